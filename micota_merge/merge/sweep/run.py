"""sweep: find the intermediate-length teacher assistant from measurements.

For each point of the grid (every ratio, at every density of `sweep.densities` for the
sparsifying methods): build the TA (all points in one pass over the inputs, see multiratio.py),
answer the probe questions with it (the generate stage), and record accuracy, mean / median
tokens and truncation rate. The two endpoints (the long-CoT and short-CoT checkpoints
themselves) are probed too: the target length `mid` is the geometric mean of their mean
lengths. The chosen point is the one whose mean length is closest to the target among those
whose accuracy is within `tolerance` points of the best; the report sets it against the
length-accuracy Pareto front (the points no other point beats on both length and accuracy).
No point is chosen (a one-line error; the output untouched, the table in the work folder) when
none reaches `min_accuracy` or every accurate-enough one has more than `max_truncated` of its
answers cut at the probe's cap: lengths and accuracies then measure noise or the cap.

Layout: work happens in `<output>.sweep/` (one TA folder and one probe file per point, each
resumable), and at the end the chosen TA is renamed to `<output>` with the tables and plots in
`<output>/sweep/`. A killed sweep started again skips every point already measured.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Optional

from pydantic import Field, ValidationError

from micota_merge.core.artifacts import move_into_place, read_manifest, write_json_atomic, write_text_atomic
from micota_merge.core.errors import UserError
from micota_merge.core.identity import changed
from micota_merge.core.options import StageOptions, cli
from micota_merge.core.ownership import (
    OWN,
    check_replaceable,
    claim,
    claim_workdir,
    output_lock,
    plain_name,
    remove_ours,
)
from micota_merge.core.strict import Float, Int
from micota_merge.generation.options import TRANSPORT_OPTIONS, BackendName
from micota_merge.merge import methods
from micota_merge.merge.aim import plan as aim_plan
from micota_merge.merge.preflight import zero_task_vector
from micota_merge.merge.recipe import Recipe, SweepSettings, format_validation_error, load_recipe
from micota_merge.merge.sweep.report import plot, plot_front, table_csv, table_md

Point = tuple[float, Optional[float]]  # (ratio, density)


def _tag(ratio: float, density: Optional[float] = None) -> str:
    """Folder and file stem of a point: ratio-0.5, or ratio-0.5-density-0.7 in a density grid."""
    tag = f"ratio-{ratio:.4f}".rstrip("0").rstrip(".") if ratio not in (0.0, 1.0) else f"ratio-{ratio:.1f}"
    if density is not None:
        tag += f"-density-{density:.4f}".rstrip("0").rstrip(".") if density != 1.0 else "-density-1.0"
    return tag


# What the plan hands generate (the rest of it, its "statement", is for people to read).
PLAN_OPTIONS = ("questions", "offset", "decontaminate", "decontaminate_against")


def probe_plan(recipe: Recipe, settings: SweepSettings) -> dict:
    """Which questions the probe answers, decided before any work (for the sweep and `run`'s check).

    The TA is a model selection, so it is never made on a test set the students are scored on: the probe
    answers training questions (by default a held-out slice of the pipeline's own, else gsm8k-train), is
    decontaminated against the benchmarks the students are scored on as training data is, and a
    benchmark's own test split is refused unless `allow_test_split` says it is meant."""
    from micota_merge.data.decontaminate import default_against
    from micota_merge.evaluation import benchmarks

    probe, pipe = settings.probe, recipe.pipeline
    against = default_against(pipe.eval.get("tasks") if pipe is not None else None)
    questions = probe.questions or (pipe.questions if pipe is not None else "gsm8k-train")
    offset, where = probe.offset, f"the first {probe.limit} of {questions}"
    if offset:  # said outright
        where = f"{probe.limit} of {questions} from question {offset + 1} on (sweep.probe.offset)"
    elif pipe is not None and questions == pipe.questions:
        if probe.held_out:
            if pipe.question_limit is None:
                raise UserError(
                    "sweep.probe: a held-out slice of pipeline.questions needs pipeline.question_limit (generate "
                    "answers every question otherwise): set it, or say sweep.probe.held_out: false to probe on "
                    "questions generate answers too, or give sweep.probe.questions"
                )
            offset = pipe.question_limit
            where = (
                f"{probe.limit} of {questions} from question {offset + 1} on, held out from the "
                f"{pipe.question_limit} that generate answers"
            )
        else:
            where += ", which generate answers too (sweep.probe.held_out: false)"
    if questions in benchmarks.question_sets() and questions in against and not probe.allow_test_split:
        raise UserError(
            f"sweep.probe.questions {questions}: the test split of a benchmark the students are scored on; a TA "
            "chosen on it is selected on the test set. Probe on training questions (the default), or set "
            "sweep.probe.allow_test_split: true to do it on purpose"
        )
    if probe.allow_test_split:
        where += "; not decontaminated (sweep.probe.allow_test_split)"
    return {
        "questions": questions,
        "offset": offset,
        "decontaminate": "off" if probe.allow_test_split else "drop",
        "decontaminate_against": against,
        "statement": where,
    }


@dataclass(frozen=True)
class EarlyStop:
    """When a TA point's probe may stop before its last question (sweep.early_stop): answered `chunk`
    questions at a time, it stops once the interval of its mean length (normal, at `confidence`) lies
    wholly on one side of the target, where it can only bracket it, or the Wilson interval of its
    accuracy lies wholly below the accuracy floor, where it cannot be chosen."""

    chunk: int
    confidence: float
    target: float
    floor: float

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(1 - (1 - self.confidence) / 2)

    def identity(self) -> dict:
        return {
            "chunk": self.chunk,
            "confidence": self.confidence,
            "target": round(self.target, 4),
            "floor": self.floor,
        }

    def reason(self, lengths: list[int], correct: list[bool]) -> Optional[str]:
        n = len(lengths)
        if n < 2:
            return None
        mean = sum(lengths) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in lengths) / (n - 1))
        half = self.z * sd / math.sqrt(n)
        level = f"{self.confidence:.0%}"
        if mean + half < self.target:
            return f"short of the target: mean length {mean:.1f} ± {half:.1f} ({level}) after {n} questions"
        if mean - half > self.target:
            return f"past the target: mean length {mean:.1f} ± {half:.1f} ({level}) after {n} questions"
        p, z = sum(map(bool, correct)) / n, self.z
        upper = (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
        if upper < self.floor:
            return f"below the accuracy floor: at most {upper:.1%} ({level}) after {n} questions"
        return None


def _answered(out: Path) -> tuple[list[int], list[bool]]:
    """The lengths and verdicts of the answers a probe file holds so far."""
    from micota_merge.generation.generate import read_records

    records = read_records(out) if out.is_file() else []
    return [r["num_tokens"] for r in records], [bool(r["correct"]) for r in records]


def _probe(
    model: Path, name: str, work: Path, settings: SweepSettings, plan: dict, echo, stop: Optional[EarlyStop] = None
) -> dict:
    """Answer the probe questions with one model; resumable through generate's own JSONL.

    A finished probe is reused only for the same model *content* and probe settings; a probe file
    left by another model (a TA rebuilt from changed inputs) is started over, never resumed. With
    `stop`, the questions are answered a chunk at a time (each chunk resumes the same file) until
    the point can only bracket the target or cannot be chosen."""
    from micota_merge.core.fingerprint import content_id
    from micota_merge.data.questions import DEFAULT_PROMPT
    from micota_merge.generation import generate as gen

    stats_file = work / f"{name}.stats.json"
    out = work / f"{name}.probe.jsonl"
    chosen = {k: plan[k] for k in PLAN_OPTIONS}
    probe = {**settings.probe.model_dump(mode="json", exclude=set(TRANSPORT_OPTIONS)), "plan": chosen}
    if stop is not None:  # a row stopped early answers to the rule that stopped it
        probe["early_stop"] = stop.identity()
    model_content = content_id(model)
    if stats_file.is_file():
        row = json.loads(stats_file.read_text())
        if row.get("probe") == probe and row.get("model_content") == model_content:
            return row  # written only once every question was answered
    # the probe's settings are generate's own fields: passed whole, greedy, every answer kept; the
    # template's switches are the side's own where the recipe gives them (a hybrid short side not thinking)
    side = name if name in ("long_cot", "short_cot") else "ta"
    by_side = settings.probe.chat_template_kwargs_by_side
    fields = settings.probe.model_dump(
        exclude={"questions", "offset", "held_out", "allow_test_split", "chat_template_kwargs_by_side"}
    )
    opts = gen.options(
        **{**fields, **({"chat_template_kwargs": by_side[side]} if side in by_side else {})},
        **chosen,
        model=str(model),
        out=str(out),
        keep="all",
        temperature=0.0,
    )
    fresh = not gen.written_with(out, gen._settings(opts, model, opts.prompt or DEFAULT_PROMPT))
    limit = settings.probe.limit
    steps = [limit]
    if stop is not None:
        have = 0 if fresh else len(_answered(out)[0])
        steps = [n for n in range(stop.chunk, limit, stop.chunk) if n >= have] + [limit]
    stopped = None
    for i, n in enumerate(steps):
        stats = gen.generate(opts.model_copy(update={"force": fresh and i == 0, "limit": n}), echo=echo)
        if stop is not None and n < limit:
            stopped = stop.reason(*_answered(out))
            if stopped:
                echo(f"probe of {name} stopped early: {stopped}")
                break
    row = {
        "records": stats["records"],
        "accuracy": stats["accuracy"],
        "mean_tokens": stats["num_tokens"]["mean"],
        "median_tokens": stats["num_tokens"]["median"],
        "p90_tokens": stats["num_tokens"]["p90"],
        "truncation_rate": round(stats["truncated"] / stats["records"], 4) if stats["records"] else None,
        "stopped_early": stopped,
        "probe_file": str(out),
        "probe": probe,
        "model_content": model_content,
    }
    write_json_atomic(stats_file, row)
    return row


def target_length(settings: SweepSettings, endpoints: dict[str, dict]) -> float:
    if settings.target_tokens != "mid":
        return float(settings.target_tokens)
    a, b = endpoints["short_cot"]["mean_tokens"], endpoints["long_cot"]["mean_tokens"]
    if not a or not b:
        raise UserError("cannot compute the 'mid' target: an endpoint wrote no tokens; set sweep.target_tokens")
    return math.sqrt(a * b)


def _acc(row: dict) -> float:
    return row["accuracy"] or 0.0


def _point(row: dict) -> Point:
    return row["ratio"], row.get("density")


def point_label(point: Point) -> str:
    return f"ratio {point[0]:g}" + (f", density {point[1]:g}" if point[1] is not None else "")


def dominates(a: dict, b: dict) -> bool:
    """a is at most as long and at least as accurate as b, and strictly better on one of the two."""
    return (
        a["mean_tokens"] <= b["mean_tokens"]
        and _acc(a) >= _acc(b)
        and (a["mean_tokens"] < b["mean_tokens"] or _acc(a) > _acc(b))
    )


def pareto_front(rows: list[dict]) -> list[dict]:
    """The points no other point dominates, shortest first: the length-accuracy trade-off."""
    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["mean_tokens"], -_acc(r)))


