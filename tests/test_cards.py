"""Model cards: every TA and every distilled student carries a README.md with the Hub's front matter and
a body that matches the folder's own manifest (the same ratio, the same input fingerprints)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.core import cards
from micota_merge.merge.recipe import parse_recipe


def _recipe(tmp_path: Path, family: dict, **sweep) -> Path:
    data = {
        "name": "card-ta",
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": "dare_ties", "ratio": 0.6, "density": 0.5, "dtype": "bfloat16", "seed": 3},
        "output": str(tmp_path / "ta"),
    }
    if sweep:
        data["sweep"] = {
            "ratios": [0.0, 0.5, 1.0],
            "probe": {"questions": "gsm8k-train", "limit": 2, "max_tokens": 6, "backend": "transformers"},
            "min_accuracy": 0.0,
            "max_truncated": 1.0,
        }
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_built_ta_carries_its_own_card(tiny_family, tmp_path):
    r = CliRunner().invoke(cli, ["build", str(_recipe(tmp_path, tiny_family))])
    assert r.exit_code == 0, r.output
    ta = tmp_path / "ta"
    front, body = cards.read(ta)
    assert {"merge", "mergekit", "dare_ties", "teacher-assistant"} <= set(front["tags"])
    assert front["library_name"] == "transformers" and "base_model" not in front  # local folders: no Hub id
    assert "ratio 0.6 (the long-CoT share), density 0.5, seed 3" in body
    assert "mergekit" in body and "This is a merge of pre-trained language models" not in body  # not mergekit's card
    manifest = json.loads((ta / "micota.json").read_text())
    for role, fp in manifest["inputs"].items():
        assert f"| {role} | `{tiny_family[role]}` | `{fp['content'][:16]}` |" in body
    assert "README.md" in manifest["written_files"]  # part of the output: replaced only with it


def test_hub_checkpoints_are_the_cards_base_models(tmp_path):
    recipe = parse_recipe(
        {
            "models": {
                "long_cot": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                "short_cot": "Qwen/Qwen2.5-Math-7B-Instruct",
                "base": "Qwen/Qwen2.5-Math-7B",
            },
            "merge": {"method": "ties", "ratio": 0.5, "density": 0.7},
            "output": str(tmp_path / "x"),
        }
    )
    text = cards.ta_card(recipe, {})
    assert text.startswith("---\n")
    front, body = cards.parse(text)
    assert front["base_model"] == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-Math-7B-Instruct"]
    assert front["base_model_relation"] == "merge"
    assert "| base | `Qwen/Qwen2.5-Math-7B` | – |" in body  # no fingerprint known: shown as missing


def test_the_sweeps_ta_card_says_why_it_was_chosen(tiny_family, tmp_path):
    r = CliRunner().invoke(cli, ["sweep", str(_recipe(tmp_path, tiny_family, sweep=True))])
    assert r.exit_code == 0, r.output
    ta = tmp_path / "ta"
    result = json.loads((ta / "sweep" / "sweep.json").read_text())
    front, body = cards.read(ta)
    assert f"ratio {result['chosen']:g} (the long-CoT share)" in body
    assert "## Chosen by a ratio sweep" in body and result["reason"] in body
    assert result["table_md"].splitlines()[0] in body
    manifest = json.loads((ta / "micota.json").read_text())
    assert manifest["recipe"]["merge"]["ratio"] == result["chosen"]


def test_a_distilled_student_carries_a_card(distilled_tiny, chat_data, tiny_family):
    front, body = cards.read(distilled_tiny)
    assert {"sft", "trl", "distillation"} <= set(front["tags"]) and "base_model" not in front
    manifest = json.loads((Path(distilled_tiny) / "micota.json").read_text())
    f = manifest["inputs"]["data"][0]
    assert f"| `{Path(f['path']).name}` | {f['records']} | `{f['sha256'][:16]}` |" in body
    assert f"Ended at step {manifest['results']['global_step']}" in body and "lr 0.01" in body
    assert "README.md" in manifest["written_files"]
