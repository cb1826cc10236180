"""AIM, Activation-Informed Merging (arXiv 2502.02421), over any task-vector merge.

The merge (TIES, DARE-TIES, ...) runs through mergekit as the recipe says; AIM then pulls each
weight's update back towards the base model, input channel by input channel, in proportion to
how strongly the base model's activations use that channel on a calibration set. The formula is
the authors' own code (`relax_on_merged` in their ActivationInformedMerging repository):

  for every module with a weight except the embeddings, with x its input on the calibration blocks,
    a_c  = Σ_blocks mean_tokens |x_c|            (one value per input channel c)
    â    = a / max(a)
    θ    = θ_base + (θ_merged − θ_base) ⊙ (1 − â·(1 − ω))      (â broadcast over the last axis)

ω = 1 keeps the merge as it is; ω = 0 pins the base's most used channel to the base. The
Long-to-Short study (arXiv 2503.20641) ran AIM-TIES with ω = 0.4 at 1.5B, 7B and 14B.

mergekit has no per-channel scale, so the rescale is one streaming pass over the merged tensors,
a shard in memory at a time. The importances are computed once per (base content, tokenizer
content, calibration texts, block size), cached under $MICOTA_CACHE (or ~/.cache/micota-merge)/aim,
reused by every point of a sweep, and copied beside each TA (aim/channel_importance.safetensors,
listed in its micota.json).

Calibration texts (`merge.aim.calibration`): by default a fixed seeded sample of the training
questions (the probe's, else the pipeline's, else gsm8k-train), each in the probe's (else the
pipeline's) prompt through the TA's chat template;
`records:` takes a generate output instead (prompt + completion: a model's own answers, as the
study calibrated on s1K's long-CoT traces). They are tokenized, concatenated and cut into blocks of
`block_size` tokens (the authors' 512), a shorter remainder dropped unless it is the only block.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from micota_merge.core.errors import UserError
from micota_merge.core.identity import digest
from micota_merge.core.strict import Float, Int

FORMAT = 1
FOLDER = "aim"  # beside the TA's weights, not among them: vLLM loads every *.safetensors at the top
FILE = "channel_importance.safetensors"


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    questions: Optional[str] = Field(
        None,
        description="question set whose prompts calibrate (default: sweep.probe.questions, else "
        "pipeline.questions, else gsm8k-train)",
    )
    records: Optional[str] = Field(
        None, description="a generate output (JSONL with prompt and completion) to calibrate on instead"
    )
    size: Int = Field(64, ge=1, description="texts drawn (seeded) from the questions or records")
    seed: Int = Field(0, description="seed of the draw")
    block_size: Int = Field(512, ge=8, description="tokens per calibration block (the authors' 512)")


class AimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    omega: Float = Field(0.4, ge=0.0, le=1.0, description="balance factor ω: 1 keeps the merge, 0 keeps the base")
    calibration: Calibration = Field(default_factory=Calibration)


@dataclass
class AimPlan:
    """What the relaxation depends on, known before any weight is read."""

    omega: float
    texts: list[str]
    source: str
    block_size: int
    base: Path
    tokenizer: Path

    @property
    def texts_digest(self) -> str:
        return digest(self.texts)

    def key(self, base_content: str, tokenizer_content: str) -> str:
        return digest(
            {
                "format": FORMAT,
                "base": base_content,
                "tokenizer": tokenizer_content,
                "texts": self.texts_digest,
                "block_size": self.block_size,
            }
        )

    def record(self) -> dict:
        """The calibration as the identity and micota.json state it."""
        return {
            "omega": self.omega,
            "source": self.source,
            "texts": len(self.texts),
            "texts_digest": self.texts_digest,
            "block_size": self.block_size,
        }


def plan(recipe, paths: dict[str, Path], base_dir: Path) -> Optional[AimPlan]:
    """The recipe's AIM step, or None; bad calibration input is refused here, before anything is written."""
    settings: Optional[AimSettings] = recipe.merge.aim
    if settings is None:
        return None
    cal = settings.calibration
    tok_path = paths[recipe.tokenizer]
    if cal.records:
        path = Path(os.path.expanduser(cal.records))
        if not path.is_absolute() and (base_dir / path).exists():
            path = base_dir / path
        pool, source = _record_texts(path), f"records {path}"
    else:
        from micota_merge.data.questions import load_questions

        name = cal.questions or _default_questions(recipe)
        pool, source = [r["question"] for r in load_questions(name)], f"questions {name}"
    if not pool:
        raise UserError(f"merge.aim.calibration: {source} holds no text to calibrate on")
    # the draw comes first: only the drawn questions go through the chat template
    picked = [pool[i] for i in sorted(random.Random(cal.seed).sample(range(len(pool)), min(cal.size, len(pool))))]
    texts = picked if cal.records else _prompt_texts(tok_path, picked, _default_prompt(recipe))
    return AimPlan(
        settings.omega,
        texts,
        f"{source}, {len(picked)} of {len(pool)} (seed {cal.seed})",
        cal.block_size,
        paths["base"],
        tok_path,
    )