def _truncated(row: dict) -> float:
    return row.get("truncation_rate") or 0.0


def _short(p: Point) -> str:
    return f"{p[0]:g}" if p[1] is None else f"{p[0]:g}/{p[1]:g}"


def target_source(settings: SweepSettings, endpoints: dict[str, dict]) -> str:
    """Where the target length came from, in words (for the choice's reason)."""
    if settings.target_tokens != "mid":
        return "sweep.target_tokens"
    a, b = endpoints["short_cot"]["mean_tokens"], endpoints["long_cot"]["mean_tokens"]
    return f"the geometric mean of the short_cot ({a:.1f}) and long_cot ({b:.1f}) mean lengths"


def _point_list(rows: list[dict]) -> str:
    """Points named briefly: "ratios 0.3, 0.4 at density 0.5" when they share a density, else
    "ratio/density 0.3/0.5, 0.4/0.7"."""
    pts = sorted(_point(r) for r in rows)
    densities = {p[1] for p in pts}
    ratios = ", ".join(f"{p[0]:g}" for p in pts)
    if len(densities) == 1:
        (d,) = densities
        return f"ratio{'s' if len(pts) > 1 else ''} {ratios}" + (f" at density {d:g}" if d is not None else "")
    return "ratio/density " + ", ".join(_short(p) for p in pts)


