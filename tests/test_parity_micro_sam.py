"""Parity with micro-sam itself (skipped where micro-sam is not installed: `make bench-env` installs it).

Same tiny random-weight model, same image embedding, same decoder maps on both sides; compares the APG
prompts (identical), the APG label images (mSA >= 0.99) and AIS (identical labels).
"""
import numpy as np
import pytest
import torch
import zarr

micro_sam = pytest.importorskip("micro_sam", reason="micro-sam not installed (make bench-env)")

from micro_sam.instance_segmentation import (AutomaticPromptGenerator, InstanceSegmentationWithDecoder,  # noqa: E402
                                             _derive_point_prompts)
from segment_anything import SamPredictor  # noqa: E402

from pipeline_lib.embed.oracle import oracle_maps  # noqa: E402
from pipeline_lib.embed.preprocess import encoder_input, input_size, normalize_and_pad  # noqa: E402
from pipeline_lib.embed.prompt_decoder import PromptDecoder, decode_points  # noqa: E402
from pipeline_lib.instances.ais import AISParams, ais_single  # noqa: E402
from pipeline_lib.instances.apg import apg_segment  # noqa: E402
from pipeline_lib.instances.prompts import apg_points  # noqa: E402
from pipeline_lib.io.synthetic import blob_field  # noqa: E402
from pipeline_lib.measure.metrics import mean_segmentation_accuracy as msa  # noqa: E402
from pipeline_lib.models.tiny import build_tiny  # noqa: E402
from pipeline_lib.tiling import block_grid  # noqa: E402


def _fields(real_plate_path):
    img, lab = blob_field((300, 380), n=40, seed=11)
    out = [("synthetic", img, lab)]
    if real_plate_path.exists():
        g = zarr.open_group(str(real_plate_path), mode="r")
        for p in ("A/2/0", "A/9/0"):
            out.append((p, np.asarray(g[f"{p}/s0"])[0], np.asarray(g[f"{p}/labels/nuclei_gt/s0"])[0]))
    return out


def _setup(img, lab):
    sam, decoder = build_tiny(0)
    with torch.no_grad():
        emb = sam.image_encoder(normalize_and_pad([encoder_input(img)], "cpu"))
    pred = SamPredictor(sam)
    pred.features, pred.original_size, pred.input_size = emb, img.shape, input_size(img.shape)
    pred.is_image_set = True
    return sam, decoder, emb, pred, oracle_maps(lab)


def test_apg_matches_micro_sam():
    from conftest import PLATE
    for name, img, lab in _fields(PLATE):
        sam, decoder, emb, pred, maps = _setup(img, lab)
        ref_pts = _derive_point_prompts(*maps)["points"][:, 0, ::-1]
        ours_pts = apg_points(maps)  # the same points; micro-sam's order follows elf's 512-blockwise labelling
        assert np.array_equal(ours_pts[np.lexsort(ours_pts.T[::-1])], ref_pts[np.lexsort(ref_pts.T[::-1])]), name
        ms = AutomaticPromptGenerator(pred, decoder)
        ms._foreground, ms._center_distances, ms._boundary_distances = maps
        ms._is_initialized = True
        ref = ms.generate()
        pd = PromptDecoder(sam)
        pd.set_tiles(emb)
        blocks = block_grid(img.shape, max(img.shape))
        ours, _ = apg_segment(maps, max(img.shape),
                              lambda t, p, pd=pd, blocks=blocks, shape=img.shape: decode_points(pd, blocks, shape, t, p))
        assert ref.max() > 5, name
        assert msa(ours, ref) >= 0.99, (name, msa(ours, ref))


def test_ais_matches_micro_sam():
    from conftest import PLATE
    for name, img, lab in _fields(PLATE):
        _, decoder, _, pred, maps = _setup(img, lab)
        ms = InstanceSegmentationWithDecoder(pred, decoder)
        ms._foreground, ms._center_distances, ms._boundary_distances = maps
        ms._is_initialized = True
        ref = ms.generate()
        ours = ais_single(maps, AISParams())
        assert np.array_equal(ours.astype(np.int64), ref.astype(np.int64)), name
