"""`micota-merge align`: NLL of the assistant tokens, the same tokens distill trains."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.training.align import AlignOptions, align, spread


def test_trained_data_is_more_likely_than_held_out(distilled_tiny, tiny_family, chat_data, tmp_path):
    """After a few steps on the terse set, the student finds it far likelier than a differently
    written set; the untrained student shows no such gap (both near ln(vocab))."""
    files = [str(chat_data["train"]), str(chat_data["verbose"])]
    before = align(
        AlignOptions(model=str(tiny_family["short_cot"]), data=files, limit=8, batch_size=8), echo=lambda s: None
    )["rows"]
    out = tmp_path / "align"
    r = CliRunner().invoke(
        cli,
        [
            "align",
            "--model",
            str(distilled_tiny),
            "--data",
            ",".join(files),
            "--limit",
            "8",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    after = json.loads((out / "align.json").read_text())["rows"]

    gap_before = before["verbose"]["nll"] - before["train"]["nll"]
    gap_after = after["verbose"]["nll"] - after["train"]["nll"]
    assert abs(gap_before) < 0.5 and 11 < before["train"]["nll"] < 13  # random init: ~ln(151646) = 11.9
    assert after["train"]["nll"] < before["train"]["nll"] - 1.0
    assert gap_after > gap_before + 0.5, (before, after)
    for row in after.values():
        assert row["records"] == 8 and row["perplexity"] == pytest.approx(math.exp(row["nll"]))
        s = row["per_record"]
        assert s["p10"] <= s["median"] <= s["p90"] and s["sd"] >= 0
    # The report: table, figure, manifest.
    table = (out / "align.md").read_text()
    assert "| train | 8 |" in table and "| verbose | 8 |" in table and "NLL/token" in table
    assert (out / "align.png").read_bytes()[:4] == b"\x89PNG"
    man = json.loads((out / "micota.json").read_text())
    assert man["stage"] == "align" and len(man["inputs"]["data"]) == 2
    assert table.strip() in r.output.replace("\r", "")


def test_scores_exactly_the_trained_tokens(tiny_family, tmp_path):
    """The token count is the assistant's tokens (answer + end of turn) minus nothing, and the
    NLL equals a direct computation from the model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from micota_merge.training.distill import encode_records, read_chat_records

    rec = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]}
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    row = align(AlignOptions(model=str(tiny_family["base"]), data=[str(f)], dtype="float32"), echo=lambda s: None)[
        "rows"
    ]["one"]
    tok = AutoTokenizer.from_pretrained(tiny_family["base"])
    [(ids, mask)] = encode_records(tok, read_chat_records(f))
    assert row["tokens"] == sum(mask) == len(tok("Hi there!<|im_end|>\n", add_special_tokens=False)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    targets = torch.tensor(ids[1:])
    keep = torch.tensor(mask[1:], dtype=torch.bool)
    direct = -logp[torch.arange(len(targets)), targets][keep].mean().item()
    assert row["nll"] == pytest.approx(direct, abs=1e-3)


def test_errors_and_spread(tmp_path, tiny_family):
    r = CliRunner().invoke(cli, ["align", "--model", str(tiny_family["base"]), "--data", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "nope.jsonl does not exist" in r.output
    s = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["mean"], s["median"], s["p10"], s["p90"]) == (3.0, 3.0, 1.4, 4.6)
