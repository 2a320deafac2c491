"""OME-Zarr reading/writing (NGFF 0.4 and 0.5) and tiled, batched prediction."""
import numpy as np
import pytest
import zarr

from pipeline_lib.embed.predict import FieldTask, predict_maps
from pipeline_lib.embed.preprocess import encoder_input, input_size, normalize_and_pad
from pipeline_lib.io.ome_zarr import (InputError, Plane2D, create_label_image, describe_store, open_field)
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.models.loading import load_model_files


@pytest.mark.parametrize("version,fmt", [("0.4", 2), ("0.5", 3)])
def test_plate_layout_and_channels(tmp_path, version, fmt):
    p = tmp_path / "p.ome.zarr"
    write_synthetic_plate(p, rows="AC", columns=[3, 11], fields=2, shape=(64, 80), nuclei=5, channels=2,
                          version=version)
    layout = describe_store(p)
    assert layout.kind == "plate" and layout.zarr_format == fmt and len(layout.fields) == 8
    assert {f.well for f in layout.fields} == {"A3", "A11", "C3", "C11"}
    img = open_field(p, layout.fields[0])
    assert img.channel_index("DAPI") == 0 and img.channel_index(1) == 1 and img.channel_index("ch1") == 1
    with pytest.raises(InputError, match="no channel named 'GFP'.*DAPI"):
        img.channel_index("GFP")
    with pytest.raises(InputError, match="out of range"):
        img.channel_index(5)
    plane = Plane2D(img, 1)
    assert plane.shape == (64, 80) and plane[(slice(0, 10), slice(5, 9))].shape == (10, 4)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_labels_are_valid_ngff_for_napari_reader(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    p = tmp_path / "p.ome.zarr"
    write_synthetic_plate(p, rows="A", columns=[1], fields=1, shape=(64, 80), nuclei=5, version=version,
                          ground_truth=False)
    img = open_field(p, "A/1/0")
    group = create_label_image(zarr.open_group(str(p / "A/1/0"), mode="a"), img, "sam", chunks=(32, 32))
    group["s0"][:] = np.arange(64 * 80, dtype=np.uint32).reshape(64, 80) % 7
    nodes = list(Reader(parse_url(str(p / "A/1/0")))())
    label_nodes = [n for n in nodes if n.metadata.get("name") == "sam" or "sam" in str(n.zarr)]
    assert label_nodes, [str(n.zarr) for n in nodes]
    data = label_nodes[0].data
    assert len(data) == img.n_levels and tuple(data[0].shape) == (64, 80)


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        describe_store(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(InputError, match="neither an OME-Zarr plate nor an image"):
        describe_store(tmp_path / "plain.zarr")


def test_tiled_prediction_stitches_inner_regions(tmp_path, tiny_model):
    model = load_model_files(tiny_model["checkpoint"], tiny_model["decoder"], device="cpu")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 4000, (150, 200)).astype(np.uint16)
    out = np.zeros((3, 150, 200), np.float16)
    n = predict_maps(model, [FieldTask("f", img, out)], tile=96, halo=16, batch_size=3)
    assert n == 6
    # tile (1, 1) of the 2 x 3 grid: inner [96:150, 96:192], outer [80:150, 80:200]; compute it directly
    import torch
    with torch.no_grad():
        x = normalize_and_pad([encoder_input(img[80:150, 80:200])])
        raw = model.decoder.forward_features(model.sam.image_encoder(x))
        ref = model.decoder.resample(raw, input_size((70, 120)), (70, 120))[0].numpy()
    np.testing.assert_allclose(out[:, 96:150, 96:192].astype(np.float32), ref[:, 16:, 16:112], atol=2e-3)
    # batch size does not change the result
    out1 = np.zeros_like(out)
    predict_maps(model, [FieldTask("f", img, out1)], tile=96, halo=16, batch_size=1)
    np.testing.assert_allclose(out1.astype(np.float32), out.astype(np.float32), atol=2e-3)
