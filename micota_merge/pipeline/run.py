"""run: the whole method from one YAML file, each stage skipped when it is already done.

    [chain: teacher's long CoT -> short_cot fine-tuned on it = long_cot]
    -> TA (sweep or build) -> generate (TA, and the experts for baselines) -> mix (optional)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import Field

from micota_merge.core.artifacts import MANIFEST, now, write_json_atomic
from micota_merge.core.fingerprint import data_fingerprint
from micota_merge.core.identity import digest
from micota_merge.core.options import StageOptions, cli, template_switches
from micota_merge.core.ownership import claim, output_lock, plain_name
from micota_merge.core.ownership import claim_workdir as own_claim_workdir
from micota_merge.data.decontaminate import default_against
from micota_merge.generation.options import TRANSPORT_OPTIONS
from micota_merge.merge.recipe import PipelineSettings, Recipe, load_recipe
from micota_merge.pipeline.report import write_report

STAGES = ("chain", "build", "generate", "mix", "distill", "eval", "report")


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


Stage = Literal[STAGES]


class RunOptions(StageOptions):
    """What `micota-merge run` takes."""

    pipeline: str = Field(description="A recipe with a `pipeline:` section (a bare recipe only builds).")
    run_from: Optional[Stage] = Field(
        None,
        description="Rerun this stage and everything after it, even if done.",
        json_schema_extra=cli(name="from"),
    )
    until: Optional[Stage] = Field(None, description="Stop after this stage.")
    force: bool = Field(
        False,
        description="Start every stage over. Only outputs this pipeline wrote are replaced (their micota.json "
        "says so); anything else in the way is refused, as without --force.",
        json_schema_extra=cli(flag=True),
    )
    dry_run: bool = Field(
        False,
        description="Validate the pipeline, its inputs and every stage's options, and print the stage plan "
        "(what is done, what would run, resume or start over, what would be replaced); write nothing.",
        json_schema_extra=cli(flag=True),
    )


def run(opts: RunOptions, echo: Callable[[str], None] = print) -> dict:
    """Run the pipeline file (a recipe with a `pipeline:` section; a bare recipe only builds).

    `force` starts every stage over (by the ownership rule: only outputs this pipeline wrote are
    replaced); `dry_run` validates everything and prints the stage plan without running a stage."""
    from micota_merge.pipeline.check import check_order, validate_pipeline

    path, run_from, until, force, dry_run = opts.pipeline, opts.run_from, opts.until, opts.force, opts.dry_run
    check_order(run_from, until, STAGES)
    if force:
        run_from = STAGES[0]
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


@dataclass
class _Context:
    """What every stage of one run reads: the recipe, its settings, the runner and the stages' results."""

    path: Path
    recipe: Recipe
    settings: Optional[PipelineSettings]
    workdir: Path
    runner: Runner
    models: dict[str, Path] = field(default_factory=dict)  # the recipe's checkpoints by role
    model_fps: dict[str, str] = field(default_factory=dict)  # their content fingerprints
    made: dict[str, tuple[Path, str]] = field(default_factory=dict)  # the chain's teacher and long_cot
    ta: tuple = ()  # (folder, whether its stage ran, its stage fingerprint)
    teachers: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name -> (model, content fingerprint)
    data: dict[str, tuple[Path, str]] = field(default_factory=dict)  # data set -> (file, content fingerprint)
    students: dict[str, tuple[Path, str]] = field(default_factory=dict)
    evals: dict[str, Path] = field(default_factory=dict)
    eval_fps: dict[str, str] = field(default_factory=dict)

    @property
    def echo(self) -> Callable[[str], None]:
        return self.runner.echo

    def known(self, output: Path, ran: bool, fallback: str, fp: Callable[[Path], str]) -> str:
        """An output's content fingerprint; while --dry-run plans a stage that would rerun, the stage's
        own fingerprint stands in (the old output's content says nothing about the new one)."""
        if (self.runner.dry_run and ran) or not output.exists():
            return fallback
        return fp(output)


