"""run: the whole method from one YAML file, each stage skipped when it is already done.

    TA (sweep or build) -> generate (TA, and the experts for baselines) -> mix (optional)
    -> distill (one student per data set) -> eval (student before/after, teachers) -> report.md

Every stage owns a folder under `pipeline.workdir` and a `stage.json` in it that records the
stage's fingerprint: a hash of its options and of its inputs' fingerprints (checkpoint
configs and weight headers, upstream stages). A stage is skipped when its stage.json says
"done" with the same fingerprint; a changed option changes the fingerprints of that stage and
of everything downstream, so only those rerun. A stage that was killed (stage.json says
"running" with the same fingerprint) resumes through the stage's own resumption (generate's
JSONL, distill's checkpoints, sweep's per-ratio files); one whose fingerprint changed starts over.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from micota_merge.core.artifacts import MANIFEST, now, write_json_atomic, write_text_atomic
from micota_merge.core.fingerprint import data_fingerprint
from micota_merge.core.identity import digest
from micota_merge.core.ownership import claim, output_lock, plain_name
from micota_merge.core.ownership import claim_workdir as own_claim_workdir
from micota_merge.generation.generate import TRANSPORT_OPTIONS
from micota_merge.merge.recipe import PipelineSettings, Recipe, load_recipe

STAGES = ("build", "generate", "mix", "distill", "eval", "report")


def _hash(obj: Any) -> str:
    return digest(obj)[:16]  # a stage's fingerprint in stage.json (micota_merge.core.identity)


def _checkpoint_fp(path: str | Path) -> str:
    """A checkpoint's content (every weight byte, config, tokenizer): never its path or shapes."""
    from micota_merge.core.checkpoints import read_checkpoint
    from micota_merge.core.fingerprint import content_id

    read_checkpoint(path)  # a clear error for a folder that is not a checkpoint
    return content_id(path)


@dataclass
class Runner:
    workdir: Path
    run_from: Optional[str] = None
    until: Optional[str] = None
    echo: Callable[[str], None] = print
    dry_run: bool = False
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def active(self, kind: str) -> bool:
        """Whether stages of this kind run at all (--until)."""
        return self.until is None or STAGES.index(kind) <= STAGES.index(self.until)

    def forced(self, kind: str) -> bool:
        return self.run_from is not None and STAGES.index(kind) >= STAGES.index(self.run_from)

    def stage(
        self,
        kind: str,
        name: str,
        folder: Path,
        fingerprint: str,
        fn: Callable[[bool], Any],
        output: Optional[Path] = None,
    ) -> bool:
        """Run `fn(fresh)` unless done; `fresh` = start over rather than resume. Returns whether it ran
        (with --dry-run: whether it would).

        "Done" needs the stage's output to still be there: a deleted output is made again."""
        marker = folder / "stage.json"
        state = _read_state(marker)
        same = state.get("fingerprint") == fingerprint
        present = output is None or output.exists()
        if same and state.get("status") == "done" and present and not self.forced(kind):
            self.echo(f"[done] {name}")
            self.skipped.append(name)
            return False
        fresh = bool(state) and (not same or self.forced(kind))
        if self.dry_run:
            what = "would start over" if fresh else ("would resume" if state else "would run")
            replaces = f"; replaces {output}" if fresh and output is not None and output.exists() else ""
            self.echo(f"[plan] {name}: {what}{replaces}")
            self.ran.append(name)
            return True
        self.echo(f"[{'redo' if fresh else 'run '}] {name}")
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"stage": name, "fingerprint": fingerprint, "status": "running", "started": now()})
        fn(fresh)
        write_json_atomic(
            marker,
            {
                "stage": name,
                "fingerprint": fingerprint,
                "status": "done",
                "started": _read_state(marker).get("started"),
                "finished": now(),
            },
        )
        self.ran.append(name)
        return True


def _read_state(marker: Path) -> dict:
    if not marker.is_file():
        return {}
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # torn or foreign: the stage runs again and rewrites it
    return state if isinstance(state, dict) else {}


