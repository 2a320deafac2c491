localrules: aggregate


rule aggregate:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
        jsons=lambda wc: expand(f"{OUT}/jobs/segment/{{batch}}.json", batch=batch_ids(wc)),
        tables=lambda wc: expand(f"{OUT}/jobs/segment/{{batch}}.parquet", batch=batch_ids(wc)),
    output:
        summary=f"{OUT}/summary.json",
        objects=f"{OUT}/objects.parquet",
    run:
        from pipeline_lib.steps.aggregate import aggregate
        aggregate(CFG, read_json_file(input.plan), read_json_file(input.model), input.jsons, input.tables,
                  output.summary, output.objects)
