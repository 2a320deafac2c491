"""Write NGFF (OME-Zarr 0.4 on zarr v2, 0.5 on zarr v3) metadata: the one place that does.

Every group the project writes (plates, wells, images, label lists, label images) gets its attributes
from here, built through ome-zarr-models' pydantic models, and every written image or label group is read
back through the same library's group models, arrays included (where a plate's fields all get the same
metadata, the first field). So validity is ome-zarr-models' check, not ours: an invalid store fails
where it is written, naming the group. Arrays are created here too
(:func:`create_levels`), so that zarr v3 arrays always carry the ``dimension_names`` NGFF 0.5 requires.

Pyramid placement: NGFF places pixel ``i`` of a level at ``scale * i + translation`` (pixel centres).
A strided pick (level k takes pixel ``i * f`` of level 0, f = 2^k) keeps level 0's translation; a level
made by averaging f x f blocks is centred on its block, ``(f - 1) / 2`` level-0 pixels further on
(:func:`block_mean_translation`). Labels are always strided picks (io/pyramid.py).

The ``labels.store`` mirror (:func:`mirror_plate` with ``placeholders``): the spec and the readers
(ome-zarr-py, napari-ome-zarr, ngio, ome-zarr-models) all want each field of a plate to be an image
with ``multiscales``, and labels under it. The mirror's field images are therefore *placeholders*: arrays
of the source image's shapes, dtype and chunks with no chunk written (a read gives 0; no pixels are
copied, the cost is a few small metadata files per field), the source's axes, scales and channel names,
channels marked inactive (napari shows that layer hidden and the labels on top), and
``pipeline_lib.placeholder_of`` plus ``image-label.source.image`` naming the real image by a relative path.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import ome_zarr_models  # noqa: F401 - imported first on purpose, see below
import zarr

# ome-zarr-models 1.7's NGFF 0.4 group models validate only when ome_zarr_models is imported before
# something else imports both pydantic_zarr.v2 and .v3 (ngio does): the two modules share the
# ForwardRefs of one typing.Union, which Python 3.11 resolves once, for whichever module comes first.
# Importing it here, with pipeline_lib.io, keeps our processes in the working order.
if TYPE_CHECKING:  # io/ome_zarr.py imports this module: its names are imported where they are used
    from .ome_zarr import Multiscale, StoreLayout

#: The multiscales ``type``/``metadata`` of label pyramids and synthetic images (strided picks).
NEAREST = ("nearest", {"method": "pipeline_lib.io.pyramid.downsample_level",
                       "description": "level k holds pixel floor(i * s_k / s_0) of level 0 (a strided pick)"})
#: ... of ingested images (2x2 block means of the level above, odd edges repeated).
BLOCK_MEAN = ("mean", {"method": "pipeline_lib.io.ingest.downsample_mean",
                       "description": "each level is the 2x2 block mean of the level above (odd edge repeated)"})
#: Above this many objects a label image gets no ``colors`` (its metadata would grow by ~50 bytes per
#: object and be read by every viewer); viewers then use their own palette.
MAX_LABEL_COLORS = 10_000
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def is_v05(version: str) -> bool:
    return str(version).startswith("0.5")


def zarr_format_of(version: str) -> int:
    """NGFF 0.5 lives on zarr v3, 0.4 on zarr v2."""
    return 3 if is_v05(version) else 2


# ----------------------------------------------------------------------------------------------- attributes


def write_ngff(group: zarr.Group, meta: dict, version: str) -> None:
    """Store NGFF attributes in the layout of ``version`` (0.5: under ``ome``), merging with what is there."""
    if is_v05(version):
        ome = dict(group.attrs.asdict().get("ome", {}))
        ome.update(meta)
        ome["version"] = "0.5"
        group.attrs["ome"] = ome
    else:
        group.attrs.update(meta)


def versioned(entry: dict, version: str) -> dict:
    """``entry`` with its own ``version`` key, which NGFF 0.4 wants per entry and 0.5 keeps only under ``ome``."""
    return entry if is_v05(version) else {**entry, "version": "0.4"}  # older inputs get 0.4 metadata


def _models(version: str) -> Any:
    """The ome-zarr-models module namespace of ``version``."""
    if is_v05(version):
        from ome_zarr_models.v05 import hcs, image, image_label, labels, well
    else:
        from ome_zarr_models.v04 import hcs, image, image_label, labels, well
    return SimpleNamespace(hcs=hcs, image=image, image_label=image_label, labels=labels, well=well)


def _dump(model: Any) -> dict:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def _attrs(cls: type, meta: dict, version: str) -> dict:
    """``meta`` validated by the ome-zarr-models attributes class ``cls``, as JSON (without ``version``)."""
    model = cls.model_validate({**meta, "version": "0.5"} if is_v05(version) else meta)
    out = _dump(model)
    if is_v05(version):
        out.pop("version", None)  # write_ngff puts it under "ome"
    return out


def _where(group: zarr.Group) -> str:
    root = getattr(group.store, "root", None)
    return os.path.join(str(root), group.path) if root is not None else f"{group.store}/{group.path}"


def _check_group(cls: type, group: zarr.Group) -> None:
    """Read ``group`` back through the ome-zarr-models group model ``cls`` (metadata and arrays)."""
    try:
        cls.from_zarr(group)
    except Exception as e:  # noqa: BLE001 - any validation failure is a bug of this module: name the group
        raise ValueError(f"{_where(group)}: the NGFF metadata written here does not validate "
                         f"({cls.__module__}.{cls.__name__}): {e}") from e


def write_plate(group: zarr.Group, plate: dict, version: str) -> None:
    """The ``plate`` attributes (rows, columns, wells, ...), validated."""
    m = _models(version)
    entry = {**plate, "version": "0.5"} if is_v05(version) else versioned(dict(plate), version)
    meta = _attrs(m.hcs.HCSAttrs, {"plate": entry}, version)
    write_ngff(group, meta, version)


def write_well(group: zarr.Group, images: Iterable[str], version: str) -> None:
    """The ``well`` attributes listing the field image paths, validated."""
    m = _models(version)
    well = versioned({"images": [{"path": str(p)} for p in images]}, version)
    write_ngff(group, _attrs(m.well.WellAttrs, {"well": well}, version), version)


def copy_well(group: zarr.Group, well: dict, version: str) -> None:
    """``well`` attributes read from another store, validated."""
    m = _models(version)
    write_ngff(group, _attrs(m.well.WellAttrs, {"well": versioned(dict(well), version)}, version), version)


def write_labels_list(group: zarr.Group, names: Sequence[str], version: str) -> None:
    """The ``labels`` group's list of label images, validated."""
    m = _models(version)
    write_ngff(group, _attrs(m.labels.LabelsAttrs, {"labels": list(names)}, version), version)


