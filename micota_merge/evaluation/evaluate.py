"""`eval`: score a checkpoint on the papers' five benchmarks with lm-evaluation-harness.

The benchmarks are lm-eval tasks in `eval/` (package `micota_merge.evaluation.tasks`); this module
runs `lm_eval.simple_evaluate` on them, keeps lm-eval's own results JSON and per-sample
logs, and adds beside them:

- `summary.json`: {"model", "protocol", "tasks": {bench: {"accuracy", "ci95", "samples",
  "pass@k", "maj@k", "mean_tokens", "mean_thinking_tokens", "mean_answer_tokens",
  "truncated", "n"}}, "average", "average_ci95", ...}
- `summary.md`: the same as a table
- `micota.json`: options, model fingerprint, versions, times, results

Protocols (`--protocol`): `greedy` is the papers' (MiCoTA, Mix Distillation: one greedy
answer, pass@1). `r1` is how reasoning models are scored since DeepSeek-R1 (open-r1,
lighteval): temperature 0.6, top-p 0.95, up to 32768 new tokens, and k sampled answers per
question averaged (avg@k): 64 for AIME24 and AMC23, 4 for MATH-500 and OlympiadBench, 1 for
GSM8K. `--samples`, `--temperature`, `--top-p`, `--max-tokens` override any of it.
The per-task settings are lm-eval task overrides (`repeats`, `generation_kwargs`,
`filter_list`, `metric_list`), so lm-eval's results JSON records exactly what ran.

Each per-sample record (`samples_micota_<bench>_<date>.jsonl`, lm-eval's format) keeps all k
responses (`resps`) and carries `samples`: per answer `response`, `pred` (the extracted
answer), `correct` (the grader's verdict), `num_tokens`, `thinking_tokens`,
`answer_tokens`, `finish_reason`, `truncated`; and `majority` (the majority answer), so any
score can be audited line by line. Lengths and truncation are the generator's own
(`micota_merge.core.lengths`, the definition `generate` and the sweep use: generated ids, or a
server's `usage.completion_tokens`; truncated = finish reason "length"), never a re-count.

Every accuracy has a 95 % bootstrap interval (questions resampled, samples nested;
`micota_merge.evaluation.scoring`). The summary and its table are `summary.py`; `compare.py` puts several
runs side by side (Markdown table and PNG bar chart with the intervals) and tests each difference
against the first run with a paired bootstrap over the questions both runs answered.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional, Sequence, Union

from pydantic import BeforeValidator, Field, field_validator

from micota_merge.core.artifacts import (
    atomic_dir,
    now,
    sha256_bytes,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from micota_merge.core.errors import StageFailed, UserError, disk_full, free_mib
from micota_merge.core.identity import changed
from micota_merge.core.identity import describe as describe_changes
from micota_merge.core.options import MODEL_DTYPES, ModelDtype, chat_template_kwargs_field, cli, template_switches
from micota_merge.core.ownership import (
    OWN,
    claim,
    claim_workdir,
    distributed_rank,
    identity_of,
    output_lock,
    remove_ours,
)
from micota_merge.core.strict import Float, Int, not_bool
from micota_merge.evaluation import benchmarks as registry
from micota_merge.evaluation import scoring
from micota_merge.evaluation.summary import SUMMARY, describe, load_summary, summarize, summary_markdown
from micota_merge.evaluation.tasks import GROUP, TASK_DIR, benchmark_of, task_name
from micota_merge.generation.options import BackendName, ServerOptions, VllmOptions

LOG = logging.getLogger("micota_merge.evaluation.evaluate")

DTYPES = MODEL_DTYPES
# Long-CoT models write thousands of tokens (R1-distill answers often pass 8k): the papers'
# budget. On CPU that is hours per question, so the default there is a short-CoT budget.
MAX_TOKENS_GPU = 16384
MAX_TOKENS_CPU = 1024

# How answers are drawn. samples: the benchmark registry's field that gives each benchmark's
# answers per question (None: 1 for all).
PROTOCOLS = {
    "greedy": {"temperature": 0.0, "top_p": 1.0, "max_tokens_gpu": MAX_TOKENS_GPU, "samples": None},
    # DeepSeek-R1's evaluation, as open-r1 / lighteval run it
    "r1": {"temperature": 0.6, "top_p": 0.95, "max_tokens_gpu": 32768, "samples": "r1_samples"},
}

Echo = Callable[[str], None]


class EvalOptions(VllmOptions, ServerOptions):
    """Everything `micota-merge eval` takes to score one model (the pipeline's `eval:` section too)."""

    model: str = Field(description="Checkpoint to score: a local Hugging Face folder (or a cached hub id).")
    tasks: Union[str, list[str]] = Field(
        "all", description=f"Comma-separated benchmarks: {', '.join(registry.papers())}, or 'all'."
    )
    backend: BackendName = Field(
        "auto",
        description="auto: openai with --base-url, else vllm when vLLM and a CUDA GPU are present, else "
        "transformers (lm-eval's hf model; 'hf' is a deprecated alias). openai: OpenAI-compatible servers "
        "through lm-eval's local-chat-completions.",
        json_schema_extra=cli(type="backend"),
    )
    limit: Optional[Int] = Field(
        None, ge=1, description="Score only the first N questions of each benchmark (quick checks)."
    )
    protocol: Literal["greedy", "r1"] = Field(
        "greedy",
        description="greedy: one greedy answer per question, the papers' pass@1. r1: DeepSeek-R1's protocol "
        "(open-r1, lighteval): temperature 0.6, top-p 0.95, 32768 new tokens on a GPU, answers per question "
        "AIME24 64, AMC23 64, OlympiadBench 4, MATH-500 4, GSM8K 1; reports avg@k, pass@k and maj@k. Each "
        "setting can be overridden below.",
    )
    samples: Optional[Annotated[Union[int, str, dict[str, int]], BeforeValidator(not_bool)]] = Field(
        None,
        description="Answers sampled per question: '8' for every benchmark, 'aime24=16,math500=2' for some (the "
        "rest keep the protocol's). Needs --temperature > 0.",
        json_schema_extra=cli(metavar="K|BENCH=K,..."),
    )
    temperature: Optional[Float] = Field(
        None, description="Sampling temperature (0 = greedy). Default: the protocol's."
    )
    top_p: Optional[Float] = Field(None, description="Nucleus sampling threshold in (0, 1]. Default: the protocol's.")
    seed: Int = Field(
        0,
        description="Seed of the sampling and of the bootstrap intervals: a rerun draws the same answers on "
        "the same backend and hardware.",
    )
    max_tokens: Optional[Int] = Field(
        None,
        ge=1,
        description=f"Most new tokens per answer. Default on a GPU or with --backend openai {MAX_TOKENS_GPU} "
        "(greedy) or 32768 (r1): long-CoT answers run to many thousands of tokens; "
        f"{MAX_TOKENS_CPU} on CPU (at most half the model's context), where 16k-token answers take hours "
        "each: enough for short-CoT answers, and long-CoT ones show in the truncated column.",
    )
    batch_size: Optional[Annotated[Union[int, str], BeforeValidator(not_bool)]] = Field(
        None, description="Prompts per batch, or 'auto'. Default: 8 on CPU, auto on GPU."
    )
    dtype: ModelDtype = Field("auto", description="Weight dtype for inference.")
    chat_template_kwargs: dict[str, Any] = chat_template_kwargs_field()
    device: Optional[str] = Field(None, description="lm-eval's device (default: the backend's choice).")
    gpu_memory_utilization: Float = Field(
        0.9, gt=0, le=1, description="vllm: share of GPU memory for weights and KV cache."
    )
    output: Optional[str] = Field(
        None,
        description="Run folder (default outputs/eval/<model name>); with --compare, where compare.md/.json/.png go.",
        json_schema_extra=cli(short="-o"),
    )
    force: bool = Field(
        False, description="Replace an output that this command wrote itself." + OWN, json_schema_extra=cli(flag=True)
    )

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v):
        if v is None or str(v) == "auto":
            return v
        if not str(v).isdigit() or int(v) < 1:
            raise ValueError(f"{v!r}: give a positive number or 'auto'")
        return int(v)


