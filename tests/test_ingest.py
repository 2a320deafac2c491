"""Ingest: per-field image files (ImageXpress-style names) -> OME-Zarr plate, and the export back to TIFFs."""
import json

import numpy as np
import pytest
import tifffile
import zarr

from pipeline_lib.config import validate_config
from pipeline_lib.io.ingest import (compile_pattern, create_plate, downsample_mean, export_tiffs, ingest_fields,
                                    plan_plate, probe_file, scan_folder)
from pipeline_lib.io.ome_zarr import InputError, describe_store, open_field
from pipeline_lib.io.synthetic import write_synthetic_plate
from pipeline_lib.steps.ingest import finish_ingest, run_ingest_batch, write_ingest_plan

GUID = "3A7F2B4C-1D2E-4F50-8A9B-0C1D2E3F4A5B"


def touch(folder, *names):
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    return folder


def ingest(src, out, pattern="{well}_s{field}_w{channel}.tif", channel_names=None, pixel_size=None, levels=3,
           chunk=64):
    spec = plan_plate(src, pattern, channel_names, pixel_size)
    create_plate(out, spec, chunk=chunk, levels=levels)
    status = ingest_fields(out, spec.fields)
    assert all(s["status"] == "ok" for s in status.values()), status
    return spec


def assert_same_images(a, b, wells=None):
    la, lb = describe_store(a), describe_store(b)
    fa = [f.path for f in la.fields if wells is None or f"{f.row}/{f.column}" in wells]
    assert fa == [f.path for f in lb.fields]
    for path in fa:
        np.testing.assert_array_equal(open_field(a, path).level(0)[:], open_field(b, path).level(0)[:])


# ----------------------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("pattern,name,expect", [
    ("{well}_s{field}_w{channel}.tif", "B12_s10_w2.TIF", {"well": "B12", "field": "10", "channel": "2"}),
    ("{well}_s{field}_w{channel}.tif", "A01_s1_wDAPI.tif", {"well": "A01", "field": "1", "channel": "DAPI"}),
    # ImageXpress: the wavelength is followed by a GUID, which may start with digits
    ("{*}_{well}_s{field}_w{channel}{*}.tif", f"Week1_150607_B02_s3_w1{GUID}.tif",
     {"well": "B02", "field": "3", "channel": "1"}),
    ("{*}_{well}_s{field}_w{channel}{*}.tif", "Week1_150607_B02_s3_w2" + "9" + GUID[1:] + ".tif",
     {"well": "B02", "field": "3", "channel": "2"}),
    ("{plate}/r{row}c{column}f{field}-ch{channel}.tiff", "P1/rCc07f3-ch2.tiff",
     {"plate": "P1", "row": "C", "column": "07", "field": "3", "channel": "2"}),
    ("{row}{column}_{field}_{channel}.tif", "AB12_4_GFP.tif", {"row": "AB", "column": "12", "channel": "GFP"}),
    ("{well}_s{field}_w{channel:\\d{2}}.tif", "A01_s1_w12.tif", {"channel": "12"}),
    ("{well}/{well}_s{field}.tif", "C03/C03_s1.tif", {"well": "C03", "field": "1"}),
])
def test_compile_pattern(pattern, name, expect):
    m = compile_pattern(pattern).fullmatch(name)
    assert m, (pattern, name)
    assert {k: m.group(k) for k in expect} == expect


def test_pattern_rejects():
    assert not compile_pattern("{well}/{well}_s{field}.tif").fullmatch("C03/C04_s1.tif")
    assert not compile_pattern("{well}_s{field}_w{channel:\\d{2}}.tif").fullmatch("A01_s1_w1.tif")
    for pattern, msg in [("{well}_{site}.tif", r"unknown placeholder \{site\}"),
                         ("{field}_{channel}.tif", r"names no well"), ("{well}_{field.tif", "unbalanced")]:
        with pytest.raises(InputError, match=msg):
            compile_pattern(pattern)


# ----------------------------------------------------------------------------------------------- scanning