def claim_workdir(workdir: Path, pipeline: str | Path) -> None:
    """The pipeline's work folder is ours (its micota.json says `run`), new, or empty; never a folder of
    other files: a `workdir: ~/projects` would otherwise fill (and --force clean) someone's project."""
    c = claim(workdir, "run", option="pipeline.workdir")
    if c.state != "ours":
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / MANIFEST, {"stage": "run", "pipeline": str(pipeline), "created": now()})


def run(
    path: str | Path,
    run_from: Optional[str] = None,
    until: Optional[str] = None,
    echo: Callable[[str], None] = print,
    force: bool = False,
    dry_run: bool = False,
) -> dict:
    """Run the pipeline file (a recipe with a `pipeline:` section; a bare recipe only builds).

    `force` starts every stage over (by the ownership rule: only outputs this pipeline wrote are
    replaced); `dry_run` validates everything and prints the stage plan without running a stage."""
    from micota_merge.pipeline.check import check_order, validate_pipeline

    check_order(run_from, until, STAGES)
    if force:
        run_from = "build"
    recipe = load_recipe(path)
    settings = recipe.pipeline
    # every stage's options and inputs, before the first (hours-long) stage starts
    validate_pipeline(recipe, settings, Path(path).parent)
    if settings is None:  # a bare recipe: its TA's folder alone, with the stage record beside it
        ta = Path(recipe.output)
        with output_lock(ta, "run", log=echo) if not dry_run else contextlib.nullcontext():
            return _run(path, recipe, settings, ta.parent, run_from, until, echo, dry_run)
    workdir = Path(settings.workdir)
    if dry_run:
        if workdir.exists():
            claim(workdir, "run", option="pipeline.workdir")
        return _run(path, recipe, settings, workdir, run_from, until, echo, dry_run)
    with output_lock(workdir, "run", log=echo):
        claim_workdir(workdir, path)
        return _run(path, recipe, settings, workdir, run_from, until, echo, dry_run)


