# Several methods side by side (`method: [apg, ais, ...]`): this workflow once per method, as a Snakemake
# module whose config is that method's (pipeline_lib.methods.method_config): labels/<labels.name>_<method>
# and the method's outputs (plan, tables, metrics, report) under <output>/methods/<method>/. Then
# <output>/methods.json lists, per field, the label image of each method (for the comparison of methods).
# SAM embeddings are computed once for the methods that share them (registry field `embeddings`;
# pipeline_lib.methods.shared_embeddings: two or more, one of them apg or amg): their modules' GPU rules
# (predict / prompt_segment) are left out, one `shared_embeddings` GPU job per batch encodes each field once
# and writes every sharer's labels (apg, amg) and decoder maps (apg, and ais, whose CPU segment rule then
# reads them; pipeline_lib/steps/shared_embeddings.py), and a local `<method>_adopt` rule per sharer writes
# that method's batch marker (its field statuses, and the job its embeddings came from). Not shared: volumes
# (each method runs its own jobs) and, within the shared job, fields larger than tiling.field_block (each
# sharer's own blockwise path). The modules' local rules (submit host: model download, plan, aggregate,
# report) are declared local here by their prefixed names; a method added to pipeline_lib/methods.py needs
# its block below.
from pipeline_lib.io.ome_zarr import read_json, write_json_atomic
from pipeline_lib.methods import method_config, method_output, methods_index, shared_embeddings
from pipeline_lib.steps.logs import logged

localrules: methods_index, compare_report

MAIN_SNAKEFILE = workflow.main_snakefile
MULTI_METHODS = method_names(CFG)
MULTI_VOLUME = input_is_volume(CFG["input"])
SHARED = None if MULTI_VOLUME else shared_embeddings(CFG)  # {"lead", "methods"} or None
SHARING = SHARED["methods"] if SHARED else []


def _per_method_resources():
    """The profile's (or --set-resources/--set-threads) per-rule settings apply to each method's copy of the
    rule too (`predict` -> `ais_predict`, ...), so the GPU partition of the slurm profile still applies; a
    profile without a `shared_embeddings` entry gives that job its `prompt_segment` settings. Uses
    Snakemake's parsed settings (9.x); skipped where they are not there."""
    settings = workflow.resource_settings
    for attr in ("_parsed_overwrite_resources", "_parsed_overwrite_threads"):
        table = getattr(settings, attr, None)
        if isinstance(table, dict):
            for rule, value in list(table.items()):
                for m in MULTI_METHODS:
                    table.setdefault(f"{m}_{rule}", value)
            if "prompt_segment" in table:
                table.setdefault("shared_embeddings", table["prompt_segment"])


_per_method_resources()
# the modules' rules that run on the submit host (plates and volumes), by their prefixed names
LOCAL_RULES = ("model", "plan", "aggregate", "report", "check_complete", "aggregate_volume", "volume_report",
               "check_volume_complete")
workflow.localrules(*(f"{m}_{r}" for m in MULTI_METHODS for r in LOCAL_RULES))


def method_targets(name):
    out = method_output(CFG, name)
    return [f"{out}/summary.json", f"{out}/report.html", f"{out}/jobs/complete.json"]


if "apg" in MULTI_METHODS:

    module apg:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "apg")

    if "apg" in SHARING:  # its GPU rule (prompt_segment) is the shared job + apg_adopt below

        use rule * from apg exclude all, prompt_segment as apg_*

    else:

        use rule * from apg exclude all as apg_*


if "ais" in MULTI_METHODS:

    module ais:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "ais")

    if "ais" in SHARING:  # its GPU rule (predict) is the shared job + ais_adopt below

        use rule * from ais exclude all, predict as ais_*

    else:

        use rule * from ais exclude all as ais_*


if "amg" in MULTI_METHODS:

    module amg:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "amg")

    if "amg" in SHARING:  # its GPU rule (prompt_segment) is the shared job + amg_adopt below

        use rule * from amg exclude all, prompt_segment as amg_*

    else:

        use rule * from amg exclude all as amg_*


if "cellpose_sam" in MULTI_METHODS:

    module cellpose_sam:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "cellpose_sam")

    use rule * from cellpose_sam exclude all as cellpose_sam_*


if SHARING:
    # One GPU job per batch: every sharer's labels / maps from one encoder pass per field.
    rule shared_embeddings:
        input:
            plans=[f"{method_output(CFG, m)}/plan.json" for m in SHARING],
            models=[f"{method_output(CFG, m)}/model.json" for m in SHARING],  # each method's model checks first
        output:
            f"{OUT}/jobs/shared_embeddings/{{batch}}.json",
        params:
            methods=SHARING, sections={m: method_sections(method_config(CFG, m)) for m in SHARING},
            encoder=CFG["encoder"], tiling=CFG["tiling"], labels=CFG["labels"], channel=CFG["channel"],
        threads: 4
        resources:
            gpu=1,
        benchmark:
            f"{OUT}/benchmarks/shared_embeddings/{{batch}}.tsv"
        log:
            f"{OUT}/logs/shared_embeddings/{{batch}}.log"
        run:
            from pipeline_lib.steps.shared_embeddings import run_shared_batch
            logged(log, lambda: run_shared_batch(CFG, SHARED, dict(zip(SHARING, map(read_json, input.plans))),
                                                 wildcards.batch, read_json(input.models[0]), output[0]))

    # Per sharer, on the submit host: its batch marker (where its module's GPU rule would write it).
    workflow.localrules(*(f"{m}_adopt" for m in SHARING))
    for _m in SHARING:

        rule:
            name:
                f"{_m}_adopt"
            input:
                f"{OUT}/jobs/shared_embeddings/{{batch}}.json",
            output:
                f"{method_output(CFG, _m)}/jobs/{get_method(_m).network_marker}/{{batch}}.json",
            params:
                method=_m,
            log:
                f"{method_output(CFG, _m)}/logs/adopt/{{batch}}.log"
            run:
                from pipeline_lib.steps.shared_embeddings import adopt_shared_batch
                logged(log, lambda: adopt_shared_batch(input[0], params.method, output[0]))


rule methods_index:
    input:
        plans=[f"{method_output(CFG, m)}/plan.json" for m in MULTI_METHODS],
    output:
        f"{OUT}/methods.json",
    log:
        f"{OUT}/logs/methods_index.log"
    run:
        logged(log, lambda: write_json_atomic(output[0], methods_index(
            CFG, {m: read_json(p) for m, p in zip(MULTI_METHODS, input.plans)})))



# The comparison of the methods (plates, 2D images, volumes): agreement per field and method pair, accuracy per
# method with ground truth, and <output>/report.html with the "Methods side by side" section and links to
# each method's report (pipeline_lib/steps/compare.py, pipeline_lib/report/compare.py).
rule compare:
    input:
        index=f"{OUT}/methods.json",
        summaries=[f"{method_output(CFG, m)}/summary.json" for m in MULTI_METHODS],
    output:
        f"{OUT}/comparison/summary.json",
    benchmark:
        f"{OUT}/benchmarks/compare.tsv"
    log:
        f"{OUT}/logs/compare.log"
    run:
        from pipeline_lib.steps.compare import run_compare
        logged(log, lambda: run_compare(CFG, read_json(input.index), MULTI_METHODS, OUT))


rule compare_report:
    input:
        f"{OUT}/comparison/summary.json",
    output:
        f"{OUT}/report.html",
    log:
        f"{OUT}/logs/compare_report.log"
    run:
        from pipeline_lib.report.compare import write_comparison_report
        logged(log, lambda: write_comparison_report(OUT, MULTI_METHODS))
