# CPU step: the method's instance step (AIS watershed, Cellpose flows -> masks) on the stitched predictions,
# labels written into labels/<name> of each field.
rule segment:
    input:
        unpack(segment_inputs),
    output:
        json=f"{OUT}/jobs/segment/{{batch}}.json",
    params:
        sections=method_sections(CFG), labels=CFG["labels"], tiling=CFG["tiling"], method=CFG["method"],
    threads: 4
    benchmark:
        f"{OUT}/benchmarks/segment/{{batch}}.tsv"
    log:
        f"{OUT}/logs/segment/{{batch}}.log"
    run:
        logged(log, lambda: METHOD_SPEC.step("segment")(
            CFG, read_json_file(input.plan), wildcards.batch, input.get("predicted"), output.json, threads=threads))