# ----------------------------------------------------------------------------------------------- images


def axes_meta(names: Sequence[str], units: dict[str, str] | None = None) -> list[dict]:
    """NGFF axes of ``names`` (e.g. "cyx"), with a unit on the axes ``units`` names."""
    units = units or {}
    return [{"name": a, "type": AXIS_TYPES[a], **({"unit": units[a]} if units.get(a) else {})} for a in names]


def datasets_meta(paths: Sequence[str], scales: Sequence[Sequence[float]],
                  translations: Sequence[Sequence[float] | None] | None = None) -> list[dict]:
    """Per-level ``coordinateTransformations`` (a scale, then a translation where one is given)."""
    translations = translations or [None] * len(paths)
    out = []
    for path, scale, shift in zip(paths, scales, translations):
        transforms = [{"type": "scale", "scale": [float(s) for s in scale]}]
        if shift is not None and any(float(t) != 0.0 for t in shift):
            transforms.append({"type": "translation", "translation": [float(t) for t in shift]})
        out.append({"path": str(path), "coordinateTransformations": transforms})
    return out


def block_mean_translation(scale0: Sequence[float], factors: Sequence[float],
                           shift0: Sequence[float] | None = None) -> list[float]:
    """Translation of a level made by averaging ``factors`` pixels of level 0 per axis: the block centre."""
    shift0 = shift0 or [0.0] * len(scale0)
    return [float(t) + float(s) * (float(f) - 1) / 2 for s, f, t in zip(scale0, factors, shift0)]


def dtype_window(dtype: Any) -> dict:
    """An OMERO ``window`` spanning the range of ``dtype`` (floats: 0..1)."""
    dt = np.dtype(dtype)
    lo, hi = (float(np.iinfo(dt).min), float(np.iinfo(dt).max)) if dt.kind in "iu" else (0.0, 1.0)
    return {"min": lo, "max": hi, "start": lo, "end": hi}


def omero_meta(names: Sequence[str], colors: Sequence[str], windows: Sequence[dict],
               active: bool = True) -> dict:
    """OMERO rendering metadata: one channel per name, each with the ``color`` and ``window`` NGFF requires."""
    return {"channels": [{"label": str(n), "color": c, "window": dict(w), "active": bool(active)}
                         for n, c, w in zip(names, colors, windows)]}


