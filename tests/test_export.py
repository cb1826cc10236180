"""`export`: generated data as LLaMA-Factory's ShareGPT data set and as a Hugging Face dataset folder;
both read back to the conversations distill would train on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli

THINK = "<think>\nFirst 2 + 2 = 4. Check: 4 - 2 = 2.\n</think>\n\nThe answer is \\boxed{4}."


def _records(tmp_path: Path) -> Path:
    rows = [
        {"id": "a", "correct": True, "finish_reason": "stop", "system": "You are Qwen.", "messages": [
            {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": THINK}]},
        {"id": "b", "correct": False, "finish_reason": "stop", "messages": [
            {"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "7"}]},
        {"id": "c", "correct": True, "finish_reason": "length", "messages": [
            {"role": "user", "content": "What is 4 + 4?"}, {"role": "assistant", "content": "<think>\n4 + 4"}]},
        {"id": "d", "correct": True, "finish_reason": "stop", "messages": [
            {"role": "user", "content": "What is 5 + 5?"}, {"role": "assistant", "content": "10"}]},
    ]  # fmt: skip
    p = tmp_path / "ta.correct.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def run(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["export", *[str(a) for a in args]])
    return r.exit_code, r.output


# what distill trains on: the verified, uncut records, with the teacher template's system prompt kept
EXPECTED = [
    [
        {"role": "system", "content": "You are Qwen."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": THINK},
    ],
    [{"role": "user", "content": "What is 5 + 5?"}, {"role": "assistant", "content": "10"}],
]


def _from_sharegpt(row: dict, columns: dict) -> list[dict]:
    """LLaMA-Factory's reading of a ShareGPT row (its default tags: from/value, human/gpt)."""
    roles = {"human": "user", "gpt": "assistant"}
    msgs = [{"role": "system", "content": row[columns["system"]]}] if row.get(columns.get("system", "")) else []
    return msgs + [{"role": roles[t["from"]], "content": t["value"]} for t in row[columns["messages"]]]


def test_llama_factory_round_trip(tmp_path):
    data = _records(tmp_path)
    code, text = run(data, "--out", tmp_path / "lf", "--name", "micota_ta")
    assert code == 0, text
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    entry = info["micota_ta"]
    assert entry["formatting"] == "sharegpt" and entry["file_name"] == "micota_ta.json"
    rows = json.loads((tmp_path / "lf" / entry["file_name"]).read_text())
    assert [_from_sharegpt(r, entry["columns"]) for r in rows] == EXPECTED  # thinking kept verbatim
    manifest = json.loads((tmp_path / "lf" / "micota.json").read_text())
    assert manifest["stage"] == "export" and manifest["results"]["left_out"] == 2
    # the same export again is done; other settings over it need --force
    assert run(data, "--out", tmp_path / "lf", "--name", "micota_ta")[1].startswith("already exported")
    code, text = run(data, "--out", tmp_path / "lf", "--name", "micota_ta", "--keep", "all")
    assert code == 2 and "--force" in text
    code, text = run(data, "--out", tmp_path / "lf", "--name", "micota_ta", "--keep", "all", "--force")
    assert code == 0, text
    assert len(json.loads((tmp_path / "lf" / "micota_ta.json").read_text())) == 4


def test_hf_round_trip_and_dropped_system(tmp_path):
    import datasets

    data = _records(tmp_path)
    code, text = run(data, "--out", tmp_path / "hf", "--to", "hf", "--template-system", "drop")
    assert code == 0, text
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert ds["messages"] == [EXPECTED[0][1:], EXPECTED[1]] and ds["id"] == ["a", "d"]


@pytest.mark.parametrize("where", ["foreign", "input"])
def test_export_never_writes_into_what_is_not_its_own(tmp_path, where):
    data = _records(tmp_path)
    target = tmp_path / "mine"
    if where == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("weeks of work")
    else:
        target = tmp_path  # the folder that holds the input
    code, text = run(data, "--out", target, "--force")
    assert code == 2 and text.count("error:") == 1
    if where == "foreign":
        assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_bad_data_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    code, text = run(bad, "--out", tmp_path / "x")
    assert code == 2 and "bad.jsonl:1" in text and not (tmp_path / "x").exists()
