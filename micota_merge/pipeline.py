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
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .artifacts import MANIFEST, now, write_json_atomic, write_text_atomic
from .fingerprint import data_fingerprint
from .ownership import claim, output_lock, plain_name
from .ownership import claim_workdir as own_claim_workdir
from .generate import TRANSPORT_OPTIONS
from .recipe import PipelineSettings, Recipe, load_recipe

STAGES = ("build", "generate", "mix", "distill", "eval", "report")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checkpoint_fp(path: str | Path) -> str:
    """A checkpoint's content (every weight byte, config, tokenizer): never its path or shapes."""
    from .checkpoints import read_checkpoint
    from .fingerprint import content_id

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

    def stage(self, kind: str, name: str, folder: Path, fingerprint: str, fn: Callable[[bool], Any],
              output: Optional[Path] = None) -> bool:
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
        write_json_atomic(marker, {"stage": name, "fingerprint": fingerprint, "status": "running",
                                   "started": now()})
        fn(fresh)
        write_json_atomic(marker, {"stage": name, "fingerprint": fingerprint, "status": "done",
                                   "started": _read_state(marker).get("started"), "finished": now()})
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


def run(path: str | Path, run_from: Optional[str] = None, until: Optional[str] = None,
        echo: Callable[[str], None] = print, force: bool = False, dry_run: bool = False) -> dict:
    """Run the pipeline file (a recipe with a `pipeline:` section; a bare recipe only builds).

    `force` starts every stage over (by the ownership rule: only outputs this pipeline wrote are
    replaced); `dry_run` validates everything and prints the stage plan without running a stage."""
    from .pipeline_check import check_order, validate_pipeline

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


def _run(path, recipe: Recipe, settings: Optional[PipelineSettings], workdir: Path, run_from, until, echo,
         dry_run: bool) -> dict:
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
    from .checkpoints import resolve_model_path

    base_dir = Path(path).parent
    models = {role: resolve_model_path(spec, f"models.{role}", base_dir) for role, spec in specs.items()}
    ta_dir = Path(recipe.output)
    use_sweep = settings is not None and settings.select == "sweep"
    ta_fp = _hash({"recipe": recipe.model_dump(mode="json", exclude={"pipeline"}), "sweep": use_sweep,
                   "inputs": {r: _checkpoint_fp(p) for r, p in models.items()}})

    def make_ta(fresh: bool) -> None:
        if use_sweep:
            from .sweep import sweep

            sweep(path, force=fresh or ta_dir.exists() and not (ta_dir / "sweep").is_dir(), echo=echo)
        else:
            from .merge import build

            build(path, force=True, echo=echo)

    # the TA may live outside the work folder: its path is checked before anything is written beside it
    claim(ta_dir, "build", inputs=models, stages=["sweep"], option="output")
    stage_dir = ta_dir.parent / f".{ta_dir.name}.stage"
    if not dry_run:
        own_claim_workdir(stage_dir, "run", ta_dir, inputs=models, option="output", adopt=["stage.json"])
    ran = runner.stage("build", "build: teacher assistant" + (" (sweep)" if use_sweep else ""),
                       stage_dir, ta_fp, make_ta, output=ta_dir)
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
        fp = _hash({"model": model_fp, "options": {k: v for k, v in opts.items()
                                                   if k not in ("model", "out", *TRANSPORT_OPTIONS)}})

        def gen(fresh: bool, opts=opts) -> None:
            from . import generate as g

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
        fp = _hash({"weights": weights, "parts": {p: f for p, (_, f) in parts.items()}, "seed": settings.seed,
                    "total": settings.mix_total})

        def do_mix(fresh: bool, folder=folder, weights=weights, parts=parts) -> None:
            from .mix import run as mix_run

            mix_run([f"{parts[p][0]}={w}" for p, w in weights.items()], str(folder / "data.jsonl"),
                    total=settings.mix_total, seed=settings.seed, force=True, echo=echo)

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
            fp = _hash({"student": student_fp, "data": data_fp, "distill": settings.distill,
                        **({"seed": seed} if tag else {})})

            def do_distill(fresh: bool, folder=folder, data_file=data_file, seed=seed) -> None:
                from .distill import DistillConfig, distill

                out = folder / "model"
                cfg = DistillConfig(**{**settings.distill, "student": str(student), "data": [str(data_file)],
                                       "out": str(out), "force": True, "resume": not fresh, "seed": seed})
                distill(cfg, echo=echo)

            model_dir = folder / "model"
            ran = runner.stage("distill", f"distill: student on {name} data" + (f" (seed {seed})" if tag else ""),
                               folder, fp, do_distill, output=model_dir)
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
            from .evaluate import evaluate

            # a stage that is resumed (same fingerprint) keeps lm-eval's response cache; a changed
            # one (fresh) starts it over
            evaluate(str(model), output=str(folder / "run"), force=fresh or (folder / "run").exists(), echo=echo,
                     **settings.eval)

        runner.stage("eval", f"eval: {name}", folder, fp, do_eval, output=folder / "run")
        evals[name] = folder / "run"
        eval_fps[name] = fp
    if not runner.active("report"):
        return _finish(runner, results)

    # ---- report
    report_fp = _hash({"evals": list(eval_fps.items())})
    runner.stage("report", "report", workdir / "report", report_fp,
                 lambda fresh: write_report(workdir, recipe, settings, ta_dir, data, evals))
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
    opts = {"model": str(model), "questions": settings.questions, "out": str(out), "keep": "correct",
            "seed": settings.seed}
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