def _measured(rows: list[dict]) -> str:
    """Points with their length and accuracy; points measured alike are named together."""
    same: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["mean_tokens"], -_acc(r), _point(r))):
        same.setdefault((r["mean_tokens"], _acc(r)), []).append(r)
    parts = []
    for (tokens, acc), rs in same.items():
        name = point_label(_point(rs[0])) if len(rs) == 1 else _point_list(rs)
        parts.append(f"{name} ({'each ' if len(rs) > 1 else ''}{tokens:.1f} tokens, {acc:.1%})")
    return "; ".join(parts)


def choose(
    rows: list[dict],
    target: float,
    tolerance: float,
    min_accuracy: float = 0.0,
    max_truncated: float = 1.0,
    target_from: Optional[str] = None,
) -> tuple[Optional[dict], str]:
    """The point closest to the target length among the accurate-enough ones, and why, against the front.

    Accurate enough: at least `min_accuracy`, within `tolerance` points of the best, and at most
    `max_truncated` of its probe answers cut at the length cap (a cut answer's length is the cap's, its
    accuracy a floor). (None, why) when no point is worth choosing: none reaches `min_accuracy`, or every
    accurate-enough one is mostly truncated; a choice among them would be a choice among noise.

    The reason is short sentences, after the chosen point's name: the target (and, with `target_from`,
    where it came from), the points that qualified and those left out, why this one, and where it
    stands against the length-accuracy front."""
    best = max(_acc(r) for r in rows)
    if best < min_accuracy - 1e-12:
        top = max(rows, key=_acc)
        return None, (
            f"no point reaches sweep.min_accuracy {min_accuracy:.1%} (the best, {point_label(_point(top))}, "
            f"has {best:.1%}): the probe cannot tell these TAs apart, so their lengths decide nothing; check "
            "the checkpoints and the probe (questions, prompt, probe.max_tokens), or lower "
            "sweep.min_accuracy"
        )
    floor = max(best - tolerance / 100.0, min_accuracy)
    accurate = [r for r in rows if _acc(r) >= floor - 1e-12]
    cut = [r for r in accurate if _truncated(r) > max_truncated + 1e-12]
    eligible = [r for r in accurate if not any(r is c for c in cut)]
    if not eligible:
        return None, (
            "every point within {tol:g} points of the best accuracy ({best:.1%}) has more than "
            "sweep.max_truncated {mt:.0%} of its probe answers cut at probe.max_tokens ({pts}): their "
            "lengths are the cap's and their accuracies a floor; raise sweep.probe.max_tokens, or "
            "sweep.max_truncated"
        ).format(
            tol=tolerance,
            best=best,
            mt=max_truncated,
            pts=", ".join(f"{point_label(_point(r))}: {_truncated(r):.0%} truncated" for r in cut),
        )
    pick = min(eligible, key=lambda r: (abs(r["mean_tokens"] - target), -_acc(r), r["ratio"], r.get("density") or 0))
    too_inaccurate = [r for r in rows if not any(r is a for a in accurate)]
    by_min = min_accuracy > best - tolerance / 100  # the floor is min_accuracy's, not the tolerance's
    sentences = [
        f"{point_label(_point(pick))}.",
        f"Target: {target:.1f} mean tokens" + (f", {target_from}." if target_from else "."),
        f"Qualified, with accuracy at least {max(floor, 0):.1%} (within {tolerance:g} points of the best, "
        f"{best:.1%}"
        + (f", and sweep.min_accuracy {min_accuracy:.1%}" if by_min else "")
        + f"): {_point_list(eligible)}.",
    ]
    if too_inaccurate:
        sentences.append(
            "Left out as too inaccurate: "
            + ", ".join(f"{_short(_point(r))} ({_acc(r):.1%})" for r in sorted(too_inaccurate, key=_point))
            + "."
        )
    if cut:
        sentences.append(
            f"Left out as mostly truncated (over {max_truncated:.0%} of answers at the cap): "
            + ", ".join(f"{_short(_point(r))} ({_truncated(r):.0%})" for r in cut)
            + "."
        )
    gap = abs(pick["mean_tokens"] - target)
    ties = [r for r in eligible if r is not pick and abs(r["mean_tokens"] - target) == gap]
    sentences.append(
        f"This one is the qualifier closest to the target: {pick['mean_tokens']:.1f} tokens, "
        f"{_acc(pick):.1%} accurate"
        + (f" (tied on length with {_point_list(ties)}; the more accurate, then the lower ratio, wins)" if ties else "")
        + "."
    )
    front = pareto_front(rows)
    if any(r is pick for r in front):
        others = [r for r in front if r is not pick and r in eligible]
        sentences.append("It is on the length-accuracy front.")
        if others:
            sentences.append(f"Other qualified front points, which another target would pick: {_measured(others)}.")
    else:
        better = [r for r in front if dominates(r, pick)]
        sentences.append(
            f"It is off the length-accuracy front: {_measured(better)} "
            f"{'are' if len(better) > 1 else 'is'} as accurate or more and no longer."
        )
        them, one = ("them", "one of them") if len(better) > 1 else ("it", "it")
        sentences.append(f"Only the target length put this one ahead; a target nearer to {them} would pick {one}.")
    return pick, " ".join(sentences)


