"""`align`: how close a data set sits to a model — per-token NLL of its assistant tokens.

MiCoTA's argument for mid-length CoT is that a small student finds the TA's data more likely
than the long-CoT teacher's. This stage measures that: each record goes through the model's
chat template exactly as `distill` would train it (same tokenization, same prompt mask), and
the model's negative log-likelihood of the assistant tokens is averaged per token. The spread
is over records (each record's mean NLL per token), so one long record does not hide the rest.
The log-probabilities come from TRL's fused LM head (the one SFTTrainer trains with), which
never builds the (tokens x vocabulary) logits, so 16k-token CoTs fit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import Field

from micota_merge.core.errors import UserError
from micota_merge.core.options import ModelDtype, StageOptions, chat_template_kwargs_field, cli, template_switches
from micota_merge.core.ownership import OWN
from micota_merge.core.stats import spread
from micota_merge.core.strict import Int


def score_examples(
    model, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, desc: str = ""
) -> list[tuple[float, int]]:
    """(sum of NLL, number of scored tokens) per example, in the order given."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # less padding per batch
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with torch.inference_mode(), tqdm(total=len(examples), desc=desc or "scoring", unit="rec") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(examples[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                toks, mask = examples[i]
                t = torch.tensor(toks)
                ids[row, : len(toks)] = t
                att[row, : len(toks)] = 1
                labels[row, : len(toks)] = torch.where(torch.tensor(mask, dtype=torch.bool), t, -100)
            out = model(
                input_ids=ids.to(device), attention_mask=att.to(device), labels=labels.to(device), fused_lm_head=True
            )
            nll = (-out.log_probs.float()).sum(dim=1).cpu()
            n = out.label_mask.sum(dim=1).cpu()
            for row, i in enumerate(idx):
                results[i] = (float(nll[row]), int(n[row]))
            bar.update(len(idx))
    return results


def load_scoring_model(model_dir: Path, dtype: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from micota_merge.training.distill import resolve_dtype

    dtype, _ = resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    add_fused_lm_head(model)
    return model


def _labels(files: list[str]) -> list[str]:
    stems = [Path(f).stem for f in files]
    out = []
    for i, s in enumerate(stems):
        out.append(s if stems.count(s) == 1 else f"{s}#{i + 1}")
    return out


def markdown_table(model_name: str, rows: dict[str, dict]) -> str:
    lines = [
        f"# Assistant-token NLL under `{model_name}`",
        "",
        "Per-token negative log-likelihood (nats) of each data set's assistant tokens, through the "
        "model's chat template; perplexity = exp(NLL). Spread columns are over records "
        "(each record's mean NLL per token).",
        "",
        "| data | records | tokens | NLL/token | perplexity | record mean | sd | median | p10 | p90 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        s = r["per_record"]
        lines.append(
            f"| {name} | {r['records']} | {r['tokens']:,} | {r['nll']:.4f} | {r['perplexity']:.3f} | "
            f"{s['mean']:.4f} | {s['sd']:.4f} | {s['median']:.4f} | {s['p10']:.4f} | {s['p90']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict], path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) + 2), 4.2))
    ax.boxplot([rows[n]["record_nll"] for n in names], whis=(10, 90), showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=15 if len(names) > 3 else 0)
    ax.set_ylabel("mean NLL per assistant token (nats)")
    ax.set_title(
        f"data likelihood under {model_name}\n(box: quartiles, whiskers: p10-p90, triangle: mean)", fontsize=10
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class AlignOptions(StageOptions):
    """What `micota-merge align` takes."""

    model: str = Field(description="Checkpoint whose likelihood to measure (usually the student).")
    data: list[str] = Field(
        min_length=1,
        description="JSONL file(s) of chat records; one row per file.",
        json_schema_extra=cli(metavar="FILE"),
    )
    limit: Optional[Int] = Field(None, ge=1, description="Score only the first N records of each file.")
    batch_size: Int = Field(4, ge=1, description="Records per forward pass.")
    max_length: Int = Field(16384, ge=16, description="Longer records are truncated to this many tokens (and counted).")
    dtype: ModelDtype = Field("auto", description="Weights' dtype for the forward passes (auto: the checkpoint's).")
    chat_template_kwargs: dict[str, Any] = chat_template_kwargs_field()
    out: Optional[str] = Field(None, description="Folder for align.md, align.json, align.png and micota.json.")
    force: bool = Field(
        False, description="Replace an align report that align wrote." + OWN, json_schema_extra=cli(flag=True)
    )


def align(opts: AlignOptions, echo: Callable[[str], None] = print) -> dict:
    """Score every data file under `model`; print the table and write the report folder if `out`."""
    from transformers import AutoTokenizer

    from micota_merge.core.artifacts import now
    from micota_merge.core.checkpoints import check_model_files, resolve_model_path
    from micota_merge.training.distill import read_chat_records

    started = now()
    model_path = resolve_model_path(opts.model, "--model")
    meta = check_model_files(model_path, "--model")
    inputs = {"--model": model_path, **{f"--data {f}": f for f in opts.data}}
    run_id, done = _claim_report(opts, meta, inputs, echo) if opts.out else (None, None)
    if done is not None:
        return done
    records = {f: read_chat_records(f) for f in opts.data}  # read all first: a bad file fails before the model loads
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lm = load_scoring_model(model_path, opts.dtype)
    rows = {
        label: _score_file(lm, tokenizer, f, records[f], opts, label) for label, f in zip(_labels(opts.data), opts.data)
    }
    table = markdown_table(model_path.name, rows)
    echo(table)
    result = {"model": str(model_path), "rows": rows}
    if opts.out:
        _write_report(opts, model_path, meta, inputs, rows, table, result, run_id, started)
        echo(f"wrote {opts.out}/align.md, align.json, align.png")
    return result


def _claim_report(opts: AlignOptions, meta, inputs: dict, echo) -> tuple[str, Optional[dict]]:
    """(the report's identity, the finished report when --out already holds this one)."""
    from micota_merge.core.artifacts import sha256_file
    from micota_merge.core.ownership import claim, identity_of

    claimed = claim(opts.out, "align", inputs=inputs, option="--out")
    run_id = identity_of(
        {
            "model": meta.fingerprint()["content"],
            "data": [sha256_file(f) for f in opts.data],
            "limit": opts.limit,
            "max_length": opts.max_length,
            "dtype": opts.dtype,
            **template_switches(opts.chat_template_kwargs),
        }
    )
    if claimed.same(run_id) and not opts.force:
        echo(f"already measured: {opts.out} holds this model's NLL on data of the same content; nothing to do")
        return run_id, json.loads((Path(opts.out) / "align.json").read_text(encoding="utf-8"))
    if claimed.state == "ours" and not opts.force:
        raise UserError(
            f"--out {opts.out} already exists and holds an align report of another model or data: "
            "pass --force to replace it, or choose another --out"
        )
    return run_id, None


def _score_file(lm, tokenizer, f: str, records: list, opts: AlignOptions, label: str) -> dict:
    """One data file's row: per-token NLL over all its assistant tokens, and the spread over records."""
    from micota_merge.core.artifacts import sha256_file
    from micota_merge.training.distill import encode_records

    recs = records[: opts.limit] if opts.limit else records
    if not recs:
        raise UserError(f"--data {f}: no records")
    examples, truncated = [], 0
    for ids, mask in encode_records(tokenizer, recs, template_kwargs=opts.chat_template_kwargs):
        if len(ids) > opts.max_length:
            ids, mask, truncated = ids[: opts.max_length], mask[: opts.max_length], truncated + 1
        examples.append((ids, mask))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scored = score_examples(lm, examples, opts.batch_size, pad_id, desc=label)
    kept = [(s, n) for s, n in scored if n > 0]
    if not kept:
        raise UserError(f"--data {f}: no assistant tokens left to score (raise --max-length)")
    total_nll, total_n = sum(s for s, _ in kept), sum(n for _, n in kept)
    per_record = [s / n for s, n in kept]
    nll = total_nll / total_n
    return {
        "file": str(Path(f).resolve()),
        "sha256": sha256_file(f),
        "records": len(kept),
        "skipped_empty": len(scored) - len(kept),
        "truncated": truncated,
        "tokens": total_n,
        "nll": nll,
        "perplexity": math.exp(nll),
        "per_record": spread(per_record),
        "record_nll": per_record,
    }


def _write_report(opts: AlignOptions, model_path: Path, meta, inputs, rows, table, result, run_id, started) -> None:
    from micota_merge.core.artifacts import atomic_dir, now, write_json_atomic, write_manifest, write_text_atomic

    with atomic_dir(opts.out, "align", force=opts.force, inputs=inputs, option="--out") as staging:
        write_text_atomic(staging / "align.md", table)
        write_json_atomic(staging / "align.json", result)
        plot(rows, staging / "align.png", model_path.name)
        write_manifest(
            staging,
            "align",
            options={
                "limit": opts.limit,
                "batch_size": opts.batch_size,
                "max_length": opts.max_length,
                "dtype": opts.dtype,
            },
            inputs={
                "model": meta.fingerprint(),
                "data": [{"path": r["file"], "sha256": r["sha256"]} for r in rows.values()],
            },
            results={
                k: {"nll": v["nll"], "perplexity": v["perplexity"], "tokens": v["tokens"], "records": v["records"]}
                for k, v in rows.items()
            },
            started=started,
            finished=now(),
            identity=run_id,
        )
