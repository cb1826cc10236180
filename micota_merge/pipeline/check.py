"""`run`'s check of the whole pipeline before its first stage.

A typo in `distill:` must not cost the hours of merging and generation that come before the
distill stage: every stage's options (unknown keys named with the closest valid one), every path
(models, student, questions) and every task name is checked here, from metadata only, in seconds.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import BaseModel, ValidationError

from micota_merge.core.errors import UserError
from micota_merge.merge.recipe import PipelineSettings, Recipe, format_validation_error

# Names users bring from other tools (transformers' TrainingArguments, vLLM, lm-eval).
_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "max_seq_length": "max_length",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_scheduler",
    "max_new_tokens": "max_tokens",
    "max_gen_toks": "max_tokens",
    "num_samples": "n",
    "model_name_or_path": "student",
}


def unknown_keys(section: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Refuse the first key of `given` that is not in `valid`, naming the closest valid one."""
    valid = sorted(valid)
    for key in given:
        if key in valid:
            continue
        close = _ALIASES.get(key) if _ALIASES.get(key) in valid else None
        close = close or next(iter(difflib.get_close_matches(key, valid, n=1)), None)
        hint = f"; did you mean {close!r}?" if close else ""
        raise UserError(f"{section}: unknown option {key!r}{hint} (valid: {', '.join(valid)})")


def _model_check(section: str, model: type[BaseModel], values: dict[str, Any], set_by_pipeline: dict[str, Any]):
    for key in set_by_pipeline:
        if key in values:
            raise UserError(f"{section}.{key} is set by the pipeline; remove it")
    unknown_keys(section, values, [k for k in model.model_fields if k not in set_by_pipeline])
    try:
        return model.model_validate({**values, **set_by_pipeline})
    except ValidationError as e:
        raise UserError(format_validation_error(section, e, model)) from None


def check_order(run_from: Optional[str], until: Optional[str], stages: tuple[str, ...]) -> None:
    for opt, value in (("--from", run_from), ("--until", until)):
        if value is not None and value not in stages:
            raise UserError(f"{opt} {value!r}: choose one of {', '.join(stages)}")
    if run_from and until and stages.index(run_from) > stages.index(until):
        raise UserError(
            f"--from {run_from} comes after --until {until}: nothing would run; "
            f"stages run in the order {' -> '.join(stages)}"
        )


def _check_questions(
    section: str, spec: str, base_dir: Path, limit: Optional[int], fields: dict, offset: int = 0
) -> None:
    from micota_merge.data.questions import load_questions, require_answers

    try:
        questions = load_questions(
            spec,
            fields.get("question_field"),
            fields.get("answer_field"),
            fields.get("id_field"),
            benchmark=fields.get("benchmark"),
            split=fields.get("split"),
            limit=limit,
        )
        if len(questions) <= offset:
            raise UserError(
                f"{spec} has {len(questions)} questions: none is left after the {offset} that generate answers "
                "(lower pipeline.question_limit, or say sweep.probe.held_out: false)"
            )
        require_answers(questions[offset:], spec)
    except UserError as e:
        raise UserError(f"{section}: {e}") from None


def validate_pipeline(recipe: Recipe, settings: Optional[PipelineSettings], base_dir: Path) -> None:
    """Everything `run` can know to be wrong before it starts; raises UserError (one line).

    Each section is validated by its stage's own options model, as the stage will read it."""
    from micota_merge.core.checkpoints import check_model_files, resolve_model_path

    specs = recipe.model_specs(made=True)  # a long_cot that the chain makes is not there yet
    models = {role: resolve_model_path(spec, f"models.{role}", base_dir) for role, spec in specs.items()}
    for role, path in models.items():
        check_model_files(path, f"models.{role}", tokenizer=False)
    if settings is None:
        return
    if settings.select == "sweep" and recipe.sweep is not None:
        from micota_merge.merge.sweep.run import probe_plan

        plan = probe_plan(recipe, recipe.sweep)  # never a test split the students are scored on
        limit = plan["offset"] + recipe.sweep.probe.limit
        _check_questions("sweep.probe.questions", plan["questions"], base_dir, limit, {}, offset=plan["offset"])
    _check_generate("pipeline", settings.generate, settings.questions, settings.question_limit, base_dir)
    _check_distill(settings, base_dir)
    if settings.chain is not None:  # after the pipeline's own sections, which it lays its options over
        _check_chain(settings, base_dir, models["short_cot"])
    _check_eval(settings)


def _check_chain(settings: PipelineSettings, base_dir: Path, parent: Path) -> None:
    """The chain's teacher, its generate options and questions, and the fine-tune of the TA's parent."""
    from micota_merge.core.checkpoints import check_model_files, resolve_model_path
    from micota_merge.training.distill import DistillConfig

    chain = settings.chain
    teacher = resolve_model_path(chain.teacher, "pipeline.chain.teacher", base_dir)
    check_model_files(teacher, "pipeline.chain.teacher", tokenizer=False)
    questions = chain.questions or settings.questions
    limit = chain.question_limit or settings.question_limit
    _check_generate("pipeline.chain", {**settings.generate, **chain.generate}, questions, limit, base_dir)
    _model_check(
        "pipeline.chain.distill",
        DistillConfig,
        {**settings.distill, **chain.distill},
        {"student": str(parent), "data": ["-"], "out": "-"},
    )


def _check_generate(section: str, options: dict, questions: str, limit: Optional[int], base_dir: Path) -> None:
    from micota_merge.generation.options import GenerateOptions

    gen = _model_check(
        f"{section}.generate",
        GenerateOptions,
        dict(options),
        {"model": "-", "questions": questions, "out": "-.jsonl"},
    )
    _check_questions(f"{section}.questions", questions, base_dir, limit, gen.model_dump())
    serve = gen.data_parallel_size > 1 or bool(gen.serve_args)
    if serve or gen.backend != "auto" or gen.base_url:
        from micota_merge.generation import backends

        # generate's own choice and checks (`vllm serve` here or in $MICOTA_VLLM_PYTHON's virtualenv)
        backends.pick(gen.backend, gen.base_url, serve=serve)


def _check_distill(settings: PipelineSettings, base_dir: Path) -> None:
    from micota_merge.core.checkpoints import check_model_files, resolve_model_path
    from micota_merge.training.distill import DistillConfig

    student = resolve_model_path(settings.student, "pipeline.student", base_dir)
    check_model_files(student, "pipeline.student")
    _model_check(
        "pipeline.distill", DistillConfig, dict(settings.distill), {"student": str(student), "data": ["-"], "out": "-"}
    )


def _check_eval(settings: PipelineSettings) -> None:
    from micota_merge.evaluation.evaluate import EvalOptions, parse_tasks

    ev = _model_check("pipeline.eval", EvalOptions, dict(settings.eval), {"model": "-", "output": "-", "force": False})
    try:
        parse_tasks(ev.tasks)
    except UserError as e:
        raise UserError(f"pipeline.eval.tasks: {e}") from None
