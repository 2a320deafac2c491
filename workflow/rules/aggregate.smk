localrules: aggregate, report

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
    run:
        from pipeline_lib.steps.aggregate import aggregate
        aggregate(CFG, read_json_file(input.plan), read_json_file(input.model), input.jsons, input.tables, OUT,
                  [str(p) for p in workflow.configfiles])


rule report:
    input:
        [f"{OUT}/{name}" for name in PLATE_OUTPUTS if name != "objects.parquet"],
    output:
        f"{OUT}/report.html",
    params:
        report=CFG["report"],
    run:
        from pipeline_lib.steps.report import run_report
        run_report(CFG, OUT)
