# GPU step: the method's network over the tiles of a batch of fields (SAM encoder + decoder for AIS, cellpose's
# network for cellpose_sam); writes predictions.ome.zarr chunks. The step: methods.py `predict`.
rule predict:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
    output:
        f"{OUT}/jobs/predict/{{batch}}.json",
    params:
        network=network_sections(CFG), tiling=CFG["tiling"], channel=CFG["channel"],
    threads: 4
    resources:
        gpu=1,
    benchmark:
        f"{OUT}/benchmarks/predict/{{batch}}.tsv"
    log:
        f"{OUT}/logs/predict/{{batch}}.log"
    run:
        logged(log, lambda: METHOD_SPEC.step("predict")(
            CFG, read_json_file(input.plan), wildcards.batch, read_json_file(input.model), output[0]))