def _run(
    path, recipe: Recipe, settings: Optional[PipelineSettings], workdir: Path, run_from, until, echo, dry_run: bool
) -> dict:
    runner = Runner(workdir, run_from, until, echo, dry_run=dry_run)
    results: dict[str, Any] = {"pipeline": str(path), "workdir": str(workdir)}

    def known(output: Path, ran: bool, fallback: str, fp: Callable[[Path], str]) -> str:
        """An output's content fingerprint; while --dry-run plans a stage that would rerun, the stage's
        own fingerprint stands in (the old output's content says nothing about the new one)."""
        if (dry_run and ran) or not output.exists():
            return fallback
        return fp(output)

    # ---- teacher assistant
    specs = recipe.model_specs()
    from micota_merge.core.checkpoints import resolve_model_path

    base_dir = Path(path).parent
    models = {role: resolve_model_path(spec, f"models.{role}", base_dir) for role, spec in specs.items()}
    ta_dir = Path(recipe.output)
    use_sweep = settings is not None and settings.select == "sweep"
    ta_fp = _hash(
        {
            "recipe": recipe.model_dump(mode="json", exclude={"pipeline"}),
            "sweep": use_sweep,
            "inputs": {r: _checkpoint_fp(p) for r, p in models.items()},
        }
    )

    def make_ta(fresh: bool) -> None:
        if use_sweep:
            from micota_merge.merge.sweep.run import sweep

            sweep(path, force=fresh or ta_dir.exists() and not (ta_dir / "sweep").is_dir(), echo=echo)
        else:
            from micota_merge.merge.build import build

            build(path, force=True, echo=echo)

    # the TA may live outside the work folder: its path is checked before anything is written beside it
    claim(ta_dir, "build", inputs=models, stages=["sweep"], option="output")
    stage_dir = ta_dir.parent / f".{ta_dir.name}.stage"
    if not dry_run:
        own_claim_workdir(stage_dir, "run", ta_dir, inputs=models, option="output", adopt=["stage.json"])
    ran = runner.stage(
        "build",
        "build: teacher assistant" + (" (sweep)" if use_sweep else ""),
        stage_dir,
        ta_fp,
        make_ta,
        output=ta_dir,
    )
    if settings is None or not runner.active("generate"):
        results["ta"] = str(ta_dir)
        return _finish(runner, results)

    # ---- data: the TA's answers, and the experts' for baselines
    # Downstream stages key on what the TA *is* (its bytes), so a TA replaced by hand is noticed.
    teachers = {"ta": (ta_dir, known(ta_dir, ran, ta_fp, _checkpoint_fp))}
    for name in _data_sources(settings):
        if name in ("long_cot", "short_cot"):
            teachers[name] = (models[name], _checkpoint_fp(models[name]))
    data: dict[str, tuple[Path, str]] = {}
    for name, (model, model_fp) in teachers.items():
        folder = workdir / "data" / plain_name(name, "data set")
        opts = _generate_options(settings, model, folder / "data.jsonl")
        fp = _hash(
            {
                "model": model_fp,
                "options": {k: v for k, v in opts.items() if k not in ("model", "out", *TRANSPORT_OPTIONS)},
            }
        )

        def gen(fresh: bool, opts=opts) -> None:
            from micota_merge.generation import generate as g

            g.generate(g.options(**opts, force=fresh), echo=echo)

        kept = folder / "data.correct.jsonl"
        ran = runner.stage("generate", f"generate: {name} data", folder, fp, gen, output=kept)
        data[name] = (kept, known(kept, ran, fp, data_fingerprint))
    if not runner.active("mix"):
        return _finish(runner, results)

    # ---- mixes (the main data set, if mixed, and mix baselines)
    for name, weights in _mixes(settings).items():
        folder = workdir / "data" / plain_name(name, "pipeline.baselines name")
        parts = {part: data[part] for part in weights}
        fp = _hash(
            {
                "weights": weights,
                "parts": {p: f for p, (_, f) in parts.items()},
                "seed": settings.seed,
                "total": settings.mix_total,
            }
        )

        def do_mix(fresh: bool, folder=folder, weights=weights, parts=parts) -> None:
            from micota_merge.data.mix import run as mix_run

            mix_run(
                [f"{parts[p][0]}={w}" for p, w in weights.items()],
                str(folder / "data.jsonl"),
                total=settings.mix_total,
                seed=settings.seed,
                force=True,
                echo=echo,
            )

        mixed = folder / "data.jsonl"
        ran = runner.stage("mix", f"mix: {name}", folder, fp, do_mix, output=mixed)
        data[name] = (mixed, known(mixed, ran, fp, data_fingerprint))
    if not runner.active("distill"):
        return _finish(runner, results)

    # ---- students
    student = resolve_model_path(settings.student, "pipeline.student", base_dir)
    student_fp = _checkpoint_fp(student)
    students: dict[str, tuple[Path, str]] = {"student": (student, student_fp)}
    seeds = settings.distill_seeds or [settings.seed]
    for name in _student_data(settings):
        for seed in seeds:
            # one seed keeps the plain names; several get one folder (and one row) each
            tag = "" if len(seeds) == 1 else f"@seed{seed}"
            folder = workdir / "students" / plain_name(name, "student data") / (f"seed-{seed}" if tag else "")
            data_file, data_fp = data[name]
            fp = _hash(
                {"student": student_fp, "data": data_fp, "distill": settings.distill, **({"seed": seed} if tag else {})}
            )

            def do_distill(fresh: bool, folder=folder, data_file=data_file, seed=seed) -> None:
                from micota_merge.training.distill import DistillConfig, distill

                out = folder / "model"
                cfg = DistillConfig(
                    **{
                        **settings.distill,
                        "student": str(student),
                        "data": [str(data_file)],
                        "out": str(out),
                        "force": True,
                        "resume": not fresh,
                        "seed": seed,
                    }
                )
                distill(cfg, echo=echo)

            model_dir = folder / "model"
            ran = runner.stage(
                "distill",
                f"distill: student on {name} data" + (f" (seed {seed})" if tag else ""),
                folder,
                fp,
                do_distill,
                output=model_dir,
            )
            students[f"student+{name}{tag}"] = (model_dir, known(model_dir, ran, fp, _checkpoint_fp))
    if not runner.active("eval"):
        return _finish(runner, results)

    # ---- evaluation (through lm-eval, with the one grader)
    scored = dict(students)
    if settings.eval_teachers:
        scored.update({f"teacher:{n}": v for n, v in teachers.items()})
    evals: dict[str, Path] = {}
    eval_fps: dict[str, str] = {}
    for name, (model, model_fp) in scored.items():
        folder = workdir / "eval" / plain_name(name.replace(":", "-").replace("+", "-").replace("@", "-"), "eval name")
        fp = _hash({"model": model_fp, "eval": {k: v for k, v in settings.eval.items() if k not in TRANSPORT_OPTIONS}})

        def do_eval(fresh: bool, folder=folder, model=model) -> None:
            from micota_merge.evaluation.evaluate import evaluate

            # a stage that is resumed (same fingerprint) keeps lm-eval's response cache; a changed
            # one (fresh) starts it over
            evaluate(
                str(model),
                output=str(folder / "run"),
                force=fresh or (folder / "run").exists(),
                echo=echo,
                **settings.eval,
            )

        runner.stage("eval", f"eval: {name}", folder, fp, do_eval, output=folder / "run")
        evals[name] = folder / "run"
        eval_fps[name] = fp
    if not runner.active("report"):
        return _finish(runner, results)

    # ---- report
    report_fp = _hash({"evals": list(eval_fps.items())})
    runner.stage(
        "report",
        "report",
        workdir / "report",
        report_fp,
        lambda fresh: write_report(workdir, recipe, settings, ta_dir, data, evals),
    )
    results["report"] = str(workdir / "report.md")
    return _finish(runner, results)


