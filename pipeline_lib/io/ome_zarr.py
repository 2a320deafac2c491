"""Read OME-Zarr plates and images (NGFF 0.4 on zarr v2, 0.5 on zarr v3); writing lives in io/ngff.py.

Metadata is written once by the planning step; worker jobs only write array chunks (concurrent edits of
the same JSON are what corrupts stores). Arrays are always read lazily through zarr slicing.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zarr

# NGFF metadata is written in one place, io/ngff.py; these names stay importable from here.
from .ngff import (create_label_image, create_predictions_image, mirror_plate, versioned,  # noqa: F401
                   write_ngff)


class InputError(ValueError):
    """The input store is not what the config says it is; the message names the path and the fix."""


# ----------------------------------------------------------------------------------------------- metadata


def open_group(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise InputError(f"'{path}' is not a zarr group (no .zgroup / zarr.json found).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_metadata(path, e) from e


_METADATA_FILES = ("zarr.json", ".zgroup", ".zattrs", ".zarray")


def bad_metadata(path: str | os.PathLike, error: Exception) -> InputError:
    """An InputError naming the metadata file(s) under ``path`` that are not valid JSON (truncated, corrupt)."""
    bad = []
    for name in _METADATA_FILES:
        f = os.path.join(str(path), name)
        try:
            json.loads(Path(f).read_bytes())
        except FileNotFoundError:
            continue
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            bad.append(f)
    where = ", ".join(bad) or f"the zarr metadata under '{path}'"
    return InputError(f"{where}: not valid JSON ({error}); the file is truncated or corrupt. Restore it from "
                      "the source data (or rewrite it) and run again.")


def open_level(group: zarr.Group, path: str, where: str) -> zarr.Array:
    """Array ``path`` of ``group``; a missing level or broken metadata becomes an InputError naming it."""
    try:
        return group[path]
    except KeyError:
        raise InputError(f"'{where}': the multiscales metadata lists level '{path}' but the array is "
                         "missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_metadata(os.path.join(where, path), e) from e


def ngff(group: zarr.Group) -> tuple[dict, str]:
    """(NGFF attributes, version): 0.5 keeps them under ``ome``, 0.4 at the top level."""
    attrs = group.attrs.asdict()
    if "ome" in attrs:
        return dict(attrs["ome"]), str(attrs["ome"].get("version", "0.5"))
    version = "0.4"
    for key in ("multiscales", "plate", "well"):
        if key in attrs:
            entry = attrs[key][0] if key == "multiscales" else attrs[key]
            version = str(entry.get("version", version))
            break
    return attrs, version


def zarr_format(group: zarr.Group) -> int:
    return int(group.metadata.zarr_format)


# ----------------------------------------------------------------------------------------------- images


@dataclass
class Multiscale:
    """One NGFF multiscale image: axes, level paths and their scale transforms."""

    group: zarr.Group
    path: str
    version: str
    axes: list[dict]
    datasets: list[dict]
    omero: dict | None = None
    name: str = "image"

    @property
    def axis_names(self) -> list[str]:
        return [a["name"] for a in self.axes]

    def level(self, i: int = 0) -> zarr.Array:
        return open_level(self.group, self.datasets[i]["path"], self.path)

    @property
    def n_levels(self) -> int:
        return len(self.datasets)

    def scale(self, i: int = 0) -> list[float]:
        for t in self.datasets[i].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                return [float(s) for s in t["scale"]]
        return [1.0] * len(self.axes)

    @cached_property
    def shape(self) -> tuple[int, ...]:
        """Level-0 shape (read once: opening an array is a metadata read, slow on network filesystems)."""
        return tuple(self.level(0).shape)

    def channel_names(self) -> list[str]:
        if not self.omero:
            return []
        return [str(c.get("label", "")) for c in self.omero.get("channels", [])]

    def channel_index(self, channel: int | str) -> int | None:
        """Index of the channel chosen by index or by OMERO label; None when the image has no c axis."""
        names = self.axis_names
        if "c" not in names:
            if channel in (0, None) or (isinstance(channel, str) and channel in self.channel_names()):
                return None
            raise InputError(f"{self.path}: the image has no channel axis (axes {names}), but channel "
                             f"'{channel}' was requested. Use channel: 0.")
        n = self.shape[names.index("c")]
        if isinstance(channel, bool) or channel is None:
            channel = 0
        if isinstance(channel, int):
            if not -n <= channel < n:
                raise InputError(f"{self.path}: channel index {channel} is out of range; the image has {n} "
                                 f"channel(s) {self.channel_names() or ''}.")
            return channel % n
        labels = self.channel_names()
        if channel in labels:
            return labels.index(channel)
        if str(channel).isdigit():
            return self.channel_index(int(channel))
        raise InputError(f"{self.path}: no channel named '{channel}'. Channels in the OMERO metadata: "
                         f"{labels or 'none (select the channel by index)'}.")

    def spatial_axes(self) -> list[str]:
        return [a for a in self.axis_names if a in ("z", "y", "x")]


#: Length units (NGFF axes, TIFF tags) in micrometres.
UNIT_UM = {"micrometer": 1.0, "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0,
            "\\u00b5m": 1.0, "nanometer": 1e-3, "nm": 1e-3, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4,
            "cm": 1e4}


def pixel_size_um(image: Multiscale) -> float | None:
    """The x pixel size at level 0 in micrometres, when the x axis carries a length unit."""
    i = image.axis_names.index("x")
    factor = UNIT_UM.get(str(image.axes[i].get("unit", "")).lower())
    return image.scale(0)[i] * factor if factor else None


def read_multiscale(group: zarr.Group, path: str = "") -> Multiscale:
    meta, version = ngff(group)
    if "multiscales" not in meta:
        raise InputError(f"'{path}' has no NGFF 'multiscales' metadata: is this an OME-Zarr image? "
                         "For a plate give the plate root, for a single image the image group.")
    ms = meta["multiscales"][0]
    axes = ms.get("axes")
    if axes is None:  # NGFF <= 0.3 had no axes: assume tczyx truncated from the left
        ndim = len(group[ms["datasets"][0]["path"]].shape)
        axes = [{"name": n} for n in "tczyx"[5 - ndim:]]
    axes = [a if isinstance(a, dict) else {"name": a} for a in axes]
    names = [a["name"] for a in axes]
    if "y" not in names or "x" not in names:
        raise InputError(f"'{path}': axes {names} lack y and x; cannot segment this image.")
    image = Multiscale(group=group, path=path, version=version, axes=axes, datasets=ms["datasets"],
                       omero=meta.get("omero"), name=ms.get("name", "image"))
    check_axes(image)
    return image


def check_axes(image: Multiscale) -> None:
    """Every level has one dimension per NGFF axis (else a (1, 520, 696) array with axes [y, x] would be
    read as a 1 x 520 strip); caches the level-0 shape."""
    for k in range(image.n_levels):
        shape = tuple(image.level(k).shape)
        if len(shape) != len(image.axes):
            meta = "zarr.json" if image.version.startswith("0.5") else ".zattrs"
            raise InputError(
                f"'{image.path}': the NGFF axes {image.axis_names} name {len(image.axes)} dimensions but level "
                f"'{image.datasets[k]['path']}' has {len(shape)} (shape {shape}). Fix 'axes' in "
                f"{os.path.join(image.path, meta)} to name every dimension of the arrays (e.g. "
                f"{list('tczyx'[5 - len(shape):]) if len(shape) <= 5 else '...'}).")
        if k == 0:
            image.__dict__["shape"] = shape


# ----------------------------------------------------------------------------------------------- plates


def row_name(index: int) -> str:
    """Row label of a 0-based row index: A..Z, then AA, AB, .. (1536-well plates use A..AF)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def row_index(name: str) -> int | None:
    """0-based index of a letter row label (inverse of ``row_name``); None when it is not letters."""
    name = str(name).strip().upper()
    if not re.fullmatch(r"[A-Z]+", name):
        return None
    index = 0
    for ch in name:
        index = index * 26 + (ord(ch) - ord("A") + 1)
    return index - 1