class SweepOptions(StageOptions):
    """What `micota-merge sweep` takes: the recipe, and overrides of its `sweep:` section."""

    recipe: str = Field(description="A micota recipe; its `sweep:` section holds the defaults below.")
    ratios: Optional[list[Float]] = Field(
        None, description="Ratios to merge at (default: the recipe's sweep.ratios).", json_schema_extra=cli(metavar="R")
    )
    densities: Optional[list[Float]] = Field(
        None,
        description="Densities: sweep every ratio at each (methods that sparsify; default: the recipe's "
        "sweep.densities, else merge.density alone).",
        json_schema_extra=cli(metavar="D"),
    )
    tolerance: Optional[Float] = Field(
        None, description="Accuracy points below the best that still qualify (default 2)."
    )
    limit: Optional[Int] = Field(None, description="Probe questions (default: sweep.probe.limit).")
    max_tokens: Optional[Int] = Field(None, description="Probe answer length cap (default: sweep.probe.max_tokens).")
    backend: Optional[BackendName] = Field(
        None,
        description="Probe generation backend (default: sweep.probe.backend, else auto as in generate).",
        json_schema_extra=cli(type="local-backend"),
    )
    data_parallel_size: Optional[Int] = Field(
        None,
        description="vllm: probe each checkpoint through `vllm serve` with this many replicas (default: "
        "sweep.probe.data_parallel_size).",
    )
    keep_all: bool = Field(
        False,
        description="Keep every point's TA in <output>.sweep/ (default: only the chosen).",
        json_schema_extra=cli(flag=True),
    )
    force: bool = Field(
        False, description="Redo a finished sweep and replace the TA it left." + OWN, json_schema_extra=cli(flag=True)
    )


