# SAM-based instance segmentation of OME-Zarr plates and images.
#   snakemake --cores 4 --configfile my_config.yaml           (local)
#   snakemake --profile profiles/slurm --configfile my.yaml    (cluster)
# Data flow: model -> plan (checkpoint) -> predict (GPU, per batch) -> segment (CPU, per batch) -> aggregate
from pipeline_lib.config import validate_config

if not config:
    raise ValueError("No config given: run with --configfile FILE (see config/config.yaml and README.md).")

CFG = validate_config(config, source="the Snakemake config")
OUT = CFG["output"]
USE_MODEL = not CFG["predictions"]


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        f"{OUT}/summary.json",
        f"{OUT}/objects.parquet",
    default_target: True
