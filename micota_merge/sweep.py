"""sweep: find the intermediate-length teacher assistant from measurements.

For each ratio: build the TA (all ratios in one pass over the inputs for linear and
task_arithmetic), answer the probe questions with it (the generate stage), and record accuracy,
mean / median tokens and truncation rate. The two endpoints (the long-CoT and short-CoT
checkpoints themselves) are probed too: the target length `mid` is the geometric mean of their
mean lengths. The chosen ratio is the one whose mean length is closest to the target among those
whose accuracy is within `tolerance` points of the best.

Layout: work happens in `<output>.sweep/` (one TA folder and one probe file per ratio, each
resumable), and at the end the chosen TA is renamed to `<output>` with the tables and plot in
`<output>/sweep/`. A killed sweep started again skips every ratio already measured.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Optional

from .artifacts import read_manifest, write_json_atomic, write_text_atomic
from .errors import UserError
from pydantic import ValidationError

from .recipe import Recipe, SweepSettings, format_validation_error, load_recipe


def _tag(ratio: float) -> str:
    return f"ratio-{ratio:.4f}".rstrip("0").rstrip(".") if ratio not in (0.0, 1.0) else f"ratio-{ratio:.1f}"


def _probe(model: Path, name: str, work: Path, settings: SweepSettings, echo) -> dict:
    """Answer the probe questions with one model; resumable through generate's own JSONL.

    A finished probe is reused only for the same model *content* and probe settings; a probe file
    left by another model (a TA rebuilt from changed inputs) is started over, never resumed."""
    from . import generate as gen
    from .data import DEFAULT_PROMPT
    from .fingerprint import content_id

    stats_file = work / f"{name}.stats.json"
    out = work / f"{name}.probe.jsonl"
    probe = settings.probe.model_dump(mode="json")
    model_content = content_id(model)
    if stats_file.is_file():
        row = json.loads(stats_file.read_text())
        if row.get("probe") == probe and row.get("model_content") == model_content:
            return row  # written only once every question was answered
    opts = gen.options(model=str(model), questions=settings.probe.questions or settings.probe.benchmark,
                       out=str(out), backend=settings.probe.backend or "auto", max_tokens=settings.probe.max_tokens,
                       limit=settings.probe.limit, batch_size=settings.probe.batch_size, keep="all", temperature=0.0,
                       prompt=settings.probe.prompt or "", data_parallel_size=settings.probe.data_parallel_size,
                       tensor_parallel_size=settings.probe.tensor_parallel_size, serve_args=settings.probe.serve_args,
                       max_model_len=settings.probe.max_model_len, enforce_eager=settings.probe.enforce_eager,
                       dtype=settings.probe.dtype)
    fresh = not gen.written_with(out, gen._settings(opts, model, opts.prompt or DEFAULT_PROMPT))
    stats = gen.generate(opts.model_copy(update={"force": fresh}), echo=echo)
    row = {"records": stats["records"], "accuracy": stats["accuracy"],
           "mean_tokens": stats["num_tokens"]["mean"], "median_tokens": stats["num_tokens"]["median"],
           "p90_tokens": stats["num_tokens"]["p90"],
           "truncation_rate": round(stats["truncated"] / stats["records"], 4) if stats["records"] else None,
           "probe_file": str(out), "probe": probe, "model_content": model_content}
    write_json_atomic(stats_file, row)
    return row


def target_length(settings: SweepSettings, endpoints: dict[str, dict]) -> float:
    if settings.target_tokens != "mid":
        return float(settings.target_tokens)
    a, b = endpoints["short_cot"]["mean_tokens"], endpoints["long_cot"]["mean_tokens"]
    if not a or not b:
        raise UserError("cannot compute the 'mid' target: an endpoint wrote no tokens; set sweep.target_tokens")
    return math.sqrt(a * b)


def choose(rows: list[dict], target: float, tolerance: float) -> tuple[float, str]:
    """The ratio closest to the target length among the accurate-enough ones, and why."""
    best = max(r["accuracy"] or 0.0 for r in rows)
    floor = best - tolerance / 100.0
    eligible = [r for r in rows if (r["accuracy"] or 0.0) >= floor - 1e-12]
    pick = min(eligible, key=lambda r: (abs(r["mean_tokens"] - target), -(r["accuracy"] or 0), r["ratio"]))
    left_out = sorted(r["ratio"] for r in rows if r not in eligible)
    why = (f"ratio {pick['ratio']:g}: mean {pick['mean_tokens']:.1f} tokens, closest to the target "
           f"{target:.1f} among the ratios within {tolerance:g} points of the best accuracy "
           f"({best:.1%}, floor {max(floor, 0):.1%})")
    if left_out:
        why += f"; too inaccurate: {', '.join(f'{r:g}' for r in left_out)}"
    return pick["ratio"], why


def sweep(recipe_path: str | Path, ratios: Optional[list[float]] = None, keep_all: bool = False,
          tolerance: Optional[float] = None, limit: Optional[int] = None, max_tokens: Optional[int] = None,
          backend: Optional[str] = None, data_parallel_size: Optional[int] = None, force: bool = False,
          echo=print) -> dict:
    from .merge import build
    from .multiratio import build_ratios, supports_one_pass

    # ---- setup
    recipe = load_recipe(recipe_path)
    settings = (recipe.sweep or SweepSettings()).model_copy(deep=True)
    try:
        if ratios is not None:
            settings = SweepSettings.model_validate({**settings.model_dump(), "ratios": ratios})
        if tolerance is not None:
            settings.tolerance = tolerance
        for key, value in (("limit", limit), ("max_tokens", max_tokens), ("backend", backend),
                           ("data_parallel_size", data_parallel_size)):
            if value is not None:
                setattr(settings.probe, key, value)
    except ValidationError as e:
        raise UserError(format_validation_error("sweep options", e, SweepSettings)) from None
    output = Path(recipe.output)
    work = output.with_name(output.name + ".sweep")
    from .checkpoints import resolve_model_path
    from .fingerprint import content_id

    specs = recipe.model_specs()
    paths = {role: resolve_model_path(spec, f"models.{role}", Path(recipe_path).parent) for role, spec in specs.items()}
    # What the sweep's result depends on: the recipe, the sweep settings and the inputs' *content*.
    identity = {"recipe": recipe.model_dump(mode="json", exclude={"sweep", "pipeline", "output"}),
                "sweep": settings.model_dump(mode="json"),
                "inputs": {role: content_id(p) for role, p in paths.items()}}
    if (output / "sweep" / "sweep.json").is_file() and not force:
        result = json.loads((output / "sweep" / "sweep.json").read_text())
        if result.get("identity") == identity:
            echo(f"sweep already done: chosen ratio {result['chosen']:g} in {output} (use --force to redo)")
            echo(result["table_md"])
            return result
        changed = [k for k in identity if (result.get("identity") or {}).get(k) != identity[k]]
        raise UserError(f"{output} holds a sweep made with other {', '.join(changed)} "
                        f"({'input content' if 'inputs' in changed else 'settings'} changed): pass --force to redo it")
    if output.exists() and not force:
        raise UserError(f"output {output} already exists and holds no matching sweep: pass --force to replace it")
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "settings.json", identity)

    # ---- endpoints: the two checkpoints as they are

    endpoints = {role: _probe(paths[role], role, work, settings, echo) for role in ("short_cot", "long_cot")}

    # ---- teacher assistants, one per ratio
    tas = {r: work / _tag(r) for r in settings.ratios}
    missing = [r for r in settings.ratios if not _built(tas[r], recipe, r, identity["inputs"])]
    for r in missing:
        shutil.rmtree(tas[r], ignore_errors=True)
    if missing and supports_one_pass(recipe):
        build_ratios(recipe_path, recipe, {r: tas[r] for r in missing}, echo=echo)
    else:
        for r in missing:
            build(recipe_path, output=str(tas[r]), ratio=r, recipe=recipe, echo=echo)
    rows = []
    for r in settings.ratios:
        row = _probe(tas[r], _tag(r), work, settings, echo)
        rows.append({"ratio": r, **row})

    # ---- choose and report
    target = target_length(settings, endpoints)
    chosen, reason = choose(rows, target, settings.tolerance)
    result = {"recipe": str(recipe_path), "identity": identity, "method": recipe.merge.method,
              "probe": settings.probe.model_dump(mode="json"), "tolerance": settings.tolerance,
              "ratios": rows, "endpoints": endpoints, "target_tokens": round(target, 2),
              "chosen": chosen, "reason": reason}
    result["table_md"] = table_md(result)
    _finish(output, work, tas, chosen, result, keep_all, force)
    echo(result["table_md"])
    echo(f"chosen: {reason}")
    echo(f"teacher assistant at {output}; sweep table and plot in {output / 'sweep'}")
    return result


def _built(folder: Path, recipe: Recipe, ratio: float, inputs: dict[str, str]) -> bool:
    """A TA in the work folder is reused only if built from this recipe at this ratio from inputs of
    the same content (a long_cot replaced in place under the same path is caught here)."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("stage") != "build":
        return False
    built_from = {role: (fp or {}).get("content") for role, fp in (manifest.get("inputs") or {}).items()}
    if built_from != inputs:
        return False
    want = recipe.model_dump(mode="json")
    want["merge"]["ratio"] = ratio
    got = dict(manifest.get("recipe") or {})
    return got.get("models") == want["models"] and got.get("merge") == want["merge"] and \
        got.get("tokenizer") == want["tokenizer"] and got.get("config_from") == want["config_from"]


