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


def write_feature_table(image_group_path: str, name: str, label_name: str, features: pd.DataFrame) -> str:
    """Write ``features`` (a ``label`` column plus numeric columns) as ``tables/<name>``; returns its path.

    The table replaces an earlier one of the same name; the ``tables`` listing is updated last.
    """
    import anndata as ad
    from anndata.io import write_elem

    values = features.drop(columns=["label"]).select_dtypes(include=[np.number, bool])
    labels = features["label"].to_numpy(np.int64)
    obs = pd.DataFrame({"label": labels}, index=pd.Index(labels.astype(str), name="label_id"))
    table = ad.AnnData(X=values.to_numpy(np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index([str(c) for c in values.columns])))
    image = open_group(image_group_path, mode="a")
    tables = image.require_group("tables")
    with warnings.catch_warnings():  # anndata's notices about future zarr defaults, not about this table
        warnings.filterwarnings("ignore", message=".*(autosharding|zarr v2 data will no longer).*")
        write_elem(tables, name, table)
    tables[name].attrs.update(feature_table_attrs(label_name))

    def add_name() -> None:  # re-read inside the lock: runs with other label names share this list
        fresh = image.require_group("tables")
        listed = list(fresh.attrs.get("tables", []))
        if name not in listed:
            fresh.attrs["tables"] = listed + [name]
    locked_update(os.path.join(image_group_path, "tables"), add_name)
    return os.path.join(image_group_path, "tables", name)


def read_feature_table(image_group_path: str, name: str) -> pd.DataFrame:
    """The table as a DataFrame (``label`` first), e.g. for tests and notebooks."""
    import anndata as ad
    table = ad.io.read_elem(zarr.open_group(os.path.join(image_group_path, "tables", name), mode="r"))
    df = pd.DataFrame(table.X, columns=list(table.var_names))
    df.insert(0, "label", table.obs["label"].to_numpy())
    return df
