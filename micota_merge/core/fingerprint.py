"""Content identity: one fingerprint of a checkpoint that changes when any weight byte changes.

Two fine-tunes of one architecture share their config.json and every safetensors header, so
identity must come from the bytes. Every stage that decides "same input" (manifests, generate
resume, the eval response cache, `run` stage skipping, sweep resume, distill resume) asks this
module.

Cost: weight files are hashed with xxh3-128 (several GB/s, far above disk speed), once per file
version: the digest is cached keyed by (size, mtime_ns, inode), in `.micota-fingerprint.json`
inside an output micota-merge wrote, and for every other folder (the user's checkpoints, which are
read and never written) under $MICOTA_CACHE or ~/.cache/micota-merge/fingerprints/.
A file in the Hugging Face cache is a symlink to `blobs/<sha256>`: its name is its identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from micota_merge.core.checkpoints import TOKENIZER_FILES
from micota_merge.core.errors import UserError

CACHE_NAME = ".micota-fingerprint.json"
CACHE_FORMAT = 1
_CHUNK = 16 << 20
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")

# Besides the weights, the files that change what a model generates: its config, generation
# defaults, tokenizer and chat template. README, micota.json, sweep tables and the like do not.
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _hasher():
    import xxhash  # a dependency (pyproject.toml): several GB/s, so identity by content costs little

    return xxhash.xxh3_128(), "xxh3_128"


def file_digest(path: str | os.PathLike) -> str:
    """`algo:hex` of a file's bytes (streamed; never the whole file in memory)."""
    h, algo = _hasher()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return f"{algo}:{h.hexdigest()}"


def hub_blob_digest(path: Path) -> str | None:
    """`sha256:<hex>` for a file in the Hugging Face cache (a symlink to blobs/<its sha256>)."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256_NAME.match(target.name):
        return f"sha256:{target.name}"
    return None


def cache_home() -> Path:
    """micota-merge's own cache folder: $MICOTA_CACHE, else ~/.cache/micota-merge."""
    return Path(os.environ.get("MICOTA_CACHE", Path.home() / ".cache" / "micota-merge"))


def cache_file(folder: Path) -> Path:
    """Where a folder's digests are cached: inside an output micota-merge wrote (its micota.json says
    so), else under the user's cache folder: a checkpoint of the user's is read, never written to."""
    folder = Path(folder)
    local = folder / CACHE_NAME
    if (folder / "micota.json").is_file() and os.access(folder, os.W_OK):
        return local
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return cache_home() / "fingerprints" / f"{key}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["files"] if data.get("format") == CACHE_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_cache(path: Path, files: dict) -> None:
    from micota_merge.core.artifacts import write_json_atomic

    try:
        write_json_atomic(path, {"format": CACHE_FORMAT, "files": files})
    except OSError:  # a cache we cannot write only costs a re-hash next time
        pass


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def model_files(folder: Path) -> list[Path]:
    """The files that make up the model: weights, config, generation config, tokenizer."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if (
            p.name in MODEL_FILES
            or (p.suffix in WEIGHT_SUFFIXES and p.is_file())
            or p.name.endswith(".safetensors.index.json")
        ):
            out.append(p)
    return out


def checkpoint_fingerprint(folder: str | os.PathLike) -> dict:
    """{"content": one id for the whole model, "files": {name: digest}} for a checkpoint folder.

    `content` changes when any byte of a weight, config, generation config or tokenizer file
    changes, or when a file is added or removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a checkpoint folder")
    cache_path = cache_file(folder)
    cache = _load_cache(cache_path)
    files: dict[str, str] = {}
    fresh_cache: dict[str, dict] = {}
    changed = False
    for p in model_files(folder):
        blob = hub_blob_digest(p)
        if blob:
            files[p.name] = blob
            continue
        st = p.stat()
        key = _stat_key(st)
        hit = cache.get(p.name)
        if hit and hit.get("key") == key:
            digest = hit["digest"]
        else:
            digest = file_digest(p)
            changed = True
        files[p.name] = digest
        fresh_cache[p.name] = {"key": key, "digest": digest}
    if changed or set(fresh_cache) != set(cache):
        _save_cache(cache_path, fresh_cache)
    content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"content": content, "files": files}


def content_id(folder: str | os.PathLike) -> str:
    """The checkpoint's content fingerprint alone (64 hex characters)."""
    return checkpoint_fingerprint(folder)["content"]


def data_fingerprint(path: str | os.PathLike) -> str:
    """Content id of a data file, or of every file under a data folder (a save_to_disk dataset)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        parts = {
            str(p.relative_to(path)): file_digest(p)
            for p in sorted(path.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        return "tree:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    raise UserError(f"{path} does not exist")