def _finish(runner: Runner, results: dict) -> dict:
    if runner.dry_run:
        runner.echo(f"dry run: {len(runner.ran)} stage(s) would run, {len(runner.skipped)} done; nothing was written")
    elif runner.ran:
        runner.echo(f"ran {len(runner.ran)} stage(s), {len(runner.skipped)} already done")
    else:
        runner.echo(f"every stage is done ({len(runner.skipped)}); nothing to run")
    results.update(ran=runner.ran, skipped=runner.skipped)
    return results


# ------------------------------------------------------------------ option plumbing


def _generate_options(settings: PipelineSettings, model: Path, out: Path) -> dict:
    opts = {
        "model": str(model),
        "questions": settings.questions,
        "out": str(out),
        "keep": "correct",
        "seed": settings.seed,
    }
    if settings.question_limit:
        opts["limit"] = settings.question_limit
    if settings.prompt:
        opts["prompt"] = settings.prompt
    opts.update(settings.generate)
    return opts


def _mixes(settings: PipelineSettings) -> dict[str, dict[str, float]]:
    mixes = {}
    if settings.mix:
        mixes["mix"] = dict(settings.mix)
    for b in settings.baselines:
        if not isinstance(b, str):
            mixes[b.name] = dict(b.mix)
    return mixes


def _data_sources(settings: PipelineSettings) -> list[str]:
    """Teachers whose answers are needed: the experts named by baselines or mixes."""
    names = set()
    for b in settings.baselines:
        names.update([b] if isinstance(b, str) else b.mix.keys())
    names.update((settings.mix or {}).keys())
    return sorted(n for n in names if n in ("long_cot", "short_cot"))


def _student_data(settings: PipelineSettings) -> list[str]:
    main = "mix" if settings.mix else "ta"
    return [main] + [b if isinstance(b, str) else b.name for b in settings.baselines]


# ------------------------------------------------------------------ report


