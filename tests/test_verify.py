"""The micro world's chain verifier (issue 25, item 2): the world's own answers verify, and each kind of
wrong chain is caught with the verdicts a reader would give it."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.demo import microworld as mw
from micota_merge.demo.verify import check, difficulty, parse_question, verify_records

PROBLEMS = mw.generate_problems(3, 200)


def test_the_worlds_own_answers_verify_in_both_styles():
    for p in PROBLEMS:
        parsed = parse_question(p.question)
        assert parsed is not None and parsed.ops == p.ops and parsed.name == p.name and parsed.item == p.item
        for style in (mw.short_cot, mw.long_cot):
            v = check(p.question, style(p), str(p.answer))
            assert v == {"final_right": True, "chain_right": True, "values_right": True, "errors": []}, style(p)
    # the long style's planted slips, each corrected, are among them
    assert any("Wait, that's not right." in mw.long_cot(p) for p in PROBLEMS)


def _problem(pred) -> mw.Problem:
    return next(p for p in PROBLEMS if pred(p))


def _lines(p, style=mw.short_cot) -> list[str]:
    return style(p).split("\n")


def _verdict(p, lines) -> tuple[bool, bool, bool]:
    v = check(p.question, "\n".join(lines), str(p.answer))
    return v["final_right"], v["chain_right"], v["values_right"]


def test_each_kind_of_wrong_chain():
    p = PROBLEMS[0]
    other = next(n for n, _ in mw.NAMES if n != p.name)
    lines = _lines(p)
    # another person narrated, or another thing: the numbers are right, the chain is not
    assert _verdict(p, [lines[0].replace(p.name, other, 1)] + lines[1:]) == (True, False, True)
    item = next(i for i in mw.ITEMS if i != p.item)
    assert _verdict(p, [lines[0].replace(p.item, item)] + lines[1:]) == (True, False, True)
    # a step that takes another of the question's clauses with the same sign and amount: words wrong only
    sign, n, clause = p.ops[0]
    swapped = next(c for c in (mw.ADD_CLAUSES if sign > 0 else mw.SUB_CLAUSES) if c.split()[0] != clause.split()[0])
    new_clause = swapped.format(n=n, other=other)
    assert _verdict(p, [lines[0], lines[1].replace(clause, new_clause)] + lines[2:]) == (True, False, True)
    # a step dropped: the final number may still be right, the chain is not
    assert _verdict(p, lines[:1] + lines[2:]) == (True, False, False)
    # an extra line the world never writes
    assert _verdict(p, lines[:2] + ["Hmm, interesting."] + lines[2:]) == (True, False, False)
    # the wrong box
    assert _verdict(p, lines[:-1] + [f"The answer is \\boxed{{{p.answer + 1}}}."])[0] is False


def test_wrong_amounts_and_values_and_a_lucky_answer():
    # two steps with the same sign: a wrong amount in the first, made up by the second, lands on the gold
    p = _problem(lambda p: len(p.ops) >= 2 and p.ops[0][0] == p.ops[1][0] == 1 and p.ops[1][1] > 2)
    vals = p.values()
    (_, n0, c0), (_, n1, c1) = p.ops[0], p.ops[1]
    step1 = f"Step 1: {p.pronoun} {c0.replace(str(n0), str(n0 + 1), 1)}: {vals[0]} + {n0 + 1} = {vals[1] + 1}."
    step2 = f"Step 2: {p.pronoun} {c1.replace(str(n1), str(n1 - 1), 1)}: {vals[1] + 1} + {n1 - 1} = {vals[2]}."
    lines = _lines(p)
    lucky = [lines[0], step1, step2] + lines[3:]
    assert _verdict(p, lucky) == (True, False, False)
    # the right amounts, a wrong sum carried on to a wrong answer
    bad = lines[1].rsplit("= ", 1)[0] + f"= {vals[1] + 2}."
    assert _verdict(p, [lines[0], bad] + lines[2:])[1:] == (False, False)


def test_a_planted_slip_must_be_corrected():
    p = _problem(lambda p: "Wait, that's not right." in mw.long_cot(p))
    lines = _lines(p, mw.long_cot)
    at = next(i for i, ln in enumerate(lines) if ln.startswith("Wait, that's not right."))
    assert _verdict(p, lines) == (True, True, True)
    assert _verdict(p, lines[:at] + lines[at + 1 :]) == (True, False, False)  # the slip left standing
    wrong_fix = lines[at].replace("So it is", "So it is 1 +", 1)
    assert _verdict(p, lines[:at] + [wrong_fix] + lines[at + 1 :])[1] is False
    # a reflection with a wrong check
    refl = next(i for i, ln in enumerate(lines) if ln.startswith("Wait, let me check:"))
    broken = lines[refl].replace(". Yes.", "1. Yes.", 1)
    assert _verdict(p, lines[:refl] + [broken] + lines[refl + 1 :]) == (True, False, False)


def test_questions_outside_the_world():
    assert parse_question("What is 2 + 3?") is None
    assert parse_question(PROBLEMS[0].question.replace(" has ", " holds ", 1)) is None
    v = check("What is 2 + 3?", "The answer is \\boxed{5}.", "5")
    assert v["final_right"] is True and v["chain_right"] is False


def test_verify_records_reads_generate_outputs_and_lm_eval_samples(tmp_path):
    rng = random.Random(0)
    picks = rng.sample(PROBLEMS, 10)
    out = tmp_path / "data.jsonl"
    with out.open("w") as f:
        for j, p in enumerate(picks):
            text = mw.long_cot(p) if j < 6 else mw.short_cot(p).replace(p.name, "Nobody", 1)
            msgs = [{"role": "user", "content": p.question}, {"role": "assistant", "content": text}]
            f.write(json.dumps({"id": p.id, "messages": msgs, "answer": str(p.answer)}) + "\n")
    v = verify_records(out)
    assert (v["records"], v["final_right"], v["chain_right"], v["values_right"]) == (10, 10, 6, 10)
    # the same by difficulty (the number of steps), in its order; every answer counted once
    by = v["by_difficulty"]
    assert list(by) == [d for d in difficulty.order if d in by] and sum(c["records"] for c in by.values()) == 10
    for d, counts in by.items():
        assert counts["records"] == sum(difficulty(p.question) == d for p in picks) == counts["final_right"]
    assert v["right_by_number_only"] == {"line N is not the question's start": 4}
    samples = tmp_path / "samples_micota_microworld.jsonl"
    with samples.open("w") as f:
        for p in picks[:4]:
            doc = {"id": p.id, "question": p.question, "answer": str(p.answer)}
            resp = [mw.short_cot(p), "The answer is \\boxed{0}."]
            f.write(json.dumps({"doc": doc, "resps": [resp], "filtered_resps": [resp]}) + "\n")
    v = verify_records(samples)
    assert (v["records"], v["chain_right"]) == (8, 4)
    r = CliRunner().invoke(cli, ["demo", "verify", str(out), str(samples)])
    assert r.exit_code == 0 and "whole chain right 6 (60.0%)" in r.output and "8 answers" in r.output
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    r = CliRunner().invoke(cli, ["demo", "verify", str(tmp_path / "bad.jsonl")])
    assert r.exit_code == 2 and "line 1 is neither a generate record" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("seed", [0, 1])
def test_the_committed_worlds_questions_all_parse(seed):
    from micota_merge.demo.microworld import ASSETS

    rows = [
        json.loads(x) for x in (ASSETS / ("train.jsonl" if seed == 0 else "heldout.jsonl")).read_text().splitlines()
    ]
    assert all(parse_question(r["question"]) is not None for r in rows)
    assert all(parse_question(r["question"]).answer == int(r["answer"]) for r in rows)


def test_generate_keeps_whole_chains_when_asked(tmp_path):
    """`generate --keep chain|values`: every micro-world record carries its whole-chain and numbers verdicts,
    and the kept file is the records right by the final number *and* the chain (its numbers); without a
    verifier for the questions it is refused before anything is generated."""
    world = mw.ASSETS
    common = ["generate", "--model", str(world / "long_cot"), "--questions", str(world / "train.jsonl")]
    common += ["--limit", "12", "--max-tokens", "512", "--backend", "transformers", "--prompt", "{question}"]
    runs = {}
    for keep in ("correct", "values", "chain"):
        out = tmp_path / keep / "data.jsonl"
        r = CliRunner().invoke(cli, [*common, "--out", str(out), "--benchmark", "microworld", "--keep", keep])
        assert r.exit_code == 0, r.output
        runs[keep] = out
    records = [json.loads(x) for x in runs["chain"].read_text().splitlines()]
    assert len(records) == 12
    for rec in records:
        question, answer = rec["messages"][0]["content"], rec["messages"][-1]["content"]
        v = check(question, answer, rec["answer"])
        assert (rec["chain_correct"], rec["values_correct"]) == (v["chain_right"], v["values_right"])
    kept = {
        keep: [json.loads(x) for x in (out.parent / "data.correct.jsonl").read_text().splitlines()]
        for keep, out in runs.items()
    }
    assert kept["correct"] == [r for r in records if r["correct"] and r["finish_reason"] == "stop"]
    assert kept["chain"] == [r for r in kept["correct"] if r["chain_correct"]]
    assert kept["values"] == [r for r in kept["correct"] if r["values_correct"]]
    # the same records asked again with the other filter: the kept file follows the request, not the last run
    r = CliRunner().invoke(
        cli, [*common, "--out", str(runs["chain"]), "--benchmark", "microworld", "--keep", "correct"]
    )
    assert r.exit_code == 0, r.output
    again = [json.loads(x) for x in (runs["chain"].parent / "data.correct.jsonl").read_text().splitlines()]
    assert again == kept["correct"]
    r = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "no" / "data.jsonl"), "--keep", "chain"])
    assert r.exit_code == 2 and "--keep chain" in r.output and "--benchmark microworld" in r.output
    assert not (tmp_path / "no" / "data.jsonl").exists()