def sweep(opts: SweepOptions, echo=print, recipe: Optional[Recipe] = None) -> dict:
    """Sweep the recipe's merge points and leave the chosen TA at the recipe's output (see module doc).

    `recipe`, when given, is the parsed recipe to use instead of re-reading `opts.recipe` (`run`'s
    chain, whose long-CoT side it made)."""
    output = Path((recipe or load_recipe(opts.recipe)).output)
    # one lock for the output and its work folder: two sweeps would build into one `.sweep/`
    with output_lock(output, "sweep", log=echo):
        return _sweep(opts, echo, recipe)


def _settings(recipe: Recipe, opts: SweepOptions) -> SweepSettings:
    """The recipe's sweep settings with the command line's overrides, validated as the YAML is."""
    settings = (recipe.sweep or SweepSettings()).model_copy(deep=True)
    top = {k: getattr(opts, k) for k in ("ratios", "densities", "tolerance") if getattr(opts, k) is not None}
    probe = {k: getattr(opts, k) for k in ("limit", "max_tokens", "backend", "data_parallel_size")}
    probe = {k: v for k, v in probe.items() if v is not None}
    pipeline = recipe.pipeline
    if pipeline is not None and pipeline.chat_template_kwargs and not settings.probe.chat_template_kwargs_by_side:
        # a pipeline's per-model switches reach its probes too: each side answers as it will in generate
        sides = {r: k for r, k in pipeline.chat_template_kwargs.items() if r in ("long_cot", "short_cot", "ta")}
        probe["chat_template_kwargs_by_side"] = sides
    try:
        data = settings.model_dump()
        if "ratios" in top or "densities" in top:  # ratios given on the command line are a grid to probe
            data["search"] = "grid"
        settings = SweepSettings.model_validate({**data, **top, "probe": {**data["probe"], **probe}})
    except ValidationError as e:
        raise UserError(format_validation_error("sweep options", e, SweepSettings)) from None
    if settings.densities is not None and not methods.get(recipe.merge.method).density:
        raise UserError(
            f"sweep.densities: method {recipe.merge.method} keeps every delta and has no density to "
            f"sweep; remove densities, or use one of {', '.join(methods.sparsifying())}"
        )
    return settings


