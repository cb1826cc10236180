"""Honest figures: lengths and truncation are the generator's own, the same in generate, eval and the
sweep; a sweep with nothing worth choosing chooses nothing; booleans are not numbers, a gold is not a dict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LoopbackAPI

from micota_merge.cli import cli


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def eval_samples(out: Path, bench: str = "gsm8k") -> list[dict]:
    (path,) = out.glob(f"samples_micota_{bench}_*.jsonl")
    return sorted(read_jsonl(path), key=lambda r: r["doc_id"])


class FakeServer(LoopbackAPI):
    """An OpenAI-compatible server on loopback (aiohttp, in a thread) serving `model_id`; each chat is
    answered by `answer(user_text) -> (content, finish_reason, completion_tokens)`."""

    def __init__(self, model_id: str, answer):
        self.model_id, self.answer, self.seen = model_id, answer, []
        self.start()

    def routes(self, app) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request):
        from aiohttp import web

        return web.json_response(
            {"object": "list", "data": [{"id": self.model_id, "object": "model", "root": self.model_id}]}
        )

    async def chat(self, request):
        from aiohttp import web

        body = await request.json()
        self.seen.append(body)
        content, reason, tokens = self.answer(body["messages"][-1]["content"])
        return web.json_response(
            {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
            }
        )


def local_count(model: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model)(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- 7a: the generator's own figures

CAP = 8
LONG_TEXT = "So the answer is \\boxed{18} dollars, as computed."


def test_eval_truncation_and_count_come_from_the_server(tiny_family, tmp_path):
    """The server finished the answer (finish_reason stop, 7 tokens; cap 8) though the local tokenizer
    counts more: not truncated, 7 tokens. An answer it ended by length is truncated."""
    model = tiny_family["short_cot"]
    assert local_count(model, LONG_TEXT) >= CAP  # a re-count would call it truncated, and longer

    def answer(user: str):
        if "Janet" in user:  # gsm8k-test-0
            return LONG_TEXT, "stop", CAP - 1
        return LONG_TEXT, "length", CAP

    api = FakeServer(str(model), answer)
    try:
        out = tmp_path / "ev"
        code, text = run_cli(
            "eval",
            "--model",
            model,
            "--base-url",
            api.url,
            "--tasks",
            "gsm8k",
            "--limit",
            "3",
            "--max-tokens",
            CAP,
            "--output",
            out,
        )
        assert code == 0, text
    finally:
        api.close()
    assert len(api.seen) == 3 and all(b["max_tokens"] == CAP for b in api.seen)
    recs = eval_samples(out)
    first = recs[0]["samples"][0]
    assert "Janet" in recs[0]["doc"]["question"]
    assert (first["num_tokens"], first["truncated"]) == (CAP - 1, False)
    assert first["finish_reason"] == "stop"
    for rec in recs[1:]:
        (s,) = rec["samples"]
        assert (s["num_tokens"], s["truncated"], s.get("finish_reason")) == (CAP, True, "length")
    t = json.loads((out / "summary.json").read_text())["tasks"]["gsm8k"]
    assert t["truncated"] == pytest.approx(2 / 3) and t["mean_tokens"] == pytest.approx((CAP - 1 + 2 * CAP) / 3)


def test_generate_and_eval_count_alike_from_one_server(tiny_family, tmp_path):
    """One server, one answer text per question: generate's records and eval's samples give the same
    whole, thinking and answer counts: the server's, not the local tokenizer's."""
    model = tiny_family["short_cot"]
    texts = {}

    def answer(user: str):
        question = user.split("\n")[0]
        content = f"<think>\nLet me see: {question[:40]}\n</think>\n\nSo \\boxed{{{len(question)}}}."
        texts[question] = content
        return content, "stop", 20 + len(question) % 7  # the server's own count, not any re-tokenisation

    api = FakeServer(str(model), answer)
    try:
        gen_out = tmp_path / "g.jsonl"
        code, text = run_cli(
            "generate",
            "--model",
            model,
            "--base-url",
            api.url,
            "--questions",
            "gsm8k",
            "--decontaminate",
            "off",
            "--limit",
            "3",
            "--max-tokens",
            "64",
            "--keep",
            "all",
            "--out",
            gen_out,
        )
        assert code == 0, text
        ev_out = tmp_path / "ev"
        code, text = run_cli(
            "eval",
            "--model",
            model,
            "--base-url",
            api.url,
            "--tasks",
            "gsm8k",
            "--limit",
            "3",
            "--max-tokens",
            "64",
            "--output",
            ev_out,
        )
        assert code == 0, text
    finally:
        api.close()
    records = {r["id"]: r for r in read_jsonl(gen_out)}
    samples = eval_samples(ev_out)
    assert len(records) == len(samples) == 3
    for rec in samples:
        g = records[f"gsm8k-test-{rec['doc_id']}"]
        (s,) = rec["samples"]
        content = g["messages"][1]["content"]
        assert rec["resps"][0][0] == content  # the same answer text reached both
        question = rec["doc"]["question"].split("\n")[0]
        assert g["num_tokens"] == s["num_tokens"] == 20 + len(question) % 7 != local_count(model, content)
        assert (g["thinking_tokens"], g["answer_tokens"]) == (s["thinking_tokens"], s["answer_tokens"])
        assert g["finish_reason"] == s["finish_reason"] == "stop" and s["truncated"] is False


def test_eval_hf_counts_generated_ids_like_generate(tiny_family, tmp_path):
    """transformers in eval and in generate: the same answers get the same count and finish reason,
    both from the generated ids (a random tiny model's text re-tokenizes to another count)."""
    model = tiny_family["long_cot"]
    gen_out = tmp_path / "g.jsonl"
    code, text = run_cli(
        "generate",
        "--model",
        model,
        "--questions",
        "gsm8k",
        "--decontaminate",
        "off",
        "--limit",
        "2",
        "--max-tokens",
        "12",
        "--backend",
        "transformers",
        "--batch-size",
        "1",
        "--dtype",
        "float32",
        "--keep",
        "all",
        "--out",
        gen_out,
    )
    assert code == 0, text
    ev_out = tmp_path / "ev"
    code, text = run_cli(
        "eval",
        "--model",
        model,
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "12",
        "--batch-size",
        "1",
        "--dtype",
        "float32",
        "--backend",
        "hf",
        "--output",
        ev_out,
    )
    assert code == 0, text
    records = {r["id"]: r for r in read_jsonl(gen_out)}
    for rec in eval_samples(ev_out):
        g = records[f"gsm8k-test-{rec['doc_id']}"]
        (s,) = rec["samples"]
        assert rec["resps"][0][0] == g["messages"][1]["content"]
        assert s["num_tokens"] == g["num_tokens"]
        assert s["truncated"] == (g["finish_reason"] == "length")
        assert s["finish_reason"] == g["finish_reason"]


def test_resumed_eval_keeps_the_engines_figures(tiny_family, tmp_path, monkeypatch):
    """Answers read back from the response cache after a crash keep the engine's count and finish reason."""
    from lm_eval.models.huggingface import HFLM

    from micota_merge.evaluation import evaluate as ev

    model = tiny_family["long_cot"]
    args = [
        "eval",
        "--model",
        model,
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "12",
        "--dtype",
        "float32",
        "--batch-size",
        "1",
    ]
    code, text = run_cli(*args, "--output", tmp_path / "clean")
    assert code == 0, text
    clean = [r["samples"] for r in eval_samples(tmp_path / "clean")]
    assert all(s["finish_reason"] in ("stop", "length") for q in clean for s in q)

    def killed(samples, **kwargs):
        raise RuntimeError("killed after generation")

    monkeypatch.setattr(ev, "audit_samples", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(*args, "--output", tmp_path / "run")
    monkeypatch.undo()

    def generate_until(self, requests, disable_tqdm=False):
        raise AssertionError("generated again instead of reading the cached responses")

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    code, text = run_cli(*args, "--output", tmp_path / "run")
    assert code == 0, text
    assert [r["samples"] for r in eval_samples(tmp_path / "run")] == clean


# ---------------------------------------------------------------- 7b: a sweep with nothing worth choosing


def _row(ratio, acc, tokens, truncated, density=None):
    return {"ratio": ratio, "density": density, "accuracy": acc, "mean_tokens": tokens, "truncation_rate": truncated}


def test_choose_refuses_noise_and_cut_answers():
    from micota_merge.merge.sweep.run import choose

    noise = [_row(r, 0.0, 64.0, 1.0) for r in (0.0, 0.5, 1.0)]
    pick, why = choose(noise, 40.0, tolerance=2.0, min_accuracy=0.05, max_truncated=0.5)
    assert pick is None and "sweep.min_accuracy 5.0%" in why and "0.0%" in why
    # accurate enough, but the accurate ones were mostly cut at the cap: their lengths are the cap's
    cut = [_row(0.0, 0.02, 30.0, 0.0), _row(0.5, 0.40, 64.0, 0.9), _row(1.0, 0.41, 64.0, 0.75)]
    pick, why = choose(cut, 50.0, tolerance=2.0, min_accuracy=0.05, max_truncated=0.5)
    assert pick is None and "sweep.max_truncated 50%" in why and "ratio 0.5: 90% truncated" in why
    # one accurate point answered within the cap: it is chosen, and the cut one is named
    mixed = [_row(0.0, 0.02, 30.0, 0.0), _row(0.5, 0.40, 50.0, 0.1), _row(1.0, 0.41, 64.0, 0.75)]
    pick, why = choose(mixed, 64.0, tolerance=2.0, min_accuracy=0.05, max_truncated=0.5)
    assert pick["ratio"] == 0.5 and "mostly truncated" in why and "1 (75%)" in why
    # a point below the floor never qualifies, however close its length (and however wide the tolerance)
    pick, _ = choose(mixed, 30.0, tolerance=100.0, min_accuracy=0.05, max_truncated=1.0)
    assert pick["ratio"] == 0.5


def _sweep_recipe(tmp_path: Path, family: dict, **sweep) -> Path:
    import yaml

    data = {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": "linear", "dtype": "float32"},
        "output": str(tmp_path / "ta"),
        "sweep": {
            "ratios": [0.0, 1.0],
            "probe": {"questions": "gsm8k-train", "limit": 2, "max_tokens": 4, "backend": "transformers"},
            **sweep,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sweep_of_noise_chooses_nothing_and_keeps_the_output(tiny_family, tmp_path):
    """Random tiny models: every point 0 % accurate, every answer cut at 4 tokens. A sweep that accepts
    anything writes a TA; the default floor refuses, leaves that TA as it was, and the table readable."""
    recipe = _sweep_recipe(tmp_path, tiny_family, min_accuracy=0.0, max_truncated=1.0)
    code, text = run_cli("sweep", recipe)
    assert code == 0, text
    out = tmp_path / "ta"
    data = json.loads((out / "sweep" / "sweep.json").read_text())
    assert all(r["accuracy"] == 0.0 and r["truncation_rate"] == 1.0 for r in data["ratios"])
    before = _tree(out)

    recipe = _sweep_recipe(tmp_path, tiny_family)  # the defaults: min_accuracy 0.05, max_truncated 0.5
    code, text = run_cli("sweep", recipe, "--force")
    assert code == 2, text
    line = text.strip().splitlines()[-1]
    assert line.startswith("error:") and "sweep.min_accuracy" in line and "chose no TA" in line
    assert str(tmp_path / "ta.sweep" / "sweep.md") in line
    assert _tree(out) == before
    work = tmp_path / "ta.sweep"
    table = json.loads((work / "sweep.json").read_text())
    assert table["chosen"] is None and [r["ratio"] for r in table["ratios"]] == [0.0, 1.0]
    assert table["min_accuracy"] == 0.05 and "sweep.min_accuracy" in table["reason"]
    md = (work / "sweep.md").read_text()
    assert "| TA |" in md and "**chosen**" not in md and "no TA chosen" in md


# ---------------------------------------------------------------- 8: types whose coercion changes meaning


def _base_recipe(tmp_path: Path) -> dict:
    return {
        "models": {"long_cot": "a", "short_cot": "b", "base": "c"},
        "merge": {"method": "dare_ties", "ratio": 0.5, "density": 0.5, "seed": 0},
        "output": str(tmp_path / "ta"),
        "sweep": {"ratios": [0.0, 0.5], "probe": {"questions": "gsm8k-train", "limit": 4}},
        "pipeline": {"workdir": str(tmp_path / "w"), "student": "s", "mix": {"ta": 1, "short_cot": 4}},
    }


BOOL_FIELDS = [
    ("merge", "ratio"),
    ("merge", "density"),
    ("merge", "seed"),
    ("merge", "lambda"),
    ("sweep", "tolerance"),
    ("sweep", "min_accuracy"),
    ("sweep", "max_truncated"),
    ("sweep", "target_tokens"),
    ("sweep.probe", "limit"),
    ("sweep.probe", "max_tokens"),
    ("sweep.probe", "batch_size"),
    ("pipeline", "seed"),
    ("pipeline", "question_limit"),
    ("pipeline", "mix_total"),
]


@pytest.mark.parametrize("section,key", BOOL_FIELDS)
def test_a_boolean_is_not_a_number_in_a_recipe(tmp_path, section, key):
    from micota_merge.core.errors import UserError
    from micota_merge.merge.recipe import parse_recipe

    data = _base_recipe(tmp_path)
    node = data
    for part in section.split("."):
        node = node[part]
    node[key] = True
    with pytest.raises(UserError) as e:
        parse_recipe(data, "recipe.yaml")
    line = str(e.value)
    named = f"{section}.{key}" in line or (key == "lambda" and f"{section}: '{key}'" in line)  # passed to mergekit
    assert "\n" not in line and named and "true/false" in line, line


@pytest.mark.parametrize("where", ["ratios", "densities", "distill_seeds", "mix"])
def test_a_boolean_is_not_a_number_in_a_list_or_mapping(tmp_path, where):
    from micota_merge.core.errors import UserError
    from micota_merge.merge.recipe import parse_recipe

    data = _base_recipe(tmp_path)
    if where in ("ratios", "densities"):
        data["sweep"][where] = [0.5, True]
    elif where == "distill_seeds":
        data["pipeline"]["distill_seeds"] = [0, True]
    else:
        data["pipeline"]["mix"] = {"ta": True, "short_cot": 4}
    with pytest.raises(UserError, match=f"{where}.*true/false"):
        parse_recipe(data, "recipe.yaml")


def test_ratio_true_is_refused_by_build(tiny_family, tmp_path):
    """`merge.ratio: true` merged at 1.0; now one line naming the field, exit 2, nothing written."""
    import yaml

    data = {
        "models": {k: str(v) for k, v in tiny_family.items()},
        "merge": {"method": "linear", "ratio": True, "dtype": "float32"},
        "output": str(tmp_path / "ta"),
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, text = run_cli("build", recipe)
    assert code == 2 and "merge.ratio" in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "ta").exists()


@pytest.mark.parametrize(
    "field",
    [
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "batch_size",
        "limit",
        "seed",
        "concurrency",
        "retries",
        "request_timeout",
        "max_model_len",
    ],
)
def test_a_boolean_is_not_a_number_in_generate_options(field):
    from micota_merge.core.errors import UserError
    from micota_merge.generation.generate import options

    with pytest.raises(UserError, match=f"--{field.replace('_', '-')}:.*true/false"):
        options(model="m", questions="gsm8k", out="o.jsonl", **{field: True})


def _questions(tmp_path: Path, *rows: dict) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("gold,what", [({"value": 3}, "dict"), (True, "bool"), ([1, 2], "list"), ([{"a": 1}], "list")])
def test_a_gold_that_is_not_a_string_or_number_is_refused(tmp_path, gold, what):
    from micota_merge.core.errors import UserError
    from micota_merge.data.questions import load_questions

    path = _questions(
        tmp_path, {"id": "a", "question": "1+1?", "answer": "2"}, {"id": "b", "question": "2+2?", "answer": gold}
    )
    with pytest.raises(UserError) as e:
        load_questions(str(path))
    line = str(e.value)
    assert "\n" not in line and str(path) in line and "record 2" in line and "'b'" in line and "'answer'" in line
    assert what in line, line


def test_golds_that_are_strings_numbers_or_olympiad_lists_load(tmp_path):
    from micota_merge.data.questions import load_questions

    path = _questions(
        tmp_path, {"question": "a?", "answer": "2"}, {"question": "b?", "answer": 3}, {"question": "c?", "answer": 2.5}
    )
    assert [q["answer"] for q in load_questions(str(path))] == ["2", "3", "2.5"]
    path = _questions(
        tmp_path, {"question": "a?", "final_answer": ["$1$", "$2$"]}, {"question": "b?", "final_answer": [7]}
    )
    qs = load_questions(str(path), benchmark="olympiadbench")
    assert [q["answer"] for q in qs] == [["1", "2"], "7"]
    assert load_questions("olympiadbench", limit=2)  # the shipped multi-answer golds


def test_grading_never_reads_a_dict_as_its_repr():
    from micota_merge.evaluation import grading

    with pytest.raises(ValueError, match="string or a number"):
        grading.parse_gold({"value": 3})
    with pytest.raises(ValueError, match="string or a number"):
        grading.parse_gold([{"value": 3}], "olympiadbench")
    assert grading.parse_gold({"final_answer": ["$1$"]}) == ["1"]  # an OlympiadBench row, as eval passes it


def test_generate_refuses_a_dict_gold_in_one_line(tiny_family, tmp_path):
    path = _questions(tmp_path, {"question": "1+1?", "answer": {"value": 2}})
    code, text = run_cli(
        "generate",
        "--model",
        tiny_family["short_cot"],
        "--questions",
        path,
        "--out",
        tmp_path / "o.jsonl",
        "--backend",
        "transformers",
    )
    assert code == 2 and "'answer'" in text and "record 1" in text and len(text.strip().splitlines()) == 1, text


@pytest.mark.parametrize(
    "section,key",
    [
        ("generate", "max_tokens"),
        ("generate", "temperature"),
        ("eval", "temperature"),
        ("eval", "top_p"),
        ("eval", "seed"),
    ],
)
def test_run_refuses_a_boolean_in_a_stage_option(tiny_family, tmp_path, section, key):
    """A pipeline's stage options reach generate's model and eval's arguments: true is no number there."""
    from micota_merge.core.errors import UserError
    from micota_merge.merge.recipe import parse_recipe
    from micota_merge.pipeline.check import validate_pipeline

    data = {
        "models": {k: str(v) for k, v in tiny_family.items()},
        "merge": {"method": "linear"},
        "output": str(tmp_path / "ta"),
        "pipeline": {"workdir": str(tmp_path / "w"), "student": str(tiny_family["short_cot"]), section: {key: True}},
    }
    recipe = parse_recipe(data)
    with pytest.raises(UserError) as e:
        validate_pipeline(recipe, recipe.pipeline, tmp_path)
    line = str(e.value)
    assert f"pipeline.{section}" in line and key in line and "true/false" in line, line


def test_every_sampled_answer_carries_the_engines_figures(tiny_family, tmp_path):
    """k samples of one prompt go to the engine together: each of the k answers is matched to its own
    generation (the repeats share a context), none falls back to the estimate."""
    out = tmp_path / "ev"
    code, text = run_cli(
        "eval",
        "--model",
        tiny_family["long_cot"],
        "--tasks",
        "gsm8k",
        "--limit",
        "2",
        "--samples",
        "3",
        "--temperature",
        "1.0",
        "--max-tokens",
        "10",
        "--dtype",
        "float32",
        "--backend",
        "hf",
        "--output",
        out,
    )
    assert code == 0, text
    recs = eval_samples(out)
    assert [len(r["samples"]) for r in recs] == [3, 3]
    for rec in recs:
        for response, s in zip(rec["filtered_resps"][0], rec["samples"]):
            assert s["finish_reason"] in ("stop", "length") and 1 <= s["num_tokens"] <= 10
            assert s["truncated"] is (s["finish_reason"] == "length")
            assert s["finish_reason"] == "stop" or s["num_tokens"] == 10
    assert len({r for rec in recs for r in rec["filtered_resps"][0]}) > 2  # sampled: distinct answers
