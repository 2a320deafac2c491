"""The method registry: one entry per segmentation method, saying what it needs and which steps run it.

Everything that used to be a branch on the method name (the model to resolve, whether the decoder is
needed, whether a predictions store is written or read and of which kind, the Snakemake rule chain, the
provenance keys, the resolved thresholds) is read off :data:`METHODS`. A new method is one entry here plus
its steps and its schema section. Steps are import paths (``"module:function"``) so that this module
imports neither torch nor the algorithm packages.

Predictions stores come in two kinds, both (3, Y, X) float16 per field: ``sam_maps`` (micro-sam's decoder
maps: foreground, center distance, boundary distance) and ``flows`` (Cellpose's ``dY, dX, cellprob``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

#: Root attribute of a predictions store naming its kind (``sam_maps`` or ``flows``); absent in stores
#: written before the registry (read as ``sam_maps``).
STORE_KIND_KEY = "pipeline_lib_predictions_kind"
STORE_KINDS = {"sam_maps": "micro-sam decoder maps (foreground, center distance, boundary distance)",
               "flows": "Cellpose flows (dY, dX, cellprob)"}


@dataclass(frozen=True)
class Method:
    """What one method needs and which steps run it.

    ``network``: the model the ``model`` rule resolves (``sam``: SAM encoder + optional decoder from
    ``model:``; ``cellpose``: a Cellpose-SAM net from ``cellpose.model``). ``store``: the kind of
    predictions store the method writes (and reads with ``predictions:``), None for none. ``network_reads
    _predictions``: the network still runs when ``predictions`` is given (APG: SAM decodes prompts from the
    given maps); otherwise ``predictions`` skips the model entirely and the job needs no GPU.
    ``chain``: ``predict_segment`` (GPU ``predict`` -> CPU ``segment`` rules) or ``prompt_segment`` (one GPU
    ``prompt_segment`` rule). ``sections``: the config sections that decide its objects (provenance, rule
    params). ``params``: import path of ``f(cfg) -> dataclass`` of the resolved parameters. ``predict`` /
    ``segment``: import paths of the batch steps the rules call; ``instances``: the per-field instance step
    of the ``segment`` rule (``f(cfg, predictions, out, scratch, progress, threads) -> dict``) or of the
    prompt step (``f(cfg, decoder, blocks, maps, shape, tile, clock) -> (labels, info)``).
    ``slice_instances``: ``f(maps, params) -> labels`` of one in-memory (3, h, w) crop (volume slices of the
    predict -> segment chain). ``stack_instances``: ``volume.instances: stack`` applies (AIS in 3D).
    ``embeddings``: the per-tile encoder output the method is computed from (``sam``: SAM's image encoder
    on ``tiling`` tiles, and its decoder maps where the method reads them); methods of a list with the same
    value share one encoder pass per tile (:func:`shared_embeddings`), None for a network of its own.
    """

    name: str
    network: str
    store: str | None
    chain: str
    sections: tuple[str, ...]
    params: str
    predict: str | None = None
    segment: str | None = None
    instances: str | None = None
    slice_instances: str | None = None
    stack_instances: bool = False
    network_reads_predictions: bool = False
    embeddings: str | None = None
    description: str = ""

    @property
    def network_rule(self) -> str:
        """The module rule that runs the network (``predict`` or ``prompt_segment``)."""
        return "predict" if self.chain == "predict_segment" else "prompt_segment"

    @property
    def network_marker(self) -> str:
        """The folder under ``jobs/`` of the network step's batch markers (``predict`` or ``segment``)."""
        return "predict" if self.chain == "predict_segment" else "segment"

    def needs_decoder(self, cfg: dict[str, Any]) -> bool:
        """Whether the SAM instance decoder must run: the method uses decoder maps and they are not given."""
        return self.network == "sam" and self.store == "sam_maps" and not cfg.get("predictions")

    def uses_model(self, cfg: dict[str, Any]) -> bool:
        """Whether any network runs (and the jobs that run it need a GPU)."""
        return not cfg.get("predictions") or self.network_reads_predictions

    def resolved_params(self, cfg: dict[str, Any]) -> Any:
        return load(self.params)(cfg)

    def step(self, kind: str) -> Callable:
        """The callable of step ``kind`` (``predict``, ``segment``, ``instances``)."""
        path = getattr(self, kind)
        if path is None:
            raise ValueError(f"method '{self.name}' has no {kind} step (its rule chain is {self.chain}).")
        return load(path)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("apg", network="sam", store="sam_maps", chain="prompt_segment", sections=("apg", "encoder"),
           params="pipeline_lib.config:apg_params", segment="pipeline_lib.steps.prompt_segment:run_prompt_segment_batch",
           instances="pipeline_lib.steps.prompt_segment:apg_labels", network_reads_predictions=True,
           embeddings="sam",
           description="automatic prompt generation: decoder maps give point prompts, SAM decodes them, mask NMS"),
    Method("ais", network="sam", store="sam_maps", chain="predict_segment", sections=("ais",),
           params="pipeline_lib.config:ais_params", predict="pipeline_lib.steps.predict:run_predict_batch",
           segment="pipeline_lib.steps.segment:run_segment_batch",
           instances="pipeline_lib.steps.segment:ais_instances",
           slice_instances="pipeline_lib.instances.ais:ais_single", stack_instances=True, embeddings="sam",
           description="seeded watershed on the decoder maps"),
    Method("amg", network="sam", store=None, chain="prompt_segment", sections=("amg", "encoder"),
           params="pipeline_lib.config:amg_params", segment="pipeline_lib.steps.prompt_segment:run_prompt_segment_batch",
           instances="pipeline_lib.steps.prompt_segment:amg_labels", embeddings="sam",
           description="SAM's point-grid automatic mask generator (no decoder)"),
    Method("cellpose_sam", network="cellpose", store="flows", chain="predict_segment", sections=("cellpose",),
           params="pipeline_lib.config:cellpose_params",
           predict="pipeline_lib.steps.cellpose:run_cellpose_predict_batch",
           segment="pipeline_lib.steps.segment:run_segment_batch",
           instances="pipeline_lib.steps.cellpose:cellpose_instances",
           slice_instances="pipeline_lib.embed.cellpose_dynamics:cellpose_masks",
           description="Cellpose-SAM: cellpose's network writes flows, cellpose's dynamics make the masks"),
]}