# ------------------------------------------------------------------------------- task names


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Benchmark names from '--tasks' ('all', 'gsm8k,math500', 'micota_gsm8k' ...), papers' order."""
    if spec is None:
        return list(registry.papers())
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in items if s and s.strip()]
    if not names:
        raise UserError(f"--tasks is empty: choose from {', '.join(registry.papers())} (or 'all')")
    chosen = set()
    for name in names:
        if name in ("all", GROUP):
            chosen.update(registry.papers())
            continue
        bench = benchmark_of(name)
        if bench not in registry.names():
            raise UserError(
                f"--tasks: unknown task {name!r}: choose from {', '.join(registry.names())} "
                f"(or 'all' for the papers' five; lm-eval names {task_name('gsm8k')} etc. work too)"
            )
        chosen.add(bench)
    return [b for b in registry.names() if b in chosen]


def load_task_manager(metadata: dict | None = None, task_dir: Path = TASK_DIR):
    """lm-eval's TaskManager over our tasks only, failing loudly if any task did not register.

    lm-eval skips a YAML it cannot parse with a debug-level log line; a benchmark silently
    missing from a results table is worse than a crash, so we check and say which file broke.
    """
    from lm_eval.tasks import TaskManager

    dirs = registry.task_dirs(task_dir)  # tasks/ and the folders of benchmarks registered elsewhere
    tm = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False, metadata=metadata)
    expected = [task_name(b) for b in registry.names()] + [GROUP]
    missing = [n for n in expected if n not in tm.all_tasks]
    if missing:
        from lm_eval.tasks._yaml_loader import load_yaml

        problems = []
        for path in sorted(p for d in dirs for p in d.glob("*.yaml")):
            try:
                load_yaml(path, resolve_func=False, recursive=True)
            except Exception as e:  # any parse error is the answer we are looking for
                problems.append(f"{path.name}: {type(e).__name__}: {e}")
        detail = "; ".join(problems) or "no YAML failed to parse; check the `task:`/`group:` names"
        raise StageFailed(f"lm-eval did not register {', '.join(missing)} from {', '.join(map(str, dirs))}: {detail}")
    return tm


