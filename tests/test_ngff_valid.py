"""Every store the project writes is valid NGFF: validated group by group with ome-zarr-models (plate, well,
image, labels, label image) and opened with ngio (plate, image, label, table), as Fractal users open them.
Stores come from the library functions and the step functions directly (no Snakemake: seconds)."""
import os

import numpy as np
import pytest
import zarr

from pipeline_lib.config import validate_config
from pipeline_lib.embed.oracle import write_oracle_predictions
from pipeline_lib.io.ingest import create_plate, export_tiffs, ingest_fields, plan_plate
from pipeline_lib.io.ome_zarr import create_label_image, ngff, open_field
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.io.synthetic_volume import write_synthetic_volume
from pipeline_lib.steps.measure import run_measure_batch
from pipeline_lib.steps.plan import write_plan
from pipeline_lib.steps.segment import run_segment_batch

import ngio  # noqa: E402,I001 - after pipeline_lib.io (which imports ome_zarr_models first: io/ngff.py)

VERSIONS = ["0.4", "0.5"]


def _models(version):
    if version == "0.5":
        from ome_zarr_models.v05 import hcs, image, image_label, labels, well
    else:
        from ome_zarr_models.v04 import hcs, image, image_label, labels, well
    return hcs, well, image, labels, image_label


def _group(path):
    return zarr.open_group(str(path), mode="r")


def validate_image(path, version, label_names=()):
    """The image group, its labels group and each named label image; returns the image model."""
    _, _, image, labels, image_label = _models(version)
    img = image.Image.from_zarr(_group(path))
    if label_names:
        listed = labels.Labels.from_zarr(_group(f"{path}/labels"))
        assert set(label_names) <= set(listed.ome_attributes.labels)
        for name in label_names:
            lab = image_label.ImageLabel.from_zarr(_group(f"{path}/labels/{name}"))
            source = lab.ome_attributes.image_label.source
            assert source is None or not os.path.isabs(source.image)  # NGFF: a relative path
    return img


def validate_plate(path, version, label_names=()):
    """Plate, every well and every field image (with ``label_names``); returns the field paths."""
    hcs, well, _, _, _ = _models(version)
    plate = hcs.HCS.from_zarr(_group(path))
    fields = []
    for w in plate.ome_attributes.plate.wells:
        wm = well.Well.from_zarr(_group(f"{path}/{w.path}"))
        for im in wm.ome_attributes.well.images:
            validate_image(f"{path}/{w.path}/{im.path}", version, label_names)
            fields.append(f"{w.path}/{im.path}")
    assert fields
    return fields


def ngio_plate(path, label_names=(), table=None):
    """Open the plate with ngio, then each image, its labels and ``table``; returns the first image."""
    plate = ngio.open_ome_zarr_plate(str(path))
    first = None
    for rel in plate.images_paths():
        row, col, fld = rel.split("/")
        container = plate.get_image(row, col, fld)
        image = container.get_image()
        assert image.shape
        assert set(label_names) <= set(container.list_labels())
        for name in label_names:
            lab = container.get_label(name)
            assert lab.shape == tuple(s for s, a in zip(image.shape, image.axes) if a != "c")
        if table:
            assert table in container.list_tables()
            df = container.get_table(table).dataframe
            assert len(df) == int(np.unique(container.get_label(label_names[0]).get_array()).size - 1)
        first = first or container
    return first


def _translation(dataset):
    for t in dataset.coordinateTransformations:
        if t.type == "translation":
            return list(t.translation)
    return None


# ----------------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("version", VERSIONS)
def test_synthetic_plate(tmp_path, version):
    p = tmp_path / "plate.ome.zarr"
    write_synthetic_plate(p, rows="AB", columns=(1, 2), fields=2, shape=(64, 80), nuclei=4, version=version)
    assert len(validate_plate(p, version, ["nuclei_gt"])) == 8
    ngio_plate(p, ["nuclei_gt"])


@pytest.mark.parametrize("version", VERSIONS)
def test_synthetic_volume_and_its_labels(tmp_path, version):
    """The volume and its GT in place, then volume labels made by the plan step, in place and in a
    labels.store (its root a placeholder image of the volume)."""
    vol = tmp_path / "vol.ome.zarr"
    write_synthetic_volume(vol, shape=(8, 64, 64), version=version, predictions=str(tmp_path / "maps.ome.zarr"))
    validate_image(vol, version, ["nuclei_gt"])
    validate_image(tmp_path / "maps.ome.zarr", version)
    ngio.open_ome_zarr_container(str(tmp_path / "maps.ome.zarr")).get_image()
    for store in (None, str(tmp_path / "labels.ome.zarr")):
        cfg = validate_config({"input": str(vol), "output": str(tmp_path / "out"),
                               "predictions": str(tmp_path / "maps.ome.zarr"),
                               "labels": {"store": store}, "tiling": {"tile": 32, "halo": 8}})
        write_plan(cfg, str(tmp_path / "out/plan.json"))
        root = store or vol
        validate_image(root, version, ["sam"])
        container = ngio.open_ome_zarr_container(str(root))
        assert container.get_label("sam").shape == (8, 64, 64) and container.get_image().shape == (1, 8, 64, 64)


