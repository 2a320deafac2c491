"""Download published model files once into a cache, verify their xxh128 hashes, then work offline."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import xxhash

from .registry import PublishedModel, get_published


class DownloadError(RuntimeError):
    """A model file could not be fetched or failed its hash check."""


def default_cache_dir() -> Path:
    """micro-sam's cache layout, so an existing micro-sam cache is reused: $MICROSAM_CACHEDIR/models."""
    root = os.environ.get("MICROSAM_CACHEDIR")
    if root:
        return Path(root) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "micro_sam" / "models"


def file_xxh128(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = xxhash.xxh128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, expected: str, target: Path, progress: bool = True, timeout: float = 60) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    total = int(resp.headers.get("Content-Length") or 0)
                    done = 0
                    while block := resp.read(1 << 22):
                        out.write(block)
                        done += len(block)
                        if progress and total:
                            print(f"\r  {target.name}: {done / 2**20:.0f} / {total / 2**20:.0f} MiB",
                                  end="", file=sys.stderr, flush=True)
                    if progress:
                        print(file=sys.stderr)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise DownloadError(
                    f"Could not download {url} ({e}). Without internet access, download the file elsewhere and "
                    f"either place it at {target} (it is hash-checked), or point the config at local files: "
                    "model: {checkpoint: /path/sam.pt, decoder: /path/decoder.pt}.") from e
        got = file_xxh128(tmp)
        if got != expected:
            raise DownloadError(f"Downloaded {url} but its xxh128 is {got}, expected {expected}; "
                                "the file is corrupt or the URL changed. Nothing was written to the cache.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_file(url: str, expected: str, target: Path, progress: bool = True, timeout: float = 60) -> Path:
    """Return ``target``, downloading it if absent; a cached file with a wrong hash is re-fetched.
    ``timeout``: seconds per connection attempt and per read."""
    if target.is_file():
        if file_xxh128(target) == expected:
            return target
        print(f"cached {target} fails its hash check; downloading it again", file=sys.stderr)
    _fetch(url, expected, target, progress, timeout)
    return target


def unreachable(url: str, timeout: float = 10) -> str | None:
    """Why ``url`` cannot be fetched now (e.g. no internet), or None when it answers within ``timeout`` s.

    A HEAD request in a daemon thread, so that even a name lookup that hangs (not covered by socket
    timeouts) costs at most ``timeout`` seconds."""
    result: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                result.append(None)
        except urllib.error.HTTPError:  # the server answered (e.g. HEAD not allowed): the network works
            result.append(None)
        except (urllib.error.URLError, OSError, ValueError) as e:
            result.append(str(getattr(e, "reason", e)))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def ensure_published(name: str, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True, timeout: float = 60) -> dict[str, str]:
    """Make sure the files of model ``name`` are in the cache; return their paths and hashes."""
    model: PublishedModel = get_published(name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = {"name": name,
           "checkpoint": str(ensure_file(model.sam.url, model.sam.xxh128, cache / name, progress, timeout)),
           "checkpoint_xxh128": model.sam.xxh128}
    if model.decoder is not None:
        out["decoder"] = str(ensure_file(model.decoder.url, model.decoder.xxh128, cache / f"{name}_decoder",
                                         progress, timeout))
        out["decoder_xxh128"] = model.decoder.xxh128
    return out


def copy_into_cache(src: str | os.PathLike, name: str, cache_dir: str | os.PathLike | None = None,
                    decoder: bool = False) -> Path:
    """Put a file downloaded by hand into the cache after checking its hash."""
    model = get_published(name)
    ref = model.decoder if decoder else model.sam
    if ref is None:
        raise ValueError(f"model '{name}' has no decoder file")
    got = file_xxh128(src)
    if got != ref.xxh128:
        raise DownloadError(f"'{src}' has xxh128 {got}, but {name}{'_decoder' if decoder else ''} "
                            f"must have {ref.xxh128}.")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / (f"{name}_decoder" if decoder else name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target