def test_scan_folder(tmp_path):
    src = touch(tmp_path / "src", *[f"TimePoint_1/A{c:02d}_s{s}_w{w}{GUID}.tif"
                                    for c in (1, 12) for s in (1, 2) for w in (1, 2, 10)], "notes.txt",
                "TimePoint_1/.hidden_A01_s1_w1.tif")
    # w10 + a GUID is ambiguous for {*} (channel takes one character): reported as duplicates, and a GUID
    # regex for the suffix resolves it
    with pytest.raises(InputError, match=r"(?s)more than once.*well A01 field 1 channel '1'.*_w10"):
        scan_folder(src, "TimePoint_1/{well}_s{field}_w{channel}{*}.tif")
    table = scan_folder(src, "TimePoint_1/{well}_s{field}_w{channel}{*:[0-9A-F-]{36}}.tif")
    assert len(table) == 12 and sorted(set(table["field"])) == [0, 1] and set(table["site"]) == {1, 2}
    assert list(table["channel"][:3]) == ["1", "2", "10"]  # numeric order
    assert set(table["row"]) == {"A"} and set(table["column"]) == {1, 12}

    with pytest.raises(InputError, match=r"(?s)no file in '.*src' matches ingest.pattern '\{well\}_s\{field\}"
                                         r"_w\{channel\}.tif'.*TimePoint_1/A01_s1_w1"):
        scan_folder(src, "{well}_s{field}_w{channel}.tif")
    with pytest.raises(InputError, match="not a folder"):
        scan_folder(tmp_path / "nope", "{well}.tif")


def test_scan_folder_missing_channel_and_duplicates(tmp_path):
    src = touch(tmp_path / "a", "A01_s1_w1.tif", "A01_s1_w2.tif", "B03_s2_w1.tif", "B03_s2_w2.tif", "B03_s3_w1.tif")
    with pytest.raises(InputError, match=r"well B03 field 3: missing channel\(s\) 2 \(has 1\)"):
        scan_folder(src, "{well}_s{field}_w{channel}.tif")
    src = touch(tmp_path / "b", f"A01_s1_w1{GUID}.tif", "A01_s1_w1_thumb.tif")
    with pytest.raises(InputError, match=r"(?s)more than once.*well A01 field 1 channel '1'.*_thumb"):
        scan_folder(src, "{well}_s{field}_w{channel}{*}.tif")
    assert len(scan_folder(src, "{well}_s{field}_w{channel}{*:[0-9A-F-]{36}}.tif")) == 1


# ----------------------------------------------------------------------------------------------- round trip


def test_roundtrip_synthetic_plate(tmp_path):
    """Plate -> ImageXpress-style TIFFs -> plate: identical level 0, metadata napari can read, mean pyramid."""
    src = tmp_path / "src.ome.zarr"
    write_synthetic_plate(src, rows="AB", columns=(1, 3), fields=2, shape=(100, 130), nuclei=5, channels=2)
    files = export_tiffs(src, tmp_path / "tifs")
    assert len(files) == 16 and {f.name for f in files} >= {"A01_s1_w1.tif", "B03_s2_w2.tif"}
    out = tmp_path / "out.ome.zarr"
    spec = ingest(tmp_path / "tifs", out, channel_names=["DAPI", "ch1"], levels=3)
    assert spec.shape == (2, 100, 130) and spec.dtype == "uint16" and spec.pixel_size is None

    assert_same_images(src, out)
    layout = describe_store(out)
    assert layout.version == "0.4" and layout.zarr_format == 2
    plate = layout.plate_meta
    assert [r["name"] for r in plate["rows"]] == ["A", "B"] and [c["name"] for c in plate["columns"]] == ["1", "2", "3"]
    assert {(w["path"], w["rowIndex"], w["columnIndex"]) for w in plate["wells"]} == {
        ("A/1", 0, 0), ("A/3", 0, 2), ("B/1", 1, 0), ("B/3", 1, 2)}
    assert plate["field_count"] == 2 and plate["name"] == "tifs"
    img = open_field(out, "B/3/1")
    assert img.channel_names() == ["DAPI", "ch1"] and img.axis_names == ["c", "y", "x"]
    assert [img.level(k).shape for k in range(3)] == [(2, 100, 130), (2, 50, 65), (2, 25, 33)]
    assert [img.scale(k) for k in range(3)] == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0], [1.0, 4.0, 4.0]]
    assert img.level(0).chunks == (1, 64, 64)
    level0 = img.level(0)[:]
    np.testing.assert_array_equal(img.level(1)[:], downsample_mean(level0))
    np.testing.assert_array_equal(img.level(2)[:], downsample_mean(downsample_mean(level0)))

    # napari-ome-zarr reads through ome_zarr.reader: the plate node and the field images
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    nodes = list(Reader(parse_url(str(out)))())
    assert nodes[0].metadata["metadata"]["plate"]["field_count"] == 2
    assert tuple(nodes[0].data[0].shape) == (2, 200, 390)  # 2 x 3 wells of field 0 stitched, empty A/2, B/2
    node = list(Reader(parse_url(str(out / "A/3/0")))())[0]
    assert node.metadata["channel_names"] == ["DAPI", "ch1"] and len(node.data) == 3
    np.testing.assert_array_equal(np.asarray(node.data[0]), open_field(src, "A/3/0").level(0)[:])

    # a second run reuses the plate and every converted field
    assert create_plate(out, spec, chunk=64, levels=3) == "reused"
    assert all(s["reused"] for s in ingest_fields(out, spec.fields).values())
    assert zarr.open_group(str(out)).attrs["ingest"]["files"] == 16