def write_report(workdir: Path, recipe: Recipe, settings: PipelineSettings, ta_dir: Path,
                 data: dict[str, tuple[Path, str]], evals: dict[str, Path]) -> None:
    from .evaluate import compare_chart, load_summary

    summaries = {name: load_summary(run) for name, run in evals.items()}
    tasks = sorted({t for s in summaries.values() for t in s["tasks"]})
    before = summaries.get("student")
    report_dir = workdir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {recipe.name or 'micota-merge'}: pipeline report", "",
             f"Work folder: `{settings.workdir}` · written {now()}", ""]
    sweep_json = ta_dir / "sweep" / "sweep.json"
    if sweep_json.is_file():
        sw = json.loads(sweep_json.read_text())
        shutil.copyfile(ta_dir / "sweep" / "sweep.png", report_dir / "sweep.png")
        lines += ["## Teacher assistant: merge-ratio sweep", "", sw["table_md"], "", f"Chosen: {sw['reason']}", "",
                  "![sweep](report/sweep.png)", ""]
        if (ta_dir / "sweep" / "front.png").is_file():
            shutil.copyfile(ta_dir / "sweep" / "front.png", report_dir / "front.png")
            lines += ["![length-accuracy front](report/front.png)", ""]
    lines += ["## Distillation data", "", "| data | records kept | acceptance rate | mean tokens |",
              "| --- | ---: | ---: | ---: |"]
    for name, (file, _) in data.items():
        stats_file = file.parent / "data.stats.json"
        st = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        if "kept" in st:  # generate's statistics (a mix writes its composition under the same name)
            lines.append(f"| {name} | {st['kept']} | {st['acceptance_rate']:.1%} | "
                         f"{st['accepted_num_tokens']['mean']} |")
        else:
            recs = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
            mean = sum(r.get("num_tokens", 0) for r in recs) / max(len(recs), 1)
            lines.append(f"| {name} (mix) | {len(recs)} | - | {mean:.1f} |")
    lines += ["", "## Scores", "", "Accuracy (avg@k; with one greedy answer the papers' pass@1) with its 95 % "
              "bootstrap interval, mean response tokens and the share of answers cut at the length cap per task; "
              "Δ is the accuracy change against the untrained student (`micota-merge eval --compare` tests it).", ""]
    header = "| model | " + " | ".join(f"{t} acc (95 % CI) | {t} tokens | {t} cut" for t in tasks) + \
        " | average | Δ avg |"
    lines += [header, "|" + " --- |" * (3 * len(tasks) + 3)]
    for name, s in summaries.items():
        cells = []
        for t in tasks:
            r = s["tasks"].get(t, {})
            ci = r.get("ci95")
            cells += [(f"{r.get('accuracy') or 0:.1%}" + (f" ({ci[0]:.0%}–{ci[1]:.0%})" if ci else "")) if r else "-",
                      f"{r.get('mean_tokens') or 0:.1f}" if r else "-",
                      f"{r['truncated']:.0%}" if r and r.get("truncated") is not None else "-"]
        delta = "" if before is None or name == "student" else f"{(s['average'] - before['average']) * 100:+.1f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['average']:.1%} | {delta} |")
    groups = seed_groups(summaries)
    if any(len(g["seeds"]) > 1 for g in groups.values()):
        lines += ["", "### Students over distillation seeds", "",
                  "Mean ± sample standard deviation over the seeds (min–max in brackets) of the average accuracy "
                  "and of the mean response tokens; Δ against the untrained student.", "",
                  "| student data | seeds | accuracy | mean tokens | Δ avg |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, g in groups.items():
            acc, tok = g["accuracy"], g["mean_tokens"]
            delta = "" if before is None else f"{(acc['mean'] - before['average']) * 100:+.1f}"
            lines.append(f"| {name} | {len(g['seeds'])} | {acc['mean']:.1%} ± {acc['sd']:.1%} "
                         f"({acc['min']:.1%}–{acc['max']:.1%}) | {tok['mean']:.1f} ± {tok['sd']:.1f} | {delta} |")
    compare_chart(list(summaries), list(summaries.values()), report_dir / "scores.png")
    lines += ["", "![scores](report/scores.png)", ""]
    losses = sorted((workdir / "students").glob("**/model/loss.png"))  # students/<data>[/seed-<n>]/model
    if losses:
        lines += ["## Training loss", ""] + [f"![{p.parent.parent.relative_to(workdir / 'students')}]"
                                             f"({p.relative_to(workdir)})" for p in losses]
    write_text_atomic(workdir / "report.md", "\n".join(lines) + "\n")
    write_json_atomic(report_dir / "summary.json", {"scores": summaries, "students": seed_groups(summaries),
                                                    "data": {n: str(f) for n, (f, _) in data.items()}})


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    import statistics

    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def seed_groups(summaries: dict[str, dict]) -> dict[str, dict]:
    """The distilled students grouped over their distillation seeds ("student+ta@seed1" -> "student+ta")."""
    groups: dict[str, dict] = {}
    for name, s in summaries.items():
        if not name.startswith("student+"):
            continue
        base, _, seed = name.partition("@seed")
        g = groups.setdefault(base, {"seeds": [], "acc": [], "tok": []})
        g["seeds"].append(int(seed) if seed else None)
        g["acc"].append(s["average"])
        toks = [t.get("mean_tokens") or 0 for t in s["tasks"].values()]
        g["tok"].append(sum(toks) / max(len(toks), 1))
    return {n: {"seeds": g["seeds"], "accuracy": spread(g["acc"]), "mean_tokens": spread(g["tok"])}
            for n, g in groups.items()}