# ---------------------------------------------------------------------------------- sampling


def parse_samples(spec, benchmarks: Sequence[str], protocol: str = "greedy") -> dict[str, int]:
    """Answers per question for each benchmark: the protocol's, then '--samples'.

    '--samples 8' sets every benchmark; 'aime24=16,math500=2' sets those (the rest keep the
    protocol's); '8,gsm8k=1' does both.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
    field = PROTOCOLS[protocol]["samples"]
    per_task = {b: getattr(registry.get(b), field) if field else 1 for b in benchmarks}
    if spec is None or str(spec).strip() == "":
        return per_task
    for item in str(spec).split(","):
        item = item.strip()
        name, _, value = item.rpartition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise UserError(
                f"--samples {spec!r}: give a positive number of answers per question, "
                "for all benchmarks (8) or some (aime24=16,math500=2)"
            )
        if not name:
            per_task = {b: int(value) for b in benchmarks}
            continue
        bench = benchmark_of(name.strip())
        if bench not in registry.names():
            raise UserError(
                f"--samples {spec!r}: unknown benchmark {name!r}: choose from {', '.join(registry.names())}"
            )
        if bench in per_task:
            per_task[bench] = int(value)
    return per_task


def sampling_settings(
    protocol: str, samples, temperature: Optional[float], top_p: Optional[float], benchmarks: Sequence[str]
) -> dict:
    """{"protocol", "temperature", "top_p", "samples": {bench: k}} with the options applied."""
    per_task = parse_samples(samples, benchmarks, protocol)
    base = PROTOCOLS[protocol]
    temperature = base["temperature"] if temperature is None else float(temperature)
    top_p = base["top_p"] if top_p is None else float(top_p)
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: give 0 (greedy) or a positive number")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: give a number in (0, 1]")
    if temperature == 0 and any(k > 1 for k in per_task.values()):
        raise UserError(
            "--samples above 1 with greedy decoding repeats one answer k times: pass "
            "--temperature > 0 (e.g. --protocol r1: 0.6, top-p 0.95)"
        )
    return {"protocol": protocol, "temperature": temperature, "top_p": top_p, "samples": per_task}


def generation_kwargs(sampling: dict, max_tokens: int) -> dict:
    kw = {
        "until": [],
        "do_sample": sampling["temperature"] > 0,
        "temperature": sampling["temperature"],
        "max_gen_toks": max_tokens,
    }
    if sampling["temperature"] > 0:
        kw["top_p"] = sampling["top_p"]
    return kw


def task_specs(tm, benchmarks: Sequence[str], sampling: dict, max_tokens: int, task_dir: Path = TASK_DIR) -> list:
    """lm-eval tasks: ours with this run's sampling laid over their YAML as config overrides.

    All five benchmarks go in as the `micota_math` group (lm-eval then reports the papers'
    plain average too).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    from micota_merge.evaluation.tasks.utils import sample_metrics

    gen = generation_kwargs(sampling, max_tokens)
    specs = []
    for bench in benchmarks:
        k = sampling["samples"][bench]
        # a task given as a dict is taken whole: its YAML (includes resolved), then ours
        specs.append(
            {
                **load_yaml(registry.get(bench).yaml_file(task_dir), resolve_func=True, recursive=True),
                "repeats": k,
                "generation_kwargs": dict(gen),
                "filter_list": [{"name": "none", "filter": [{"function": "take_first_k", "k": k}]}],
                "metric_list": [
                    {
                        "metric": m,
                        "aggregation": "mean",
                        "higher_is_better": not (m.startswith("mean_") or m == "truncated"),
                    }
                    for m in sample_metrics(k, bench)
                ],
            }
        )
    tasks = tm.load(specs)["tasks"]
    if list(benchmarks) != list(registry.papers()):
        return [tasks[task_name(b)] for b in benchmarks]
    # lm-eval 0.4.x hands an inline group's own keys to its members as task overrides, so
    # the group is put together here from its YAML and the tasks above
    from lm_eval.api.group import Group
    from lm_eval.config.group import GroupConfig

    cfg = load_yaml(task_dir / f"{GROUP}.yaml", resolve_func=False, recursive=True)
    cfg.pop("task", None)
    group = Group.from_config(GroupConfig(**cfg))
    for bench in benchmarks:
        group.add(tasks[task_name(bench)])
    return [group]