def _run(
    path, recipe: Recipe, settings: Optional[PipelineSettings], workdir: Path, run_from, until, echo, dry_run: bool
) -> dict:
    from micota_merge.core.checkpoints import resolve_model_path

    runner = Runner(workdir, run_from, until, echo, dry_run=dry_run)
    results: dict[str, Any] = {"pipeline": str(path), "workdir": str(workdir)}
    ctx = _Context(Path(path), recipe, settings, workdir, runner)
    base_dir = Path(path).parent
    specs = recipe.model_specs(made=True)
    ctx.models = {r: resolve_model_path(spec, f"models.{r}", base_dir) for r, spec in specs.items()}
    ctx.model_fps = {r: _checkpoint_fp(p) for r, p in ctx.models.items()}
    _zero_task_vector(ctx)
    if recipe.made_long_cot:
        _chain(ctx)
        if not runner.active("build"):
            return _finish(runner, results)
    _teacher_assistant(ctx)
    if settings is None or not runner.active("generate"):
        results["ta"] = str(recipe.output)
        return _finish(runner, results)
    # each stage runs only while --until allows the stages after it
    for kind, stage in (("mix", _generate), ("distill", _mix), ("eval", _distill), ("report", _evaluate)):
        stage(ctx)
        if not runner.active(kind):
            return _finish(runner, results)
    _report(ctx)
    results["report"] = str(workdir / "report.md")
    return _finish(runner, results)


def _zero_task_vector(ctx: _Context) -> None:
    """A merge over one side itself, known from fingerprints before the chain runs: a sweep whose ratio
    cancels is refused now, not after hours of teacher generation; --dry-run says what the merge means."""
    from micota_merge.merge.preflight import zero_task_vector

    recipe = ctx.recipe
    zero = zero_task_vector(recipe.merge.method, recipe.merge.extra_params, ctx.model_fps, ctx.models)
    if zero is None:
        return
    if ctx.settings is not None and ctx.settings.select == "sweep" and recipe.sweep is not None:
        zero.refuse_sweep(recipe.sweep.ratios, recipe.sweep.search == "adaptive")
    if ctx.runner.dry_run:
        ctx.echo(f"pre-flight: {zero.message}")


def _teacher_assistant(ctx: _Context) -> None:
    """The TA, from a ratio sweep or a plain build; its record sits beside it (it may live outside workdir)."""
    recipe, settings, models = ctx.recipe, ctx.settings, ctx.models
    ta_dir = Path(recipe.output)
    use_sweep = settings is not None and settings.select == "sweep"
    ta_fp = _hash(
        {
            "recipe": recipe.model_dump(mode="json", exclude={"pipeline"}),
            "sweep": use_sweep,
            "inputs": ctx.model_fps,
        }
    )

    def make_ta(fresh: bool) -> None:
        if use_sweep:
            from micota_merge.merge.sweep.run import SweepOptions, sweep

            redo = fresh or ta_dir.exists() and not (ta_dir / "sweep").is_dir()
            sweep(SweepOptions(recipe=str(ctx.path), force=redo), echo=ctx.echo, recipe=recipe)
        else:
            from micota_merge.merge.build import BuildOptions, build

            build(BuildOptions(recipe=str(ctx.path), force=True), recipe=recipe, echo=ctx.echo)

    # the TA may live outside the work folder: its path is checked before anything is written beside it
    claim(ta_dir, "build", inputs=models, stages=["sweep"], option="output")
    stage_dir = ta_dir.parent / f".{ta_dir.name}.stage"
    if not ctx.runner.dry_run:
        own_claim_workdir(stage_dir, "run", ta_dir, inputs=models, option="output", adopt=["stage.json"])
    label = "build: teacher assistant" + (" (sweep)" if use_sweep else "")
    ran = ctx.runner.stage("build", label, stage_dir, ta_fp, make_ta, output=ta_dir)
    ctx.ta = (ta_dir, ran, ta_fp)


def _generate(ctx: _Context) -> None:
    """The TA's answers, and the experts' for baselines."""
    settings = ctx.settings
    # Downstream stages key on what the TA *is* (its bytes), so a TA replaced by hand is noticed.
    ta_dir, ran, ta_fp = ctx.ta
    ctx.teachers["ta"] = (ta_dir, ctx.known(ta_dir, ran, ta_fp, _checkpoint_fp))
    for name in _data_sources(settings):
        if name in ("long_cot", "short_cot"):
            ctx.teachers[name] = (ctx.models[name], ctx.model_fps[name])
    for name, (model, model_fp) in ctx.teachers.items():
        folder = ctx.workdir / "data" / plain_name(name, "data set")
        opts = _generate_options(settings, model, folder / "data.jsonl", name)
        ctx.data[name] = _generate_stage(ctx, "generate", f"generate: {name} data", folder, model_fp, opts)


def _generate_stage(ctx: _Context, kind: str, label: str, folder: Path, model_fp: str, opts: dict) -> tuple[Path, str]:
    """One model's verified answers (generate's JSONL, resumable); returns the kept file and its fingerprint."""
    fp = _hash(
        {"model": model_fp, "options": {k: v for k, v in opts.items() if k not in ("model", "out", *TRANSPORT_OPTIONS)}}
    )

    def gen(fresh: bool) -> None:
        from micota_merge.generation import generate as g

        g.generate(g.options(**opts, force=fresh), echo=ctx.echo)

    kept = folder / "data.correct.jsonl"
    ran = ctx.runner.stage(kind, label, folder, fp, gen, output=kept)
    return kept, ctx.known(kept, ran, fp, data_fingerprint)


