localrules: plan


checkpoint plan:
    input:
        model=f"{OUT}/model.json",
        ingested=[f"{OUT}/ingest/done.json"] if INGEST else [],
    output:
        f"{OUT}/plan.json",
    params:
        input=CFG["input"], channel=CFG["channel"], batching=CFG["batching"], labels=CFG["labels"],
        tiling=CFG["tiling"],
    log:
        f"{OUT}/logs/plan.log"
    run:
        from pipeline_lib.steps.plan import write_plan
        logged(log, lambda: write_plan(CFG, output[0]))