# ----------------------------------------------------------------------------------------------- ingest


def test_ingested_plate(tmp_path):
    """TIFFs -> plate: OMERO windows (NGFF 0.4 requires them; ngio opens no image without), block-mean levels
    centred on their blocks; labels made on it are strided picks and keep level 0's placement."""
    src = tmp_path / "src.ome.zarr"
    write_synthetic_plate(src, rows="A", columns=(1, 2), fields=2, shape=(64, 80), nuclei=4, channels=2)
    export_tiffs(src, tmp_path / "tifs")
    out = tmp_path / "plate.ome.zarr"
    spec = plan_plate(tmp_path / "tifs", "{well}_s{field}_w{channel}.tif", ["DAPI", "GFP"], 0.5)
    create_plate(out, spec, chunk=32, levels=3)
    assert all(s["status"] == "ok" for s in ingest_fields(out, spec.fields).values())
    validate_plate(out, "0.4")
    first = ngio_plate(out)
    assert first.channel_labels == ["DAPI", "GFP"]
    img = validate_image(out / "A/1/0", "0.4")
    ds = img.datasets[0]
    assert [_translation(d) for d in ds] == [None, [0.0, 0.25, 0.25], [0.0, 0.75, 0.75]]  # 0.5 um * (2^k-1)/2
    ms = img.attributes.multiscales[0]
    assert ms.type == "mean" and ms.metadata["method"].endswith("downsample_mean")
    window = img.attributes.omero.channels[0].window
    assert window.min == 0 and window.max == 65535 and window.start < window.end

    image = open_field(out, "A/1/0")
    group = create_label_image(zarr.open_group(str(out / "A/1/0"), mode="a"), image, "sam", chunks=(32, 32))
    validate_image(out / "A/1/0", "0.4", ["sam"])
    from ome_zarr_models.v04.image_label import ImageLabel
    lab = ImageLabel.from_zarr(group)
    assert [_translation(d) for d in lab.attributes.multiscales[0].datasets] == [None] * 3
    assert lab.attributes.multiscales[0].type == "nearest"
    assert ngio.open_ome_zarr_container(str(out / "A/1/0")).get_label("sam").shape == (64, 80)


# ----------------------------------------------------------------------------------------------- the workflow's stores


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mirror", [False, True], ids=["in_place", "labels_store"])
def test_workflow_stores(tmp_path, version, mirror):
    """Predictions store, label images (in the input or in a labels.store mirror) and the AnnData tables the
    plan, segment and measure steps write: all validate, and ngio opens plate, image, label and table."""
    p = tmp_path / "plate.ome.zarr"
    write_synthetic_plate(p, rows="A", columns=(1, 2), fields=2, shape=(64, 80), nuclei=4, version=version)
    pred = tmp_path / "oracle.ome.zarr"
    write_oracle_predictions(str(p), "nuclei_gt", str(pred), chunk=32)
    validate_plate(pred, version)
    assert ngio_plate(pred).get_image().shape == (3, 64, 80)
    store = str(tmp_path / "labels.ome.zarr") if mirror else None
    cfg = validate_config({"input": str(p), "output": str(tmp_path / "out"), "predictions": str(pred),
                           "labels": {"store": store}, "tiling": {"tile": 32, "halo": 8},
                           "batching": {"fields_per_job": 8}})
    plan = write_plan(cfg, str(tmp_path / "out/plan.json"))
    seg = str(tmp_path / "out/seg.json")
    run_segment_batch(cfg, plan, "b0000", None, seg)
    run_measure_batch(cfg, plan, "b0000", seg, str(tmp_path / "out/m.json"), str(tmp_path / "out/m.parquet"))
    root = store or str(p)
    validate_plate(root, version, ["sam"])
    ngio_plate(root, ["sam"], table="sam")
    group = zarr.open_group(f"{root}/A/1/0/labels/sam", mode="r")
    meta, _ = ngff(group)
    colors = meta["image-label"]["colors"]
    n = int(zarr.open_array(f"{root}/A/1/0/labels/sam/s0", mode="r")[:].max())
    assert n > 0 and [c["label-value"] for c in colors] == list(range(n + 1)) and colors[0]["rgba"][3] == 0
    if mirror:  # the source points at the real image, relative to the label group
        src = os.path.normpath(os.path.join(f"{root}/A/1/0/labels/sam", meta["image-label"]["source"]["image"]))
        assert src == os.path.normpath(f"{p}/A/1/0")
        placeholder, _ = ngff(zarr.open_group(f"{root}/A/1/0", mode="r"))
        assert not any(c["active"] for c in placeholder["omero"]["channels"])
