"""Model cards: the README.md a Hugging Face folder carries, with the Hub's YAML front matter.

Every model micota-merge writes (a teacher assistant, a distilled student) carries one, written into
the staging folder with the weights so it appears with them, atomically. The front matter is the
Hub's (`base_model`, `tags`, `library_name`, `pipeline_tag`; `base_model_relation: merge` for a TA);
the body says how the model was made, in the method's words, with every input by content
fingerprint, so a card can be checked against the folder's `micota.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from micota_merge.core.artifacts import write_text_atomic

CARD = "README.md"
TAGS = ["micota-merge", "reasoning", "chain-of-thought"]


def render(front: dict[str, Any], body: str) -> str:
    head = yaml.safe_dump({k: v for k, v in front.items() if v not in (None, [], {})}, sort_keys=False)
    return f"---\n{head}---\n\n{body.strip()}\n"


def read(folder: str | Path) -> tuple[dict, str]:
    """(front matter, body) of a folder's card; ({}, "") when it has none."""
    path = Path(folder) / CARD
    return parse(path.read_text(encoding="utf-8")) if path.is_file() else ({}, "")


def parse(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card's text."""
    if not text.startswith("---\n"):
        return {}, text
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head) or {}, body.strip()


def _hub_id(spec: str) -> Optional[str]:
    """A checkpoint named like a Hub repository (org/name, not a path that exists here): the Hub's base_model."""
    s = str(spec)
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists():
        return s
    return None


def _short(fp: Optional[str]) -> str:
    return f"`{fp[:16]}`" if fp else "–"


def ta_card(recipe, inputs: dict[str, dict], sweep: Optional[dict] = None) -> str:
    """A teacher assistant's card: the merge (method, ratio, density, seed, dtype), the two experts and
    the base by content, whose tokenizer and template it keeps, and the sweep table when a sweep chose it."""
    m = recipe.merge
    specs = recipe.model_specs()
    bases = [h for h in (_hub_id(specs[r]) for r in ("long_cot", "short_cot") if r in specs) if h]
    front = {
        "base_model": bases,
        "base_model_relation": "merge" if bases else None,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["merge", "mergekit", m.method, *(["aim"] if m.aim is not None else []), "teacher-assistant", *TAGS],
    }
    density = f", density {m.density:g}" if m.density is not None else ""
    lines = [
        f"# {recipe.name or 'teacher assistant'}",
        "",
        "A **teacher assistant** for reasoning distillation (MiCoTA, arXiv 2507.01887): a merge of a long-CoT "
        "and a short-CoT checkpoint that writes intermediate-length chains of thought, made by micota-merge "
        "through mergekit.",
        "",
        f"- method: `{m.method}`, ratio {m.ratio:g} (the long-CoT share){density}, seed {m.seed}, dtype {m.dtype}",
        f"- tokenizer, chat template and generation config: the {recipe.tokenizer} side's",
        *(
            [
                f"- then AIM (arXiv 2502.02421), omega {m.aim.omega:g}: each update from the base relaxed per input "
                "channel by the base's activations on calibration texts (`aim/channel_importance.safetensors`)"
            ]
            if m.aim is not None
            else []
        ),
        "",
        "| role | checkpoint | content fingerprint |",
        "| --- | --- | --- |",
    ]
    for role, spec in specs.items():
        fp = (inputs.get(role) or {}).get("content")
        lines.append(f"| {role} | `{spec}` | {_short(fp)} |")
    if sweep:
        lines += [
            "",
            "## Chosen by a ratio sweep",
            "",
            sweep["table_md"],
            "",
            f"Chosen: {sweep['reason']}",
        ]
    lines += ["", "How it was made, exactly: `micota.json` in this folder (recipe, mergekit config, input hashes)."]
    return render(front, "\n".join(lines))


def student_card(student: str, data: list[dict], options: dict, results: dict, eval_summary: Optional[dict] = None):
    """A distilled student's card: the student it started from, its data by content, the training options
    that decide it, where training ended, and its scores when they are known."""
    hub = _hub_id(student)
    front = {
        "base_model": hub,
        "base_model_relation": "finetune" if hub else None,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["sft", "trl", "distillation", *TAGS],
    }
    lines = [
        "# distilled student",
        "",
        f"`{student}` fine-tuned with TRL's SFT on the assistant tokens of chat records (reasoning "
        "distillation from a teacher's verified answers), by micota-merge.",
        "",
        "| data | records | sha256 |",
        "| --- | ---: | --- |",
    ]
    for f in data:
        lines.append(f"| `{Path(f['path']).name}` | {f.get('records', '–')} | {_short(f.get('sha256'))} |")
    keys = ("epochs", "max_steps", "lr", "lr_scheduler", "batch_size", "grad_accum", "max_length", "lora", "seed")
    settings = ", ".join(f"{k} {options[k]}" for k in keys if k in options)
    lines += ["", f"Training: {settings}."]
    if results.get("global_step") is not None:
        loss = results.get("final_loss")
        lines.append(
            f"Ended at step {results['global_step']}" + (f", final loss {loss:.4f}." if loss is not None else ".")
        )
    if eval_summary:
        from micota_merge.evaluation.summary import summary_markdown

        lines += ["", "## Scores", "", summary_markdown(eval_summary)]
    lines += ["", "How it was made, exactly: `micota.json` in this folder (options, data hashes, versions, loss)."]
    return render(front, "\n".join(lines))


def write(folder: str | Path, text: str) -> None:
    write_text_atomic(Path(folder) / CARD, text)


def write_student_card(folder: str | Path, eval_summary: Optional[dict] = None) -> None:
    """A distilled student's card, made from its own micota.json (the one record of how it was made)."""
    from micota_merge.core.artifacts import read_manifest

    m = read_manifest(folder) or {}
    options, inputs = m.get("options") or {}, m.get("inputs") or {}
    card = student_card(
        options.get("student", ""), inputs.get("data") or [], options, m.get("results") or {}, eval_summary
    )
    write(folder, card)
