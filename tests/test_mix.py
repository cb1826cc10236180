"""`micota-merge mix`: Mix Distillation by weight, one answer per question id, clear refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli


def part(path: Path, ids: list[str], style: str, tokens: int) -> Path:
    with open(path, "w") as f:
        for i in ids:
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "messages": [
                            {"role": "user", "content": f"q {i}"},
                            {"role": "assistant", "content": f"{style} \\boxed{{1}}"},
                        ],
                        "answer": "1",
                        "pred": "1",
                        "correct": True,
                        "num_tokens": tokens,
                        "finish_reason": "stop",
                        "model": style,
                        "sample": 0,
                    }
                )
                + "\n"
            )
    return path


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["mix", *[str(a) for a in args]], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture
def parts(tmp_path):
    """long and short answers to the same 100 questions (the usual case: two models, one question set)."""
    ids = [f"gsm8k-train-{i}" for i in range(100)]
    return part(tmp_path / "long.jsonl", ids, "long", 900), part(tmp_path / "short.jsonl", ids, "short", 150)


def test_one_to_four_mix(parts, tmp_path):
    long, short = parts
    out = tmp_path / "mix.jsonl"
    code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--total", 50, "--seed", 3)
    assert code == 0, text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["mix_part"] for r in recs) == {"long": 10, "short": 40}
    assert all(r["messages"][1]["content"].startswith(r["mix_part"]) for r in recs)
    assert len({r["id"] for r in recs}) == 50  # one answer per question
    stats = json.loads((tmp_path / "mix.stats.json").read_text())
    assert [(p["label"], p["drawn"], p["mean_tokens"]) for p in stats["parts"]] == [
        ("long", 10, 900.0),
        ("short", 40, 150.0),
    ]
    assert "long" in text and "drew     10" in text
    # same seed, same mix; another seed, another draw
    out2 = tmp_path / "mix2.jsonl"
    run(f"{long}=1", f"{short}=4", "--out", out2, "--total", 50, "--seed", 3)
    assert out2.read_bytes() == out.read_bytes()
    code, text = run(f"{long}=1", f"{short}=4", "--out", out2, "--total", 50, "--seed", 4)
    assert code == 2 and "already exists" in text and "--force" in text  # never overwritten silently
    assert out2.read_bytes() == out.read_bytes()
    code, text = run(f"{long}=1", f"{short}=4", "--out", out2, "--total", 50, "--seed", 4, "--force")
    assert code == 0, text
    assert out2.read_bytes() != out.read_bytes()


def test_default_total_is_the_largest_exact_mix(parts, tmp_path):
    long, short = parts
    out = tmp_path / "mix.jsonl"
    code, text = run(f"{long}=1", f"{short}=4", "--out", out)
    assert code == 0, text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    # 100 distinct questions, one answer each: 20 long + 80 short
    assert Counter(r["mix_part"] for r in recs) == {"long": 20, "short": 80}
    code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--per-question", 2, "--force")
    assert code == 0, text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["mix_part"] for r in recs) == {"long": 25, "short": 100}
    assert max(Counter(r["id"] for r in recs).values()) == 2


def test_scarce_part_is_served_first(tmp_path):
    """A small long-CoT part whose questions the big short part also answers still gets its share."""
    long = part(tmp_path / "long.jsonl", [f"q{i}" for i in range(10)], "long", 900)
    short = part(tmp_path / "short.jsonl", [f"q{i}" for i in range(60)], "short", 100)
    out = tmp_path / "mix.jsonl"
    code, text = run(f"{short}=4", f"{long}=1", "--out", out, "--total", 50)
    assert code == 0, text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["mix_part"] for r in recs) == {"long": 10, "short": 40}
    assert len({r["id"] for r in recs}) == 50


def test_default_total_fits_parts_that_share_questions(tmp_path):
    """Two verified parts that answered overlapping questions (the pipeline's long and short data):
    each alone could give more than the two give together at one answer per question. The default
    is then the largest total whose draw fits, not a refusal."""
    long = part(tmp_path / "long.jsonl", [f"q{i}" for i in range(0, 84)], "long", 900)
    short = part(tmp_path / "short.jsonl", [f"q{i}" for i in range(0, 99)], "short", 100)
    out = tmp_path / "mix.jsonl"
    code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--seed", 0)
    assert code == 0, text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    n = Counter(r["mix_part"] for r in recs)
    assert n["short"] == 4 * n["long"] and len({r["id"] for r in recs}) == len(recs)
    # largest: one more is refused with the draw's own reason
    code, text = run(f"{long}=1", f"{short}=4", "--out", tmp_path / "more.jsonl", "--seed", 0, "--total", len(recs) + 1)
    assert code == 2 and "lower --total" in text


def test_refusals(parts, tmp_path):
    long, short = parts
    out = tmp_path / "m.jsonl"
    code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--total", 101)
    assert code == 2 and "at most 100" in text and "100 usable" in text and not out.exists()
    code, text = run(f"{long}", "--out", out)
    assert code == 2 and "PATH=WEIGHT" in text
    code, text = run(f"{long}=0", f"{short}=1", "--out", out)
    assert code == 2 and "positive" in text
    code, text = run(f"{long}=x", "--out", out)
    assert code == 2 and "not a number" in text
    code, text = run(f"{tmp_path / 'nope.jsonl'}=1", "--out", out)
    assert code == 2 and "does not exist" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "messages": []}\n{"id": \n')
    code, text = run(f"{bad}=1", "--out", out)
    assert code == 2 and "bad.jsonl:2" in text
    before = long.read_bytes()
    for flags in ([], ["--force"]):
        code, text = run(f"{long}=1", "--out", long, *flags)
        assert code == 2 and "is the input part" in text and long.read_bytes() == before


def test_mix_never_replaces_a_generate_output(parts, tmp_path):
    """A generate output is not a mix: `--force` replaces only a mix that mix wrote, so the records,
    generate's manifest and its sidecars stay as they are."""
    long, short = parts
    out = tmp_path / "gen.jsonl"
    out.write_text("".join(json.dumps({"id": f"q{i}", "sample": 0, "messages": []}) + "\n" for i in range(24)))
    meta = tmp_path / "gen.jsonl.meta.json"
    meta.write_text('{"format": 1, "stage": "generate", "settings": {}}')
    (tmp_path / "gen.correct.jsonl").write_text("")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for flags in ([], ["--force"]):
        code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--total", 5, *flags)
        assert code == 2 and "not written by micota-merge mix" in text
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_mix_rerun_and_force(parts, tmp_path):
    long, short = parts
    out = tmp_path / "m.jsonl"
    assert run(f"{long}=1", f"{short}=4", "--out", out, "--total", 5)[0] == 0
    first = out.read_bytes()
    code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--total", 5)
    assert code == 0 and "already mixed" in text and out.read_bytes() == first
    code, text = run(f"{long}=1", f"{short}=4", "--out", out, "--total", 5, "--seed", 9, "--force")
    assert code == 0 and out.read_bytes() != first


@pytest.mark.parametrize(
    "case, message",
    [
        ("twice", "given twice"),
        ("folder", "is a folder"),
        ("system_last", "must end with the assistant"),
        ("tool_role", "role 'tool'"),
        ("no_user", "must end with the assistant's answer to a user turn"),
    ],
)
def test_bad_parts_refused_with_one_line(parts, tmp_path, case, message):
    long, short = parts
    bad = tmp_path / "bad.jsonl"
    msgs = {
        "system_last": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}],
        "tool_role": [
            {"role": "user", "content": "q"},
            {"role": "tool", "content": "t"},
            {"role": "assistant", "content": "a"},
        ],
        "no_user": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    }.get(case)
    if msgs:
        bad.write_text(json.dumps({"id": "x", "messages": msgs}) + "\n")
    specs = {"twice": [f"{long}=1", f"{long}=4"], "folder": [f"{long}=1", f"{tmp_path}=4"]}.get(
        case, [f"{long}=1", f"{bad}=4"]
    )
    out = tmp_path / "mix.jsonl"
    code, text = run(*specs, "--out", out)
    assert code == 2, text
    assert message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    assert not out.exists()