def _default_questions(recipe) -> str:
    if recipe.sweep is not None and recipe.sweep.probe.questions:
        return recipe.sweep.probe.questions
    if recipe.pipeline is not None:
        return recipe.pipeline.questions
    return "gsm8k-train"


def _default_prompt(recipe) -> Optional[str]:
    """The prompt the TA is asked with: the probe's, else the pipeline's (None: the papers' default)."""
    if recipe.sweep is not None and recipe.sweep.probe.prompt:
        return recipe.sweep.probe.prompt
    return recipe.pipeline.prompt if recipe.pipeline is not None else None


def _prompt_texts(tokenizer_path: Path, questions: list[str], prompt: Optional[str]) -> list[str]:
    from transformers import AutoTokenizer

    from micota_merge.data.questions import DEFAULT_PROMPT, format_prompt

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    return [format_prompt(tok, q, prompt or DEFAULT_PROMPT)[1] for q in questions]


def _record_texts(path: Path) -> list[str]:
    from micota_merge.data.questions import jsonl_lines

    if not path.is_file():
        raise UserError(f"merge.aim.calibration.records: {path} does not exist (give a generate output, a JSONL file)")
    out = []
    for n, line in jsonl_lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"merge.aim.calibration.records: {path} line {n} is not JSON") from None
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("prompt"), str)
            or not isinstance(rec.get("completion"), str)
        ):
            raise UserError(
                f"merge.aim.calibration.records: {path} line {n} has no prompt and completion text "
                "(give the records a generate stage wrote)"
            )
        out.append(rec["prompt"] + rec["completion"])
    return out


# ------------------------------------------------------------------ the importances


def blocks(tokenizer, texts: list[str], block_size: int) -> list[list[int]]:
    """The calibration token blocks: every text's tokens in order, cut into block_size pieces."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("merge.aim.calibration: the calibration texts tokenize to nothing")
    if len(ids) < block_size:
        return [ids]
    return [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]


def _hooked_modules(model, tensor_names: set[str]) -> dict[str, Any]:
    """Modules whose `<name>.weight` the checkpoint holds, the embeddings left out (as the authors do)."""
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is None or "embed" in name or f"{name}.weight" not in tensor_names:
            continue
        out[name] = module
    return out


def channel_importance(
    base: Path, tokenizer_path: Path, texts: list[str], block_size: int, dtype: str = "float32"
) -> tuple[dict[str, Any], dict]:
    """{tensor name: â (float32, one per input channel)} of the base model on the calibration blocks."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from micota_merge.core.checkpoints import read_checkpoint

    names = set(read_checkpoint(base).tensors)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype)).to(device).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or block_size
    size = min(block_size, limit)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    chunks = blocks(tok, texts, size)
    sums: dict[str, Any] = {}

    def hook(name):
        def record(_module, args, kwargs, _output):
            x = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
            if x is None:
                return
            stat = x.detach().reshape(-1, x.shape[-1]).abs().float().mean(dim=0).cpu()
            sums[name] = stat if name not in sums else sums[name] + stat

        return record

    modules = _hooked_modules(model, names)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for ids in tqdm(chunks, desc="AIM calibration (base model)", unit="block"):
                model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, s in sums.items():
        w = modules[name].weight
        if s.numel() != w.shape[-1]:
            continue  # an input that is not the weight's input channels: left as merged
        peak = s.abs().max()
        out[f"{name}.weight"] = (s.abs() / peak) if peak > 0 else torch.zeros_like(s)
    stats = {"blocks": len(chunks), "tokens": sum(len(c) for c in chunks), "block_size": size, "tensors": len(out)}
    del model
    return out, stats


