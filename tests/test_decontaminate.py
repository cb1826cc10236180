"""Decontamination: training questions that overlap a benchmark the students are scored on are found
(planted copies, near-copies, short exact copies), dropped by default, counted per benchmark, and
recorded in the output's settings so a resume cannot mix two question sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.data.decontaminate import (
    Index,
    benchmark_questions,
    decontaminate,
    normalize,
    word_ngrams,
)
from micota_merge.evaluation import benchmarks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_benchmark(tmp_path):
    """A registered benchmark with a question shorter than 8 words (no 8-gram at all)."""
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"id": 0, "question": "What is 17 times 23?", "answer": "391"}) + "\n")
    benchmarks.register_benchmark("shorty", data)
    yield "shorty"
    benchmarks.unregister_benchmark("shorty")


def planted(gsm8k_test: list[str]) -> list[dict]:
    q0, q1 = gsm8k_test[0], gsm8k_test[1]
    words = q1.split()
    near = " ".join(w.upper() if i % 3 == 0 else w for i, w in enumerate(words[:-3])) + "  17 more apples?"
    return [
        {"id": "copy", "question": q0},
        {"id": "near", "question": near},  # other case, spacing and ending: still shares 8-grams
        {"id": "short", "question": "what is 17   times 23?"},
        {
            "id": "clean",
            "question": "A train leaves at 3 pm and travels 120 km at 60 km per hour. When does it arrive?",
        },
    ]


def test_planted_copies_are_found_and_dropped(short_benchmark):
    test = benchmark_questions("gsm8k")
    questions = planted(test)
    kept, report = decontaminate(questions, "drop", ["gsm8k", "math500", short_benchmark])
    assert [q["id"] for q in kept] == ["clean"]
    assert report.ids == ["copy", "near", "short"]
    assert report.overlapping == {"gsm8k": 2, "shorty": 1} and report.dropped == 3 and report.checked == 4
    kept, report = decontaminate(questions, "warn", ["gsm8k", short_benchmark])
    assert kept == questions and report.dropped == 0 and len(report.ids) == 3
    kept, report = decontaminate(questions, "off", ["gsm8k"])
    assert kept == questions and report.ids == [] and report.checked == 0
    # the default is the papers' five benchmarks
    _, report = decontaminate(questions, "drop")
    assert report.against == list(benchmarks.papers()) and report.overlapping == {"gsm8k": 2}


def test_the_index_agrees_with_a_pairwise_check_on_the_real_gsm8k_splits():
    """The shipped GSM8K train questions against its test set: the index finds exactly the questions
    that a brute-force pairwise comparison of 8-gram sets finds (on a random sample of 400)."""
    train = [json.loads(x)["question"] for x in (REPO / "micota_merge/assets/train/gsm8k_train.jsonl").open()]
    test_grams = [word_ngrams(normalize(t)) for t in benchmark_questions("gsm8k")]
    index = Index.build(["gsm8k"])
    sample = random.Random(0).sample(range(len(train)), 400)
    # and the known overlapping ones, so the sample is not all negatives
    overlapping = [i for i, q in enumerate(train) if index.hits(q)]
    assert 0 < len(overlapping) < len(train) // 50
    for i in sample + overlapping[:40]:
        grams = word_ngrams(normalize(train[i]))
        pairwise = any(grams & t for t in test_grams)
        assert bool(index.hits(train[i])) == pairwise, train[i]


def test_a_templated_benchmark_is_matched_exactly():
    """The micro world's questions share 8-grams by construction; only an identical question leaks it."""
    train = [json.loads(x) for x in (REPO / "micota_merge/assets/microworld/train.jsonl").open()][:200]
    heldout = benchmark_questions("microworld")
    assert any(word_ngrams(normalize(q["question"])) & word_ngrams(normalize(heldout[0])) for q in train)
    questions = [{"id": str(i), "question": q["question"]} for i, q in enumerate(train)]
    questions.append({"id": "leak", "question": heldout[3].upper()})
    kept, report = decontaminate(questions, "drop", ["microworld"])
    assert report.ids == ["leak"] and len(kept) == 200


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["generate", *[str(a) for a in args]])
    return r.exit_code, r.output


def test_generate_drops_overlaps_records_them_and_refuses_a_mixed_resume(tiny_family, tmp_path):
    test = benchmark_questions("gsm8k")
    qfile = tmp_path / "train.jsonl"
    rows = [dict(q, answer="1") for q in planted(test)]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g.jsonl"
    base = ["--model", tiny_family["short_cot"], "--questions", qfile, "--out", out, "--max-tokens", 2]
    code, text = run(*base, "--backend", "transformers")
    assert code == 0, text
    assert "decontamination: 2 of 4 questions overlap a benchmark (gsm8k 2); dropped 2" in text
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["clean", "short"]  # "short" overlaps only a benchmark not checked
    stats = json.loads((tmp_path / "g.stats.json").read_text())
    assert stats["decontamination"]["overlapping"] == {"gsm8k": 2} and stats["decontamination"]["dropped"] == 2
    meta = json.loads((tmp_path / "g.jsonl.meta.json").read_text())
    assert meta["decontamination"]["dropped"] == 2 and meta["settings"]["decontaminated"]["dropped"] == 2
    # keeping them would change the question set: no resume into the same file
    code, text = run(*base, "--backend", "transformers", "--decontaminate", "warn")
    assert code == 2 and "questions left out as overlapping a benchmark" in text


