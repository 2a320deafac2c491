"""Methods side by side: the agreement between every pair of methods on every field, and each method's
accuracy per well (when there is ground truth), written under ``<output>/comparison/``.

Outputs (all written atomically):

- ``agreement.csv``: one row per field and method pair (``method_a`` < ``method_b`` in the order of the
  ``method`` list): ``msa``/``sa50`` of one method's labels against the other's (the mean of both
  directions, measure/agreement.py; ``msa_b_vs_a``/``msa_a_vs_b`` each direction), the object counts
  ``n_a``/``n_b``, and ``status``: ``ok``, or ``failed`` (a method failed on the field, its summary says
  so) or ``missing`` (no readable label image), with ``error`` naming the method and the file;
  ``status_a``/``status_b`` say which side it was.
- ``accuracy.csv``: every method's ``methods/<m>/metrics.csv`` (field, well and plate rows) in one long
  table with a ``method`` column and the wells' plate ``row``/``column``; absent without ground truth.
- ``wells.csv``: one row per well: ``agreement_<a>_vs_<b>`` (mean field agreement), ``min_agreement``,
  ``worst_field``/``worst_pair`` (where it is), ``n_failed`` (fields with a pair not compared),
  ``n_failed_<m>`` (fields without usable labels of method m), and with ground truth ``msa_<m>``,
  ``sa50_<m>``, ``winner`` (the method with the highest well mSA; ``tie`` on equal scores) and
  ``winner_margin`` (its lead over the next method).
- ``summary.json``: methods, pairs, counts, mean agreement per pair, plate scores per method, winner
  counts.

Each field's label images are read once, block by block, for all pairs (bounded memory).
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..engine.runner import UNIT_ERRORS, describe, log_failure
from ..io.ome_zarr import LeadingView, open_group, read_json, read_multiscale, write_atomic, write_json_atomic
from ..measure.agreement import pairwise_agreement
from ..measure.summaries import read_csv

AGREEMENT_COLUMNS = ["plate", "well", "row", "column", "field", "path", "method_a", "method_b", "status", "msa",
                     "sa50", "msa_b_vs_a", "msa_a_vs_b", "n_a", "n_b", "status_a", "status_b", "error"]
WELL_KEYS = ["plate", "well", "row", "column"]


def pair_name(a: str, b: str) -> str:
    """The column suffix of a method pair: ``<a>_vs_<b>``."""
    return f"{a}_vs_{b}"


def method_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """Every unordered pair of distinct methods, in the order of the list."""
    return list(itertools.combinations(dict.fromkeys(methods), 2))


def compare_fields(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's fields; a volume plan is one field (no well)."""
    if plan.get("kind") == "volume":
        keep = {k: plan[k] for k in ("labels", "labels_by_method") if k in plan}
        return [{"key": "image", "path": "", "plate": "", "well": "", "row": "", "column": "", "field": "", **keep}]
    return plan["fields"]


def method_labels(cfg: dict[str, Any], f: dict[str, Any], method: str) -> str:
    """The label image of ``method`` on field ``f``: ``labels_by_method[method]`` when the plan gives it,
    else ``labels/<labels.name>_<method>`` next to the field's labels."""
    by = f.get("labels_by_method") or {}
    if method in by:
        return str(by[method])
    return os.path.join(os.path.dirname(f["labels"]), f"{cfg['labels']['name']}_{method}")


def read_labels(path: str) -> LeadingView:
    """Level 0 of the NGFF label image at ``path``, lazily, without its leading size-1 axes (t, z of a 2D
    field); a volume's z axis stays."""
    arr = read_multiscale(open_group(path), path).level(0)
    lead = 0
    while lead < arr.ndim - 2 and arr.shape[lead] == 1:
        lead += 1
    return LeadingView(arr, arr.ndim - lead)


def method_status(out_dir: str, methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]] | None]:
    """{method: {field path: summary entry}} from ``methods/<m>/summary.json`` (None where absent)."""
    out: dict[str, dict[str, dict[str, Any]] | None] = {}
    for m in methods:
        p = os.path.join(out_dir, "methods", m, "summary.json")
        out[m] = _summary_status(read_json(p)) if os.path.exists(p) else None
    return out