def _sweep(opts: SweepOptions, echo, recipe: Optional[Recipe] = None) -> dict:
    from micota_merge.core.checkpoints import check_model_files, resolve_model_path
    from micota_merge.core.fingerprint import content_id

    recipe_path, force = opts.recipe, opts.force
    recipe = recipe or load_recipe(recipe_path)
    settings = _settings(recipe, opts)
    plan = probe_plan(recipe, settings)
    grid = settings.densities is not None
    points: list[Point] = [
        (r, d) for d in (settings.densities if grid else [recipe.merge.density]) for r in settings.ratios
    ]
    output = Path(recipe.output)
    work = output.with_name(output.name + ".sweep")
    specs = recipe.model_specs()
    paths = {role: resolve_model_path(spec, f"models.{role}", Path(recipe_path).parent) for role, spec in specs.items()}
    for role, p in paths.items():  # before anything is claimed or written: the endpoints are probed as they are
        check_model_files(p, f"models.{role}", tokenizer=role != "base")
    # What the sweep's result depends on: the recipe, the sweep settings and the inputs' *content*.
    identity = {
        "recipe": recipe.model_dump(mode="json", exclude={"sweep", "pipeline", "output"}),
        # early stopping's settings decide the result only where it is on: a sweep without it keeps the
        # identity it had before they existed
        "sweep": settings.model_dump(
            mode="json",
            exclude={
                "probe": set(TRANSPORT_OPTIONS),
                **({} if settings.stops_early else {k: True for k in ("early_stop", "chunk", "confidence")}),
            },
        ),
        "probe_plan": {k: plan[k] for k in PLAN_OPTIONS},
        "inputs": {role: content_id(p) for role, p in paths.items()},
    }
    aim = aim_plan(recipe, paths, Path(recipe_path).parent)
    if aim is not None:  # the calibration texts' content, as every point's build identity holds it
        identity["calibration"] = aim.record()
    zero = zero_task_vector(recipe.merge.method, recipe.merge.extra_params, identity["inputs"], paths)
    if zero is not None:
        zero.refuse_sweep(settings.ratios, settings.search == "adaptive")
    done = _claim(output, paths, identity, force, echo)
    if done is not None:
        return done
    adaptive = settings.search == "adaptive"
    tags = {p: _tag(p[0], p[1] if grid else None) for p in points}
    for t in tags.values():
        plain_name(t, "sweep point")
    claim_workdir(work, "sweep", output)
    if not adaptive:  # the adaptive search checks each round's points
        check_sweep_disk(recipe_path, recipe, work, [p for p in points if not (work / tags[p]).is_dir()], output)
    write_json_atomic(work / "settings.json", identity)

    # the two checkpoints as they are, then one TA per point
    echo(f"probe: {plan['statement']}")
    endpoints = {role: _probe(paths[role], role, work, settings, plan, echo) for role in ("short_cot", "long_cot")}
    target = target_length(settings, endpoints)
    run = _Points(recipe_path, recipe, work, settings, plan, identity["inputs"], echo, identity.get("calibration"))
    if settings.stops_early and settings.chunk < settings.probe.limit:
        run.stop = EarlyStop(settings.chunk, settings.confidence, target, settings.min_accuracy)
    if adaptive:
        rows, search = _search(run, endpoints, target)
    else:
        rows, search = run.probe(points), None
    tas = run.tas
    pick, reason = choose(
        rows,
        target,
        settings.tolerance,
        settings.min_accuracy,
        settings.max_truncated,
        target_from=target_source(settings, endpoints),
    )
    result = {
        "recipe": str(recipe_path),
        "identity": identity,
        "method": recipe.merge.method,
        "probe": settings.probe.model_dump(mode="json"),
        "probe_questions": plan["statement"],
        "tolerance": settings.tolerance,
        **({"min_accuracy": settings.min_accuracy, "max_truncated": settings.max_truncated} if pick is None else {}),
        "densities": settings.densities,
        "ratios": rows,
        "endpoints": endpoints,
        "target_tokens": round(target, 2),
        "front": [list(_point(r)) for r in pareto_front(rows)],
        **({"search": search} if search else {}),
        "chosen": None if pick is None else _point(pick)[0],
        "chosen_density": None if pick is None else _point(pick)[1],
        "reason": reason,
    }
    result["table_md"] = table_md(result)
    for stale in ("sweep.md", "sweep.json"):  # a refusal's table, from an earlier run
        (work / stale).unlink(missing_ok=True)
    if pick is None:
        # nothing worth choosing: the output stays as it is; the table goes to the work folder, whose probes
        # and TAs a rerun (other settings, a longer probe) reuses
        write_json_atomic(work / "sweep.json", result)
        write_text_atomic(work / "sweep.md", result["table_md"] + f"\n\nno TA chosen: {reason}\n")
        echo(result["table_md"])
        raise UserError(f"sweep chose no TA: {reason}. {output} was not touched; the table is in {work / 'sweep.md'}")
    _finish(output, work, tas, _point(pick), result, opts.keep_all, force, recipe)
    echo(result["table_md"])
    echo(f"chosen: {reason}")
    echo(f"teacher assistant at {output}; sweep table and plot in {output / 'sweep'}")
    return result


