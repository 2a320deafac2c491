# CPU step: AIS on the stitched maps, labels written into labels/<name> of each field.
def segment_inputs(wildcards):
    inputs = {"plan": f"{OUT}/plan.json"}
    if USE_MODEL:
        inputs["predicted"] = f"{OUT}/jobs/predict/{wildcards.batch}.json"
    return inputs


rule segment:
    input:
        unpack(segment_inputs),
    output:
        json=f"{OUT}/jobs/segment/{{batch}}.json",
    params:
        ais=CFG["ais"], labels=CFG["labels"], tiling=CFG["tiling"], method=CFG["method"],
    threads: 4
    run:
        from pipeline_lib.steps.segment import run_segment_batch
        run_segment_batch(CFG, read_json_file(input.plan), wildcards.batch, input.get("predicted"),
                          output.json, threads=threads)