def create_levels(group: zarr.Group, paths: Sequence[str], shapes: Sequence[Sequence[int]],
                  chunks: Sequence[Sequence[int]], dtype: Any, axes: Sequence[str], overwrite: bool = False,
                  data: Sequence[np.ndarray] | None = None) -> list[zarr.Array]:
    """The level arrays of an image (existing ones are kept unless ``overwrite``). zarr v2 arrays use '/'
    chunk keys (what ome-zarr-py writes), zarr v3 arrays name their dimensions (required by NGFF 0.5)."""
    fmt = int(group.metadata.zarr_format)
    kwargs: dict[str, Any] = ({"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2
                              else {"dimension_names": list(axes)})
    out = []
    for k, (path, shape, ch) in enumerate(zip(paths, shapes, chunks)):
        ch = tuple(max(1, min(int(c), int(s))) for c, s in zip(ch, shape))
        if path in group and not overwrite:
            out.append(group[path])
        elif data is not None:
            out.append(group.create_array(path, data=data[k], chunks=ch, overwrite=True, **kwargs))
        else:
            out.append(group.create_array(path, shape=tuple(int(s) for s in shape), chunks=ch, dtype=dtype,
                                          fill_value=0, overwrite=True, **kwargs))
    return out


def write_image(group: zarr.Group, version: str, axes: list[dict], datasets: list[dict], name: str,
                omero: dict | None = None, downsampling: tuple[str, dict] | None = None,
                extra: dict | None = None, check: bool = True) -> None:
    """``multiscales`` (and ``omero``) of an image group whose level arrays exist; validated with them
    (the attributes always; the group read back with its arrays unless ``check`` is False, which callers
    writing many identical fields use after the first)."""
    m = _models(version)
    ms: dict[str, Any] = {"axes": axes, "datasets": datasets, "name": name}
    if downsampling:
        ms["type"], ms["metadata"] = downsampling[0], dict(downsampling[1])
    meta: dict[str, Any] = {"multiscales": [versioned(ms, version)]}
    if omero is not None:
        from ome_zarr_models.common.omero import Omero
        meta["omero"] = versioned(_dump(Omero.model_validate(omero)), version)
    meta = _attrs(m.image.ImageAttrs, meta, version)
    if extra:
        group.attrs.update(extra)
    write_ngff(group, meta, version)
    if check:
        _check_group(m.image.Image, group)


def write_label(group: zarr.Group, version: str, axes: list[dict], datasets: list[dict], name: str,
                source: str = "../../", colors: list[dict] | None = None) -> None:
    """``multiscales`` and ``image-label`` of a label group whose level arrays exist; validated with them."""
    m = _models(version)
    label: dict[str, Any] = {"source": {"image": source}}
    if colors:
        label["colors"] = colors
    ms = {"axes": axes, "datasets": datasets, "name": name, "type": NEAREST[0], "metadata": dict(NEAREST[1])}
    meta = _attrs(m.image_label.ImageLabelAttrs,
                  {"multiscales": [versioned(ms, version)], "image-label": versioned(label, version)}, version)
    write_ngff(group, meta, version)
    _check_group(m.image_label.ImageLabel, group)


def label_colors(values: Iterable[int]) -> list[dict] | None:
    """``image-label.colors`` for ``values``: background 0 transparent, each object a fixed, well-spread hue
    (golden-ratio steps, so neighbouring ids differ). None above MAX_LABEL_COLORS objects.

    Every value gets a colour: napari-ome-zarr turns ``colors`` into a direct colormap in which a value
    without a colour is transparent, so listing only the background would hide every object.
    """
    v = np.unique(np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.int64))
    v = v[v > 0]
    if len(v) > MAX_LABEL_COLORS:
        return None
    h = (v * 0.6180339887498949) % 1.0
    k = (np.arange(3)[None, :] * (1 / 3) + h[:, None]) % 1.0  # hue wheel, three phases -> r, g, b
    rgb = np.round(255 * np.clip(np.abs(k * 6 - 3) - 1, 0, 1) * 0.85 + 38).astype(int)
    rows = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    rows += [{"label-value": int(i), "rgba": [int(r), int(g), int(b), 255]} for i, (r, g, b) in zip(v, rgb)]
    return rows


def set_label_colors(group: zarr.Group, values: Iterable[int], version: str) -> None:
    """Replace the ``colors`` of a written label image by those of its label ``values`` (validated)."""
    m = _models(version)
    ome = group.attrs.asdict().get("ome", {}) if is_v05(version) else group.attrs.asdict()
    label = {k: v for k, v in dict(ome.get("image-label", {})).items() if k != "colors"}
    colors = label_colors(values)
    if colors:
        label["colors"] = colors
    meta = _attrs(m.image_label.ImageLabelAttrs,
                  {"multiscales": ome["multiscales"], "image-label": label}, version)
    write_ngff(group, {"image-label": meta["image-label"]}, version)