def cache_dir() -> Path:
    from micota_merge.core.fingerprint import cache_home

    return cache_home() / "aim"


def importance_for(aim: AimPlan, base_content: str, tokenizer_content: str, dtype: str, echo=print):
    """The importances, from the cache when this base, tokenizer and calibration were seen before."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = aim.key(base_content, tokenizer_content)
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["micota"])
                imp = {n: f.get_tensor(n) for n in f.keys()}
            echo(f"AIM: channel importances from the cache ({path})")
            return imp, {**meta, "cached": True, "key": key}
        except (OSError, KeyError, ValueError, TypeError):
            pass  # an unreadable cache entry is recomputed
    imp, stats = channel_importance(aim.base, aim.tokenizer, aim.texts, aim.block_size, dtype)
    if not imp:
        raise UserError(f"merge.aim: no module of {aim.base} has a weight AIM can relax")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(imp, str(tmp), metadata={"micota": json.dumps(stats)})
        os.replace(tmp, path)  # whole or absent: a reader never sees half of it
    except OSError:
        pass  # a cache we cannot write only costs a recomputation next time
    return imp, {**stats, "cached": False, "key": key}


def relax(merged, base, importance, omega: float):
    """θ_base + (θ_merged − θ_base)·(1 − â(1 − ω)), in float32, returned in the merged tensor's dtype."""
    b = base.to(merged.dtype).float()
    factor = 1.0 - importance.float() * (1.0 - omega)
    return (b + (merged.float() - b) * factor).to(merged.dtype)


def relax_checkpoint(folder: Path, aim: AimPlan, importance: dict[str, Any], echo=print) -> int:
    """Relax every merged tensor AIM covers in `folder` (a staging folder), a shard at a time. Returns
    the tensors relaxed."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from micota_merge.core.checkpoints import weight_files

    done = 0
    with ExitStack() as stack:
        base = {}  # tensor name -> the open base file holding it, each file opened once
        for f in weight_files(aim.base):
            h = stack.enter_context(safe_open(str(f), framework="pt"))
            base.update({n: h for n in h.keys()})
        for f in tqdm(weight_files(folder), desc="AIM relaxation", unit="shard"):
            with safe_open(str(f), framework="pt") as h:
                meta = h.metadata() or {"format": "pt"}
            tensors = load_file(str(f))
            touched = [n for n in tensors if n in importance]
            if not touched:
                continue
            for n in touched:
                tensors[n] = relax(tensors[n], base[n].get_tensor(n), importance[n], aim.omega)
                done += 1
            tmp = f.with_name(f.name + ".aim-tmp")
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, f)
            del tensors
    return done


def save_beside(folder: Path, importance: dict[str, Any], aim: AimPlan, stats: dict) -> dict:
    """Copy the importances into the TA folder; the micota.json entry that lists them."""
    from safetensors.torch import save_file

    from micota_merge.core.artifacts import sha256_file

    target = folder / FOLDER / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    # what was measured, not whether it came from the cache: the same importances, the same bytes
    measured = {k: stats.get(k) for k in ("blocks", "tokens", "block_size", "tensors")}
    save_file(importance, str(target), metadata={"micota": json.dumps(measured, sort_keys=True)})
    return {
        **aim.record(),
        "method": "aim (arXiv 2502.02421): θ_base + (θ_merged − θ_base)·(1 − â(1 − ω)), â per input channel",
        "importance": {"file": f"{FOLDER}/{FILE}", "sha256": sha256_file(target), "tensors": len(importance)},
        "calibration_blocks": stats.get("blocks"),
        "calibration_tokens": stats.get("tokens"),
        "from_cache": stats.get("cached", False),
    }