def write_report(
    workdir: Path,
    recipe: Recipe,
    settings: PipelineSettings,
    ta_dir: Path,
    data: dict[str, tuple[Path, str]],
    evals: dict[str, Path],
) -> None:
    # the figures in the formats of `eval --compare`: percent with one decimal, "–" for what is missing
    from micota_merge.evaluation.evaluate import _acc_cell, _fmt_acc, load_summary

    summaries = {name: load_summary(run) for name, run in evals.items()}
    tasks = _task_order(summaries)
    several = len(tasks) > 1  # one task's average is the task itself: no average column
    before = summaries.get("student")
    report_dir = workdir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {recipe.name or 'micota-merge'}: pipeline report",
        "",
        f"Work folder: `{settings.workdir}` · written {now()}",
        "",
    ]
    sweep_json = ta_dir / "sweep" / "sweep.json"
    if sweep_json.is_file():
        sw = json.loads(sweep_json.read_text())
        shutil.copyfile(ta_dir / "sweep" / "sweep.png", report_dir / "sweep.png")
        lines += [
            "## Teacher assistant: merge-ratio sweep",
            "",
            sw["table_md"],
            "",
            f"Chosen: {sw['reason']}",
            "",
            "![sweep](report/sweep.png)",
            "",
        ]
        if (ta_dir / "sweep" / "front.png").is_file():
            shutil.copyfile(ta_dir / "sweep" / "front.png", report_dir / "front.png")
            lines += ["![length-accuracy front](report/front.png)", ""]
    lines += [
        "## Distillation data",
        "",
        "| data | records kept | acceptance rate (%) | mean tokens |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, (file, _) in data.items():
        stats_file = file.parent / "data.stats.json"
        st = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        if "kept" in st:  # generate's statistics (a mix writes its composition under the same name)
            lines.append(
                f"| {name} | {st['kept']} | {_fmt_acc(st.get('acceptance_rate'))} | "
                f"{_fmt_num((st.get('accepted_num_tokens') or {}).get('mean'))} |"
            )
        else:
            recs = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
            mean = sum(r.get("num_tokens", 0) for r in recs) / len(recs) if recs else None
            lines.append(f"| {name} (mix) | {len(recs)} | – | {_fmt_num(mean)} |")

    def delta(name: str, value: Optional[float]) -> str:
        """Accuracy change against the untrained student, for the distilled students only."""
        if before is None or not name.startswith("student+") or value is None or before.get("average") is None:
            return ""
        return f"{(value - before['average']) * 100:+.1f}"

    lines += [
        "",
        "## Scores",
        "",
        "Accuracy in % (avg@k; with one greedy answer the papers' pass@1) with its 95 % "
        "bootstrap interval, mean response tokens and the share of answers cut at the length cap (%) per task; "
        "Δ is a distilled student's accuracy change in points against the untrained student "
        "(`micota-merge eval --compare` tests it).",
        "",
    ]
    header = (
        "| model | "
        + " | ".join(f"{t} acc % (95 % CI) | {t} tokens | {t} cut %" for t in tasks)
        + (" | average % | Δ avg |" if several else " | Δ |")
    )
    lines += [header, "| --- |" + " ---: | ---: | ---: |" * len(tasks) + (" ---: | ---: |" if several else " ---: |")]
    for name, s in summaries.items():
        cells = []
        for t in tasks:
            r = s["tasks"].get(t) or {}
            cells += [_acc_cell(r), _fmt_num(r.get("mean_tokens")), _fmt_acc(r.get("truncated"))]
        if several:
            cells.append(_fmt_acc(s.get("average")))
        cells.append(delta(name, s.get("average")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    groups = seed_groups(summaries)
    if any(len(g["seeds"]) > 1 for g in groups.values()):
        lines += [
            "",
            "### Students over distillation seeds",
            "",
            "Mean ± sample standard deviation over the seeds (min–max in brackets) of the "
            + ("average " if several else "")
            + "accuracy (%) and of the mean response tokens; "
            "Δ in points against the untrained student.",
            "",
            "| student data | seeds | accuracy % | mean tokens | Δ |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, g in groups.items():
            acc, tok = g["accuracy"], g["mean_tokens"]
            lines.append(
                f"| {name} | {len(g['seeds'])} | {_fmt_spread(acc, 100)} | "
                f"{_fmt_spread(tok, 1, brackets=False)} | {delta(name, acc['mean'] if acc else None)} |"
            )
    scores_chart(summaries, report_dir / "scores.png")
    lines += ["", "![scores](report/scores.png)", ""]
    losses = sorted((workdir / "students").glob("**/model/loss.png"))  # students/<data>[/seed-<n>]/model
    if losses:
        lines += ["## Training loss", ""] + [
            f"![{p.parent.parent.relative_to(workdir / 'students')}]({p.relative_to(workdir)})" for p in losses
        ]
    write_text_atomic(workdir / "report.md", "\n".join(lines) + "\n")
    write_json_atomic(
        report_dir / "summary.json",
        {"scores": summaries, "students": groups, "data": {n: str(f) for n, (f, _) in data.items()}},
    )


def _task_order(summaries: dict[str, dict]) -> list[str]:
    """The tasks scored, in `eval --compare`'s order (the known tasks first, then any other by name)."""
    from micota_merge.evaluation import benchmarks

    known = benchmarks.papers() + tuple(b for b in benchmarks.names() if b not in benchmarks.papers())
    names = {t for s in summaries.values() for t in s["tasks"]}
    return [t for t in known if t in names] + sorted(names - set(known))


def _fmt_num(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1f}"


def _fmt_spread(sp: Optional[dict], scale: float, brackets: bool = True) -> str:
    """mean ± sd (min–max), one decimal, scaled (100 for shares in %); "–" when nothing was measured."""
    if not sp:
        return "–"
    text = f"{scale * sp['mean']:.1f} ± {scale * sp['sd']:.1f}"
    return text + (f" ({scale * sp['min']:.1f}–{scale * sp['max']:.1f})" if brackets else "")


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    import statistics

    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _spread_or_none(values: list[Optional[float]]) -> Optional[dict]:
    present = [v for v in values if v is not None]
    return spread(present) if present else None


def _mean_tokens(summary: dict) -> Optional[float]:
    toks = [t.get("mean_tokens") for t in summary["tasks"].values() if t.get("mean_tokens") is not None]
    return sum(toks) / len(toks) if toks else None


def seed_groups(summaries: dict[str, dict]) -> dict[str, dict]:
    """The distilled students grouped over their distillation seeds ("student+ta@seed1" -> "student+ta"):
    for each data set its seeds, runs, the spread of the average accuracy and of the mean tokens, and
    per task the spread of accuracy, mean tokens and truncated share. A missing figure is left out of
    its spread (a spread of nothing is None)."""
    groups: dict[str, dict] = {}
    for name, s in summaries.items():
        if not name.startswith("student+"):
            continue
        base, _, seed = name.partition("@seed")
        g = groups.setdefault(base, {"seeds": [], "runs": [], "acc": [], "tok": [], "tasks": {}})
        g["seeds"].append(int(seed) if seed else None)
        g["runs"].append(name)
        g["acc"].append(s.get("average"))
        g["tok"].append(_mean_tokens(s))
        for task in s["tasks"]:
            g["tasks"].setdefault(task, None)
    out = {}
    for base, g in groups.items():
        per_task = {}
        for task in g["tasks"]:
            rows = [summaries[run]["tasks"].get(task) or {} for run in g["runs"]]
            per_task[task] = {
                key: _spread_or_none([r.get(key) for r in rows]) for key in ("accuracy", "mean_tokens", "truncated")
            }
        out[base] = {
            "seeds": g["seeds"],
            "runs": g["runs"],
            "accuracy": _spread_or_none(g["acc"]),
            "mean_tokens": _spread_or_none(g["tok"]),
            "tasks": per_task,
        }
    return out


# ------------------------------------------------------------------ the score chart

# one colour per data set; grey is kept for the untrained student and the teachers
_DATA_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)


def chart_bars(summaries: dict[str, dict]) -> list[dict]:
    """The score chart's bars, left to right: the untrained student, one bar per data set (its
    distilled students over their seeds), then the teachers (and any other run), each with its
    kind ("student", "distilled", "teacher", "other"), label, colour and runs."""
    groups = seed_groups(summaries)
    bars = []
    if "student" in summaries:
        bars.append({"kind": "student", "label": "untrained\nstudent", "color": "0.45", "runs": ["student"]})
    for i, (name, g) in enumerate(groups.items()):
        data_name = name.removeprefix("student+")
        n = len(g["seeds"])
        bars.append(
            {
                "kind": "distilled",
                "label": f"on {data_name}" + (f"\n{n} seeds" if n > 1 else ""),
                "color": _DATA_COLORS[i % len(_DATA_COLORS)],
                "runs": g["runs"],
                "seeds": g["seeds"],
            }
        )
    for name in summaries:
        if name.startswith("teacher:"):
            bars.append(
                {
                    "kind": "teacher",
                    "label": "teacher\n" + name.removeprefix("teacher:"),
                    "color": "0.75",
                    "runs": [name],
                }
            )
        elif name != "student" and not name.startswith("student+"):
            bars.append({"kind": "other", "label": name, "color": "0.75", "runs": [name]})
    return bars


def _values(summaries: dict[str, dict], runs: list[str], task: Optional[str], key: str) -> list[Optional[float]]:
    """One figure per run: a task's accuracy / mean_tokens / truncated, or (task None) the average."""
    out = []
    for run in runs:
        s = summaries[run]
        if task is None:
            if key == "accuracy":
                out.append(s.get("average"))
            elif key == "mean_tokens":
                out.append(_mean_tokens(s))
            else:
                cuts = [t.get("truncated") for t in s["tasks"].values() if t.get("truncated") is not None]
                out.append(sum(cuts) / len(cuts) if cuts else None)
        else:
            out.append((s["tasks"].get(task) or {}).get(key))
    return out


def scores_chart(summaries: dict[str, dict], path: Path) -> None:
    """Accuracy and mean response tokens per task (and the average, with several tasks): one
    coloured bar per data set at the mean over its distillation seeds, ± their standard deviation,
    with each seed's score as a dot; the untrained student and the teachers (one run each, with
    their 95 % interval) in grey, set apart. Values are written once per bar; the legend sits below
    the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bars = chart_bars(summaries)
    tasks = _task_order(summaries)
    rows: list[Optional[str]] = tasks + ([None] if len(tasks) > 1 else [])  # None: the average
    # x positions: a gap between the untrained student, the distilled students and the teachers
    xs, x, last = [], 0.0, None
    for b in bars:
        kind = "single" if b["kind"] in ("teacher", "other") else b["kind"]
        if last is not None and kind != last:
            x += 0.5
        xs.append(x)
        x += 1.0
        last = kind
    seps = [(xs[i - 1] + xs[i]) / 2 for i in range(1, len(bars)) if xs[i] - xs[i - 1] > 1.0]
    width = 0.7
    panel_w = max(5.0, 0.8 * len(bars) + 1.2)
    fig, axes = plt.subplots(len(rows), 2, figsize=(2 * panel_w, 4.4 * len(rows)), squeeze=False)
    sampled = any((t.get("samples") or 1) > 1 for s in summaries.values() for t in s["tasks"].values())
    caps = {s.get("max_tokens") for s in summaries.values()}
    cap = next(iter(caps)) if len(caps) == 1 else None
    for row, task in zip(axes, rows):
        for ax, key in zip(row, ("accuracy", "mean_tokens")):
            scale = 100.0 if key == "accuracy" else 1.0
            top = 1.0
            for b, bx in zip(bars, xs):
                vals = [scale * v for v in _values(summaries, b["runs"], task, key) if v is not None]
                if not vals:
                    continue  # nothing measured: no bar (a 0 would claim a result)
                mean = sum(vals) / len(vals)
                sd = spread(vals)["sd"]
                lo = hi = 0.0
                if b["kind"] == "distilled" and len(vals) > 1:
                    lo = hi = sd
                elif key == "accuracy" and len(b["runs"]) == 1:
                    t = summaries[b["runs"][0]]
                    ci = t.get("average_ci95") if task is None else (t["tasks"].get(task) or {}).get("ci95")
                    if ci:
                        lo, hi = max(mean - 100 * ci[0], 0.0), max(100 * ci[1] - mean, 0.0)
                ax.bar(
                    bx,
                    mean,
                    width,
                    color=b["color"],
                    edgecolor="0.25" if b["kind"] != "distilled" else None,
                    lw=0.6,
                    zorder=2,
                )
                if lo or hi:
                    ax.errorbar(bx, mean, yerr=[[lo], [hi]], fmt="none", ecolor="black", capsize=4, lw=1, zorder=3)
                if b["kind"] == "distilled" and len(vals) > 1:
                    jitter = [(-0.18 + 0.36 * k / (len(vals) - 1)) for k in range(len(vals))]
                    ax.scatter(
                        [bx + j for j in jitter], vals, s=16, color="white", edgecolors="black", lw=0.8, zorder=4
                    )
                peak = max([mean + hi] + vals)
                text = f"{mean:.1f}" if key == "accuracy" else f"{mean:.0f}"
                if b["kind"] == "distilled" and len(vals) > 1:
                    text += f"\n±{sd:.1f}" if key == "accuracy" else f"\n±{sd:.0f}"
                if key == "mean_tokens":
                    cut = _values(summaries, b["runs"], task, "truncated")
                    cut = [c for c in cut if c is not None]
                    if cut and sum(cut) / len(cut) > 0:
                        text += f"\n{100 * sum(cut) / len(cut):.0f}% cut"
                ax.annotate(
                    text,
                    (bx, peak),
                    xytext=(0, 5),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7.5,
                    linespacing=1.0,
                    zorder=5,
                    bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.3},
                )
                top = max(top, peak)
            for sx in seps:
                ax.axvline(sx, color="0.6", ls=":", lw=0.8)
            where = task or "average over tasks"
            if key == "accuracy":
                ax.set_ylim(0, min(100.0, top) * 1.25 + 2)
                ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
                ax.set_ylabel("avg@k (%)" if sampled else "accuracy (%, pass@1)")
                ax.set_title(f"{where}: accuracy", pad=8)
            else:
                if cap:
                    ax.axhline(cap, color="black", ls="--", lw=1, zorder=1)
                    top = max(top, cap)
                ax.set_ylim(0, top * 1.25)
                ax.set_ylabel("mean response tokens")
                ax.set_title(f"{where}: length", pad=8)
            ax.set_xticks(xs, [b["label"] for b in bars], fontsize=8)
            ax.set_xlim(xs[0] - 0.6, xs[-1] + 0.6) if xs else None
            ax.grid(axis="y", alpha=0.3, zorder=0)
            ax.set_axisbelow(True)
    handles = [Patch(facecolor="0.45", edgecolor="0.25", label="untrained student (one run, bar: 95 % CI)")]
    seeded = any(b["kind"] == "distilled" and len(b["runs"]) > 1 for b in bars)
    if any(b["kind"] == "distilled" for b in bars):
        handles.append(
            Patch(
                facecolor="tab:blue",
                label="distilled student, one colour per data set"
                + (": mean ± sd over distillation seeds" if seeded else ""),
            )
        )
    if seeded:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="black", label="one distillation seed"))
    if any(b["kind"] in ("teacher", "other") for b in bars):
        handles.append(Patch(facecolor="0.75", edgecolor="0.25", label="teacher (one run, bar: 95 % CI)"))
    if cap:
        handles.append(Line2D([], [], color="black", ls="--", lw=1, label=f"length cap ({cap} tokens)"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