def relative_source(label_group: zarr.Group, source: str) -> str:
    """``source`` (an image path) relative to the label group, as NGFF asks; kept as given when it is
    relative already or the store is not a local folder."""
    root = getattr(label_group.store, "root", None)
    if not os.path.isabs(source) or root is None:
        return source
    here = os.path.join(str(root), label_group.path)
    return os.path.relpath(os.path.abspath(source), os.path.abspath(here)).replace(os.sep, "/") + "/"


# ----------------------------------------------------------------------------------------------- the stores


def _pad_chunks(chunks: Sequence[int], ndim: int) -> tuple[int, ...]:
    chunks = tuple(chunks)
    if len(chunks) >= ndim:
        return chunks[-ndim:]
    return (1,) * (ndim - len(chunks)) + chunks


def _transform(dataset: dict, key: str) -> list[float] | None:
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == key:
            return [float(v) for v in t[key]]
    return None


def create_label_image(image_group: zarr.Group, image: Multiscale, name: str, chunks: Sequence[int],
                       dtype: str = "uint32", overwrite: bool = False, source: str = "../../",
                       level_chunks: Sequence[Sequence[int]] | None = None) -> zarr.Group:
    """Create ``labels/<name>`` (all levels, empty) with NGFF ``image-label`` metadata.

    Levels have the image's level shapes and scales (minus the channel axis). They are filled as strided
    picks of level 0 (io/pyramid.py), so every level keeps level 0's translation: copying the image's
    per-level translations (right for block-mean image levels) would place level k up to (2^k - 1) / 2
    pixels off. An absolute ``source`` is stored relative to the label group. Called once per field by
    the planning step (volumes) or the field's segment job; jobs then only write chunks. ``level_chunks``
    (volumes) gives each level its own yx chunks, so that a tile owns whole chunks of every level.
    """
    from .ome_zarr import spatial_label_axes
    axes, idx = spatial_label_axes(image)
    version = image.version
    labels = image_group.require_group("labels")
    _add_label_name(image_group, name, version)
    group = labels[name] if name in labels and not overwrite else labels.create_group(name, overwrite=True)
    paths = [d["path"] for d in image.datasets]
    shapes = [tuple(image.level(k).shape[i] for i in idx) for k in range(image.n_levels)]
    per_level = level_chunks or [chunks] * len(shapes)
    create_levels(group, paths, shapes, [_pad_chunks(c, len(s)) for c, s in zip(per_level, shapes)], dtype,
                  [a["name"] for a in axes])
    shift0 = _transform(image.datasets[0], "translation")
    scales = [[image.scale(k)[i] for i in idx] for k in range(image.n_levels)]
    shifts = [[shift0[i] for i in idx] if shift0 else None] * len(paths)
    write_label(group, version, [dict(a) for a in axes], datasets_meta(paths, scales, shifts), name,
                source=relative_source(group, source))
    return group


def _add_label_name(image_group: zarr.Group, name: str, version: str) -> None:
    """Append ``name`` to the ``labels`` list of ``labels/``: a read-modify-write under a file lock
    (io.locks), re-reading the list inside it, so that concurrent runs do not drop each other's names."""
    from .locks import locked_update
    from .ome_zarr import ngff

    def update() -> None:
        labels = image_group.require_group("labels")
        names = list(ngff(labels)[0].get("labels", []))
        if name not in names:
            write_labels_list(labels, names + [name], version)

    root = getattr(image_group.store, "root", None)
    if root is None:  # not a local directory: no file lock to take
        update()
    else:
        locked_update(str(Path(root) / image_group.path / "labels"), update)


def create_predictions_image(group: zarr.Group, shape_yx: Sequence[int], chunks_yx: Sequence[int],
                             version: str, kind: str = "sam_maps") -> zarr.Array:
    """A 3-channel float16 NGFF image (c, y, x) for the decoder maps (``kind`` sam_maps) or Cellpose's flows
    (``kind`` flows: dY, dX, cellprob), metadata included."""
    return _maps_image(group, tuple(shape_yx), tuple(chunks_yx), "yx", version, kind)


def create_volume_maps(group: zarr.Group, shape_zyx: Sequence[int], chunks_yx: Sequence[int],
                       version: str) -> zarr.Array:
    """A float16 NGFF image (c, z, y, x) for per-slice decoder maps (foreground, center, boundary)."""
    return _maps_image(group, tuple(shape_zyx), (1, *chunks_yx), "zyx", version)


