"""`mix`: Mix Distillation (arXiv 2502.12143): one training file from several by weight.

Small students (<= 3B) learn better from a mix of long and short chains of thought (long:short
1:4 in the paper) than from either alone. The drawing itself lives in `data.mix`.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import check_output_file, now, package_versions, write_json_atomic, write_jsonl_atomic
from .data import mix, parse_parts
from .errors import UserError
from .generate import meta_path, sibling


def stats_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".stats.json")


def run(parts: list[str], out: str, total: int | None = None, seed: int = 0, per_question: int = 1,
        force: bool = False, echo=print) -> dict:
    out_p = Path(out)
    parsed = parse_parts(parts)
    if any(out_p.resolve() == p.resolve() for _, p, _ in parsed):
        raise UserError(f"--out {out_p} is also one of the parts: write the mix to a new file")
    check_output_file(out_p, "--out")
    if out_p.exists() and not force:
        raise UserError(f"--out {out_p} already exists: pass --force to replace it, or choose another file")
    records, composition = mix(parsed, total=total, seed=seed, per_question=per_question)
    if force:
        # a generate output replaced by a mix must not keep its sidecars: a later `generate`
        # would take them for its own and "resume" into the mix
        for stale in (meta_path(out_p), sibling(out_p, ".correct.jsonl")):
            stale.unlink(missing_ok=True)
    write_jsonl_atomic(out_p, records)
    composition.update(out=str(out_p), created=now(), versions=package_versions())
    write_json_atomic(stats_path(out_p), composition)
    echo(f"{composition['total']} records -> {out_p} ({composition['distinct_questions']} questions)")
    for p in composition["parts"]:
        echo(f"  {p['label']:<20} weight {p['weight']:<6g} drew {p['drawn']:>6} of {p['usable']:>6} usable "
             f"({p['drawn'] / composition['total']:.1%})  mean tokens {p['mean_tokens']}")
    return composition