def load(path: str) -> Callable:
    """The object at ``"module:attribute"``."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_method(name_or_cfg: str | dict[str, Any]) -> Method:
    """The registry entry of a method name, or of a validated config's ``method``."""
    name = name_or_cfg["method"] if isinstance(name_or_cfg, dict) else name_or_cfg
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; known: {', '.join(METHODS)}") from None


#: The config sections of each network (rule params of the jobs that run it).
NETWORK_SECTIONS = {"sam": ("encoder",), "cellpose": ("cellpose",)}


def network_sections(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config sections of the configured method's network (``predict`` rule params)."""
    return {k: cfg[k] for k in NETWORK_SECTIONS[get_method(cfg).network]}


def method_sections(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config sections of the configured method (Snakemake rule params: a change reruns the jobs)."""
    return {k: cfg[k] for k in get_method(cfg).sections}


# Several methods side by side (``method: [apg, ais]``): workflow/rules/methods.smk runs this workflow once
# per method, as a Snakemake module with :func:`method_config`.
def method_names(cfg: dict[str, Any]) -> list[str]:
    """The configured method(s), in order."""
    m = cfg["method"]
    return list(m) if isinstance(m, (list, tuple)) else [m]


def method_label_name(cfg: dict[str, Any], name: str) -> str:
    """``labels/<labels.name>`` for one method, ``labels/<labels.name>_<method>`` for each of several."""
    base = cfg["labels"]["name"]
    return base if len(method_names(cfg)) == 1 else f"{base}_{name}"


def method_output(cfg: dict[str, Any], name: str) -> str:
    """``<output>`` for one method, ``<output>/methods/<method>`` (its tables and metrics) for each of several."""
    import os
    return cfg["output"] if len(method_names(cfg)) == 1 else os.path.join(cfg["output"], "methods", name)


def method_config(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The config of one method of several: that method, its label name and its output folder."""
    import copy
    if len(method_names(cfg)) == 1:
        return cfg
    out = copy.deepcopy(cfg)
    out.update(method=name, output=method_output(cfg, name),
               labels=dict(cfg["labels"], name=method_label_name(cfg, name)))
    return out


def shared_embeddings(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The methods of a list that share one encoder pass: ``{"lead", "methods"}`` or None.

    Two or more methods with the same ``embeddings`` of which one runs the ``prompt_segment`` chain (its
    per-field pipeline keeps a field's embeddings on the device while every sharer's instance step uses
    them): that one (the first in the list) leads, and one GPU job per batch
    (:func:`pipeline_lib.steps.shared_embeddings.run_shared_batch`) writes every sharer's labels or maps.
    Plates and 2D images only (workflow/rules/methods.smk leaves volumes unshared)."""
    names = method_names(cfg)
    for key in dict.fromkeys(METHODS[m].embeddings for m in names if METHODS[m].embeddings):
        group = [m for m in names if METHODS[m].embeddings == key and METHODS[m].uses_model(cfg)]
        leads = [m for m in group if METHODS[m].chain == "prompt_segment"]
        if len(group) >= 2 and leads:
            return {"lead": leads[0], "methods": group, "embeddings": key}
    return None


def methods_index(cfg: dict[str, Any], plans: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``<output>/methods.json``: the methods, their output folders, and per field the label image of
    each method (``labels_by_method``), from the plans of the methods' runs."""
    fields: dict[str, dict[str, Any]] = {}
    for name, plan in plans.items():
        if plan.get("kind") == "volume":  # a volume is one "field" without a well (its one label image)
            plan = {"fields": [{"key": "image", "path": "", "image": plan.get("input"), "plate": "", "well": "",
                                "row": "", "column": "", "field": "", "labels": plan["labels"]}]}
        for f in plan.get("fields", []):
            entry = fields.setdefault(f["key"], {k: f.get(k) for k in ("key", "path", "image", "plate", "well",
                                                                           "row", "column", "field")})
            entry.setdefault("labels_by_method", {}).update(f.get("labels_by_method") or {name: f["labels"]})
    return {"methods": list(plans), "outputs": {m: method_output(cfg, m) for m in plans},
            "fields": list(fields.values())}
