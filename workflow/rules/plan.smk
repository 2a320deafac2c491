localrules: plan


checkpoint plan:
    input:
        f"{OUT}/model.json",
    output:
        f"{OUT}/plan.json",
    params:
        input=CFG["input"], channel=CFG["channel"], batching=CFG["batching"], labels=CFG["labels"],
        tiling=CFG["tiling"],
    run:
        from pipeline_lib.steps.plan import write_plan
        write_plan(CFG, output[0])
