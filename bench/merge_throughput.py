"""How close is `micota-merge build` to the I/O floor, and how much memory does it hold?

Writes three generated Qwen2-shaped checkpoints (base, long_cot, short_cot) of about --size-gb
each, then measures, each in its own process:
  floor  a plain safetensors load of the three inputs and a save of one output (the bytes a merge
         must read and write at least once; the output is an average so the work is not elided)
  build  `micota-merge build` of a recipe over them, per method (linear: pure I/O and one
         multiply-add; dare_ties: MiCoTA's method, random drop + sign election)
and prints wall-time and memory ratios: build / floor time, peak memory / largest tensor,
peak memory / model size.

    python bench/merge_throughput.py --size-gb 1.0 [--methods linear,dare_ties] [--workdir /tmp/micota-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

FLOOR = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
work = Path(sys.argv[1])
inputs = [load_file(work / r / "model.safetensors") for r in ("base", "long_cot", "short_cot")]
out = {k: (inputs[1][k].float() * 0.5 + inputs[2][k].float() * 0.5).to(inputs[0][k].dtype) for k in inputs[0]}
save_file(out, str(work / "floor.safetensors"))
"""


def shapes(hidden: int, layers: int, inter: int, vocab: int, kv_heads: int, head_dim: int) -> dict:
    s = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.q_proj.bias": (hidden,),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    return s


def write_family(work: Path, size_gb: float) -> tuple[int, int]:
    """Three checkpoints sharing a base; returns (bytes per model, bytes of the largest tensor)."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab, head_dim, kv = 2048, 5632, 32000, 128, 4
    per_layer = 2 * hidden * hidden + 2 * kv * head_dim * hidden + 3 * hidden * inter
    layers = max(1, int((size_gb * 2**30 / 2 - 2 * vocab * hidden) / per_layer))
    spec = shapes(hidden, layers, inter, vocab, kv, head_dim)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rope_theta": 10000.0,
        "hidden_act": "silu",
    }
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in spec.items()}
    for i, role in enumerate(("base", "long_cot", "short_cot")):
        d = work / role
        d.mkdir(parents=True, exist_ok=True)
        state = (
            base
            if role == "base"
            else {
                k: (v.float() + torch.randn(v.shape, generator=gen) * 0.002).to(torch.bfloat16) for k, v in base.items()
            }
        )
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config))
    n_bytes = sum(v.numel() * 2 for v in base.values())
    largest = max(v.numel() * 2 for v in base.values())
    return n_bytes, largest


def family_recipe(workdir: str | Path, size_gb: float, method: str = "linear", **merge) -> tuple[Path, int, Path]:
    """A fresh work folder with the three generated checkpoints and a recipe merging them.
    Returns (folder, bytes per model, recipe path)."""
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_bytes, _ = write_family(work, size_gb)
    recipe = {
        "models": {r: str(work / r) for r in ("long_cot", "short_cot", "base")},
        "merge": {"method": method, "ratio": 0.5, "dtype": "bfloat16", **merge},
        "tokenizer": "short_cot",
        "output": str(work / "ta"),
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work, model_bytes, work / "recipe.yaml"


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak resident memory, and peak anonymous memory of a child process.

    Peak RSS counts the pages of memory-mapped inputs that were touched (safetensors are read
    through mmap: file-backed, reclaimable); peak anonymous memory is what the process itself
    allocated, the figure that decides whether a merge fits in RAM. Sampled every 20 ms.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    peak_rss = peak_anon = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            peak_rss = max(peak_rss, int(fields.get("VmHWM", "0 kB").split()[0]) * 1024)
            peak_anon = max(peak_anon, int(fields.get("RssAnon", "0 kB").split()[0]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, peak_rss, peak_anon


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="size of each generated checkpoint (bf16)")
    ap.add_argument("--methods", default="linear,dare_ties", help="comma-separated merge methods to time")
    ap.add_argument("--workdir", default="/tmp/micota-bench-merge")
    ap.add_argument("--shard-size", default="5GB", help="build --shard-size (mergekit buffers one shard)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    model_bytes, largest = write_family(work, args.size_gb)
    print(
        f"generated 3 checkpoints of {model_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s "
        f"(largest tensor {largest / 2**20:.0f} MiB)"
    )

    recipe = {
        "models": {r: str(work / r) for r in ("long_cot", "short_cot", "base")},
        "merge": {"method": "linear", "ratio": 0.5, "density": 0.5, "seed": 0, "dtype": "bfloat16"},
        "tokenizer": "short_cot",
        "output": str(work / "ta"),
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    micota = str(Path(sys.executable).parent / "micota-merge")

    subprocess.run([sys.executable, "-c", "import safetensors.torch, torch"], check=True)  # warm imports
    floor_s, floor_rss, floor_anon = measure([sys.executable, "-c", FLOOR, str(work)])
    rows = [("floor (load 3 + save 1)", floor_s, floor_rss, floor_anon)]
    for method in args.methods.split(","):
        recipe["merge"]["method"] = method
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        rows.append(
            (
                f"build {method}",
                *measure([micota, "build", str(work / "recipe.yaml"), "--force", "--shard-size", args.shard_size]),
            )
        )

    gib = 2**30
    print(f"\n{'':26}{'wall s':>8}{'peak RSS GiB':>14}{'peak anon GiB':>15}")
    for name, s, rss, anon in rows:
        print(f"{name:26}{s:>8.1f}{rss / gib:>14.2f}{anon / gib:>15.2f}")
    print(f"\nmodel size {model_bytes / gib:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB")
    for name, s, rss, anon in rows[1:]:
        print(
            f"{name}: wall {s / floor_s:.2f}x floor; peak anon {anon / model_bytes:.2f}x model size, "
            f"{anon / largest:.1f}x largest tensor; peak RSS {rss / model_bytes:.2f}x model size"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