def _distill_stage(
    ctx: _Context,
    kind: str,
    label: str,
    folder: Path,
    student: tuple[Path, str],
    data: tuple[Path, str],
    options: dict,
    seed: int,
    seed_in_fp: bool = True,
) -> tuple[Path, str]:
    """A model fine-tuned on one data set (distill's checkpoints, resumable); returns it and its fingerprint,
    which holds the student's and the data's content and the options. (A single-seed student's leaves its
    seed out, as it always has: the students of finished pipelines keep their fingerprints.)"""
    fp = _hash({"student": student[1], "data": data[1], "distill": options, **({"seed": seed} if seed_in_fp else {})})

    def do_distill(fresh: bool) -> None:
        from micota_merge.training.distill import DistillConfig, distill

        own = {"student": str(student[0]), "data": [str(data[0])], "out": str(folder / "model"), "seed": seed}
        distill(DistillConfig(**{**options, **own, "force": True, "resume": not fresh}), echo=ctx.echo)

    model_dir = folder / "model"
    ran = ctx.runner.stage(kind, label, folder, fp, do_distill, output=model_dir)
    return model_dir, ctx.known(model_dir, ran, fp, _checkpoint_fp)


def _chain(ctx: _Context) -> None:
    """MiCoTA's chain: the teacher's verified long CoT, and the short-CoT checkpoint (the TA's own parent)
    fine-tuned on it, which is the long_cot side the TA then merges with that parent."""
    from micota_merge.core.checkpoints import resolve_model_path

    settings, chain = ctx.settings, ctx.settings.chain
    root = Path(chain.workdir) if chain.workdir else ctx.workdir / "chain"
    if chain.workdir and not ctx.runner.dry_run:  # shared by the pipelines of several students
        claim_workdir(root, ctx.path)
    teacher = resolve_model_path(chain.teacher, "pipeline.chain.teacher", ctx.path.parent)
    teacher_fp = _checkpoint_fp(teacher)
    opts = _chain_generate_options(settings, teacher, root / "teacher" / "data.jsonl")
    opts.update(_switches(settings, "teacher"))
    label = "chain: teacher's long-CoT data"
    ctx.data["teacher"] = _generate_stage(ctx, "chain", label, root / "teacher", teacher_fp, opts)
    parent = (ctx.models["short_cot"], ctx.model_fps["short_cot"])
    # the parent learns its side's answers, with its side's switches
    options = {**settings.distill, **chain.distill, **_switches(settings, "short_cot")}
    label = "chain: long_cot = short_cot fine-tuned on the teacher's data"
    made, made_fp = _distill_stage(
        ctx, "chain", label, root / "long_cot", parent, ctx.data["teacher"], options, settings.seed
    )
    ctx.models["long_cot"], ctx.model_fps["long_cot"] = made, made_fp
    ctx.made = {"teacher": (teacher, teacher_fp), "long_cot": (made, made_fp)}
    ctx.recipe = ctx.recipe.with_long_cot(made)


def _mix(ctx: _Context) -> None:
    """The main data set, if mixed, and the mix baselines."""
    settings = ctx.settings
    for name, weights in _mixes(settings).items():
        folder = ctx.workdir / "data" / plain_name(name, "pipeline.baselines name")
        parts = {part: ctx.data[part] for part in weights}
        fp = _hash(
            {
                "weights": weights,
                "parts": {p: f for p, (_, f) in parts.items()},
                "seed": settings.seed,
                "total": settings.mix_total,
            }
        )

        def do_mix(fresh: bool, folder=folder, weights=weights, parts=parts) -> None:
            from micota_merge.data.mix import MixOptions
            from micota_merge.data.mix import run as mix_run

            parts_spec = [f"{parts[p][0]}={w}" for p, w in weights.items()]
            out = str(folder / "data.jsonl")
            mix_run(
                MixOptions(parts=parts_spec, out=out, total=settings.mix_total, seed=settings.seed, force=True),
                echo=ctx.echo,
            )

        mixed = folder / "data.jsonl"
        ran = ctx.runner.stage("mix", f"mix: {name}", folder, fp, do_mix, output=mixed)
        ctx.data[name] = (mixed, ctx.known(mixed, ran, fp, data_fingerprint))


