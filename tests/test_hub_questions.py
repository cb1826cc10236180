"""Hub datasets as questions (`hf:ORG/NAME[:CONFIG][@SPLIT]`), read offline from a pre-filled Hugging
Face cache laid out as huggingface_hub lays it out, and local dataset repository folders; their common
shapes (problem/solution with a boxed answer, chat records) and their identity by content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core.errors import UserError
from micota_merge.data.questions import load_questions, questions_source

REV1 = "1" * 40
REV2 = "2" * 40


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _snapshot(cache: Path, repo: str, rev: str, files: dict[str, list[dict] | str]) -> Path:
    """A dataset in huggingface_hub's cache layout: refs/main -> snapshots/<rev>/..."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    snap = root / "snapshots" / rev
    for name, content in files.items():
        if isinstance(content, str):
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            (snap / name).write_text(content)
        else:
            _jsonl(snap / name, content)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


CONFIGS = """---
configs:
- config_name: easy
  data_files:
  - split: train
    path: easy/train.jsonl
- config_name: hard
  data_files:
  - split: train
    path: hard/train.jsonl
---
"""


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub whose cache holds acme/toymath (problem/solution) and acme/levels (two configs)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    rows = [
        {"problem": "Tom has 3 apples and buys 4 more. How many now?", "solution": "3 + 4 = 7, so \\boxed{7}."},
        {"problem": "What is 6 times 7?", "solution": "We get $\\boxed{42}$."},
    ]
    _snapshot(cache, "acme/toymath", REV1, {"data/train.jsonl": rows, "data/test.jsonl": rows[:1]})
    easy = [{"question": "1 + 1?", "answer": "2"}]
    hard = [{"question": "What is 12 squared?", "answer": "144"}, {"question": "17 * 3?", "answer": "51"}]
    _snapshot(cache, "acme/levels", REV1, {"README.md": CONFIGS, "easy/train.jsonl": easy, "hard/train.jsonl": hard})
    return cache


def test_a_hub_dataset_is_read_offline_from_the_cache(hub):
    qs = load_questions("hf:acme/toymath")
    assert [(q["question"][:6], q["answer"]) for q in qs] == [("Tom ha", "7"), ("What i", "42")]
    assert all(q["id"].startswith("toymath-") for q in qs)  # content ids: stable under reordering
    assert [q["answer"] for q in load_questions("hf:acme/toymath@test")] == ["7"]
    assert [q["answer"] for q in load_questions("hf:acme/levels:hard")] == ["144", "51"]
    assert [q["answer"] for q in load_questions("hf:acme/levels:easy@train")] == ["2"]
    assert questions_source("hf:acme/toymath").name == REV1  # the resolved revision's snapshot


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("hf:acme/unknown", "huggingface-cli download --repo-type dataset acme/unknown"),
        ("hf:acme/toymath@validation", "hf:acme/toymath"),
        ("hf:acme/levels:medium", "hf:acme/levels:medium"),
        ("hf:noslash", "hf:ORG/NAME"),
    ],
)
def test_hub_mistakes_are_one_line(hub, spec, needle):
    with pytest.raises(UserError) as e:
        load_questions(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_chat_records_and_a_local_repository_folder(tmp_path):
    folder = tmp_path / "myrepo"
    _jsonl(
        folder / "data" / "train.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "What is 2 + 5?"},
                    {"role": "assistant", "content": "\\boxed{7}"},
                ]
            },
            {"messages": [{"role": "user", "content": "What is 9 - 4?"}, {"role": "assistant", "content": "So 5."}]},
        ],
    )
    qs = load_questions(folder)
    assert [(q["question"], q["answer"]) for q in qs] == [("What is 2 + 5?", "7"), ("What is 9 - 4?", None)]


def test_generate_on_a_hub_dataset_knows_it_by_content(hub, tiny_family, tmp_path):
    out = tmp_path / "g.jsonl"
    args = ["generate", "--model", str(tiny_family["short_cot"]), "--questions", "hf:acme/toymath"]
    args += ["--out", str(out), "--max-tokens", "2", "--backend", "transformers"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["settings"]["questions"] == "hf:acme/toymath"
    first = meta["settings"]["questions_content"]
    assert CliRunner().invoke(cli, args).output.count("already generated") == 1
    # a new revision with other content under the same name: not the same questions
    rows = [{"problem": "What is 6 times 8?", "solution": "\\boxed{48}"}, {"problem": "2+2?", "solution": "\\boxed{4}"}]
    _snapshot(hub, "acme/toymath", REV2, {"data/train.jsonl": rows})
    assert questions_source("hf:acme/toymath").name == REV2
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "question file content" in r.output
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["settings"]["questions_content"] == first
