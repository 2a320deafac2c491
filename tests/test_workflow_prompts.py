"""APG and AMG through the real Snakefile, with the tiny random-weight model."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from conftest import run_workflow, subset_plate
from pipeline_lib.config import ConfigError, validate_config
from pipeline_lib.embed.oracle import write_oracle_predictions
from pipeline_lib.embed.preprocess import encoder_input, normalize_and_pad
from pipeline_lib.embed.prompt_decoder import PromptDecoder, decode_points
from pipeline_lib.instances.apg import apg_segment
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa
from pipeline_lib.models.loading import load_model_files
from pipeline_lib.tiling import block_grid


@pytest.mark.slow  # end-to-end through Snakemake
def test_apg_real_plate_subset(real_plate, tiny_model, tmp_path):
    """APG on 3 real fields, prompts from oracle maps (`predictions`), SAM = the tiny model."""
    plate = subset_plate(real_plate, tmp_path / "plate.ome.zarr", ["A/2", "B/4"])
    preds = tmp_path / "oracle.ome.zarr"
    assert write_oracle_predictions(str(plate), "nuclei_gt", str(preds)) == 3
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "method": "apg", "predictions": str(preds),
           "model": {"checkpoint": tiny_model["checkpoint"], "device": "cpu"}, "tiling": {"tile": 1024},
           "labels": {"name": "apg"}, "batching": {"fields_per_job": 2}}
    run_workflow(cfg, tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "apg" and summary["status_counts"] == {"ok": 3}
    objects = pd.read_parquet(tmp_path / "out" / "objects.parquet")
    assert len(objects) == summary["n_objects"] > 0
    # the labels equal APG run directly on the same field, embedding and maps
    f = next(x for x in summary["fields"] if x["path"] == "A/2/0")
    lab = np.asarray(zarr.open_array(f"{f['labels']}/s0", mode="r"))
    assert lab.shape == (520, 696) and lab.dtype == np.uint32
    assert sorted(zarr.open_group(f["labels"], mode="r").array_keys()) == ["s0", "s1", "s2"]
    model = load_model_files(tiny_model["checkpoint"], None, device="cpu")
    img = np.asarray(zarr.open_array(f"{plate}/A/2/0/s0", mode="r"))[0]
    maps = np.asarray(zarr.open_array(f"{preds}/A/2/0/0", mode="r"), dtype=np.float32)
    with torch.no_grad():
        emb = model.sam.image_encoder(normalize_and_pad([encoder_input(img)], "cpu"))
    pd_ = PromptDecoder(model.sam)
    pd_.set_tiles(emb)
    blocks = block_grid(img.shape, 1024, 64)
    direct, info = apg_segment(maps, 1024, lambda t, p: decode_points(pd_, blocks, img.shape, t, p))
    assert msa(lab, direct) >= 0.99
    assert (objects["field"] == "0").any() and set(objects["well"]) == {"A2", "B4"}


@pytest.mark.slow  # end-to-end through Snakemake
def test_amg_synthetic_plate(tiny_model, tmp_path):
    plate = tmp_path / "plate.ome.zarr"
    write_synthetic_plate(plate, rows="A", columns=[1], fields=2, shape=(150, 190), nuclei=12)
    cfg = {"input": str(plate), "output": str(tmp_path / "out"), "method": "amg",
           "model": {"checkpoint": tiny_model["checkpoint"], "device": "cpu"},
           "tiling": {"tile": 96, "halo": 16},
           "amg": {"points_per_side": 3, "pred_iou_threshold": -1.0, "stability_score_threshold": 0.0},
           "labels": {"name": "amg"}}
    run_workflow(cfg, tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "amg" and summary["status_counts"] == {"ok": 2}
    lab = np.asarray(zarr.open_array(f"{summary['fields'][0]['labels']}/s0", mode="r"))
    assert lab.max() > 0 and len(np.unique(lab)) == lab.max() + 1  # consecutive ids
    assert not (tmp_path / "out" / "predictions.ome.zarr" / "A").exists()  # AMG has no decoder maps


def test_method_resolution_and_errors(tmp_path):
    base = {"input": "x", "output": "y"}
    assert validate_config(base)["method"] == "apg"  # vit_b_lm has a decoder
    assert validate_config(dict(base, model={"name": "vit_b"}))["method"] == "amg"  # original SAM
    assert validate_config(dict(base, predictions="p"))["method"] == "ais"
    assert validate_config(dict(base, predictions="p", method="apg"))["method"] == "apg"
    with pytest.raises(ConfigError, match="amg"):
        validate_config(dict(base, predictions="p", method="amg"))
    with pytest.raises(ConfigError, match="method"):
        validate_config(dict(base, method="cellpose"))
    with pytest.raises(ConfigError, match="nms_threshold"):
        validate_config(dict(base, apg={"nms_threshold": 2}))