def test_generate_on_a_benchmarks_test_split_says_what_to_do(tiny_family, tmp_path):
    out = tmp_path / "g.jsonl"
    code, text = run("--model", tiny_family["short_cot"], "--questions", "amc23", "--out", out, "--limit", 3)
    assert code == 2 and "--decontaminate off" in text and "amc23" in text and not out.exists()
    code, text = run(
        *("--model", tiny_family["short_cot"], "--questions", "amc23", "--out", out, "--limit", 1),
        *("--max-tokens", 2, "--decontaminate", "off", "--backend", "transformers"),
    )
    assert code == 0, text
    assert len(out.read_text().splitlines()) == 1


# ---- no selection on a test set: the sweep's probe


def _recipe(tmp_path: Path, family: dict, probe: dict, pipeline: dict | None = None) -> Path:
    import yaml

    data = {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": "linear", "ratio": 0.5, "dtype": "float32"},
        "output": str(tmp_path / "ta"),
        "sweep": {"ratios": [0.0, 1.0], "probe": probe, "min_accuracy": 0.0, "max_truncated": 1.0},
    }
    if pipeline is not None:
        data["pipeline"] = {"workdir": str(tmp_path / "work"), "student": str(family["short_cot"]), **pipeline}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_the_probe_refuses_a_test_split_the_students_are_scored_on(tiny_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_family, {"questions": "gsm8k", "limit": 2, "max_tokens": 2})
    r = CliRunner().invoke(cli, ["sweep", str(recipe)])
    assert r.exit_code == 2 and "sweep.probe.questions gsm8k: the test split" in r.output, r.output
    assert "allow_test_split" in r.output and not (tmp_path / "ta.sweep").exists()
    pipe = _recipe(tmp_path, tiny_family, {"questions": "amc23"}, {"questions": "gsm8k-train", "question_limit": 2})
    r = CliRunner().invoke(cli, ["run", str(pipe), "--dry-run"])
    assert r.exit_code == 2 and "sweep.probe.questions amc23" in r.output and not (tmp_path / "work").exists()


def test_the_probe_plan(tiny_family, tmp_path):
    from micota_merge.merge.recipe import load_recipe
    from micota_merge.merge.sweep.run import probe_plan

    def plan(probe, pipeline=None):
        r = load_recipe(_recipe(tmp_path, tiny_family, probe, pipeline))
        return probe_plan(r, r.sweep)

    # a plain sweep: gsm8k-train by default, decontaminated against the papers' benchmarks
    p = plan({})
    assert (p["questions"], p["offset"], p["decontaminate"]) == ("gsm8k-train", 0, "drop")
    assert p["decontaminate_against"] == list(benchmarks.papers())
    # a pipeline: a held-out slice of its own training questions, checked against what it evaluates too
    pipe = {"questions": "gsm8k-train", "question_limit": 40, "eval": {"tasks": "microworld"}}
    p = plan({"limit": 8}, pipe)
    assert (p["questions"], p["offset"]) == ("gsm8k-train", 40) and "held out from the 40" in p["statement"]
    assert p["decontaminate_against"] == [*benchmarks.papers(), "microworld"]
    p = plan({"limit": 8, "held_out": False}, pipe)
    assert p["offset"] == 0 and "which generate answers too" in p["statement"]
    with pytest.raises(Exception, match="pipeline.question_limit"):
        plan({}, {"questions": "gsm8k-train"})
    # on purpose: allowed, and said
    p = plan({"questions": "gsm8k", "allow_test_split": True})
    assert p["decontaminate"] == "off" and "not decontaminated" in p["statement"]


def test_no_shipped_recipe_selects_on_a_test_split():
    from micota_merge.merge.recipe import load_recipe
    from micota_merge.merge.sweep.run import probe_plan

    recipes = sorted((REPO / "micota_merge/recipes").glob("*/*.yaml"))
    swept = 0
    for path in recipes:
        if "merge_method" in path.read_text() or path.parent.name in ("distill", "accelerate"):
            continue
        recipe = load_recipe(path)
        if recipe.sweep is None:
            continue
        p = probe_plan(recipe, recipe.sweep)
        assert p["questions"] not in benchmarks.question_sets() and p["decontaminate"] == "drop", path
        swept += 1
    assert swept >= 6