def _distill(ctx: _Context) -> None:
    """One student per data set (and per seed with pipeline.distill_seeds)."""
    from micota_merge.core.checkpoints import resolve_model_path

    settings = ctx.settings
    student = resolve_model_path(settings.student, "pipeline.student", ctx.path.parent)
    student_fp = _checkpoint_fp(student)
    ctx.students["student"] = (student, student_fp)
    seeds = settings.distill_seeds or [settings.seed]
    for name in _student_data(settings):
        for seed in seeds:
            # one seed keeps the plain names; several get one folder (and one row) each
            tag = "" if len(seeds) == 1 else f"@seed{seed}"
            folder = ctx.workdir / "students" / plain_name(name, "student data") / (f"seed-{seed}" if tag else "")
            label = f"distill: student on {name} data" + (f" (seed {seed})" if tag else "")
            options = {**settings.distill, **_switches(settings, "student")}
            ctx.students[f"student+{name}{tag}"] = _distill_stage(
                ctx, "distill", label, folder, (student, student_fp), ctx.data[name], options, seed, bool(tag)
            )


def _evaluate(ctx: _Context) -> None:
    """Every student (and, with eval_teachers, the TA and the experts) through lm-eval, with the one grader."""
    settings = ctx.settings
    scored = dict(ctx.students)
    if settings.eval_teachers:  # with the chain: its teacher and the fine-tuned long_cot too
        scored.update({f"teacher:{n}": v for n, v in {**ctx.made, **ctx.teachers}.items()})
    for name, (model, model_fp) in scored.items():
        plain = name.replace(":", "-").replace("+", "-").replace("@", "-")
        folder = ctx.workdir / "eval" / plain_name(plain, "eval name")
        role = name.removeprefix("teacher:") if name.startswith("teacher:") else "student"
        section = {**settings.eval, **_switches(settings, role)}
        fp = _hash({"model": model_fp, "eval": {k: v for k, v in section.items() if k not in TRANSPORT_OPTIONS}})

        def do_eval(fresh: bool, folder=folder, model=model, section=section) -> None:
            from micota_merge.evaluation.evaluate import EvalOptions, evaluate

            # a stage that is resumed (same fingerprint) keeps lm-eval's response cache; a changed
            # one (fresh) starts it over
            run = folder / "run"
            opts = EvalOptions(**section, model=str(model), output=str(run), force=fresh or run.exists())
            evaluate(opts, echo=ctx.echo)

        ran = ctx.runner.stage("eval", f"eval: {name}", folder, fp, do_eval, output=folder / "run")
        ctx.evals[name] = folder / "run"
        ctx.eval_fps[name] = fp
        if ran and not ctx.runner.dry_run and name.startswith("student+"):
            _card_with_scores(model, folder / "run")


def _card_with_scores(model_dir: Path, run: Path) -> None:
    """A student this pipeline distilled gets its scores in its model card once they are known."""
    from micota_merge.core import cards
    from micota_merge.core.artifacts import read_manifest
    from micota_merge.evaluation.summary import load_summary

    if (read_manifest(model_dir) or {}).get("stage") == "distill" and (model_dir / cards.CARD).is_file():
        cards.write_student_card(model_dir, load_summary(run))


def _report(ctx: _Context) -> None:
    report_fp = _hash({"evals": list(ctx.eval_fps.items())})
    ta_dir = Path(ctx.recipe.output)

    def write(fresh: bool) -> None:
        write_report(ctx.workdir, ctx.recipe, ctx.settings, ta_dir, ctx.data, ctx.evals)

    ctx.runner.stage("report", "report", ctx.workdir / "report", report_fp, write)


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


def _switches(settings: PipelineSettings, role: str) -> dict:
    """The chat template switches of one model (pipeline.chat_template_kwargs), as a stage option."""
    return template_switches(settings.chat_template_kwargs.get(role))


def _generate_options(settings: PipelineSettings, model: Path, out: Path, role: Optional[str] = None) -> dict:
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
    opts["decontaminate_against"] = default_against(settings.eval.get("tasks"))
    opts.update(settings.generate)
    opts.update(_switches(settings, role) if role else {})
    return opts


def _chain_generate_options(settings: PipelineSettings, teacher: Path, out: Path) -> dict:
    """The teacher's generate options: the pipeline's, with pipeline.chain's questions, prompt and
    generate options laid over them."""
    chain = settings.chain
    opts = _generate_options(settings, teacher, out)
    if chain.questions is not None:
        opts["questions"] = chain.questions
    if chain.question_limit is not None:
        opts["limit"] = chain.question_limit
    if chain.prompt is not None:
        opts["prompt"] = chain.prompt
    opts.update(chain.generate)
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
    return sorted(n for n in names if n in ("long_cot", "short_cot"))  # the chain's teacher has its data


def _student_data(settings: PipelineSettings) -> list[str]:
    main = "mix" if settings.mix else "ta"
    return [main] + [b if isinstance(b, str) else b.name for b in settings.baselines]
