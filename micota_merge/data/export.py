"""`export`: generated or mixed data for other trainers.

- `llama-factory`: LLaMA-Factory's ShareGPT format, `OUT/NAME.json` (records of `conversations`, each
  turn `{"from": "system" | "human" | "gpt", "value": ...}`), and `OUT/dataset_info.json` registering it
  (`formatting: sharegpt`), so `dataset: NAME` with `dataset_dir: OUT` trains on it. The assistant turn
  is the record's text as generated, thinking included.
- `hf`: a Hugging Face dataset folder (`datasets.Dataset.save_to_disk`; `datasets.load_from_disk(OUT)`
  reads it) with a `messages` column in the chat format TRL reads, and each record's id and verdict.

The records are those `distill` would train on, read by the same reader: incorrect ones and answers cut
at the length cap are left out unless `--keep all`, and the system prompt the teacher's template
injected is kept or dropped as `distill --template-system` does. The folder appears whole or not at all,
with a `micota.json` naming the data by content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal, Optional

from pydantic import Field

from micota_merge.core.artifacts import atomic_dir, sha256_file, write_json_atomic, write_manifest
from micota_merge.core.errors import UserError
from micota_merge.core.options import StageOptions, cli
from micota_merge.core.ownership import OWN, claim, identity_of, output_lock, plain_name

FORMAT = 1


class ExportOptions(StageOptions):
    """What `micota-merge export` takes."""

    data: str = Field(description="Chat records (JSONL), as `generate` or `mix` write them.")
    out: str = Field(description="Folder to write the data set into.")
    to: Literal["llama-factory", "hf"] = Field(
        "llama-factory",
        description="llama-factory: ShareGPT records and dataset_info.json; hf: a save_to_disk dataset folder.",
    )
    name: Optional[str] = Field(
        None, description="The data set's name in dataset_info.json (default: the data file's stem)."
    )
    keep: Literal["correct", "all"] = Field(
        "correct", description="correct: what distill trains on (no incorrect or cut-off answers); all: every record."
    )
    template_system: Literal["keep", "drop"] = Field(
        "keep", description="The system prompt the teacher's template injected: keep it as distill does, or drop it."
    )
    force: bool = Field(
        False, description="Replace an export that export wrote itself." + OWN, json_schema_extra=cli(flag=True)
    )


def export(opts: ExportOptions, echo: Callable[[str], None] = print) -> dict:
    from micota_merge.training.distill import read_chat_records

    data, out = Path(opts.data), Path(opts.out)
    name = plain_name(opts.name or data.name.removesuffix(".jsonl").removesuffix(".correct"), "--name")
    inputs = {"--data": data}
    claimed = claim(out, "export", inputs=inputs, option="--out")
    records = read_chat_records(data)  # one-line errors naming the file and line, before anything is written
    data_sha = sha256_file(data)  # read once: the identity and the manifest name the same bytes
    identity = identity_of(
        {
            "format": FORMAT,
            "data": data_sha,
            **opts.model_dump(include={"to", "keep", "template_system"}),
            "name": name,
        }
    )
    with output_lock(out, "export", log=echo):
        claimed = claim(out, "export", inputs=inputs, option="--out")
        if claimed.same(identity) and not opts.force:
            echo(f"already exported: {out} holds this data of the same content; nothing to do")
            return json.loads((out / "micota.json").read_text(encoding="utf-8"))["results"]
        if claimed.state == "ours" and not opts.force:
            raise UserError(f"--out {out} holds an export of other data or settings: pass --force to replace it")
        kept = [r for r in records if opts.keep == "all" or (r.correct is not False and not r.cut_off)]
        if not kept:
            raise UserError(
                f"--data {data}: no record left to export (all incorrect or cut off; --keep all keeps them)"
            )
        conversations = [_messages(r, opts.template_system) for r in kept]
        with atomic_dir(out, "export", force=opts.force, inputs=inputs, option="--out", identity=identity) as staging:
            if opts.to == "llama-factory":
                _llama_factory(staging, name, conversations)
            else:
                _hf(staging, kept, conversations)
            results = {"format": opts.to, "name": name, "records": len(kept), "left_out": len(records) - len(kept)}
            write_manifest(
                staging,
                "export",
                options=opts.model_dump(exclude={"force"}),
                inputs={"data": {"path": str(data.resolve()), "sha256": data_sha}},
                results=results,
                identity=identity,
            )
    echo(f"exported {len(kept)} records ({len(records) - len(kept)} left out) as {opts.to} to {out}")
    return results


def _messages(rec, template_system: str) -> list[dict]:
    from micota_merge.training.distill import _prompt_messages

    return _prompt_messages(rec, template_system) + [rec.completion]


_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _llama_factory(folder: Path, name: str, conversations: list[list[dict]]) -> None:
    rows = []
    for msgs in conversations:
        row: dict = {"conversations": []}
        for m in msgs:
            if m["role"] not in _SHAREGPT_ROLE:
                raise UserError(f"a message of role {m['role']!r} has no ShareGPT role (system, user, assistant)")
            if m["role"] == "system":  # LLaMA-Factory takes the system prompt as its own column
                row["system"] = m["content"]
            else:
                row["conversations"].append({"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]})
        rows.append(row)
    write_json_atomic(folder / f"{name}.json", rows)
    columns = {"messages": "conversations"}
    if any("system" in r for r in rows):
        columns["system"] = "system"
    write_json_atomic(
        folder / "dataset_info.json",
        {name: {"file_name": f"{name}.json", "formatting": "sharegpt", "columns": columns}},
    )


def _hf(folder: Path, records, conversations: list[list[dict]]) -> None:
    import datasets

    rows = {
        "messages": conversations,
        "id": [r.id for r in records],
        "correct": [r.correct for r in records],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
