localrules: aggregate, report, check_complete

PLATE_OUTPUTS = ["summary.json", "objects.parquet", "fields.csv", "wells.csv", "plate.csv", "provenance.json"] + (
    ["metrics.csv"] if CFG["ground_truth"] else [])


rule aggregate:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
        jsons=lambda wc: expand(f"{OUT}/jobs/measure/{{batch}}.json", batch=batch_ids(wc)),
        tables=lambda wc: expand(f"{OUT}/jobs/measure/{{batch}}.parquet", batch=batch_ids(wc)),
    output:
        [f"{OUT}/{name}" for name in PLATE_OUTPUTS],
    params:
        ground_truth=CFG["ground_truth"], report=CFG["report"],
    log:
        f"{OUT}/logs/aggregate.log"
    run:
        from pipeline_lib.steps.aggregate import aggregate
        logged(log, lambda: aggregate(
            CFG, read_json_file(input.plan), read_json_file(input.model), input.jsons, input.tables, OUT,
            [str(p) for p in workflow.configfiles]))


rule report:
    input:
        [f"{OUT}/{name}" for name in PLATE_OUTPUTS if name != "objects.parquet"],
    output:
        f"{OUT}/report.html",
    params:
        report=CFG["report"],
    log:
        f"{OUT}/logs/report.log"
    run:
        from pipeline_lib.steps.report import run_report
        logged(log, lambda: run_report(CFG, OUT))


# The last step: fails the run when fields failed, after retiring their batches so that the next run
# recomputes exactly those (batching.rerun_failed; see README "Failures and resume").
rule check_complete:
    input:
        plan=f"{OUT}/plan.json",
        markers=lambda wc: expand(f"{OUT}/jobs/measure/{{batch}}.json", batch=batch_ids(wc)),
        summary=f"{OUT}/summary.json",
        report=f"{OUT}/report.html",
    output:
        f"{OUT}/jobs/complete.json",
    params:
        rerun_failed=CFG["batching"]["rerun_failed"],
    log:
        f"{OUT}/logs/check_complete.log"
    run:
        from pipeline_lib.steps.aggregate import check_complete
        logged(log, lambda: check_complete(CFG, read_json_file(input.plan), OUT, output[0]))