# ---------------------------------------------------------------------------------- backends


# The backends (names, the auto policy, their lm-eval models) are micota_merge.generation.backends,
# shared with `generate`.


def model_args_for(
    backend: str,
    model_path: Path,
    *,
    dtype: str,
    max_tokens: int,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_model_len: Optional[int],
    data_parallel_size: int = 1,
) -> dict:
    """lm-eval model_args of a local backend (batch size and device travel as simple_evaluate's own arguments)."""
    from micota_merge.generation import backends

    job = backends.EvalJob(
        model_path=model_path,
        dtype=dtype,
        max_tokens=max_tokens,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        data_parallel_size=data_parallel_size,
    )
    if backends.canonical(backend) == "vllm":
        from micota_merge.generation.backends.vllm import lm_eval_args

        return lm_eval_args(job)
    return {"pretrained": str(model_path), "dtype": dtype}


class _QuietLmEval(logging.Filter):
    """Drop lm-eval warnings that are wrong for our use (we set metadata and gen_kwargs on purpose)."""

    NOISE = ("Custom kwargs can be passed", "Ensure 'do_sample=True'", "specified through cli")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


def _quiet_lm_eval() -> None:
    # sqlitedict logs each failed cache write (a full disk) in a dozen lines and then raises it too
    logging.getLogger("sqlitedict").setLevel(logging.CRITICAL)
    for name in ("lm_eval.api.task", "lm_eval.evaluator", "lm-eval"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietLmEval) for f in logger.filters):
            logger.addFilter(_QuietLmEval())


# -------------------------------------------------------------------------------------- run


def default_output(model: str) -> Path:
    return Path("outputs") / "eval" / Path(model.rstrip("/")).name