class _Points:
    """Builds (one pass where possible) and probes sweep points, keeping each point's TA folder."""

    def __init__(
        self,
        recipe_path,
        recipe: Recipe,
        work: Path,
        settings: SweepSettings,
        plan: dict,
        inputs,
        echo,
        calibration=None,
    ):
        self.recipe_path, self.recipe, self.work, self.settings = recipe_path, recipe, work, settings
        self.plan, self.inputs, self.echo, self.calibration = plan, inputs, echo, calibration
        self.grid = settings.densities is not None
        self.stop: Optional[EarlyStop] = None  # sweep.early_stop, once the target is known
        self.tas: dict[Point, Path] = {}

    def probe(self, points: list[Point], **extra) -> list[dict]:
        tags = {p: _tag(p[0], p[1] if self.grid else None) for p in points}
        tas = {p: self.work / tags[p] for p in points}
        self.tas.update(tas)
        _build_points(self.recipe_path, self.recipe, tas, self.inputs, self.echo, self.calibration)
        return [
            {
                "ratio": p[0],
                "density": p[1],
                **_probe(tas[p], tags[p], self.work, self.settings, self.plan, self.echo, self.stop),
                **extra,
            }
            for p in points
        ]


def _search(run: _Points, endpoints: dict[str, dict], target: float) -> tuple[list[dict], dict]:
    """The adaptive search (adaptive.py): rounds of ratios bracketing the target length, each round's
    points merged in one pass; a point's TA is deleted once another probed point beats it for the choice."""
    from micota_merge.merge.sweep.adaptive import next_ratios

    settings, density = run.settings, run.recipe.merge.density
    measured = {0.0: endpoints["short_cot"]["mean_tokens"], 1.0: endpoints["long_cot"]["mean_tokens"]}
    rows: list[dict] = []
    notes: list[str] = []
    while True:
        step = next_ratios(measured, target, settings.resolution, settings.per_round, settings.length_tolerance)
        if step.note and step.note not in notes:
            notes.append(step.note)
            run.echo(f"note: {step.note}")
        if not step.ratios:
            break
        rnd = 1 + max((r["round"] for r in rows), default=0)
        run.echo(f"round {rnd}: ratios {', '.join(f'{r:g}' for r in step.ratios)} ({step.why})")
        points = [(r, density) for r in step.ratios]
        check_sweep_disk(run.recipe_path, run.recipe, run.work, [p for p in points if not run.tas.get(p)], run.work)
        new = run.probe(points, round=rnd, why=step.why)
        rows += new
        measured.update({r["ratio"]: r["mean_tokens"] for r in new})
        _prune(rows, target, run)
    if not rows:
        raise UserError(
            f"sweep (adaptive): {step.why}, so no ratio between them reaches the target of {target:.1f} tokens; "
            "set sweep.target_tokens between the experts' lengths, or use search: grid"
        )
    return rows, {
        "mode": "adaptive",
        "rounds": rows[-1]["round"],
        "probed": len(rows),
        "stopped": step.why,
        "notes": notes,
    }


def _prune(rows: list[dict], target: float, run: _Points) -> None:
    """Disk as a budget: delete the TA of a point that another probed point beats whatever the accuracy floor
    ends up being (strictly closer to the target, at least as accurate, no more truncated). Its probe stays."""
    for r in rows:
        gap = abs(r["mean_tokens"] - target)
        beaten = any(
            o is not r
            and abs(o["mean_tokens"] - target) < gap
            and _acc(o) >= _acc(r)
            and _truncated(o) <= _truncated(r)
            for o in rows
        )
        folder = run.tas.get(_point(r))
        if beaten and folder is not None and folder.exists():
            remove_ours(folder, "build")
            r["pruned"] = True


def _claim(output: Path, paths: dict[str, Path], identity: dict, force: bool, echo) -> Optional[dict]:
    """Claim the output; a finished sweep of the same identity is returned (nothing to do)."""
    claimed = claim(output, "sweep", inputs=paths, stages=["build"])  # a TA is what a sweep writes
    if claimed.state == "ours" and (output / "sweep" / "sweep.json").is_file() and not force:
        result = json.loads((output / "sweep" / "sweep.json").read_text())
        if result.get("identity") == identity:
            echo(f"sweep already done: chosen ratio {result['chosen']:g} in {output} (use --force to redo)")
            echo(result["table_md"])
            return result
        what = changed(result.get("identity"), identity)
        raise UserError(
            f"{output} holds a sweep made with other {', '.join(what)} "
            f"({'input content' if 'inputs' in what else 'settings'} changed): pass --force to redo it"
        )
    if claimed.state == "ours":
        check_replaceable(output)  # before the probes, not after
    if claimed.state == "ours" and not force:
        raise UserError(
            f"output {output} already exists and holds a TA that no sweep of this recipe made: "
            "pass --force to replace it"
        )
    return None