def _summary_status(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{field path: status} of a method's summary; a volume is the one field "" (failed if blocks failed)."""
    if summary.get("kind") == "volume":
        bad = summary.get("failed_blocks") or []
        return {"": {"status": "failed", "error": f"{len(bad)} volume blocks failed ({', '.join(map(str, bad[:5]))})"}
                if bad else {"status": "ok"}}
    return {str(f.get("path", "")): f for f in summary.get("fields", [])}


def _unavailable(cfg: dict[str, Any], f: dict[str, Any], method: str, status: dict | None
                 ) -> tuple[str, str] | None:
    """(status, reason) when ``method`` has no usable label image on ``f``, else None."""
    if status is not None:
        s = status.get(str(f["path"]))
        if s is None:
            return "missing", f"{method}: no result for this field in methods/{method}/summary.json"
        if s.get("status") not in ("ok", "empty"):
            return "failed", f"{method}: {s.get('status')}: {s.get('error', 'no error given')}"
    path = method_labels(cfg, f, method)
    if not os.path.isdir(path):
        return "missing", f"{method}: no label image at {path}"
    return None


def _odd_shapes(images: dict[str, Any], method_labels) -> dict[str, tuple[str, str]]:
    """Methods whose label image has another shape than most (it was computed for other data)."""
    shapes = {m: tuple(int(s) for s in v.shape) for m, v in images.items()}
    if len(set(shapes.values())) < 2:
        return {}
    common = max(dict.fromkeys(shapes.values()), key=list(shapes.values()).count)
    return {m: ("failed", f"{m}: label image {method_labels(m)} has shape {s}, the other methods' {common}: "
                          "it was computed for other data; rerun the method on this input")
            for m, s in shapes.items() if s != common}


def compare_field(cfg: dict[str, Any], f: dict[str, Any], methods: Sequence[str],
                  status: dict[str, dict | None]) -> list[dict[str, Any]]:
    """The agreement rows of one field (one per method pair); an unusable label image gives named rows."""
    base = {k: f.get(k, "") for k in ("plate", "well", "row", "column", "field", "path")}
    pairs = method_pairs(methods)
    bad = {m: r for m in methods if (r := _unavailable(cfg, f, m, status.get(m)))}
    images: dict[str, Any] = {}
    for m in methods:
        if m in bad:
            continue
        try:
            images[m] = read_labels(method_labels(cfg, f, m))
        except UNIT_ERRORS as e:
            bad[m] = ("missing", f"{m}: {describe(e)}")
    bad.update(_odd_shapes(images, method_labels=lambda m: method_labels(cfg, f, m)))
    images = {m: v for m, v in images.items() if m not in bad}
    good = [p for p in pairs if p[0] not in bad and p[1] not in bad]
    try:
        scores = pairwise_agreement(images, good)
    except UNIT_ERRORS as e:
        err = f"{', '.join(images)} on {f['path'] or 'image'}: {describe(e)}"
        bad.update({m: ("failed", err) for m in images})
        scores = {}
    rows = []
    for a, b in pairs:
        sides = {"status_a": bad[a][0] if a in bad else "ok", "status_b": bad[b][0] if b in bad else "ok"}
        if (a, b) in scores:
            rows.append({**base, "method_a": a, "method_b": b, "status": "ok", **scores[(a, b)], **sides, "error": ""})
            continue
        why = [bad[m] for m in (a, b) if m in bad]
        st = "failed" if any(s == "failed" for s, _ in why) else "missing"
        rows.append({**base, "method_a": a, "method_b": b, "status": st, **sides,
                     "error": "; ".join(r for _, r in why)})
    return rows


def accuracy_table(out_dir: str, methods: Sequence[str], fields: Sequence[dict[str, Any]]) -> pd.DataFrame | None:
    """Every method's metrics.csv in one table (with ``method``, ``row``, ``column``); None if none has one."""
    where = {(str(f["plate"]), str(f["well"])): (f["row"], f["column"]) for f in fields}
    parts = []
    for m in methods:
        p = os.path.join(out_dir, "methods", m, "metrics.csv")
        if os.path.exists(p):
            parts.append(read_csv(p).assign(method=m))
    if not parts:
        return None
    acc = pd.concat(parts, ignore_index=True)
    pos = [where.get((str(p), str(w)), ("", "")) for p, w in zip(acc["plate"], acc["well"])]
    acc["row"] = [r for r, _ in pos]
    acc["column"] = [c for _, c in pos]
    return acc


def wells_table(agreement: pd.DataFrame, accuracy: pd.DataFrame | None, methods: Sequence[str]) -> pd.DataFrame:
    """One row per well: mean agreement per pair, the worst field, and with ground truth each method's
    well mSA/SA50 and the winner (see the module docstring)."""
    pairs = method_pairs(methods)
    df = agreement.assign(pair=[pair_name(a, b) for a, b in zip(agreement["method_a"], agreement["method_b"])])
    df["msa"] = pd.to_numeric(df["msa"], errors="coerce")
    ok = df[df["status"] == "ok"]
    rows = []
    for key, g in df.groupby(WELL_KEYS, sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(WELL_KEYS, key))
        gok = ok.loc[ok.index.intersection(g.index)]
        row["n_fields"] = int(g["path"].nunique())
        row["n_failed"] = int(g.loc[g["status"] != "ok", "path"].nunique())
        for m in methods:  # fields on which this method has no usable labels
            bad = ((g["method_a"] == m) & (g["status_a"] != "ok")) | ((g["method_b"] == m) & (g["status_b"] != "ok"))
            row[f"n_failed_{m}"] = int(g.loc[bad, "path"].nunique())
        for a, b in pairs:
            v = gok.loc[gok["pair"] == pair_name(a, b), "msa"]
            row[f"agreement_{pair_name(a, b)}"] = float(v.mean()) if len(v) else np.nan
        row["min_agreement"] = float(gok["msa"].min()) if len(gok) else np.nan
        worst = gok.loc[gok["msa"].idxmin()] if len(gok) else None
        row["worst_field"] = str(worst["field"]) if worst is not None else ""
        row["worst_pair"] = f"{worst['method_a']} vs {worst['method_b']}" if worst is not None else ""
        rows.append(row)
    if not rows:  # no field planned: the columns the report reads
        return pd.DataFrame(columns=[*WELL_KEYS, "n_fields", "n_failed", "min_agreement"])
    wells = pd.DataFrame(rows)
    if accuracy is not None:
        wells = _add_winner(wells, accuracy, methods)
    return wells


def _add_winner(wells: pd.DataFrame, accuracy: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    w = accuracy[accuracy["level"].astype(str) == "well"] if "level" in accuracy else accuracy.iloc[:0]
    for m in methods:
        mine = w[w["method"] == m].set_index(["plate", "well"])
        idx = pd.MultiIndex.from_arrays([wells["plate"].astype(str), wells["well"].astype(str)])
        for s in ("msa", "sa50"):
            col = pd.to_numeric(mine[s], errors="coerce") if s in mine else pd.Series(dtype=float)
            wells[f"{s}_{m}"] = col.reindex(idx).to_numpy() if len(col) else np.nan
    scores = wells[[f"msa_{m}" for m in methods]].to_numpy(dtype=float)
    winner, margin = [], []
    for r in scores:
        have = np.isfinite(r)
        if not have.any():
            winner.append("")
            margin.append(np.nan)
            continue
        order = np.argsort(-np.where(have, r, -np.inf), kind="stable")
        best = r[order[0]]
        second = r[order[1]] if have.sum() > 1 else np.nan
        winner.append("tie" if np.isfinite(second) and np.isclose(best, second, rtol=0, atol=1e-9)
                      else methods[order[0]])
        margin.append(best - second if np.isfinite(second) else np.nan)
    wells["winner"] = winner
    wells["winner_margin"] = margin
    return wells


def comparison_summary(agreement: pd.DataFrame, accuracy: pd.DataFrame | None, wells: pd.DataFrame,
                       methods: Sequence[str]) -> dict[str, Any]:
    ok = agreement[agreement["status"] == "ok"]
    pair_means = {}
    for a, b in method_pairs(methods):
        v = pd.to_numeric(ok.loc[(ok["method_a"] == a) & (ok["method_b"] == b), "msa"], errors="coerce")
        pair_means[pair_name(a, b)] = {"msa": float(v.mean()) if len(v) else None, "n_fields": int(len(v))}
    scores: dict[str, Any] = {}
    if accuracy is not None and "level" in accuracy:
        plate = accuracy[accuracy["level"].astype(str) == "plate"]
        for m in methods:
            r = plate[plate["method"] == m]
            scores[m] = ({k: float(pd.to_numeric(r[k], errors="coerce").mean()) for k in ("msa", "sa50")}
                         if len(r) else None)
    winners = wells["winner"].value_counts().to_dict() if "winner" in wells else {}
    single = len(agreement) > 0 and not agreement["well"].astype(str).replace("nan", "").any()
    return {"methods": list(methods), "pairs": [list(p) for p in method_pairs(methods)],
            "kind": "image" if single else "plate",
            "ground_truth": accuracy is not None, "n_fields": int(agreement["path"].nunique()) if len(agreement) else 0,
            "status_counts": agreement["status"].value_counts().to_dict(), "agreement": pair_means,
            "accuracy": scores, "winners": {str(k): int(v) for k, v in winners.items() if k}}


def run_compare(cfg: dict[str, Any], plan: dict[str, Any], methods: Sequence[str], out_dir: str) -> dict[str, Any]:
    """Compare the label images of ``methods`` on every field of ``plan``; write ``<out_dir>/comparison/``
    (agreement.csv, wells.csv, accuracy.csv with ground truth, summary.json) and return the summary.

    Reads ``<out_dir>/methods/<m>/summary.json`` (per-field status: a failed field is not compared) and
    ``metrics.csv`` (accuracy) where present. Needs at least two methods."""
    methods = list(dict.fromkeys(methods))
    if len(methods) < 2:
        raise ValueError(f"comparing methods needs at least two, got {methods}: list them in 'method'.")
    fields = compare_fields(plan)
    status = method_status(out_dir, methods)
    rows = []
    for f in fields:
        for r in compare_field(cfg, f, methods, status):
            if r["status"] != "ok":
                log_failure("compare", f.get("key", f["path"]), r["error"])
            rows.append(r)
    agreement = pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
    accuracy = accuracy_table(out_dir, methods, fields) if cfg.get("ground_truth") else None
    wells = wells_table(agreement, accuracy, methods)
    out = os.path.join(out_dir, "comparison")
    csv = (lambda df, name: write_atomic(os.path.join(out, name), lambda p: df.to_csv(p, index=False)))
    csv(agreement, "agreement.csv")
    csv(wells, "wells.csv")
    if accuracy is not None:
        csv(accuracy, "accuracy.csv")
    summary = comparison_summary(agreement, accuracy, wells, methods)
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    return summary