def _holding_output_lock(fn):
    """One process at a time writes an eval run folder and its response cache (rank 0 under launch)."""

    @functools.wraps(fn)
    def wrapper(opts: EvalOptions, *args, **kw):
        if distributed_rank() != 0:
            return fn(opts, *args, **kw)
        with output_lock(Path(opts.output or default_output(opts.model)), "eval", log=kw.get("echo")):
            return fn(opts, *args, **kw)

    return wrapper


@dataclass
class _Plan:
    """What the options mean on this machine, decided before anything is written."""

    benchmarks: list[str]
    engine: Any  # the backend (backends.Backend)
    sampling: dict
    gpu: bool
    max_tokens: int
    batch_size: Any
    device: Optional[str]
    urls: list[str]
    model_path: Optional[Path] = None
    meta: Any = None  # checkpoints.ModelFiles of a local model
    served: Optional[str] = None

    @property
    def inputs(self) -> Optional[dict]:
        return {"--model": self.model_path} if self.model_path else None


@_holding_output_lock
def evaluate(opts: EvalOptions, echo: Echo = print) -> dict:
    """Score `opts.model` on `opts.tasks` with lm-eval; write results, samples and summary to `opts.output`."""
    plan = _plan(opts, echo)
    out = Path(opts.output) if opts.output else default_output(opts.model)
    claimed = claim(out, "eval", inputs=plan.inputs, option="--output")
    identity, run_id = _identity(opts, plan)
    if claimed.same(run_id) and not opts.force:
        echo(f"already evaluated: {out} holds this model's scores with the same settings; nothing to do")
        return load_summary(out)
    if claimed.state == "ours" and not opts.force:
        raise UserError(
            f"--output {out} already exists and holds an eval of another model or other settings: "
            "pass --force to replace it, or choose another --output"
        )
    # Responses are cached as they are generated (lm-eval's sqlite cache, keyed by prompt and
    # generation settings), so a killed run resumes where it stopped. The cache belongs to one model
    # *content* and one set of generation settings: another model (even one of the same architecture,
    # whose config and headers are identical) is refused rather than served another's answers.
    # (Greedy answers only: lm-eval's CachingLM never stores a do_sample request.)
    cache_dir = out.parent / f".{out.name}.responses"
    claim_response_cache(cache_dir, identity, out, opts.force)
    model_key = sha256_bytes(json.dumps(identity, sort_keys=True).encode())[:16]
    tm, lm_tasks, lm_model, args = _lm_eval_model(opts, plan)
    if plan.engine.eval_fixed_batch_size is not None:
        plan.batch_size = plan.engine.eval_fixed_batch_size
    echo(
        f"scoring {opts.model} on {', '.join(plan.benchmarks)} with lm-eval ({plan.engine.name}, "
        f"{describe(plan.sampling)}, max {plan.max_tokens} new tokens"
        f"{f', {opts.limit} per task' if opts.limit else ''}) -> {out}"
    )
    started, t0 = now(), time.time()
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker()  # records model and chat template; told where to write below
    results = _simple_evaluate(opts, plan, tm, lm_tasks, lm_model, args, tracker, cache_dir / model_key, cache_dir)
    if results is None:  # not the main process of a multi-process run: that one writes
        return {}
    summary = _write_run(opts, plan, out, results, tracker, args, run_id, started, t0)
    remove_ours(cache_dir, "eval")
    echo(summary_markdown(summary))
    echo(f"wrote {out}/summary.json, summary.md, lm-eval results and per-sample logs")
    return summary


