"""Model registry, download/verify and loading of every published file layout."""
import pytest
import torch

from pipeline_lib.models import download as dl
from pipeline_lib.models.loading import (ModelLoadError, decoder_uses_conv_transpose,
                                         load_model_files, select_device, sniff_model_type)
from pipeline_lib.models.registry import MODELS, get_published
from pipeline_lib.models.tiny import build_tiny, write_tiny_model


def _same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


@pytest.mark.parametrize("conv_transpose", [False, True])
def test_separate_files_give_same_weights(tmp_path, conv_transpose):
    paths = write_tiny_model(tmp_path, seed=3, conv_transpose=conv_transpose)
    sam, dec = build_tiny(seed=3, conv_transpose=conv_transpose)
    m = load_model_files(paths["checkpoint"], paths["decoder"], device="cpu")
    _same(m.sam, sam)
    _same(m.decoder, dec)
    assert m.decoder.use_conv_transpose is conv_transpose
    assert decoder_uses_conv_transpose(torch.load(paths["decoder"])) is conv_transpose


def test_training_checkpoint_gives_same_weights(tmp_path):
    paths = write_tiny_model(tmp_path, seed=5, training_checkpoint=True)
    state = torch.load(paths["checkpoint"])
    assert all(k.startswith("sam.") for k in state["model_state"])
    sam, dec = build_tiny(seed=5)
    m = load_model_files(paths["checkpoint"], device="cpu")
    _same(m.sam, sam)
    _same(m.decoder, dec)


def test_loaded_model_predicts_like_direct_model(tmp_path):
    paths = write_tiny_model(tmp_path, seed=1)
    sam, dec = build_tiny(seed=1)
    m = load_model_files(paths["checkpoint"], paths["decoder"], device="cpu", encoder="stock")
    fast = load_model_files(paths["checkpoint"], paths["decoder"], device="cpu")  # SDPA encoder: float-close
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        direct = dec.forward_features(sam.image_encoder(x))
        assert torch.equal(m.decoder.forward_features(m.sam.image_encoder(x)), direct)
        torch.testing.assert_close(fast.decoder.forward_features(fast.sam.image_encoder(x)), direct,
                                   rtol=1e-4, atol=1e-4)


def test_sniff_model_type():
    assert sniff_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}) == "vit_b"
    assert sniff_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}) == "vit_l"
    assert sniff_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}) == "vit_h"
    assert sniff_model_type({"image_encoder.neck.0.weight": torch.zeros(1)}) == "vit_t"


def test_full_size_architecture_is_sniffed_from_weights():
    """A vit_b-shaped state dict (built, not downloaded) reproduces SAM's vit_b architecture."""
    from segment_anything import sam_model_registry
    from pipeline_lib.models.loading import _encoder_architecture
    sd = sam_model_registry["vit_b"]().state_dict()
    arch = _encoder_architecture(sd)
    assert arch == {"encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12,
                    "encoder_global_attn_indexes": [2, 5, 8, 11]}


def test_decoder_missing_for_ais(tmp_path):
    paths = write_tiny_model(tmp_path)
    with pytest.raises(ModelLoadError, match="AIS|ais"):
        load_model_files(paths["checkpoint"], None, device="cpu", require_decoder=True)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_published("vit_q_lm")
    assert "vit_b_lm" in str(e.value) and "vit_l_em_organelles" in str(e.value)


def test_registry_matches_published_hashes():
    assert MODELS["vit_b_lm"].sam.xxh128 == "fe9252a29f3f4ea53c15a06de471e186"
    assert MODELS["vit_b_lm"].decoder.xxh128 == "708b15ac620e235f90bb38612c4929ba"
    assert MODELS["vit_l_lm"].decoder.xxh128 == "2faeafa03819dfe03e7c46a44aaac64a"
    assert MODELS["vit_b"].decoder is None
    assert MODELS["vit_b"].sam.url.endswith("sam_vit_b_01ec64.pth")


def test_download_verifies_hash_and_caches(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"weights" * 1000)
    good = dl.file_xxh128(src)
    target = tmp_path / "cache" / "vit_x"
    dl.ensure_file(src.as_uri(), good, target, progress=False)
    assert target.read_bytes() == src.read_bytes()
    src.unlink()  # now offline: the cached, verified file is used
    assert dl.ensure_file(src.as_uri(), good, target, progress=False) == target


def test_download_bad_hash_leaves_no_file(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"corrupt")
    target = tmp_path / "cache" / "m"
    with pytest.raises(dl.DownloadError, match="xxh128"):
        dl.ensure_file(src.as_uri(), "0" * 32, target, progress=False)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_failed_download_names_url_and_local_files(tmp_path):
    url = "http://127.0.0.1:9/vit_b.pt"
    with pytest.raises(dl.DownloadError) as e:
        dl.ensure_file(url, "0" * 32, tmp_path / "m", progress=False)
    assert url in str(e.value) and "checkpoint:" in str(e.value)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path))
    assert dl.default_cache_dir() == tmp_path / "models"


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            select_device("cuda")


def test_corrupt_cached_file_is_fetched_again(tmp_path):
    src = tmp_path / "remote.bin"
    src.write_bytes(b"weights" * 1000)
    good = dl.file_xxh128(src)
    target = tmp_path / "cache" / "vit_x"
    target.parent.mkdir()
    target.write_bytes(b"truncated")
    dl.ensure_file(src.as_uri(), good, target, progress=False)
    assert target.read_bytes() == src.read_bytes()
