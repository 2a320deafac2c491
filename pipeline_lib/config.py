"""Load and validate the workflow config against the one schema, filling in its documented defaults."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """The config does not match the schema; the message names the key and what is allowed."""


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _with_defaults(validator_class):
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Return a validated copy of ``config`` with every default filled in."""
    cfg = copy.deepcopy(dict(config))
    errors = sorted(_Validator(load_schema()).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.path) or "(top level)"
            lines.append(f"  {where}: {e.message}")
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(lines) +
                          f"\nSee the config reference in README.md (schema: {SCHEMA_PATH.name}).")
    if cfg.get("predictions") is None and cfg["model"].get("decoder") and not cfg["model"].get("checkpoint"):
        raise ConfigError(f"{source}: model.decoder is set but model.checkpoint is not; give both, "
                          "or use model.name for a published model.")
    t, h = cfg["tiling"]["tile"], cfg["tiling"]["halo"]
    if h > t:
        raise ConfigError(f"{source}: tiling.halo ({h}) is larger than tiling.tile ({t}): each tile would encode "
                          f"{((t + 2 * h) / t) ** 2:.0f}x its own pixels. Use a halo of at most the tile size "
                          "(typically tile/8 to tile/4), or a larger tile.")
    fb, fh = cfg["tiling"]["field_block"], cfg["tiling"]["field_halo"]
    if fh > fb:
        raise ConfigError(f"{source}: tiling.field_halo ({fh}) is larger than tiling.field_block ({fb}): a block's "
                          "halo may only reach its direct neighbours. Lower the halo or raise the block.")
    if isinstance(cfg["method"], list) and len(cfg["method"]) == 1:
        cfg["method"] = cfg["method"][0]
    if isinstance(cfg["method"], list):
        _check_method_list(cfg, source)
        return cfg
    cfg["method"] = resolve_method(cfg, source)
    return cfg


def _check_method_list(cfg: dict[str, Any], source: str) -> None:
    """Several methods side by side: each must be able to run, on the same input."""
    if cfg.get("predictions"):
        raise ConfigError(f"{source}: `predictions` holds one method's maps; with several methods "
                          f"({', '.join(cfg['method'])}) drop it, or run that method alone.")
    if cfg["ingest"].get("source"):
        raise ConfigError(f"{source}: with several methods, convert the files first (one run with "
                          "ingest.source and one method), then give the plate as `input`.")
    for m in cfg["method"]:
        resolve_method(dict(cfg, method=m), source)


def check_runnable(cfg: dict[str, Any], source: str = "config") -> list[str]:
    """What ``python -m pipeline_lib validate`` checks beyond the schema, without running anything: the
    model name, and that the input (or ingest.source) and ``predictions`` exist. Returns the problems."""
    from .methods import get_method
    from .models.registry import MODELS
    problems = []
    model = cfg["model"]
    sam = get_method(cfg).network == "sam"
    if get_method(cfg).network == "cellpose" and not cfg.get("predictions"):
        from .models.cellpose import PUBLISHED
        m = cfg["cellpose"]["model"]
        if m not in PUBLISHED and not os.path.isfile(m):
            problems.append(f"cellpose.model: '{m}' is neither a published name ({', '.join(PUBLISHED)}) nor an "
                            "existing file.")
    if sam and not cfg.get("predictions") and not model.get("checkpoint") and model["name"] not in MODELS:
        problems.append(f"model.name: unknown model '{model['name']}'. Valid names: {', '.join(sorted(MODELS))}; "
                        "or give model.checkpoint (and model.decoder).")
    for key in ("checkpoint", "decoder"):
        if sam and not cfg.get("predictions") and model.get(key) and not os.path.exists(model[key]):
            problems.append(f"model.{key}: '{model[key]}' does not exist.")
    if cfg["ingest"].get("source"):
        if not os.path.isdir(cfg["ingest"]["source"]):
            problems.append(f"ingest.source: '{cfg['ingest']['source']}' is not a directory.")
    elif not os.path.exists(cfg["input"]):
        problems.append(f"input: '{cfg['input']}' does not exist (give an OME-Zarr plate or image, or set "
                        "ingest.source to convert a folder of image files into it).")
    if cfg.get("predictions") and not os.path.exists(cfg["predictions"]):
        problems.append(f"predictions: '{cfg['predictions']}' does not exist.")
    return [f"{source}: {p}" for p in problems]


