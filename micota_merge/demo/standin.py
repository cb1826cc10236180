"""Metadata stand-ins: checkpoints that are real in every header and empty in every weight.

From a folder of a real checkpoint's metadata (config.json, and where known generation_config.json
and tokenizer_config.json), write a folder whose safetensors files carry the tensor names, shapes
and dtypes that transformers' own model class gives for that config (instantiated on the `meta`
device, so nothing is allocated), with a tied lm_head left out as `save_pretrained` leaves it out.
The data is a hole: the file is truncated to its full size, so a 65 GB 32B stand-in costs a few
kilobytes of disk. Every pre-flight check (`build --dry-run`) reads only these headers and the
JSON files, so it meets the paper-scale pairs' real traps in seconds.

The tokenizer: both families use the Qwen2 byte-level BPE (vocab.json, merges.txt shipped in
assets/qwen2_tokenizer); their added tokens (ids 151643+) come from
assets/model_meta/added_tokens_by_family.json, and the chat template, bos/eos/pad strings from the
real tokenizer config where one was found. What came from where is written to STANDIN.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from micota_merge.core.artifacts import atomic_dir, write_json_atomic
from micota_merge.core.errors import UserError
from micota_merge.core.fingerprint import data_fingerprint
from micota_merge.core.ownership import claim, identity_of
from micota_merge.core.safetensors_io import nbytes, numel, plan_shards, shard_file_names, write_header, write_index

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL_META = ASSETS / "model_meta"
FAMILY_TOKENS = MODEL_META / "added_tokens_by_family.json"
QWEN2_BPE = ASSETS / "qwen2_tokenizer"

_ST_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Fields of a real tokenizer_config.json that the stand-in keeps (values verbatim).
_TOKENIZER_FIELDS = (
    "chat_template",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "model_max_length",
    "clean_up_tokenization_spaces",
)


def meta_folder_name(hub_id: str) -> str:
    """deepseek-ai/DeepSeek-R1-Distill-Qwen-7B -> deepseek-ai__DeepSeek-R1-Distill-Qwen-7B (the model_meta layout)."""
    return hub_id.replace("/", "__")


def tensor_layout(meta: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], int]:
    """{name: (safetensors dtype, shape)} as save_pretrained writes them, and the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((meta / "config.json").read_text(encoding="utf-8"))
    try:
        cfg = AutoConfig.from_pretrained(meta)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise UserError(f"{meta / 'config.json'}: transformers cannot read it ({e})") from None
    dtype_name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype_name not in _ST_DTYPE:
        raise UserError(f"config.json: torch_dtype {dtype_name!r} is not one of {sorted(_ST_DTYPE)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype_name))
    tied = (
        model.get_output_embeddings() is not None
        and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    layout = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # save_pretrained writes a tied head once, as the embedding
        layout[name] = (_ST_DTYPE[str(t.dtype).removeprefix("torch.")], tuple(t.shape))
    n_params = sum(numel(shape) for _, shape in layout.values())
    return layout, n_params


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """A valid safetensors file whose data section is a hole. Returns its size in bytes."""
    with open(path, "wb") as f:
        size = write_header(
            f, tensors, sorted(tensors), {"format": "pt", "micota_standin": "data is a hole: no weights"}
        )
        f.truncate(f.tell() + size)
        return f.tell() + size


def family_tokens(folder_name: str) -> tuple[Optional[str], dict]:
    table = json.loads(FAMILY_TOKENS.read_text(encoding="utf-8"))
    for family, tokens in table.items():
        if not family.startswith("_") and folder_name.startswith(family):
            return family, tokens
    return None, {}


def _tokenizer_config(meta: Path) -> tuple[dict, Optional[str], Optional[dict]]:
    """(the fields a stand-in keeps, the file they came from, that file's own added_tokens_decoder)."""
    for name in ("tokenizer_config.json", "tokenizer_config.hf_api_subset.json"):
        p = meta / name
        if p.is_file():
            cfg = json.loads(p.read_text(encoding="utf-8"))
            kept = {k: cfg[k] for k in _TOKENIZER_FIELDS if k in cfg}
            for k, v in list(kept.items()):  # the HF API spells AddedToken objects with a "__type" key
                if isinstance(v, dict) and "content" in v:
                    kept[k] = v["content"]
            return kept, name, cfg.get("added_tokens_decoder")
    return {}, None, None


def _already(out: Path, identity: str, force: bool) -> bool:
    """A stand-in of the same metadata is already there (exit 0); another one needs --force."""
    c = claim(out, "standin", option="--out")
    if c.same(identity) and not force:
        return True
    if c.state == "ours" and not force:
        raise UserError(
            f"--out {out} already exists and holds a stand-in of other metadata: pass --force to replace it"
        )
    return False


def make_standin(
    meta: str | os.PathLike, out: str | os.PathLike, force: bool = False, shard_bytes: Optional[int] = None
) -> Path:
    """Write a stand-in checkpoint for the metadata in `meta` into `out`. Returns `out`."""
    meta, out = Path(meta), Path(out)
    if not (meta / "config.json").is_file():
        raise UserError(f"--meta {meta}: no config.json there; a stand-in needs at least the real config.json")
    config = json.loads((meta / "config.json").read_text(encoding="utf-8"))
    layout, n_params = tensor_layout(meta)
    prov: dict = {"meta": str(meta.resolve()), "parameters": n_params, "files": {}, "missing": []}
    ident = identity_of({"meta": data_fingerprint(meta), "shard_bytes": shard_bytes})
    if _already(out, ident, force):
        return out
    with atomic_dir(out, "standin", force=force, inputs={"--meta": meta}, option="--out", identity=ident) as staging:
        for name in ("config.json", "generation_config.json"):
            if (meta / name).is_file():
                shutil.copyfile(meta / name, staging / name)
                prov["files"][name] = f"copied from {meta / name}"
            else:
                prov["missing"].append(name)
        shards = plan_shards(layout, shard_bytes)
        weight_map, total = {}, 0
        for fname, names in zip(shard_file_names(len(shards)), shards):
            write_sparse_safetensors(staging / fname, {n: layout[n] for n in names})
            weight_map.update({n: fname for n in names})
            total += sum(nbytes(layout[n]) for n in names)
        if len(shards) > 1:
            write_index(staging, total, weight_map)
        prov["files"]["*.safetensors"] = (
            "tensor names, shapes and dtypes of transformers' "
            f"{config.get('architectures', ['?'])[0]} for this config.json; data is a hole"
        )
        _write_tokenizer(meta, staging, prov)
        write_json_atomic(staging / "STANDIN.json", prov)
    return out


def _write_tokenizer(meta: Path, staging: Path, prov: dict) -> None:
    family, tokens = family_tokens(meta.name)
    tok_cfg, tok_src, real = _tokenizer_config(meta)
    model_type = json.loads((meta / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    if not model_type.startswith("qwen"):
        # the only BPE in the assets is Qwen2's: another family's ids would be wrong, so the stand-in keeps
        # the real tokenizer_config (template, eos) for the pre-flight and no vocabulary
        if (meta / "tokenizer_config.json").is_file():
            shutil.copyfile(meta / "tokenizer_config.json", staging / "tokenizer_config.json")
            prov["files"]["tokenizer_config.json"] = f"copied from {meta / 'tokenizer_config.json'}"
        prov["missing"].append(f"tokenizer vocabulary ({model_type}'s BPE is not in the assets: it does not load)")
        return
    if real:  # the checkpoint's own added tokens (Qwen3's files have them), not a family table
        family, tokens = None, {i: {"content": t["content"], "special": t["special"]} for i, t in real.items()}
    if not tokens and not tok_cfg:
        prov["missing"].append("tokenizer (no tokenizer_config in the metadata and no known family)")
        return
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(QWEN2_BPE / name, staging / name)
    prov["files"]["vocab.json, merges.txt"] = (
        "the Qwen2 byte-level BPE (assets/qwen2_tokenizer; its merges.txt "
        "is the Qwen2.5-Instruct blob, see model_meta/SOURCES.md)"
    )
    cfg: dict = {
        "tokenizer_class": "Qwen2Tokenizer",
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": {
            i: {
                "content": t["content"],
                "special": t["special"],
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, t in tokens.items()
        },
    }
    cfg.update(tok_cfg)
    (staging / "tokenizer_config.json").write_text(
        json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    prov["files"]["tokenizer_config.json"] = (
        (f"{', '.join(sorted(tok_cfg))} verbatim from {tok_src}; " if tok_src else "")
        + (f"added_tokens_decoder from the {family} table (added_tokens_by_family.json); " if family else "")
        + ("added_tokens_decoder verbatim from tokenizer_config.json; " if real else "")
        + "tokenizer_class Qwen2Tokenizer, because the real tokenizer.json was not found"
    )
    if not tok_src:
        prov["missing"].append("tokenizer_config.json (so no chat template, no bos/eos strings)")
    elif "chat_template" not in tok_cfg:
        prov["missing"].append("chat_template")


# ---------------------------------------------------------------- whole recipes


def recipe_checkpoints(recipe) -> dict[str, str]:
    """Every checkpoint a recipe reads, by role: the merge's, and a pipeline's student and chain teacher."""
    specs = recipe.model_specs(made=True)
    if recipe.pipeline is not None:
        specs["pipeline.student"] = recipe.pipeline.student
        if recipe.pipeline.chain is not None:
            specs["pipeline.chain.teacher"] = recipe.pipeline.chain.teacher
    return specs


def recipe_standins(
    recipe_path: str | os.PathLike,
    meta_root: str | os.PathLike,
    out: str | os.PathLike,
    force: bool = False,
    shard_bytes: Optional[int] = None,
) -> Path:
    """Stand-ins for every checkpoint a recipe names (a pipeline's student and chain teacher too), and
    `out/recipe.yaml` pointing at them."""
    import yaml

    from micota_merge.merge.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    meta_root, out = Path(meta_root), Path(out)
    specs = recipe_checkpoints(recipe)
    missing = [
        f"{spec} ({meta_root / meta_folder_name(spec) / 'config.json'})"
        for spec in specs.values()
        if not (meta_root / meta_folder_name(spec) / "config.json").is_file()
    ]
    if missing:
        raise UserError(
            f"{recipe_path}: no metadata for {'; '.join(missing)}: a stand-in needs the real "
            "config.json at least (nothing is guessed)"
        )
    ident = identity_of(
        {
            "recipe": data_fingerprint(recipe_path),
            "shard_bytes": shard_bytes,
            "meta": [data_fingerprint(meta_root / meta_folder_name(spec)) for spec in specs.values()],
        }
    )
    if _already(out, ident, force):
        return out / "recipe.yaml"
    with atomic_dir(
        out,
        "standin",
        force=force,
        inputs={"--meta": meta_root, "--recipe": recipe_path},
        option="--out",
        identity=ident,
    ) as staging:
        done: dict[str, str] = {}
        for spec in dict.fromkeys(specs.values()):
            name = meta_folder_name(spec)
            make_standin(meta_root / name, staging / name, force=True, shard_bytes=shard_bytes)
            done[spec] = name
        data = recipe.model_dump(mode="json", exclude_none=True)
        for role, spec in specs.items():  # relative: a recipe's paths resolve beside it
            keys = role.split(".") if "." in role else ["models", role]
            place = data
            for k in keys[:-1]:
                place = place[k]
            place[keys[-1]] = done[spec]
        if recipe.models.base == "short_cot":
            data["models"]["base"] = "short_cot"
        data["output"] = str(out.resolve() / "ta")
        (staging / "recipe.yaml").write_text(
            f"# {recipe_path} on metadata stand-ins (micota-merge demo standin): dry-run only\n"
            + yaml.safe_dump(data, sort_keys=False),
            encoding="utf-8",
        )
    return out / "recipe.yaml"
