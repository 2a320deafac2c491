# Runs on the submit host (local rule): compute nodes often have no internet.
localrules: model


rule model:
    output:
        f"{OUT}/model.json",
    params:
        model=CFG["model"], method=CFG["method"], predictions=CFG["predictions"],
        cellpose=[CFG["cellpose"]["model"], CFG["cellpose"]["cache_dir"]],
    log:
        f"{OUT}/logs/model.log"
    run:
        from pipeline_lib.steps.model import resolve_model
        from pipeline_lib.io.ome_zarr import write_json_atomic
        logged(log, lambda: write_json_atomic(output[0], resolve_model(CFG)))
