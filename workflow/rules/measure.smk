# CPU step per batch: features of every object in every channel, the AnnData table next to each image,
# and the accuracy against `ground_truth` when it is set.
rule measure:
    input:
        plan=f"{OUT}/plan.json",
        segment=f"{OUT}/jobs/segment/{{batch}}.json",
    output:
        json=f"{OUT}/jobs/measure/{{batch}}.json",
        table=f"{OUT}/jobs/measure/{{batch}}.parquet",
    params:
        ground_truth=CFG["ground_truth"], labels=CFG["labels"],
    threads: 1
    benchmark:
        f"{OUT}/benchmarks/measure/{{batch}}.tsv"
    log:
        f"{OUT}/logs/measure/{{batch}}.log"
    run:
        from pipeline_lib.steps.measure import run_measure_batch
        logged(log, lambda: run_measure_batch(
            CFG, read_json_file(input.plan), wildcards.batch, input.segment, output.json, output.table))
