# Volumes (one OME-Zarr image with z > 1), in four passes over blocks of z_block slices x one yx tile; a job
# (batch) is a range of volume.blocks_per_job blocks in (slab, tile) order:
#   volume_segment (GPU unless AIS from `predictions`): 2D instances per slice x tile with halo (AIS with
#                   volume.instances: stack also reads a z-halo of maps: foreground decided in 3D)
#   volume_edges:   yx matches in the halo bands, z overlaps, piece sizes (needs the pass-1 blocks it reads)
#   volume_merge:   one job: union of yx matches, 3D merge across slices, compact lookup table
#   volume_relabel: apply the table, label pyramid per slab, per-object partial measurements
# -> aggregate_volume: objects.parquet (3D properties, intensities per channel), the AnnData table next to the
#    labels (tables/<labels.name>) and summary.json -> volume_report: report.html -> check_volume_complete:
#    fails the run when blocks failed, after retiring their batches (a rerun redoes just those, README
#    "Failures and resume")
# Every job records its run time and peak memory under <output>/benchmarks/ (Snakemake `benchmark:`).


rule volume_segment:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
    output:
        f"{OUT}/jobs/volume_segment/{{batch}}.json",
    benchmark:
        f"{OUT}/benchmarks/volume_segment/{{batch}}.tsv"
    params:
        method=CFG["method"], ais=CFG["ais"], apg=CFG["apg"], amg=CFG["amg"], encoder=CFG["encoder"],
        tiling=CFG["tiling"], volume=CFG["volume"], channel=CFG["channel"],
    threads: 4
    resources:
        gpu=1 if METHOD_SPEC.uses_model(CFG) else 0,
    log:
        f"{OUT}/logs/volume_segment/{{batch}}.log"
    run:
        from pipeline_lib.steps.volume_segment import run_volume_segment_batch
        logged(log, lambda: run_volume_segment_batch(
            CFG, read_json_file(input.plan), wildcards.batch, read_json_file(input.model), output[0]))


rule volume_edges:
    input:
        plan=f"{OUT}/plan.json",
        segments=edge_segment_markers,
    output:
        f"{OUT}/jobs/volume_edges/{{batch}}.npz",
    benchmark:
        f"{OUT}/benchmarks/volume_edges/{{batch}}.tsv"
    params:
        volume=CFG["volume"],
    log:
        f"{OUT}/logs/volume_edges/{{batch}}.log"
    run:
        from pipeline_lib.steps.volume_stitch import run_volume_edges_batch
        logged(log, lambda: run_volume_edges_batch(
            CFG, read_json_file(input.plan), wildcards.batch, input.segments, output[0]))


rule volume_merge:
    input:
        plan=f"{OUT}/plan.json",
        segments=segment_markers,
        edges=lambda wc: expand(f"{OUT}/jobs/volume_edges/{{batch}}.npz", batch=batch_ids(wc)),
    output:
        lut=f"{OUT}/volume/lut.npy",
        json=f"{OUT}/volume/merge.json",
    benchmark:
        f"{OUT}/benchmarks/volume_merge.tsv"
    params:
        volume=CFG["volume"],
    log:
        f"{OUT}/logs/volume_merge.log"
    run:
        from pipeline_lib.steps.volume_stitch import run_volume_merge
        logged(log, lambda: run_volume_merge(
            CFG, read_json_file(input.plan), input.segments, input.edges, output.lut, output.json))


rule volume_relabel:
    input:
        plan=f"{OUT}/plan.json",
        segments=segment_markers,
        lut=f"{OUT}/volume/lut.npy",
        merge=f"{OUT}/volume/merge.json",
    output:
        json=f"{OUT}/jobs/volume_relabel/{{batch}}.json",
        table=f"{OUT}/jobs/volume_relabel/{{batch}}.parquet",
    benchmark:
        f"{OUT}/benchmarks/volume_relabel/{{batch}}.tsv"
    log:
        f"{OUT}/logs/volume_relabel/{{batch}}.log"
    run:
        from pipeline_lib.steps.volume_relabel import run_volume_relabel_batch
        logged(log, lambda: run_volume_relabel_batch(
            CFG, read_json_file(input.plan), wildcards.batch, input.segments, input.lut, output.json, output.table,
            input.merge))


localrules: aggregate_volume, volume_report, check_volume_complete


rule aggregate_volume:
    input:
        plan=f"{OUT}/plan.json",
        model=f"{OUT}/model.json",
        segments=segment_markers,
        merge=f"{OUT}/volume/merge.json",
        jsons=lambda wc: expand(f"{OUT}/jobs/volume_relabel/{{batch}}.json", batch=batch_ids(wc)),
        tables=lambda wc: expand(f"{OUT}/jobs/volume_relabel/{{batch}}.parquet", batch=batch_ids(wc)),
    output:
        summary=f"{OUT}/summary.json",
        objects=f"{OUT}/objects.parquet",
    log:
        f"{OUT}/logs/aggregate_volume.log"
    run:
        from pipeline_lib.steps.volume_relabel import aggregate_volume
        logged(log, lambda: aggregate_volume(
            CFG, read_json_file(input.plan), read_json_file(input.model), input.segments, input.merge, input.tables,
            output.summary, output.objects))


rule volume_report:
    input:
        summary=f"{OUT}/summary.json",
        objects=f"{OUT}/objects.parquet",
    output:
        f"{OUT}/report.html",
    params:
        report=CFG["report"],
    log:
        f"{OUT}/logs/volume_report.log"
    run:
        from pipeline_lib.report.volume import run_volume_report
        logged(log, lambda: run_volume_report(CFG, OUT, input.summary, input.objects))


rule check_volume_complete:
    input:
        segments=segment_markers,  # a retired (missing) marker makes its batch and what follows run again
        summary=f"{OUT}/summary.json",
        report=f"{OUT}/report.html",
    output:
        f"{OUT}/jobs/complete.json",
    params:
        rerun_failed=CFG["batching"]["rerun_failed"],
    log:
        f"{OUT}/logs/check_volume_complete.log"
    run:
        from pipeline_lib.steps.volume_relabel import check_volume_complete
        logged(log, lambda: check_volume_complete(CFG, OUT, output[0]))