def _build_points(
    recipe_path, recipe: Recipe, tas: dict[Point, Path], inputs: dict[str, str], echo, calibration=None
) -> None:
    """Every point's TA that is not built yet: all from one read of the inputs where mergekit allows."""
    from micota_merge.merge.build import BuildOptions, build
    from micota_merge.merge.onepass.engine import at_point, build_points, supports_one_pass
    from micota_merge.merge.onepass.replay import Unsupported

    missing = [p for p in tas if not _built(tas[p], recipe, p, inputs, calibration)]
    for p in missing:
        remove_ours(tas[p], "build")  # a point folder of an older build; never anything that is not a TA
    one_pass = bool(missing) and supports_one_pass(recipe)
    if one_pass:
        try:
            build_points(recipe_path, recipe, {p: tas[p] for p in missing}, echo=echo)
        except Unsupported as e:
            echo(f"one pass not possible ({e}): building each point separately")
            one_pass = False
    if missing and not one_pass:
        for p in missing:
            build(BuildOptions(recipe=str(recipe_path), output=str(tas[p])), recipe=at_point(recipe, p), echo=echo)


def _built(folder: Path, recipe: Recipe, point: Point, inputs: dict[str, str], calibration=None) -> bool:
    """A TA in the work folder is reused only if built from this recipe at this point from inputs of
    the same content (a long_cot replaced in place under the same path is caught here), and with AIM
    from calibration texts of the same content."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("stage") != "build":
        return False
    if calibration is not None:
        got_aim = manifest.get("aim") or {}
        if any(got_aim.get(k) != v for k, v in calibration.items()):
            return False
    built_from = {role: (fp or {}).get("content") for role, fp in (manifest.get("inputs") or {}).items()}
    if built_from != inputs:
        return False
    want = recipe.model_dump(mode="json")
    want["merge"]["ratio"], want["merge"]["density"] = point
    got = dict(manifest.get("recipe") or {})
    return (
        got.get("models") == want["models"]
        and got.get("merge") == want["merge"]
        and got.get("tokenizer") == want["tokenizer"]
        and got.get("config_from") == want["config_from"]
    )


def _finish(
    output: Path,
    work: Path,
    tas: dict[Point, Path],
    chosen: Point,
    result: dict,
    keep_all: bool,
    force: bool,
    recipe: Recipe,
) -> None:
    """Tables, plot and model card into the chosen TA, then rename it to the recipe's output path."""
    from micota_merge.core import cards
    from micota_merge.merge.onepass.engine import at_point

    ta = tas[chosen]
    report = ta / "sweep"
    report.mkdir(exist_ok=True)
    write_json_atomic(report / "sweep.json", result)
    write_text_atomic(report / "sweep.csv", table_csv(result))
    probe = f"\n\nprobe questions: {result['probe_questions']}\n" if result.get("probe_questions") else "\n"
    write_text_atomic(report / "sweep.md", result["table_md"] + f"\n\nchosen: {result['reason']}" + probe)
    plot(result, report / "sweep.png")
    plot_front(result, report / "front.png")
    for f in work.glob("*.probe.jsonl"):
        shutil.copyfile(f, report / f.name)
    # the card says why this point was chosen (the build wrote it without the sweep's table)
    cards.write(ta, cards.ta_card(at_point(recipe, chosen), read_manifest(ta).get("inputs") or {}, sweep=result))
    claimed = claim(output, "sweep", stages=["build"])  # still ours or absent: we held the lock throughout
    if claimed.state == "ours" and not force:
        raise UserError(f"output {output} holds another TA: pass --force to replace it")
    move_into_place(ta, output)
    if keep_all:
        return
    remove_ours(work, "sweep")


def check_sweep_disk(recipe_path, recipe: Recipe, work: Path, missing: list[Point], output: Path) -> None:
    """Every point still to build is written at once (one pass): they must all fit, now, before the
    endpoints are probed; where they do not, say how many do."""
    if not missing:
        return
    from micota_merge.merge.build import _DISK_MARGIN, _DISK_SLACK_BYTES, plan_build
    from micota_merge.merge.onepass.engine import at_point

    plan = plan_build(recipe_path, str(work / "disk-check"), recipe=at_point(recipe, missing[0]), dry_run=True)
    each = int(plan.output_bytes * _DISK_MARGIN) + _DISK_SLACK_BYTES
    free = shutil.disk_usage(work).free
    if free < each * len(missing):
        fit = free // each
        raise UserError(
            f"not enough disk space for the sweep: {len(missing)} points of about {each / 2**30:.2f} GiB "
            f"each are written at once to {work}, which has {free / 2**30:.2f} GiB free, enough "
            f"for {fit}; free space, or sweep at most {max(fit, 1)} points at a time (--ratios)"
        )