def _plan(opts: EvalOptions, echo: Echo) -> _Plan:
    """The backend, token budget, batch size and model checks; every refusal before anything is written."""
    from micota_merge.generation import backends

    benchmarks = parse_tasks(opts.tasks)
    engine = backends.pick(opts.backend, opts.base_url)  # the auto policy, shared with generate
    if opts.data_parallel_size > 1:
        import importlib.util

        if not engine.data_parallel:
            raise UserError(
                "--data-parallel-size is for --backend vllm (lm-eval's vLLM replicas); with servers, "
                "start `vllm serve --data-parallel-size N` or pass several --base-url"
            )
        if importlib.util.find_spec("ray") is None:
            raise UserError(
                "--data-parallel-size > 1: lm-eval runs its vLLM replicas through Ray, which is not "
                "installed here (pip install ray)"
            )
    gpu = backends.cuda_visible()
    plan = _Plan(
        benchmarks=benchmarks,
        engine=engine,
        sampling=sampling_settings(opts.protocol, opts.samples, opts.temperature, opts.top_p, benchmarks),
        gpu=gpu,
        # servers are where the GPUs are: the protocol's budget, whatever this machine has
        max_tokens=opts.max_tokens
        or (PROTOCOLS[opts.protocol]["max_tokens_gpu"] if gpu or engine.remote else MAX_TOKENS_CPU),
        batch_size=engine.eval_batch_size(gpu) if opts.batch_size is None else opts.batch_size,
        device=opts.device if opts.device is not None else engine.eval_device(gpu),
        urls=list(opts.base_url),
    )
    # with servers, --model may be a name only they know (a hosted model): no local checks, no tokenizer
    if not engine.remote or (Path(opts.model) / "config.json").is_file():
        _check_local_model(opts, plan, echo)
    if engine.remote:  # every server is asked before anything is written
        plan.urls, _, plan.served = engine.connect(
            plan.urls, opts.api_key_env, opts.model, plan.model_path, opts.served_model
        )
    return plan


def _check_local_model(opts: EvalOptions, plan: _Plan, echo: Echo) -> None:
    from micota_merge.core.checkpoints import check_model_files, context_length, read_chat_template, resolve_model_path

    model = opts.model
    plan.model_path = resolve_model_path(model, "--model")
    plan.meta = check_model_files(plan.model_path, "--model")
    context = opts.max_model_len or context_length(plan.meta.config)
    if opts.max_tokens is None and context is not None and plan.max_tokens >= context:
        # a short context (the micro world's 1024, Qwen2.5-Instruct's 32768 under r1): leave room
        # for the prompt
        echo(
            f"max new tokens {plan.max_tokens} would not fit {model}'s context of {context}: using "
            f"{context // 2} (pass --max-tokens to choose)"
        )
        plan.max_tokens = context // 2
    if context is not None and plan.max_tokens >= context:
        raise UserError(
            f"--max-tokens {plan.max_tokens} does not fit {model}'s context of {context} tokens "
            f"(prompt plus answer must fit): pass --max-tokens below {context}"
        )
    if read_chat_template(plan.model_path) is None:
        raise UserError(
            f"--model {model}: no chat template (chat_template.jinja or tokenizer_config.json); the "
            "benchmarks are asked through the model's chat template, as in the papers: use a chat "
            "model, or add its template"
        )


def _identity(opts: EvalOptions, plan: _Plan) -> tuple[dict, str]:
    """(the response cache's identity, the run's identity): model content and the settings that decide answers.

    A server-only model is known by its served name alone (docs: scale)."""
    backend = plan.engine.name
    # transformers is spelled "hf" here, as before the rename: runs and caches written then stay resumable
    same = {"transformers": "hf"}.get(backend, backend)
    identity = {
        "model_content": plan.meta.fingerprint()["content"] if plan.meta else f"served:{plan.served}",
        "backend": same,
        "dtype": opts.dtype,
        "max_tokens": plan.max_tokens,
        "chat_template_kwargs": opts.chat_template_kwargs or None,  # None when unset: older caches resume
    }
    run_id = identity_of(
        {
            "model": identity["model_content"],
            "tasks": plan.benchmarks,
            "limit": opts.limit,
            "max_tokens": plan.max_tokens,
            "sampling": plan.sampling,
            "seed": opts.seed,
            "backend": same,
            "dtype": opts.dtype,
            **template_switches(opts.chat_template_kwargs),
        }
    )
    return identity, run_id


