"""The published micro-sam / SAM models: download URLs, xxh128 hashes and per-model defaults.

Source of truth: micro-sam 1.8.14, ``micro_sam/util.py::models()`` and ``micro_sam/_model_settings.py``.
File names in the cache follow micro-sam's layout (``<cache>/models/<name>`` and
``<cache>/models/<name>_decoder``), so a user's existing micro-sam cache is reused as is.
"""
from __future__ import annotations

from dataclasses import dataclass

_EBI = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"
_GWDG = "https://owncloud.gwdg.de/index.php/s"
_FB = "https://dl.fbaipublicfiles.com/segment_anything"


@dataclass(frozen=True)
class ModelFile:
    url: str
    xxh128: str


@dataclass(frozen=True)
class PublishedModel:
    name: str
    sam: ModelFile
    decoder: ModelFile | None

    @property
    def model_type(self) -> str:
        return self.name[:5]


_SAM = {
    "vit_l": (f"{_FB}/sam_vit_l_0b3195.pth", "a82beb3c660661e3dd38d999cc860e9a"),
    "vit_h": (f"{_FB}/sam_vit_h_4b8939.pth", "97698fac30bd929c2e6d8d8cc15933c2"),
    "vit_b": (f"{_FB}/sam_vit_b_01ec64.pth", "6923c33df3637b6a922d7682bfc9a86b"),
    "vit_t": (f"{_GWDG}/TuDzuwVDHd1ZDnQ/download", "8eadbc88aeb9d8c7e0b4b60c3db48bd0"),
    "vit_l_lm": (f"{_EBI}/idealistic-rat/1.2/files/vit_l.pt", "017f20677997d628426dec80a8018f9d"),
    "vit_b_lm": (f"{_EBI}/diplomatic-bug/1.2/files/vit_b.pt", "fe9252a29f3f4ea53c15a06de471e186"),
    "vit_t_lm": (f"{_EBI}/faithful-chicken/1.1/files/vit_t.pt", "72ec5074774761a6e5c05a08942f981e"),
    "vit_l_em_organelles": (f"{_EBI}/humorous-crab/1.2/files/vit_l.pt", "810b084b6e51acdbf760a993d8619f2d"),
    "vit_b_em_organelles": (f"{_EBI}/noisy-ox/1.2/files/vit_b.pt", "f3bf2ed83d691456bae2c3f9a05fb438"),
    "vit_t_em_organelles": (f"{_EBI}/greedy-whale/1/files/vit_t.pt", "253474720c497cce605e57c9b1d18fd9"),
    "vit_b_histopathology": (f"{_GWDG}/sBB4H8CTmIoBZsQ/download", "ffd1a2cd84570458b257bd95fdd8f974"),
    "vit_l_histopathology": (f"{_GWDG}/IZgnn1cpBq2PHod/download", "b591833c89754271023e901281dee3f2"),
    "vit_h_histopathology": (f"{_GWDG}/L7AcvVz7DoWJ2RZ/download", "bd1856dafc156a43fb3aa705f1a6e92e"),
    "vit_b_medical_imaging": (f"{_GWDG}/f5Ol4FrjPQWfjUF/download", "40169f1e3c03a4b67bff58249c176d92"),
}

_DECODER = {
    "vit_l_lm": (f"{_EBI}/idealistic-rat/1.2/files/vit_l_decoder.pt", "2faeafa03819dfe03e7c46a44aaac64a"),
    "vit_b_lm": (f"{_EBI}/diplomatic-bug/1.2/files/vit_b_decoder.pt", "708b15ac620e235f90bb38612c4929ba"),
    "vit_t_lm": (f"{_EBI}/faithful-chicken/1.1/files/vit_t_decoder.pt", "3e914a5f397b0312cdd36813031f8823"),
    "vit_l_em_organelles": (
        f"{_EBI}/humorous-crab/1.2/files/vit_l_decoder.pt", "334877640bfdaaabce533e3252a17294"),
    "vit_b_em_organelles": (f"{_EBI}/noisy-ox/1.2/files/vit_b_decoder.pt", "bb6398956a6b0132c26b631c14f95ce2"),
    "vit_t_em_organelles": (
        f"{_EBI}/greedy-whale/1/files/vit_t_decoder.pt", "8f897c7bb93174a4d1638827c4dd6f44"),
    "vit_b_histopathology": (f"{_GWDG}/KO9AWqynI7SFOBj/download", "6a66194dcb6e36199cbee2214ecf7213"),
    "vit_l_histopathology": (f"{_GWDG}/oIs6VSmkOp7XrKF/download", "46aab7765d4400e039772d5a50b55c04"),
    "vit_h_histopathology": (f"{_GWDG}/1qAKxy5H0jgwZvM/download", "3ed9f87e46ad5e16935bd8d722c8dc47"),
    "vit_b_medical_imaging": (f"{_GWDG}/ahd3ZhZl2e0RIwz/download", "9e498b12f526f119b96c88be76e3b2ed"),
}

MODELS: dict[str, PublishedModel] = {
    name: PublishedModel(
        name=name,
        sam=ModelFile(*_SAM[name]),
        decoder=ModelFile(*_DECODER[name]) if name in _DECODER else None,
    )
    for name in _SAM
}

DEFAULT_MODEL = "vit_b_lm"

# micro-sam's tuned AIS seed thresholds (``_model_settings.AIS_SETTINGS``); others use 0.5 / 0.5.
AIS_DEFAULTS: dict[str, dict[str, float]] = {
    "vit_t_lm": {"center_distance_threshold": 0.5, "boundary_distance_threshold": 0.5},
    "vit_b_lm": {"center_distance_threshold": 0.4, "boundary_distance_threshold": 0.5},
    "vit_l_lm": {"center_distance_threshold": 0.4, "boundary_distance_threshold": 0.4},
    "vit_t_em_organelles": {"center_distance_threshold": 0.4, "boundary_distance_threshold": 0.5},
    "vit_b_em_organelles": {"center_distance_threshold": 0.3, "boundary_distance_threshold": 0.4},
    "vit_l_em_organelles": {"center_distance_threshold": 0.3, "boundary_distance_threshold": 0.4},
}

# micro-sam's tuned AMG thresholds (``_model_settings.AMG_SETTINGS``); plain SAM uses SAM's own defaults.
AMG_DEFAULTS: dict[str, dict[str, float]] = {
    "vit_t_lm": {"pred_iou_threshold": 0.6, "stability_score_threshold": 0.65},
    "vit_b_lm": {"pred_iou_threshold": 0.65, "stability_score_threshold": 0.7},
    "vit_l_lm": {"pred_iou_threshold": 0.65, "stability_score_threshold": 0.73},
    "vit_t_em_organelles": {"pred_iou_threshold": 0.75, "stability_score_threshold": 0.75},
    "vit_b_em_organelles": {"pred_iou_threshold": 0.75, "stability_score_threshold": 0.75},
    "vit_l_em_organelles": {"pred_iou_threshold": 0.8, "stability_score_threshold": 0.8},
}


def get_published(name: str) -> PublishedModel:
    """Look up a published model by name; the error lists every valid name."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model name '{name}'. Valid names: {', '.join(sorted(MODELS))}. "
            "For your own weights set model: {checkpoint: PATH, decoder: PATH} instead of model.name."
        ) from None


def ais_defaults(name: str | None) -> dict[str, float]:
    """Seed thresholds micro-sam uses for this model (0.5 / 0.5 when it has none tuned)."""
    return dict(AIS_DEFAULTS.get(name or "", {"center_distance_threshold": 0.5,
                                              "boundary_distance_threshold": 0.5}))