@dataclass(frozen=True)
class FieldRef:
    """One field of view: where it lives relative to the store root and its plate coordinates."""

    path: str  # relative to the store root, "" for a single image
    plate: str
    well: str  # e.g. "A12" ("" for a single image)
    row: str
    column: str
    field: str

    @property
    def key(self) -> str:
        """A filesystem-safe unique name for this field."""
        return self.path.replace("/", "_") if self.path else "image"

    def to_dict(self) -> dict:
        return {"path": self.path, "plate": self.plate, "well": self.well, "row": self.row,
                "column": self.column, "field": self.field}


@dataclass
class StoreLayout:
    """What the input store is (plate or image) and its fields."""

    root: str
    kind: str  # "plate" | "image"
    version: str
    zarr_format: int
    fields: list[FieldRef]
    plate_meta: dict | None = None
    well_meta: dict[str, dict] = field(default_factory=dict)


def describe_store(path: str | os.PathLike) -> StoreLayout:
    """Enumerate the fields of an HCS plate, or the single image, at ``path``."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"input '{path}' does not exist.")
    root = open_group(path, "r")
    meta, version = ngff(root)
    name = Path(path.rstrip("/")).name
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if "plate" in meta:
        plate = meta["plate"]
        name = str(plate.get("name") or "").removesuffix(".ome.zarr").removesuffix(".zarr") or name  # NGFF name
        fields, wells = [], {}
        for w in plate.get("wells", []):
            wpath = w["path"]
            try:
                wgroup = root[wpath]
            except KeyError:
                raise InputError(f"{path}: plate metadata lists well '{wpath}' but the group is missing.") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad_metadata(os.path.join(path, wpath), e) from e
            wmeta, _ = ngff(wgroup)
            if "well" not in wmeta:
                raise InputError(f"{path}/{wpath}: well group has no NGFF 'well' metadata.")
            wells[wpath] = wmeta["well"]
            row, col = wpath.split("/")[:2]
            for img in wmeta["well"].get("images", []):
                fields.append(FieldRef(path=f"{wpath}/{img['path']}", plate=name, well=f"{row}{col}", row=row,
                                       column=col, field=str(img["path"])))
        if not fields:
            raise InputError(f"{path}: the plate lists no fields.")
        return StoreLayout(path, "plate", version, zarr_format(root), fields, plate_meta=plate, well_meta=wells)
    if "multiscales" in meta:
        return StoreLayout(path, "image", version, zarr_format(root),
                           [FieldRef(path="", plate=name, well="", row="", column="", field="0")])
    if "well" in meta:
        raise InputError(f"'{path}' is a single well; give the plate root (its parent's parent) as input.")
    raise InputError(f"'{path}' is neither an OME-Zarr plate nor an image (no 'plate' or 'multiscales' "
                     "metadata). Convert the data to OME-Zarr first (e.g. with bioio or bioformats2raw).")


def open_field(root: str | os.PathLike, ref: FieldRef | str) -> Multiscale:
    rel = ref.path if isinstance(ref, FieldRef) else ref
    group = open_group(os.path.join(str(root), rel) if rel else str(root), "r")
    return read_multiscale(group, os.path.join(str(root), rel) if rel else str(root))


def plane_selector(image: Multiscale, channel: int | None, allow_z: bool = False) -> tuple:
    """Index tuple selecting (y, x) (or (z, y, x) with ``allow_z``) of one channel at level 0."""
    sel: list[Any] = []
    for name, size in zip(image.axis_names, image.shape):
        if name == "c":
            sel.append(channel if channel is not None else 0)
        elif name == "t":
            if size != 1:
                raise InputError(f"{image.path}: has {size} time points; only single time points are supported. "
                                 "Split the time series into separate images.")
            sel.append(0)
        elif name == "z":
            if size != 1 and not allow_z:
                raise InputError(f"{image.path}: is a 3D volume with {size} z-slices; plate fields must be 2D. "
                                 "Give a volume as its own input (the OME-Zarr image group) to segment it in 3D.")
            sel.append(slice(None) if allow_z else 0)
        elif name in ("y", "x"):
            sel.append(slice(None))
        else:
            raise InputError(f"{image.path}: unknown axis '{name}'.")
    return tuple(sel)


def read_region(array: Any, index: tuple, source: str, region: Any) -> np.ndarray:
    """``array[index]`` as numpy; a failed read becomes an InputError naming ``source`` and ``region``."""
    try:
        return np.asarray(array[index])
    except Exception as e:  # noqa: BLE001 - name the chunk that failed
        raise InputError(f"{source}: could not read region {region} ({type(e).__name__}: {e}); "
                         "a chunk is missing or corrupt.") from e


def missing_chunks(array: zarr.Array) -> list[str]:
    """Keys of the chunks (shards) of ``array`` that are absent from its local store, which zarr would read
    as the fill value without a word. Empty for stores that are not local directories."""
    root = getattr(array.store, "root", None)
    if root is None:
        return []
    base = Path(root) / array.path
    present = set()
    for dirpath, _, files in os.walk(base):
        rel = os.path.relpath(dirpath, base).replace(os.sep, "/")
        present.update(f if rel == "." else f"{rel}/{f}" for f in files)
    grid = array.shards or array.chunks
    n = tuple(math.ceil(s / c) for s, c in zip(array.shape, grid))
    keys = (array.metadata.encode_chunk_key(c) for c in np.ndindex(*n))
    return [k for k in keys if k not in present]


def check_chunks(array: zarr.Array, where: str, policy: str = "fail") -> None:
    """Raise an InputError naming the missing chunks of ``array`` (``policy`` "fill" accepts them as the
    fill value, for writers that skip empty chunks, as zarr-python does by default)."""
    if policy == "fill":
        return
    missing = missing_chunks(array)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{where}: {len(missing)} chunk(s) missing ({', '.join(missing[:5])}{more}); zarr "
                         "would read them as zeros. Restore the chunk files and run again, or set "
                         "missing_chunks: fill if the writer leaves out empty chunks.")


class ChannelView:
    """One channel of an image at level 0 over its ``spatial`` axes, read lazily: slicing returns numpy."""

    spatial = "yx"

    def __init__(self, image: Multiscale, channel: int | None):
        self.image = image
        self.array = image.level(0)
        image.__dict__.setdefault("shape", tuple(self.array.shape))
        self.sel = plane_selector(image, channel, allow_z="z" in self.spatial)
        self.shape = tuple(image.shape[image.axis_names.index(a)] for a in self.spatial)
        self.dtype = self.array.dtype
        self.ndim = len(self.spatial)

    def __getitem__(self, region: tuple) -> np.ndarray:
        region = tuple(region)
        it = iter(region)
        full = tuple(next(it) if s == slice(None) else s for s in self.sel)
        return read_region(self.array, full, self.image.path, region)


class Plane2D(ChannelView):
    """A lazily read 2D plane (y, x) of one channel."""


# ----------------------------------------------------------------------------------------------- writing


def _array_kwargs(fmt: int) -> dict:
    if fmt == 2:
        return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    return {}


def spatial_label_axes(image: Multiscale) -> tuple[list[dict], list[int]]:
    """Axes of a label image for ``image`` (all but c) and their indices in the image axes."""
    idx = [i for i, a in enumerate(image.axis_names) if a != "c"]
    return [image.axes[i] for i in idx], idx


def level_shapes(image: Multiscale, axis_idx: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(image.level(k).shape[i] for i in axis_idx) for k in range(image.n_levels)]


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Let ``write`` fill a temp file next to ``path``, then rename it: a killed job never leaves a
    half-written file that a rerun would trust. The temp name keeps the suffix (numpy appends one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1, default=_json_default)))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


class LeadingView:
    """A window onto the last ``ndim`` axes of an array whose leading axes have size 1 (e.g. labels with
    t/z axes seen as (y, x), or t seen as (z, y, x))."""

    def __init__(self, array: Any, ndim: int = 3):
        self.array = array
        self.lead = tuple(0 for _ in array.shape[:-ndim])
        self.shape = tuple(array.shape[-ndim:])
        self.dtype = array.dtype

    def __getitem__(self, region):
        return np.asarray(self.array[self.lead + tuple(region)])

    def __setitem__(self, region, value):
        self.array[self.lead + tuple(region)] = value


class Plane2DView(LeadingView):
    """A (y, x) window onto an nD label array whose leading axes have size 1."""

    def __init__(self, array: Any):
        super().__init__(array, 2)