def _lm_eval_model(opts: EvalOptions, plan: _Plan):
    """lm-eval's task manager, task specs, model name and model_args for this run."""
    from micota_merge.generation import backends

    _quiet_lm_eval()
    # the token metrics count in the model's own tokenizer; a hosted model's is not here, so they are left out
    metadata = {"max_gen_toks": plan.max_tokens}
    if plan.model_path:
        metadata["tokenizer"] = str(plan.model_path)
    tm = load_task_manager(metadata=metadata)
    lm_tasks = task_specs(tm, plan.benchmarks, plan.sampling, plan.max_tokens)
    # lm-eval's model: for the local backends, subclasses whose answers carry the engine's finish
    # reason and count (models.py; lengths.py defines them for every stage); for servers,
    # local-chat-completions over all of them (servers/client.py)
    lm_model, args = plan.engine.lm_eval(
        backends.EvalJob(
            model_path=plan.model_path,
            dtype=opts.dtype,
            max_tokens=plan.max_tokens,
            seed=opts.seed,
            samples=plan.sampling["samples"],
            gpu=plan.gpu,
            tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            max_model_len=opts.max_model_len,
            data_parallel_size=opts.data_parallel_size,
            urls=plan.urls,
            served=plan.served,
            api_key_env=opts.api_key_env,
            concurrency=opts.concurrency,
            retries=opts.retries,
            request_timeout=opts.request_timeout,
            chat_template_kwargs=dict(opts.chat_template_kwargs),
        )
    )
    return tm, lm_tasks, lm_model, args


def _simple_evaluate(opts, plan: _Plan, tm, lm_tasks, lm_model, args, tracker, cache: Path, cache_dir: Path):
    """lm-eval's run, with its failures as one line: a full disk, or servers that kept failing."""
    import lm_eval

    try:
        return lm_eval.simple_evaluate(
            model=lm_model,
            model_args=args,
            tasks=lm_tasks,
            task_manager=tm,
            limit=opts.limit,
            batch_size=plan.batch_size,
            device=plan.device,
            apply_chat_template=True,
            log_samples=True,
            evaluation_tracker=tracker,
            use_cache=str(cache),
            confirm_run_unsafe_code=False,
            random_seed=opts.seed,
            numpy_random_seed=opts.seed,
            torch_random_seed=opts.seed,
            fewshot_random_seed=opts.seed,
        )
    except Exception as e:
        if disk_full(e, cache_dir):  # sqlite's "database or disk is full" is no OSError
            raise UserError(
                f"no space left on the disk holding {cache_dir} (lm-eval's response cache, "
                f"{free_mib(cache_dir)} MiB free): free space there (or give --output on a bigger disk) "
                "and run the same command again; the answers cached so far are kept"
            ) from None
        if not plan.engine.remote:
            raise
        # lm-eval gave up after its retries on every server; each answer it got is in the cache
        raise StageFailed(
            f"requests to {', '.join(plan.urls)} kept failing ({type(e).__name__}: {str(e)[:200]}); the "
            "answers received so far are cached: run the same command again to resume"
        ) from None


def _write_run(opts: EvalOptions, plan: _Plan, out: Path, results, tracker, args, run_id, started, t0) -> dict:
    """Regrade, summarize and commit the run folder atomically; returns the summary."""
    logged = results.pop("samples")
    tokenizer = str(plan.model_path) if plan.model_path else None
    mismatches, per_question, majority = audit_samples(logged, tokenizer=tokenizer, max_tokens=plan.max_tokens)
    fp = plan.meta.fingerprint() if plan.meta else {"served_model": plan.served, "content": None}
    options = {
        "tasks": plan.benchmarks,
        "backend": plan.engine.name,
        "limit": opts.limit,
        "max_tokens": plan.max_tokens,
        "batch_size": plan.batch_size,
        "dtype": opts.dtype,
        "device": plan.device,
        "model_args": args,
        **plan.sampling,
        "seed": opts.seed,
    }
    with atomic_dir(out, "eval", force=opts.force, inputs=plan.inputs, option="--output") as staging:
        tracker.output_path = str(staging / "results.json")  # lm-eval writes results_<date>.json beside it
        tracker.save_results_aggregated(results=results, samples=logged)
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=logged[name])
        files = _written_files(staging, results["configs"])
        summary = summarize(
            results,
            model=opts.model,
            benchmarks=plan.benchmarks,
            per_question=per_question,
            majority=majority,
            seed=opts.seed,
        )
        summary.update(
            backend=plan.engine.name,
            max_tokens=plan.max_tokens,
            limit=opts.limit,
            **plan.sampling,
            seed=opts.seed,
            files=files,
            seconds=round(time.time() - t0, 1),
        )
        if mismatches:
            summary["regrade_mismatches"] = mismatches
        write_json_atomic(staging / SUMMARY, summary)
        write_text_atomic(staging / "summary.md", summary_markdown(summary))
        write_manifest(
            staging,
            "eval",
            model=opts.model,
            options=options,
            inputs={"model": fp},
            started=started,
            finished=now(),
            seconds=summary["seconds"],
            results=summary,
            identity=run_id,
        )
    return summary