MAP_CHANNELS = (("foreground", "00FF00"), ("center_distance", "FF00FF"), ("boundary_distance", "00FFFF"))
FLOW_CHANNELS = (("dY", "FF0000"), ("dX", "0000FF"), ("cellprob", "FFFF00"))


def _maps_image(group: zarr.Group, shape: tuple, chunks: tuple, spatial: str, version: str,
                kind: str = "sam_maps") -> zarr.Array:
    axes = "c" + spatial
    channels, name = (FLOW_CHANNELS, "cellpose_flows") if kind == "flows" else (MAP_CHANNELS, "sam_decoder_maps")
    (arr,) = create_levels(group, ["0"], [(3, *shape)], [(3, *chunks)], "float16", axes, overwrite=True)
    omero = omero_meta([n for n, _ in channels], [c for _, c in channels], [dtype_window("float16")] * 3)
    write_image(group, version, axes_meta(axes), datasets_meta(["0"], [[1.0] * len(axes)]), name,
                omero=omero)
    return arr


def _hex_color(value: Any) -> str:
    text = str(value or "")
    return text if len(text) == 6 and all(ch in "0123456789abcdefABCDEF" for ch in text) else "FFFFFF"


def _window(value: Any, dtype: Any) -> dict:
    keys = ("min", "max", "start", "end")
    if isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in keys):
        return {k: float(value[k]) for k in keys}
    return dtype_window(dtype)


def placeholder_image(group: zarr.Group, image: Multiscale, source: str, check: bool = True) -> None:
    """Make ``group`` a metadata-only copy of ``image`` (see the module docstring: the labels.store mirror)."""
    paths = [d["path"] for d in image.datasets]
    levels = [image.level(k) for k in range(image.n_levels)]
    create_levels(group, paths, [a.shape for a in levels], [a.chunks for a in levels], levels[0].dtype,
                  image.axis_names)
    n = image.shape[image.axis_names.index("c")] if "c" in image.axis_names else 1
    old = {c.get("label"): c for c in (image.omero or {}).get("channels", []) if isinstance(c, dict)}
    names = image.channel_names() or [f"c{i}" for i in range(n)]
    names = (names + [f"c{i}" for i in range(len(names), n)])[:n]
    colors = [_hex_color(old.get(nm, {}).get("color")) for nm in names]
    windows = [_window(old.get(nm, {}).get("window"), levels[0].dtype) for nm in names]
    rel = relative_source(group, source)
    write_image(group, image.version, [dict(a) for a in image.axes], [dict(d) for d in image.datasets],
                image.name, omero=omero_meta(names, colors, windows, active=False),
                extra={"pipeline_lib": {"placeholder_of": rel,
                                        "note": "no pixels here: the image is at placeholder_of"}},
                check=check)


def mirror_plate(src: StoreLayout, dst_root: str | os.PathLike, placeholders: bool = False) -> zarr.Group:
    """Create a store with the plate/well hierarchy and metadata of ``src`` (same NGFF version).

    With ``placeholders`` (the labels.store mirror) every field (or the single image) becomes a
    :func:`placeholder_image` of the source field, so that the mirror is a valid plate readers open.
    """
    from .ome_zarr import InputError, open_field
    root = zarr.open_group(str(dst_root), mode="a", zarr_format=src.zarr_format)
    if src.kind == "plate":
        try:
            write_plate(root, {k: v for k, v in src.plate_meta.items() if k != "version"}, src.version)
            for wpath, wmeta in src.well_meta.items():
                copy_well(root.require_group(wpath), {k: v for k, v in wmeta.items() if k != "version"},
                          src.version)
        except ValueError as e:  # pydantic's ValidationError: the input's own plate metadata is not valid NGFF
            warnings.warn(f"{src.root}: its plate/well metadata is not valid NGFF ({e}); copied as it is, so "
                          f"{dst_root} is no more valid than the input.", stacklevel=2)
            write_ngff(root, {"plate": src.plate_meta}, src.version)
            for wpath, wmeta in src.well_meta.items():
                write_ngff(root.require_group(wpath), {"well": wmeta}, src.version)
    if placeholders:
        for i, ref in enumerate(src.fields):
            try:
                image = open_field(src.root, ref)
            except InputError:
                continue  # the plan records the field as failed; no labels will be written for it
            group = root.require_group(ref.path) if ref.path else root
            attrs = group.attrs.asdict()
            if "multiscales" in attrs.get("ome", attrs) and "pipeline_lib" not in attrs:
                continue  # a real image is there already (the store holds pixels): leave it alone
            placeholder_image(group, image, image.path, check=i == 0)
    return root
