import json

from pipeline_lib.steps.logs import logged  # stderr of each run: step into its log: file


def load_plan():
    with checkpoints.plan.get().output[0].open() as f:
        return json.load(f)


def batch_ids(wildcards):
    return sorted(load_plan()["batches"])


def read_json_file(path):
    with open(path) as f:
        return json.load(f)


# Input functions of segment.smk, ingest.smk, volume.smk (`snakemake --lint`: functions and rules in separate files)
# segment.smk: the AIS step waits for the predict job of its batch unless the maps are given
def segment_inputs(wildcards):
    inputs = {"plan": f"{OUT}/plan.json"}
    if USE_MODEL:
        inputs["predicted"] = f"{OUT}/jobs/predict/{wildcards.batch}.json"
    return inputs


# ingest.smk
def ingest_plan_json():
    return checkpoints.ingest_plan.get().output[0]


# volume.smk
def segment_markers(wildcards):
    return expand(f"{OUT}/jobs/volume_segment/{{batch}}.json", batch=batch_ids(wildcards))


def edge_segment_markers(wildcards):
    """The pass-1 markers of the blocks an edge job reads (a rerun of one segment batch redoes only these)."""
    from pipeline_lib.steps.volume_plan import edge_inputs
    batches = edge_inputs(load_plan(), wildcards.batch, CFG["volume"]["merge"]["max_gap"] + 1)
    return expand(f"{OUT}/jobs/volume_segment/{{batch}}.json", batch=batches)
