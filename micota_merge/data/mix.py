"""`mix`: Mix Distillation (arXiv 2502.12143): one training file from several by weight.

Small students (<= 3B) learn better from a mix of long and short chains of thought (long:short
1:4 in the paper) than from either alone. The drawing itself lives in `data.mix`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import Field

from micota_merge.core.artifacts import now, package_versions, write_json_atomic, write_jsonl_atomic
from micota_merge.core.errors import UserError
from micota_merge.core.fingerprint import data_fingerprint
from micota_merge.core.options import StageOptions, cli
from micota_merge.core.ownership import OWN, claim, claim_sidecars, file_manifest, identity_of, output_lock
from micota_merge.core.strict import Int
from micota_merge.data.questions import mix, parse_parts


class MixOptions(StageOptions):
    """What `micota-merge mix` takes."""

    parts: list[str] = Field(description="PART=WEIGHT: a JSONL file of chat records and its weight in the mix.")
    out: str = Field(description="Mixed records (JSONL), written atomically.")
    total: Optional[Int] = Field(
        None, description="Records in the mix (default: the most the parts allow at these weights)."
    )
    seed: Int = Field(0, description="Seed of the draw.")
    per_question: Int = Field(1, description="Most answers per question id across the whole mix.")
    force: bool = Field(
        False,
        description="Replace a mix that mix wrote (its OUT.meta.json says so)." + OWN,
        json_schema_extra=cli(flag=True),
    )


def stats_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".stats.json")


def run(opts: MixOptions, echo=print) -> dict:
    parts, total, seed, per_question, force = opts.parts, opts.total, opts.seed, opts.per_question, opts.force
    out_p = Path(opts.out)
    parsed = parse_parts(parts)
    inputs = {f"part {label}": p for label, p, _ in parsed}
    claimed = claim(out_p, "mix", kind="file", inputs=inputs, option="--out")
    claim_sidecars(claimed, [stats_path(out_p)], option="--out")
    identity = identity_of(
        {
            "parts": [(label, data_fingerprint(p), w) for label, p, w in parsed],
            "total": total,
            "seed": seed,
            "per_question": per_question,
        }
    )
    with output_lock(out_p, "mix", log=echo):
        claimed = claim(out_p, "mix", kind="file", inputs=inputs, option="--out")
        if claimed.same(identity):
            echo(f"already mixed: {out_p} holds this mix of parts of the same content; nothing to do")
            return json.loads(stats_path(out_p).read_text(encoding="utf-8")) if stats_path(out_p).is_file() else {}
        if claimed.state == "ours" and not force:
            raise UserError(
                f"--out {out_p} already exists and holds a mix of other parts or settings: "
                "pass --force to replace it, or "
                "choose another file"
            )
        records, composition = mix(parsed, total=total, seed=seed, per_question=per_question)
        # the manifest first (a kill after it leaves a mix of ours to replace, never a foreign-looking file)
        write_json_atomic(file_manifest(out_p), {"stage": "mix", "identity": None, "created": now()})
        write_jsonl_atomic(out_p, records)
        composition.update(out=str(out_p), created=now(), versions=package_versions())
        write_json_atomic(stats_path(out_p), composition)
        write_json_atomic(
            file_manifest(out_p),
            {"stage": "mix", "identity": identity, "created": now(), "parts": [str(p) for _, p, _ in parsed]},
        )
    echo(f"{composition['total']} records -> {out_p} ({composition['distinct_questions']} questions)")
    for p in composition["parts"]:
        echo(
            f"  {p['label']:<20} weight {p['weight']:<6g} drew {p['drawn']:>6} of {p['usable']:>6} usable "
            f"({p['drawn'] / composition['total']:.1%})  mean tokens {p['mean_tokens']}"
        )
    return composition