def test_downsample_mean_rounds_and_repeats_odd_edge():
    a = np.array([[[0, 1, 10], [2, 3, 20], [7, 7, 65535]]], dtype=np.uint16)
    np.testing.assert_array_equal(downsample_mean(a), [[[2, 15], [7, 65535]]])
    assert downsample_mean(np.ones((3, 5), np.float32)).shape == (2, 3)


def test_multichannel_files_and_pixel_size(tmp_path):
    """Without {channel}: one OME-TIFF per field, channel names and pixel size read from the file."""
    src = tmp_path / "src.ome.zarr"
    write_synthetic_plate(src, rows="A", columns=(2,), fields=2, shape=(64, 80), nuclei=5, channels=3)
    calibrated = tmp_path / "cal.ome.zarr"
    export_tiffs(src, tmp_path / "plain")
    ingest(tmp_path / "plain", calibrated, channel_names=["DAPI", "ch1", "ch2"], pixel_size=0.65, levels=2)
    img = open_field(calibrated, "A/2/0")
    assert img.scale(0) == [1.0, 0.65, 0.65] and img.scale(1) == [1.0, 1.3, 1.3]
    assert img.axes[2] == {"name": "x", "type": "space", "unit": "micrometer"}

    files = export_tiffs(calibrated, tmp_path / "ome", pattern="{well}_s{field}.tif")
    assert [f.name for f in files] == ["A02_s1.tif", "A02_s2.tif"]
    spec = ingest(tmp_path / "ome", tmp_path / "back.ome.zarr", pattern="{well}_s{field}.tif")
    assert spec.channels == ["DAPI", "ch1", "ch2"] and spec.pixel_size == pytest.approx(0.65)
    assert_same_images(src, tmp_path / "back.ome.zarr")

    export_tiffs(calibrated, tmp_path / "res")  # plain TIFFs: pixel size in the resolution tags
    spec = plan_plate(tmp_path / "res", "{well}_s{field}_w{channel}.tif")
    assert spec.channels == ["w1", "w2", "w3"] and spec.pixel_size == pytest.approx(0.65, rel=1e-6)