def resolve_method(cfg: dict[str, Any], source: str = "config") -> str:
    """The concrete method for ``method: auto`` (and a check that the choice can run at all)."""
    from .models.registry import MODELS
    from .methods import METHODS
    method = cfg["method"]
    model = cfg["model"]
    published = None if model.get("checkpoint") else MODELS.get(model["name"])
    if cfg.get("predictions"):
        if method != "auto" and METHODS[method].store is None:
            readers = ", ".join(f"'{m.name}'" for m in METHODS.values() if m.store)
            raise ConfigError(f"{source}: method '{method}' does not use a predictions store, so `predictions` "
                              f"has no effect with it. Drop `predictions`, or use method {readers}.")
        if method == "auto":  # a store of Cellpose flows is read by cellpose_sam, SAM maps by ais
            from .steps.plan import predictions_kind
            return "cellpose_sam" if predictions_kind(cfg["predictions"]) == "flows" else "ais"
        return method
    if method != "auto":
        return method
    if published is not None and published.decoder is None:
        return "amg"
    return "apg"


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return validate_config(raw, source=str(path))


def _model_name(cfg: dict[str, Any]) -> str | None:
    return None if cfg["model"].get("checkpoint") else cfg["model"]["name"]


def apg_params(cfg: dict[str, Any]):
    from .instances.apg import APGParams
    a = cfg["apg"]
    return APGParams(a["foreground_threshold"], a["center_distance_threshold"], a["boundary_distance_threshold"],
                     a["min_size"], a["nms_threshold"])


def amg_params(cfg: dict[str, Any]):
    """AMGParams, with micro-sam's tuned thresholds for its models where the config leaves them null."""
    from .instances.apg import AMGParams
    from .models.registry import AMG_DEFAULTS
    a = cfg["amg"]
    d = AMG_DEFAULTS.get(_model_name(cfg) or "", {"pred_iou_threshold": 0.88, "stability_score_threshold": 0.95})
    pick = (lambda k: a[k] if a[k] is not None else d[k])
    return AMGParams(a["points_per_side"], pick("pred_iou_threshold"), pick("stability_score_threshold"),
                     a["nms_threshold"], a["min_size"], a["remove_background"])


def ais_params(cfg: dict[str, Any]):
    """AISParams from the config, with micro-sam's per-model thresholds where the config leaves them null."""
    from .instances.ais import AISParams
    from .models.registry import ais_defaults
    a = cfg["ais"]
    d = ais_defaults(_model_name(cfg))
    return AISParams(
        center_distance_threshold=a["center_distance_threshold"] if a["center_distance_threshold"] is not None
        else d["center_distance_threshold"],
        boundary_distance_threshold=a["boundary_distance_threshold"] if a["boundary_distance_threshold"] is not None
        else d["boundary_distance_threshold"],
        foreground_threshold=a["foreground_threshold"], foreground_smoothing=a["foreground_smoothing"],
        distance_smoothing=a["distance_smoothing"], min_size=a["min_size"], keep_unseeded=a["keep_unseeded"])


def cellpose_params(cfg: dict[str, Any]):
    """FlowParams of cellpose's flows -> masks step from the ``cellpose`` section."""
    from .instances.flows import FlowParams
    c = cfg["cellpose"]
    return FlowParams(c["cellprob_threshold"], c["flow_threshold"], c["niter"], c["min_size"],
                      c["max_size_fraction"], c["diameter"], c["exact"])


def merge3d_params(cfg: dict[str, Any]):
    """Merge3DParams for the 3D merge of a volume's slices (``volume.merge``)."""
    from .stitch.merge3d import Merge3DParams
    return Merge3DParams(**cfg["volume"]["merge"])
