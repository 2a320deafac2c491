"""Collect the per-batch results into summary.json and objects.parquet."""
from __future__ import annotations

from typing import Any

import pandas as pd

from ..io.ome_zarr import read_json, write_atomic, write_json_atomic
from .segment import TABLE_COLUMNS


def aggregate(cfg: dict[str, Any], plan: dict[str, Any], model_info: dict[str, Any], batch_jsons: list[str],
              batch_tables: list[str], summary_path: str, objects_path: str) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for p in batch_jsons:
        status.update(read_json(p)["fields"])
    fields = []
    for f in plan["fields"]:
        s = status.get(f["key"], {"status": "missing", "n_objects": 0})
        fields.append({"plate": f["plate"], "well": f["well"], "field": f["field"], "path": f["path"],
                       "image": f["image"], "predictions": f["predictions"], "labels": f["labels"],
                       "n_objects": s.get("n_objects", 0), "status": s["status"],
                       **({"error": s["error"]} if s.get("error") else {})})
    tables = [pd.read_parquet(p) for p in batch_tables]
    objects = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=TABLE_COLUMNS)
    write_atomic(objects_path, lambda p: objects.to_parquet(p, index=False))
    counts = pd.Series([f["status"] for f in fields]).value_counts().to_dict()
    summary = {"input": plan["input"], "kind": plan["kind"], "method": cfg["method"],
               "model": model_info, "n_fields": len(fields), "status_counts": counts,
               "n_objects": int(sum(f["n_objects"] for f in fields)), "labels_name": cfg["labels"]["name"],
               "config": cfg, "fields": fields}
    write_json_atomic(summary_path, summary)
    return summary