def test_pixel_size_from_tiff_tags(tmp_path):
    a = np.zeros((32, 40), np.uint16)
    tifffile.imwrite(tmp_path / "none.tif", a)  # tifffile's default 1/1 without unit: not a calibration
    tifffile.imwrite(tmp_path / "dpi.tif", a, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "cm.tif", a, resolution=(1e4 / 0.325, 1e4 / 0.325), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    desc = ('<MetaData><PlaneInfo><prop id="spatial-calibration-x" type="float" value="0.645"/>'
            '<prop id="spatial-calibration-units" type="string" value="um"/></PlaneInfo></MetaData>')
    tifffile.imwrite(tmp_path / "mm.tif", a, description=desc, software="MetaSeries", metadata=None)
    sizes = {n: probe_file(tmp_path / f"{n}.tif").pixel_size for n in ("none", "dpi", "cm", "ij", "mm")}
    assert sizes["none"] is None and sizes["dpi"] is None
    assert sizes["cm"] == pytest.approx(0.325) and sizes["ij"] == pytest.approx(0.5)
    assert sizes["mm"] == pytest.approx(0.645)
    assert probe_file(tmp_path / "cm.tif").shape == (32, 40)


# ----------------------------------------------------------------------------------------------- errors


def test_bad_files(tmp_path):
    src = tmp_path / "z"
    src.mkdir()
    tifffile.imwrite(src / "A01_s1.tif", np.zeros((3, 16, 16), np.uint16), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(InputError, match=r"A01_s1.tif: has 3 z-planes"):
        plan_plate(src, "{well}_s{field}.tif")
    (src / "A01_s1.tif").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"A01_s1.tif: cannot open the image"):
        plan_plate(src, "{well}_s{field}.tif")
    (src / "A01_s1.tif").unlink()
    tifffile.imwrite(src / "A01_s1_w1.tif", np.zeros((2, 16, 16), np.uint16), ome=True, metadata={"axes": "CYX"})
    with pytest.raises(InputError, match=r"holds 2 channels, but ingest.pattern .* has \{channel\}"):
        plan_plate(src, "{well}_s{field}_w{channel}.tif")
    with pytest.raises(InputError, match=r"channel_names has 1 name\(s\) but .* 2 channel"):
        plan_plate(src, "{well}_s{field}_w1.tif", channel_names=["DAPI"])


def test_refuses_to_overwrite_a_foreign_plate(tmp_path):
    write_synthetic_plate(tmp_path / "user.zarr", rows="A", columns=(1,), fields=1, shape=(32, 32), nuclei=2)
    export_tiffs(tmp_path / "user.zarr", tmp_path / "tifs")
    spec = plan_plate(tmp_path / "tifs", "{well}_s{field}_w{channel}.tif")
    with pytest.raises(InputError, match=r"'.*user.zarr' exists and was not written by ingest"):
        create_plate(tmp_path / "user.zarr", spec)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("x")
    with pytest.raises(InputError, match="refusing to overwrite"):
        create_plate(tmp_path / "other", spec)
    assert (tmp_path / "user.zarr" / "A/1/0/s0").exists() and (tmp_path / "other" / "data.txt").exists()
    # a plate of ours written with other settings is replaced
    assert create_plate(tmp_path / "mine.zarr", spec, chunk=64) == "created"
    assert create_plate(tmp_path / "mine.zarr", spec, chunk=128) == "created"
    assert open_field(tmp_path / "mine.zarr", "A/1/0").level(0).chunks == (1, 32, 32)


def test_steps_corrupt_file_fails_its_field_only(tmp_path):
    """A truncated TIFF fails its field (error names the file), the rest converts; finish_ingest stops the run
    with the list; after the file is replaced, the rerun redoes only that field."""
    src = tmp_path / "src.ome.zarr"
    write_synthetic_plate(src, rows="AB", columns=(1, 2), fields=2, shape=(48, 64), nuclei=4)
    tifs = tmp_path / "tifs"
    export_tiffs(src, tifs)
    bad = tifs / "B02_s1_w1.tif"
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])
    cfg = validate_config({"input": str(tmp_path / "plate.ome.zarr"), "output": str(tmp_path / "out"),
                           "ingest": {"source": str(tifs), "chunk": 64, "levels": 2},
                           "batching": {"fields_per_job": 3}})
    plan = write_ingest_plan(cfg, tmp_path / "out/ingest/plan.json")
    assert sorted(plan["batches"]) == ["b0000", "b0001", "b0002"] and plan["n_fields"] == 8
    assert json.loads((tmp_path / "out/ingest/plan.json").read_text())["batches"]["b0000"][0]["path"] == "A/1/0"
    jsons = [str(tmp_path / f"out/jobs/ingest/{b}.json") for b in sorted(plan["batches"])]
    results = [run_ingest_batch(cfg, plan, b, j) for b, j in zip(sorted(plan["batches"]), jsons)]
    status = {k: v for r in results for k, v in r["fields"].items()}
    assert status["B/2/0"]["status"] == "failed" and "B02_s1_w1.tif" in status["B/2/0"]["error"]
    assert [k for k, v in status.items() if v["status"] == "ok"] == [
        "A/1/0", "A/1/1", "A/2/0", "A/2/1", "B/1/0", "B/1/1", "B/2/1"]
    with pytest.raises(InputError, match=r"(?s)1 of 8 field\(s\).*B/2/0: .*B02_s1_w1.tif.*Replace the broken"):
        finish_ingest(cfg, plan, jsons, tmp_path / "out/ingest/done.json")
    assert not (tmp_path / "out/ingest/done.json").exists()
    assert not (tmp_path / "out/jobs/ingest/b0002.json").exists()  # moved aside: the batch is redone

    bad.write_bytes(good)
    rerun = run_ingest_batch(cfg, plan, "b0002", jsons[2])["fields"]
    assert rerun == {"B/2/0": {"status": "ok", "reused": False}, "B/2/1": {"status": "ok", "reused": True}}
    done = finish_ingest(cfg, plan, jsons, tmp_path / "out/ingest/done.json")
    assert done["n_fields"] == 8 and done["reused_fields"] == 1
    assert_same_images(src, tmp_path / "plate.ome.zarr")
    assert write_ingest_plan(cfg, tmp_path / "out/ingest/plan.json")["plate"] == "reused"