def _finish(output: Path, work: Path, tas: dict[float, Path], chosen: float, result: dict, keep_all: bool,
            force: bool) -> None:
    """Tables and plot into the chosen TA, then rename it to the recipe's output path."""
    ta = tas[chosen]
    report = ta / "sweep"
    report.mkdir(exist_ok=True)
    write_json_atomic(report / "sweep.json", result)
    write_text_atomic(report / "sweep.csv", table_csv(result))
    write_text_atomic(report / "sweep.md", result["table_md"] + f"\n\nchosen: {result['reason']}\n")
    plot(result, report / "sweep.png")
    for f in work.glob("*.probe.jsonl"):
        shutil.copyfile(f, report / f.name)
    if output.exists():
        if not force:
            raise UserError(f"output {output} appeared during the sweep; pass --force to replace it")
        shutil.rmtree(output)
    ta.rename(output)
    if keep_all:
        return
    shutil.rmtree(work, ignore_errors=True)


def table_md(result: dict) -> str:
    lines = ["| model | ratio | accuracy | mean tokens | median tokens | truncated |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]

    def row(name, ratio, r):
        acc = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "n/a"
        lines.append(f"| {name} | {ratio} | {acc} | {r['mean_tokens']:.1f} | {r['median_tokens']:g} | "
                     f"{r['truncation_rate']:.0%} |")

    row("short_cot", "-", result["endpoints"]["short_cot"])
    for r in result["ratios"]:
        mark = " **chosen**" if r["ratio"] == result["chosen"] else ""
        row(f"TA{mark}", f"{r['ratio']:g}", r)
    row("long_cot", "-", result["endpoints"]["long_cot"])
    lines.append(f"\ntarget mean length: {result['target_tokens']:.1f} tokens")
    return "\n".join(lines)


def table_csv(result: dict) -> str:
    buf = io.StringIO()
    fields = ["model", "ratio", "accuracy", "mean_tokens", "median_tokens", "p90_tokens", "truncation_rate",
              "records", "chosen"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerow({"model": "short_cot", **result["endpoints"]["short_cot"], "ratio": ""})
    for r in result["ratios"]:
        w.writerow({"model": "ta", **r, "chosen": r["ratio"] == result["chosen"]})
    w.writerow({"model": "long_cot", **result["endpoints"]["long_cot"], "ratio": ""})
    return buf.getvalue()


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["ratio"] for r in result["ratios"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [r["mean_tokens"] for r in result["ratios"]], "o-", color="tab:blue", label="TA mean tokens")
    for role, x, style in (("short_cot", 0.0, "s"), ("long_cot", 1.0, "D")):
        ax.plot([x], [result["endpoints"][role]["mean_tokens"]], style, color="tab:blue", mfc="none", ms=9,
                label=f"{role} checkpoint")
    ax.axhline(result["target_tokens"], color="tab:blue", ls=":", lw=1, label="target length")
    ax.set_xlabel("ratio (long-CoT share)")
    ax.set_ylabel("mean response tokens", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(xs, [100 * (r["accuracy"] or 0) for r in result["ratios"]], "o-", color="tab:red", label="TA accuracy")
    for role, x, style in (("short_cot", 0.0, "s"), ("long_cot", 1.0, "D")):
        ax2.plot([x], [100 * (result["endpoints"][role]["accuracy"] or 0)], style, color="tab:red", mfc="none", ms=9)
    ax2.set_ylabel("accuracy (%)", color="tab:red")
    ax.axvline(result["chosen"], color="gray", ls="--", lw=1)
    ax.annotate(f"chosen {result['chosen']:g}", (result["chosen"], ax.get_ylim()[1]), ha="center", va="bottom",
                fontsize=9)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    ax.set_title(f"{result['method']} sweep on {result['probe'].get('questions') or result['probe']['benchmark']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
