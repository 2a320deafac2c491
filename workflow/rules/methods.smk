# Several methods side by side (`method: [apg, ais, ...]`): this workflow once per method, as a Snakemake
# module whose config is that method's (pipeline_lib.methods.method_config): labels/<labels.name>_<method>
# and the method's outputs (plan, tables, metrics, report) under <output>/methods/<method>/. Then
# <output>/methods.json lists, per field, the label image of each method (for the comparison of methods).
# Each method runs its own jobs (SAM embeddings are not yet shared between the SAM methods). The modules'
# local rules (submit host: model download, plan, aggregate, report) are declared local here by their
# prefixed names; a method added to pipeline_lib/methods.py needs its block below.
from pipeline_lib.io.ome_zarr import read_json, write_json_atomic
from pipeline_lib.methods import method_config, method_output, methods_index
from pipeline_lib.steps.logs import logged

localrules: methods_index, compare_report

MAIN_SNAKEFILE = workflow.main_snakefile
MULTI_METHODS = method_names(CFG)


def _per_method_resources():
    """The profile's (or --set-resources/--set-threads) per-rule settings apply to each method's copy of the
    rule too (`predict` -> `ais_predict`, ...), so the GPU partition of the slurm profile still applies. Uses
    Snakemake's parsed settings (9.x); skipped where they are not there."""
    settings = workflow.resource_settings
    for attr in ("_parsed_overwrite_resources", "_parsed_overwrite_threads"):
        table = getattr(settings, attr, None)
        if isinstance(table, dict):
            for rule, value in list(table.items()):
                for m in MULTI_METHODS:
                    table.setdefault(f"{m}_{rule}", value)


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

    use rule * from apg exclude all as apg_*


if "ais" in MULTI_METHODS:

    module ais:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "ais")

    use rule * from ais exclude all as ais_*


if "amg" in MULTI_METHODS:

    module amg:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "amg")

    use rule * from amg exclude all as amg_*


if "cellpose_sam" in MULTI_METHODS:

    module cellpose_sam:
        snakefile:
            MAIN_SNAKEFILE
        config:
            method_config(CFG, "cellpose_sam")

    use rule * from cellpose_sam exclude all as cellpose_sam_*



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
