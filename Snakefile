# SAM-based instance segmentation of OME-Zarr plates and images.
#   snakemake --cores 4 --configfile my_config.yaml           (local)
#   snakemake --profile slurm --configfile my.yaml             (cluster, from the repository root)
# Data flow: model -> plan (checkpoint) -> per batch of fields:
#   ais:     predict (GPU: decoder maps) -> segment (CPU: watershed)
#   apg/amg: prompt_segment (GPU: embed, decode prompts, mask NMS)
#   (the chain of each method: pipeline_lib/methods.py; several methods: workflow/rules/methods.smk, where
#   SAM methods share one encoder pass per tile)
# -> measure (CPU: features in every channel, AnnData tables, accuracy vs ground truth) -> aggregate -> report
# A folder of TIFF/CZI/ND2 files (ingest.source) is first converted into the OME-Zarr plate at `input`.
# Volumes (single image with z > 1): workflow/rules/volume.smk (slices -> yx stitch -> 3D merge -> relabel).
from pipeline_lib.config import validate_config
from pipeline_lib.methods import get_method, method_names, method_sections, network_sections
from pipeline_lib.steps.volume_plan import input_is_volume

if not config:
    raise ValueError("No config given: run with --configfile FILE (see config/config.yaml and README.md).")

CFG = validate_config(config, source="the Snakemake config")
OUT = CFG["output"]
USE_MODEL = not CFG["predictions"]
METHOD = CFG["method"]  # "auto" is resolved by validate_config
MULTI = len(method_names(CFG)) > 1  # several methods side by side: workflow/rules/methods.smk
METHOD_SPEC = None if MULTI else get_method(METHOD)  # what it needs, which rules run it (pipeline_lib/methods.py)
INGEST = bool(CFG["ingest"]["source"])
VOLUME = not MULTI and not INGEST and input_is_volume(CFG["input"])


if MULTI:

    include: "workflow/rules/methods.smk"

    rule all:  # here, not in methods.smk: Snakemake takes the default target from the main Snakefile
        input:
            [t for m in MULTI_METHODS for t in method_targets(m)] + [f"{OUT}/methods.json", f"{OUT}/report.html"],
        default_target: True

else:

    include: "workflow/rules/common.smk"
    if INGEST:

        include: "workflow/rules/ingest.smk"

    include: "workflow/rules/model.smk"
    include: "workflow/rules/plan.smk"
    if VOLUME:

        include: "workflow/rules/volume.smk"

    elif METHOD_SPEC.chain == "predict_segment":

        include: "workflow/rules/predict.smk"
        include: "workflow/rules/segment.smk"

    else:

        include: "workflow/rules/prompt_segment.smk"

    if not VOLUME:

        include: "workflow/rules/measure.smk"
        include: "workflow/rules/aggregate.smk"

    rule all:
        input:
            [f"{OUT}/{name}" for name in ("summary.json", "objects.parquet", "report.html", "jobs/complete.json")]
            if VOLUME else
            [f"{OUT}/{name}" for name in PLATE_OUTPUTS] + [f"{OUT}/report.html", f"{OUT}/jobs/complete.json"],
        default_target: True