def test_real_plate_roundtrip(real_plate, tmp_path):
    """Two wells of the BBBC039 plate exported as ImageXpress-style TIFFs and ingested again are identical."""
    wells = ["A/16", "B/21"]  # 2 and 3 fields
    files = export_tiffs(real_plate, tmp_path / "tifs", pattern="{well}_s{field}_w{channel}" + GUID + ".tif",
                         wells=wells)
    assert len(files) == 5 and all(f.name.endswith(GUID + ".tif") for f in files)
    ingest(tmp_path / "tifs", tmp_path / "plate.ome.zarr", pattern="{well}_s{field}_w{channel}{*}.tif")
    assert_same_images(real_plate, tmp_path / "plate.ome.zarr", wells=set(wells))


def test_streamed_ingest_equals_whole_field_and_reads_a_tiled_tiff_lazily(tmp_path):
    """One large (tiled, as whole-slide TIFFs are) file per field, ingested block by block (blocks smaller than
    the field, odd edges): level 0 and every pyramid level equal the whole-field read and its block means."""
    from pipeline_lib.io.ingest import FieldFiles, ingest_blocks, ingest_field, read_field
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    img = rng.integers(0, 4000, (2, 301, 267), dtype=np.uint16)
    tifffile.imwrite(src / "A01_s1.tif", img, photometric="minisblack", tile=(64, 64),
                     metadata={"axes": "CYX"})
    spec = plan_plate(src, "{well}_s{field}.tif")
    out = tmp_path / "out.ome.zarr"
    create_plate(out, spec, chunk=32, levels=3)
    assert ingest_blocks(spec.shape, 32, 3, block=64)[:2] == [(slice(0, 64), slice(0, 64)),
                                                              (slice(0, 64), slice(64, 128))]
    assert ingest_field(out, spec.fields[0], block=40)  # rounded up to 64 (chunk 32, 2^2): 5 x 5 blocks
    field = open_field(out, describe_store(out).fields[0].path)
    np.testing.assert_array_equal(field.level(0)[:], img)
    np.testing.assert_array_equal(read_field(spec.fields[0]["files"], img.shape, img.dtype), img)
    np.testing.assert_array_equal(field.level(1)[:], downsample_mean(img))
    np.testing.assert_array_equal(field.level(2)[:], downsample_mean(downsample_mean(img)))
    lazy = FieldFiles(spec.fields[0]["files"], img.shape, img.dtype)
    assert lazy.arrays[0].npartitions > 1  # bioio's dask array follows the file's tiles: nothing read up front
    np.testing.assert_array_equal(lazy.region((slice(100, 164), slice(7, 9))), img[:, 100:164, 7:9])
