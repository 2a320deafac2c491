# GPU step: encoder + decoder over the tiles of a batch of fields; writes predictions.ome.zarr chunks.
rule predict:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
    output:
        f"{OUT}/jobs/predict/{{batch}}.json",
    params:
        encoder=CFG["encoder"], tiling=CFG["tiling"], channel=CFG["channel"],
    threads: 4
    resources:
        gpu=1,
    benchmark:
        f"{OUT}/benchmarks/predict/{{batch}}.tsv"
    log:
        f"{OUT}/logs/predict/{{batch}}.log"
    run:
        import sys
        from pipeline_lib.steps.predict import run_predict_batch
        logged(log, lambda: run_predict_batch(
            CFG, read_json_file(input.plan), wildcards.batch, read_json_file(input.model), output[0]))
