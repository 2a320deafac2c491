"""Per-object feature tables stored next to the image as AnnData (Fractal table spec V1).

``<image>/tables/<name>`` holds an AnnData with one row per object (obs index = label id as a string,
``obs['label']`` the integer id) and the measurements as float32 X; its attributes point at the label
image (``region.path = ../labels/<label name>``, ``instance_key: label``) so that Fractal, ngio and the
napari plugins built on them can join features to objects.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import zarr

from .locks import locked_update
from .ome_zarr import open_group


def feature_table_attrs(label_name: str) -> dict:
    return {"type": "feature_table", "fractal_table_version": "1", "table_version": "1",
            "region": {"path": f"../labels/{label_name}"}, "instance_key": "label"}


def _encode_table(table, name: str, zarr_format: int, attrs: dict) -> dict:
    """The files of ``table`` written as group ``name`` by anndata, as {relative key: bytes}, encoded in
    memory: zarr-python 3 writes each of the ~35 small files of an AnnData through its async loop, which
    costs ~0.4 s per table on a loaded node (the measure step writes one per field); in memory it is ~0.05 s."""
    from anndata.io import write_elem
    files: dict = {}
    root = zarr.open_group(zarr.storage.MemoryStore(files), mode="w", zarr_format=zarr_format)
    with warnings.catch_warnings():  # anndata's notices about future zarr defaults, not about this table
        warnings.filterwarnings("ignore", message=".*(autosharding|zarr v2 data will no longer).*")
        write_elem(root, name, table)
    root[name].attrs.update(attrs)
    return {k[len(name) + 1:]: v.to_bytes() for k, v in files.items() if k.startswith(name + "/")}


def write_feature_table(image_group_path: str, name: str, label_name: str, features: pd.DataFrame) -> str:
    """Write ``features`` (a ``label`` column plus numeric columns) as ``tables/<name>``; returns its path.

    The table is written to a temporary folder next to it and moved into place, so that an earlier table of
    the same name is replaced whole or not at all; the ``tables`` listing is updated last.
    """
    import shutil

    import anndata as ad

    values = features.drop(columns=["label"]).select_dtypes(include=[np.number, bool])
    labels = features["label"].to_numpy(np.int64)
    obs = pd.DataFrame({"label": labels}, index=pd.Index(labels.astype(str), name="label_id"))
    table = ad.AnnData(X=values.to_numpy(np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index([str(c) for c in values.columns])))
    image = open_group(image_group_path, mode="a")
    tables = image.require_group("tables")
    files = _encode_table(table, name, image.metadata.zarr_format, feature_table_attrs(label_name))
    final = os.path.join(image_group_path, "tables", name)
    tmp, old = f"{final}.tmp-{os.getpid()}", f"{final}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for key, data in files.items():
        path = os.path.join(tmp, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

    def add_name() -> None:  # re-read inside the lock: runs with other label names share this list
        fresh = image.require_group("tables")
        listed = list(fresh.attrs.get("tables", []))
        if name not in listed:
            fresh.attrs["tables"] = listed + [name]
    del tables
    locked_update(os.path.join(image_group_path, "tables"), add_name)
    return final


def read_feature_table(image_group_path: str, name: str) -> pd.DataFrame:
    """The table as a DataFrame (``label`` first), e.g. for tests and notebooks."""
    import anndata as ad
    table = ad.io.read_elem(zarr.open_group(os.path.join(image_group_path, "tables", name), mode="r"))
    df = pd.DataFrame(table.X, columns=list(table.var_names))
    df.insert(0, "label", table.obs["label"].to_numpy())
    return df
