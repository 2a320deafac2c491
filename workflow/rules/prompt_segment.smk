# GPU step for APG / AMG: per batch of fields, embed each field, decode its prompts (batched across
# tiles), mask NMS, and write labels/<name> of each field plus the batch's object table.
rule prompt_segment:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
    output:
        json=f"{OUT}/jobs/segment/{{batch}}.json",
    params:
        method=CFG["method"], sections=method_sections(CFG), encoder=CFG["encoder"], tiling=CFG["tiling"],
        labels=CFG["labels"], channel=CFG["channel"],
    threads: 4
    resources:
        gpu=1,
    benchmark:
        f"{OUT}/benchmarks/prompt_segment/{{batch}}.tsv"
    log:
        f"{OUT}/logs/prompt_segment/{{batch}}.log"
    run:
        logged(log, lambda: METHOD_SPEC.step("segment")(
            CFG, read_json_file(input.plan), wildcards.batch, read_json_file(input.model), output.json))
