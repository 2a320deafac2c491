# Ingest (ingest.source set): a folder of per-field image files -> the OME-Zarr plate at `input`.
#   ingest_plan (checkpoint): scan the folder, write the plate metadata and empty arrays once, batch the fields
#   ingest (CPU, one job per batch): read the files (bioio), write level 0 and the pyramid, mark each field done
#   ingest_done: every field converted, or an error listing the failed files (their batches are redone next run)
from pipeline_lib.steps.ingest import ingest_mem_mb

localrules: ingest_plan, ingest_done


checkpoint ingest_plan:
    output:
        f"{OUT}/ingest/plan.json",
    params:
        input=CFG["input"], ingest=CFG["ingest"], batching=CFG["batching"],
    log:
        f"{OUT}/logs/ingest_plan.log"
    run:
        from pipeline_lib.steps.ingest import write_ingest_plan
        logged(log, lambda: write_ingest_plan(CFG, output[0]))


rule ingest:
    input:
        plan=f"{OUT}/ingest/plan.json",
    output:
        f"{OUT}/jobs/ingest/{{batch}}.json",
    threads: 1
    resources:
        mem_mb=lambda wildcards, input, attempt: ingest_mem_mb(read_json_file(input.plan)) * attempt,
    benchmark:
        f"{OUT}/benchmarks/ingest/{{batch}}.tsv"
    log:
        f"{OUT}/logs/ingest/{{batch}}.log"
    run:
        from pipeline_lib.steps.ingest import run_ingest_batch
        logged(log, lambda: run_ingest_batch(CFG, read_json_file(input.plan), wildcards.batch, output[0]))


rule ingest_done:
    input:
        plan=f"{OUT}/ingest/plan.json",
        batches=lambda wc: expand(f"{OUT}/jobs/ingest/{{batch}}.json",
                                  batch=sorted(read_json_file(ingest_plan_json())["batches"])),
    output:
        f"{OUT}/ingest/done.json",
    log:
        f"{OUT}/logs/ingest_done.log"
    run:
        from pipeline_lib.steps.ingest import finish_ingest
        logged(log, lambda: finish_ingest(CFG, read_json_file(input.plan), input.batches, output[0]))