_IDENTITY_NAMES = {
    "model_content": "model content (weights, config or tokenizer)",
    "backend": "backend",
    "dtype": "dtype",
    "max_tokens": "max tokens",
    "chat_template_kwargs": "chat template switches (--chat-template-kwargs)",
}


def claim_response_cache(cache_dir: Path, identity: dict, out: Path, force: bool) -> None:
    """Make `cache_dir` hold responses of this identity only: resume it, refuse another, or (force) clear it."""
    marker = cache_dir / "identity.json"
    if force:
        remove_ours(cache_dir, "eval")
    elif marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            old = {}
        if changed(old, identity):
            what = describe_changes(old, identity, _IDENTITY_NAMES)
            raise UserError(
                f"{out} has an interrupted run with other inputs ({what} changed); resuming would score "
                "that run's cached answers as this one's: pass --force to discard them, or choose "
                "another --output"
            )
    claim_workdir(cache_dir, "eval", out, option="--output")
    if not marker.is_file():
        write_json_atomic(marker, identity)


def audit_samples(
    samples: dict[str, list[dict]], tokenizer: Optional[str] = None, max_tokens: Optional[int] = None
) -> tuple[int, dict, dict]:
    """Add every answer's grading and lengths to its lm-eval sample record.

    Each record gets `samples` (per answer, in the order of `filtered_resps[0]`: pred,
    correct, num_tokens, thinking_tokens, answer_tokens, thinking_finished, finish_reason,
    truncated) and
    `majority` (the majority answer, with k > 1). `tokenizer` and `max_tokens` are the
    run's (lm-eval loads the task functions as a module of its own, so ours is told again). Grading is
    recomputed by the same code that gave lm-eval its per-question
    `accuracy`; they agree unless math-verify timed out on one side. Returns how many
    disagree; per benchmark the correctness of every answer of every question (in doc
    order: what the intervals and the paired test resample); and per benchmark with k > 1
    whether each question's majority answer is correct.
    """
    from micota_merge.evaluation import grading
    from micota_merge.evaluation.tasks import utils

    utils.set_tokenizer(tokenizer)
    mismatches = 0
    per_question: dict[str, list[list[float]]] = {}
    majority: dict[str, list[float]] = {}
    for name, records in samples.items():
        bench = benchmark_of(name)
        if max_tokens:
            utils._max_gen_toks[bench] = int(max_tokens)
        rows = []
        for rec in sorted(records, key=lambda r: r["doc_id"]):
            scored = []
            for response in utils.responses_of(rec["filtered_resps"]):
                scored.append(utils.score(response, rec["doc"], bench))
            rec["samples"] = scored
            if len(scored) > 1:
                bench_g = utils.grader_benchmark(bench)
                winner = scoring.majority([x["pred"] for x in scored], lambda a, b: grading.equivalent(a, b, bench_g))
                rec["majority"] = None if winner is None else scored[winner]["pred"]
                majority.setdefault(bench, []).append(float(winner is not None and scored[winner]["correct"]))
            rows.append([float(x["correct"]) for x in scored])
            acc = sum(x["correct"] for x in scored) / len(scored)
            if "accuracy" in rec and abs(acc - float(rec["accuracy"])) > 1e-9:
                mismatches += 1
                LOG.warning(
                    "%s doc %s: regrading gave %s, lm-eval's run gave %s (math-verify timeout?)",
                    name,
                    rec.get("doc_id"),
                    acc,
                    rec["accuracy"],
                )
        per_question[bench] = rows
    return mismatches, per_question, majority


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
