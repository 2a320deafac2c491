"""Ingest a folder of per-field image files (TIFF; CZI/ND2 via bioio plugins) into an OME-Zarr HCS plate.

The well, field and channel of each file come from its name (relative to the folder) through a pattern such
as ``{well}_s{field}_w{channel}.tif``. The plate (NGFF 0.4, zarr v2: what napari-ome-zarr reads) is created
once with all metadata and empty arrays (:func:`create_plate`); jobs then fill batches of fields
(:func:`ingest_fields`) and mark each field complete only after its data and pyramid are written, so an
interrupted job redoes exactly the fields it did not finish. :func:`export_tiffs` is the reverse.

Assumptions: every field of the plate has the size, dtype and pixel size of the first file; a file that
differs fails its field with an error naming the file.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import zarr

from . import ngff
from .ome_zarr import (UNIT_UM, InputError, Plane2D, describe_store, open_field, pixel_size_um, read_multiscale,
                       row_index, row_name)

NGFF_VERSION = "0.4"
# Default regexes of the placeholders. {channel} is lazy: directly followed by {*} it takes one character,
# so ImageXpress's `w1<GUID>` gives channel 1 even when the GUID starts with a digit (w1..w9); anywhere
# else the next literal ends it (`w{channel}.tif` matches w12 or wDAPI). Override with {channel:regex}.
PLACEHOLDERS = {
    "well": r"[A-Za-z]+\d+",
    "row": r"[A-Za-z]+",
    "column": r"\d+",
    "field": r"\d+",
    "channel": r"[A-Za-z0-9]+?",
    "plate": r"[^/]+?",
    "*": r".*?",
}
_COLORS = ["0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00"]
MAX_PIXEL_SIZE_UM = 100.0  # larger values are DPI tags of plain TIFFs, not a calibration


# ----------------------------------------------------------------------------------------------- patterns


def _tokens(pattern: str) -> Iterator[tuple[str, str, str | None]]:
    """("literal", text, None) and ("placeholder", name, regex or None) parts of ``pattern``."""
    i = 0
    while i < len(pattern):
        j = pattern.find("{", i)
        if j < 0:
            yield "literal", pattern[i:], None
            return
        if j > i:
            yield "literal", pattern[i:j], None
        depth, k = 0, j
        while k < len(pattern):
            depth += {"{": 1, "}": -1}.get(pattern[k], 0)
            if depth == 0:
                break
            k += 1
        if depth:
            raise InputError(f"ingest.pattern '{pattern}': unbalanced '{{' at position {j}.")
        name, sep, regex = pattern[j + 1:k].partition(":")
        if name not in PLACEHOLDERS:
            raise InputError(f"ingest.pattern '{pattern}': unknown placeholder {{{name}}}. Known: "
                             + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS) + " ({*} for parts to ignore).")
        yield "placeholder", name, (regex if sep else None)
        i = k + 1


def compile_pattern(pattern: str) -> re.Pattern:
    """The regex matching file paths (relative to the source folder, '/'-separated, case-insensitive).

    Placeholders become named groups ({*} an unnamed one); a repeated placeholder must repeat its value;
    everything else is literal. A well is given by {well} or by {row} and {column}.
    """
    parts, seen = [], set()
    for kind, text, regex in _tokens(pattern):
        if kind == "literal":
            parts.append(re.escape(text))
        elif text == "*":
            parts.append(f"(?:{regex or PLACEHOLDERS['*']})")
        elif text in seen:
            parts.append(f"(?P={text})")
        else:
            seen.add(text)
            parts.append(f"(?P<{text}>{regex or PLACEHOLDERS[text]})")
    if "well" not in seen and not {"row", "column"} <= seen:
        raise InputError(f"ingest.pattern '{pattern}' names no well: use {{well}} (A01) or {{row}} and {{column}}.")
    try:
        return re.compile("".join(parts), re.IGNORECASE)
    except re.error as e:
        raise InputError(f"ingest.pattern '{pattern}': invalid regex ({e}).") from e


def well_name(row: str, column: int | str) -> str:
    """ImageXpress-style well name: A01."""
    return f"{row}{int(column):02d}" if str(column).isdigit() else f"{row}{column}"


def channel_order(tokens: Iterable[str]) -> list[str]:
    """Channel tokens sorted numerically where they are numbers (w2 before w10), else alphabetically."""
    return sorted(set(tokens), key=lambda t: (0, int(t), "") if t.isdigit() else (1, 0, t.lower()))


# ----------------------------------------------------------------------------------------------- scanning


def _list_files(source: Path) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(source)
        names += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(names)


def scan_folder(source: str | os.PathLike, pattern: str) -> pd.DataFrame:
    """One row per matching file: file (relative path), plate, row, column (int), field (0-based: the file's
    field number minus the smallest on the plate), site (the number in the name) and channel ('' without
    {channel}); sorted by well, field and channel. Raises InputError for no match, several plates,
    duplicates and fields that lack a channel the others have."""
    src = Path(source)
    if not src.is_dir():
        raise InputError(f"ingest.source '{source}' is not a folder.")
    regex = compile_pattern(pattern)
    names = _list_files(src)
    rows = []
    for name in names:
        m = regex.fullmatch(name)
        if m:
            rows.append(_record(name, m.groupdict()))
    if not rows:
        raise InputError(f"no file in '{source}' matches ingest.pattern '{pattern}' ({len(names)} files"
                         + (f", e.g. {', '.join(names[:5])}" if names else "") + "). Fix the pattern: placeholders "
                         "{well} {row} {column} {field} {channel} {plate} {*}, or {name:regex}; paths are "
                         "relative to the folder (use {*}/ or the folder name for files in subfolders).")
    table = pd.DataFrame(rows)
    plates = sorted(table["plate"].unique())
    if len(plates) > 1:
        raise InputError(f"'{source}' holds files of {len(plates)} plates ({', '.join(plates[:5])}) for pattern "
                         f"'{pattern}': convert one plate per run (put its name into the pattern).")
    table["field"] = table["site"] - table["site"].min()
    order = {t: i for i, t in enumerate(channel_order(table["channel"]))}
    table["_r"] = table["row"].map(row_index)
    table["_c"] = table["channel"].map(order)
    table = table.sort_values(["_r", "column", "field", "_c"]).drop(columns=["_r", "_c"]).reset_index(drop=True)
    _check_complete(table, source, pattern, list(order))
    return table


def _record(name: str, groups: dict[str, str | None]) -> dict[str, Any]:
    if groups.get("well"):
        m = re.fullmatch(r"([A-Za-z]+)(\d+)", groups["well"])
        if not m:
            raise InputError(f"{name}: well '{groups['well']}' is not a row letter and a column number "
                             "(e.g. A01); fix the {well:regex} of ingest.pattern.")
        row, column = m.group(1), m.group(2)
    else:
        row, column = groups["row"], groups["column"]
    if not column.isdigit():
        raise InputError(f"{name}: column '{column}' is not a number; fix ingest.pattern.")
    field = groups.get("field")
    if field is not None and not field.isdigit():
        raise InputError(f"{name}: field '{field}' is not a number; fix ingest.pattern.")
    return {"file": name, "plate": groups.get("plate") or "", "row": row.upper(), "column": int(column),
            "site": int(field) if field is not None else 0, "channel": groups.get("channel") or ""}


def _check_complete(table: pd.DataFrame, source: Any, pattern: str, channels: list[str]) -> None:
    keys = ["row", "column", "field", "channel"]
    dup = table[table.duplicated(keys, keep=False)]
    if len(dup):
        lines = [f"  well {well_name(r, c)} field {s} channel '{ch}': {', '.join(g['file'])}"
                 for (r, c, s, ch), g in dup.groupby(["row", "column", "site", "channel"], sort=False)]
        raise InputError(f"{len(lines)} field(s)/channel(s) of '{source}' match ingest.pattern '{pattern}' more "
                         "than once:\n" + "\n".join(lines[:10]) + "\nMake the pattern stricter (e.g. exclude "
                         "thumbnails with {*:[0-9A-F-]{36}} for a GUID) or remove the extra files.")
    have = table.groupby(["row", "column", "site"], sort=False)["channel"].agg(set)
    missing = have[have.map(len) < len(channels)]
    if len(missing):
        lines = [f"  well {well_name(r, c)} field {s}: missing channel(s) "
                 f"{', '.join(ch for ch in channels if ch not in got)} (has {', '.join(sorted(got))})"
                 for (r, c, s), got in missing.items()]
        raise InputError(f"{len(lines)} field(s) of '{source}' lack a channel that other fields have "
                         f"(pattern '{pattern}'):\n" + "\n".join(lines[:10]) +
                         "\nAdd the missing files, or move the incomplete fields out of the folder.")


def plate_fields(table: pd.DataFrame, source: str | os.PathLike) -> list[dict[str, Any]]:
    """One dict per field (path 'A/1/0', row, column, field, well 'A01', files: absolute, in channel order)."""
    src = os.path.abspath(source)
    out = []
    for (row, column, field), g in table.groupby(["row", "column", "field"], sort=False):
        out.append({"path": f"{row}/{column}/{field}", "row": row, "column": str(column), "field": str(field),
                    "well": well_name(row, column), "files": [os.path.join(src, f) for f in g["file"]]})
    return out


# ----------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _quiet_bioio() -> Iterator[None]:
    """bioio logs a warning for every reader it tries before the one that fits (each plain TIFF)."""
    log = logging.getLogger("bioio")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def open_image(path: str | os.PathLike) -> Any:
    """A ``bioio.BioImage``; unreadable files raise InputError naming the file."""
    from bioio import BioImage
    try:
        with _quiet_bioio():
            return BioImage(str(path))
    except Exception as e:  # noqa: BLE001 - bioio plugins raise many types
        raise InputError(f"{path}: cannot open the image ({type(e).__name__}: {_first_line(e)}). Replace the "
                         "file, or for CZI/ND2 install the bioio plugin (bioio-czi, bioio-nd2).") from e


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else ""


def _selection(image: Any, path: Any) -> tuple[str, dict[str, int], int]:
    """(dimension order to read, fixed dimensions, channel count) of a 2D (multi-channel) image file."""
    if len(image.scenes) > 1:
        raise InputError(f"{path}: holds {len(image.scenes)} scenes; only one field per file is supported.")
    dims = dict(zip(image.dims.order, image.dims.shape))
    for d, what in (("T", "time points"), ("Z", "z-planes")):
        if dims.get(d, 1) > 1:
            raise InputError(f"{path}: has {dims[d]} {what}; ingest takes 2D fields (one plane per file, or "
                             "channels as C). For a multi-page TIFF of channels write them as an OME-TIFF or "
                             "ImageJ hyperstack with a channel axis, or as one file per channel.")
    if dims.get("S", 1) > 1:  # RGB(A) samples
        if dims.get("C", 1) > 1:
            raise InputError(f"{path}: has both channels and RGB samples; not supported.")
        order, n = "SYX", dims["S"]
    else:
        order, n = "CYX", dims.get("C", 1)
    fixed = {d: 0 for d in dims if d not in order and d not in "YX"}
    return order, fixed, n


@dataclass
class FileInfo:
    """What the first file says about every field: channels, size, dtype, pixel size (um) and channel names."""

    n_channels: int
    shape: tuple[int, int]
    dtype: str
    pixel_size: float | None
    channel_names: list[str]


def probe_file(path: str | os.PathLike) -> FileInfo:
    """Read the header of one file (no pixel data)."""
    image = open_image(path)
    try:
        _, _, n = _selection(image, path)
        dims = dict(zip(image.dims.order, image.dims.shape))
        names = [str(c) for c in image.channel_names] if n == dims.get("C", 1) else []
        if len(names) != n or all(re.fullmatch(r"Channel:\d+:\d+", c) for c in names):
            names = [f"c{i}" for i in range(n)]
        return FileInfo(n, (dims["Y"], dims["X"]), str(np.dtype(image.dtype)), file_pixel_size(image, path),
                        names)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot read the image header ({type(e).__name__}: {_first_line(e)}).") from e


def file_pixel_size(image: Any, path: str | os.PathLike) -> float | None:
    """Pixel size in um from the file, or None when it carries none (or an implausible one, e.g. 72 dpi).

    Plain TIFFs are read here (MetaMorph/ImageXpress calibration, ImageJ unit, resolution tags with a real
    unit), because bioio-tifffile reports unitless resolution tags (tifffile's default 1/1) as 1 um.
    """
    if type(image.reader).__module__.startswith("bioio_tifffile"):
        size = _tiff_pixel_size(path)
    else:
        size = image.physical_pixel_sizes.X
    return float(size) if size is not None and 0 < size <= MAX_PIXEL_SIZE_UM else None


def _tiff_pixel_size(path: str | os.PathLike) -> float | None:
    import tifffile
    with tifffile.TiffFile(str(path)) as tif:
        if tif.is_metaseries:
            info = (tif.metaseries_metadata or {}).get("PlaneInfo", {})
            scale = UNIT_UM.get(str(info.get("spatial-calibration-units", "")).lower())
            size = info.get("spatial-calibration-x")
            return float(size) * scale if scale and isinstance(size, (int, float)) and size > 0 else None
        tags = tif.pages.first.tags
        xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
        if xres is None:
            return None
        if tif.is_imagej:
            scale = UNIT_UM.get(str((tif.imagej_metadata or {}).get("unit", "")).lower())
        else:
            scale = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit.value) if unit is not None else 2)
        num, den = xres.value
        return scale * den / num if scale and num else None


#: Level-0 pixels per side read and written per step when a field is ingested (rounded up to a multiple of
#: the chunk and of the pyramid's 2^(levels-1)): the memory of an ingest job is bounded by this block, not by
#: the field, so that a whole-slide TIFF, CZI or ND2 streams through bioio's lazy dask reader.
INGEST_BLOCK = 4096
#: At most this many pixels per channel are read from the first field for the OMERO display windows.
WINDOW_SAMPLE_PX = 1 << 22


class FieldFiles:
    """The files of one field (channel order) opened lazily, checked against the plate's (c, y, x) shape and
    dtype from their headers; :meth:`region` reads a (c, h, w) block through bioio's dask arrays."""

    def __init__(self, files: list[str], shape: tuple[int, ...], dtype: Any):
        self.files, self.shape, self.dtype = list(files), tuple(shape), np.dtype(dtype)
        self.arrays = []
        n = 0
        for f in self.files:
            image = open_image(f)
            order, fixed, c = _selection(image, f)
            try:
                arr = image.get_image_dask_data(order, **fixed)
            except Exception as e:  # noqa: BLE001 - bioio plugins raise many types
                raise InputError(f"{f}: cannot read the pixel data ({type(e).__name__}: {_first_line(e)}).") from e
            if tuple(arr.shape[1:]) != self.shape[1:]:
                raise InputError(f"{f}: image is {arr.shape[1]}x{arr.shape[2]} pixels, but the plate's fields are "
                                 f"{self.shape[1]}x{self.shape[2]} (from the first file): all fields must have the "
                                 "same size.")
            if arr.dtype != self.dtype and not np.can_cast(arr.dtype, self.dtype, "safe"):
                raise InputError(f"{f}: pixel type {arr.dtype} does not fit the plate's {self.dtype} (from the "
                                 "first file): all files must have the same pixel type.")
            self.arrays.append(arr)
            n += c
        if n != self.shape[0]:
            raise InputError(f"{self.files[0]}: the field has {n} channel(s), the plate {self.shape[0]}.")

    def region(self, key: tuple[slice, ...]) -> np.ndarray:
        """(c, ...) pixels of ``key`` (slices or strides of y and x) in the plate's dtype."""
        parts = []
        for f, arr in zip(self.files, self.arrays):
            try:
                parts.append(np.asarray(arr[(slice(None),) + tuple(key)].compute(), dtype=self.dtype))
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{f}: cannot read the pixel data ({type(e).__name__}: {_first_line(e)}); the "
                                 "file is corrupt or truncated. Replace it (or remove it and rerun the ingest "
                                 "plan).") from e
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_field(files: list[str], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The whole (c, y, x) image of one field from its files (channel order), checked against the plate's
    shape. Small fields and tests only: :func:`ingest_field` streams blocks instead."""
    return FieldFiles(files, shape, dtype).region((slice(None), slice(None)))


def ingest_blocks(shape: tuple[int, ...], chunk: int, levels: int, block: int = INGEST_BLOCK
                  ) -> list[tuple[slice, slice]]:
    """Level-0 (y, x) blocks of the streamed ingest: sides a multiple of the chunk and of 2^(levels - 1), so
    that each block's level-k image is exactly its share of the whole field's (same rounding at the edge)."""
    unit = chunk * 2 ** (levels - 1) // math.gcd(chunk, 2 ** (levels - 1))
    step = max(unit, -(-block // unit) * unit)
    ys, xs = shape[-2:]
    return [(slice(y, min(y + step, ys)), slice(x, min(x + step, xs)))
            for y in range(0, ys, step) for x in range(0, xs, step)]


# ----------------------------------------------------------------------------------------------- the plate


@dataclass
class PlateSpec:
    """Everything :func:`create_plate` needs: the fields with their files, channels, shape and pixel size."""

    source: str
    pattern: str
    name: str
    fields: list[dict[str, Any]]
    channels: list[str]
    shape: tuple[int, int, int]  # (c, y, x)
    dtype: str
    pixel_size: float | None
    n_files: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_label(pattern: str, token: str) -> str:
    """A channel label for a token: numbers get the letters before {channel} in the pattern ('w1' for
    ImageXpress's `_w{channel}`), so that `channel: "w1"` by name never reads as an index."""
    m = re.search(r"([A-Za-z]*)\{channel(?::[^}]*)?\}", pattern)
    return f"{(m.group(1) if m else '') or 'ch'}{token}" if token.isdigit() else token


def plan_plate(source: str | os.PathLike, pattern: str, channel_names: list[str] | None = None,
               pixel_size: float | None = None) -> PlateSpec:
    """Scan ``source``, read the first file's header and settle channels, shape, dtype and pixel size."""
    table = scan_folder(source, pattern)
    fields = plate_fields(table, source)
    first = fields[0]["files"][0]
    info = probe_file(first)
    tokens = channel_order(table["channel"])
    if tokens != [""]:
        if info.n_channels != 1:
            raise InputError(f"{first}: holds {info.n_channels} channels, but ingest.pattern '{pattern}' has "
                             "{channel} (one file per channel). Drop {channel} from the pattern for "
                             "multi-channel files.")
        n, names = len(tokens), [token_label(pattern, t) for t in tokens]
    else:
        n, names = info.n_channels, info.channel_names
    if channel_names is not None:
        if len(channel_names) != n:
            raise InputError(f"ingest.channel_names has {len(channel_names)} name(s) but the files of "
                             f"'{source}' have {n} channel(s) ({', '.join(names)}): give one name per channel.")
        names = list(channel_names)
    plate = table["plate"].iloc[0] or Path(os.path.abspath(source)).name
    return PlateSpec(source=os.path.abspath(source), pattern=pattern, name=plate, fields=fields, channels=names,
                     shape=(n, *info.shape), dtype=info.dtype, pixel_size=pixel_size or info.pixel_size,
                     n_files=len(table))


def level_shapes(shape: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    """(c, y, x) of each pyramid level: 2x downsampling, rounding up; no level smaller than 1 pixel."""
    levels = max(1, min(levels, 1 + int(math.log2(max(1, min(shape[-2:]))))))
    return [(*shape[:-2], *(math.ceil(s / 2 ** k) for s in shape[-2:])) for k in range(levels)]


def _ingest_entry(spec: PlateSpec, chunk: int, levels: int) -> dict[str, Any]:
    return {"source": spec.source, "pattern": spec.pattern, "files": spec.n_files, "fields": len(spec.fields),
            "channels": list(spec.channels), "shape": list(spec.shape), "dtype": spec.dtype,
            "pixel_size": spec.pixel_size, "chunk": chunk, "levels": levels}


def existing_ingest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``ingest`` entry of a plate this module wrote at ``path``; None when nothing is there.

    Raises InputError for anything else there (a user's plate or other files): ingest never overwrites it.
    """
    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return None
    try:
        entry = zarr.open_group(str(p), mode="r").attrs.asdict().get("ingest")
    except Exception:  # noqa: BLE001 - not a zarr group at all
        entry = None
    if not isinstance(entry, dict):
        raise InputError(f"input '{path}' exists and was not written by ingest (no 'ingest' entry in its "
                         "attributes): refusing to overwrite it. Set `input` to a new path for the converted "
                         "plate, or remove ingest.source to segment this plate as it is.")
    return entry


def create_plate(path: str | os.PathLike, spec: PlateSpec, chunk: int = 1024, levels: int = 3) -> str:
    """Write the plate at ``path`` once: plate, well and image metadata and empty arrays of every level.

    Returns "reused" when a complete plate from the same source and settings is there (its converted fields
    and any labels are kept), else "created" (a plate of ours with other settings is replaced).
    """
    entry = _ingest_entry(spec, chunk, levels)
    old = existing_ingest(path)
    if old is not None:
        if old.get("complete") and {k: v for k, v in old.items() if k != "complete"} == entry:
            return "reused"
        shutil.rmtree(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["ingest"] = {**entry, "complete": False}
    ngff.write_plate(root, _plate_meta(spec), NGFF_VERSION)
    shapes = level_shapes(spec.shape, levels)
    windows = channel_windows(spec)
    first = True  # every field has the same metadata: the first is read back and validated
    wells: dict[str, list[str]] = {}
    for f in spec.fields:
        wells.setdefault(f"{f['row']}/{f['column']}", []).append(f["field"])
    for wpath, fields in wells.items():
        well = root.require_group(wpath)
        ngff.write_well(well, fields, NGFF_VERSION)
        for i in fields:
            _create_image(well.require_group(i), spec, shapes, chunk, windows, check=first)
            first = False
    root.attrs["ingest"] = {**entry, "complete": True}
    return "created"


def _plate_meta(spec: PlateSpec) -> dict[str, Any]:
    rows = sorted({f["row"] for f in spec.fields}, key=row_index)
    cols = sorted({int(f["column"]) for f in spec.fields})
    first_col = min(cols[0], 1)
    wells = {(f["row"], int(f["column"])) for f in spec.fields}
    per_well = pd.Series([f"{f['row']}/{f['column']}" for f in spec.fields]).value_counts()
    return {
        "name": spec.name,
        "rows": [{"name": row_name(i)} for i in range(row_index(rows[-1]) + 1)],
        "columns": [{"name": str(c)} for c in range(first_col, cols[-1] + 1)],
        "wells": [{"path": f"{r}/{c}", "rowIndex": row_index(r), "columnIndex": c - first_col}
                  for r, c in sorted(wells, key=lambda w: (row_index(w[0]), w[1]))],
        "field_count": int(per_well.max()),
    }


def channel_windows(spec: PlateSpec) -> list[dict[str, float]]:
    """OMERO display windows: the dtype's range, with start/end at the 0.1 and 99.9 percentiles of the first
    field per channel (the plate is created before any field is converted; the first is read once here, with
    a stride that keeps the sample under WINDOW_SAMPLE_PX pixels: identical for fields up to 4 Mpx)."""
    full = ngff.dtype_window(spec.dtype)
    stride = max(1, math.ceil(math.sqrt(spec.shape[1] * spec.shape[2] / WINDOW_SAMPLE_PX)))
    try:
        data = FieldFiles(spec.fields[0]["files"], spec.shape, spec.dtype).region(
            (slice(None, None, stride), slice(None, None, stride)))
    except (InputError, OSError, ValueError):
        return [full] * spec.shape[0]  # the field's own job reports the bad file
    lo, hi = np.percentile(data.reshape(data.shape[0], -1), [0.1, 99.9], axis=1)
    return [{**full, "start": float(a), "end": float(b) if b > a else float(a) + 1} for a, b in zip(lo, hi)]


def _create_image(group: zarr.Group, spec: PlateSpec, shapes: list[tuple[int, ...]], chunk: int,
                  windows: list[dict[str, float]], check: bool = True) -> None:
    """Empty levels and metadata of one field. Level k is the 2^k block mean of level 0, so it is centred
    (2^k - 1) / 2 level-0 pixels from level 0: that is its translation."""
    px = spec.pixel_size
    units = {"y": "micrometer", "x": "micrometer"} if px else {}
    paths = [str(k) for k in range(len(shapes))]
    ngff.create_levels(group, paths, shapes, [(1, chunk, chunk)] * len(shapes), spec.dtype, "cyx", overwrite=True)
    s0 = px or 1.0
    scales = [[1.0, s0 * 2 ** k, s0 * 2 ** k] for k in range(len(shapes))]
    shifts = [ngff.block_mean_translation([1.0, s0, s0], [1, 2 ** k, 2 ** k]) for k in range(len(shapes))]
    colors = ["FFFFFF"] if len(spec.channels) == 1 else _COLORS
    omero = ngff.omero_meta(spec.channels, [colors[i % len(colors)] for i in range(len(spec.channels))], windows)
    ngff.write_image(group, NGFF_VERSION, ngff.axes_meta("cyx", units), ngff.datasets_meta(paths, scales, shifts),
                     "image", omero=omero, downsampling=ngff.BLOCK_MEAN, check=check)


# ----------------------------------------------------------------------------------------------- filling


def downsample_mean(data: np.ndarray) -> np.ndarray:
    """2x downsampling of the last two axes by the mean of 2x2 blocks (an odd edge is repeated); integer
    images are rounded back to their dtype."""
    y, x = data.shape[-2:]
    pad = [(0, 0)] * (data.ndim - 2) + [(0, y % 2), (0, x % 2)]
    work = np.pad(data, pad, mode="edge") if (y % 2 or x % 2) else data
    ftype = np.float32 if data.dtype.itemsize <= 2 else np.float64
    blocks = work.reshape(*data.shape[:-2], work.shape[-2] // 2, 2, work.shape[-1] // 2, 2)
    mean = blocks.mean(axis=(-3, -1), dtype=ftype)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(data.dtype)
    return mean.astype(data.dtype)


def field_complete(group: zarr.Group) -> bool:
    return bool(group.attrs.asdict().get("ingest", {}).get("complete"))


def ingest_field(plate: str | os.PathLike, field: dict[str, Any], block: int = INGEST_BLOCK) -> bool:
    """Fill level 0 and the pyramid of one field from its files, block by block (:func:`ingest_blocks`: the
    job's memory is bounded by ``block``, not by the field), then mark it complete (the marker is the last
    write). Returns False when the field was complete already."""
    path = os.path.join(str(plate), field["path"])
    group = zarr.open_group(path, mode="r+")
    if field_complete(group):
        return False
    image = read_multiscale(group, path)
    level0 = image.level(0)
    files = FieldFiles(field["files"], tuple(level0.shape), level0.dtype)
    chunk = level0.chunks[-1]
    for ys, xs in ingest_blocks(level0.shape, chunk, image.n_levels, block):
        data = files.region((ys, xs))
        level0[:, ys, xs] = data
        for k in range(1, image.n_levels):
            data = downsample_mean(data)
            f = 2 ** k
            image.level(k)[:, ys.start // f:ys.start // f + data.shape[1], xs.start // f:xs.start // f + data.shape[2]] = data
    group.attrs["ingest"] = {"complete": True, "files": list(field["files"])}
    return True


def ingest_fields(plate: str | os.PathLike, fields: list[dict[str, Any]],
                  desc: str = "ingest") -> dict[str, dict[str, Any]]:
    """Ingest a batch of fields; a field that fails is reported (its error names the file), the others go on.

    Returns {field path: {"status": "ok", "reused": bool} or {"status": "failed", "error": str}}.
    """
    from ..engine.runner import run_units
    return run_units([(f["path"], f) for f in fields],
                     lambda f: {"status": "ok", "reused": not ingest_field(plate, f)}, desc)


# ----------------------------------------------------------------------------------------------- export


def format_pattern(pattern: str, values: dict[str, Any]) -> str:
    """A file name from ``pattern``: placeholders replaced by ``values`` ({*} by nothing)."""
    out = []
    for kind, text, _ in _tokens(pattern):
        if kind == "literal":
            out.append(text)
        elif text != "*":
            if text not in values:
                raise InputError(f"export pattern '{pattern}': no value for {{{text}}}.")
            out.append(str(values[text]))
    return "".join(out)


def export_tiffs(plate_path: str | os.PathLike, out_dir: str | os.PathLike,
                 pattern: str = "{well}_s{field}_w{channel}.tif", wells: list[str] | None = None) -> list[Path]:
    """Write every field (of ``wells``, e.g. ["A/2"], or all) of an OME-Zarr plate as TIFF files named by
    ``pattern`` (well A01, 1-based field s1 and channel w1). With {channel}: one plain TIFF per channel, pixel
    size in the resolution tags; without: one multi-channel OME-TIFF with channel names and pixel size."""
    import tifffile
    layout = describe_store(plate_path)
    per_channel = any(kind == "placeholder" and name == "channel" for kind, name, _ in _tokens(pattern))
    written = []
    for ref in layout.fields:
        if wells is not None and f"{ref.row}/{ref.column}" not in wells:
            continue
        image = open_field(plate_path, ref)
        n = image.shape[image.axis_names.index("c")] if "c" in image.axis_names else 1
        planes = [np.asarray(Plane2D(image, c if "c" in image.axis_names else None)[:, :]) for c in range(n)]
        px = pixel_size_um(image)
        site = int(ref.field) + 1 if ref.field.isdigit() else ref.field
        values = {"well": well_name(ref.row, ref.column), "row": ref.row,
                  "column": f"{int(ref.column):02d}" if ref.column.isdigit() else ref.column,
                  "field": site, "plate": ref.plate}
        if per_channel:
            res = {"resolution": (1e4 / px, 1e4 / px), "resolutionunit": "CENTIMETER"} if px else {}
            for c, plane in enumerate(planes):
                out = Path(out_dir) / format_pattern(pattern, {**values, "channel": c + 1})
                out.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(out, plane, photometric="minisblack", **res)
                written.append(out)
        else:
            meta: dict[str, Any] = {"axes": "CYX"}
            if image.channel_names():
                meta["Channel"] = {"Name": image.channel_names()}
            if px:
                meta.update(PhysicalSizeX=px, PhysicalSizeY=px, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
            out = Path(out_dir) / format_pattern(pattern, values)
            out.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(out, np.stack(planes), ome=True, photometric="minisblack", metadata=meta)
            written.append(out)
    return written
