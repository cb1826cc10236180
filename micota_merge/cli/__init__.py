"""The `micota-merge` command line. Commands only parse options and call one stage function;
heavy libraries are imported inside the stages so `--help` stays instant."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys

import click

from micota_merge import __version__
from micota_merge.core.errors import StageFailed, UserError
from micota_merge.core.options import WEIGHT_DTYPES, click_options, resolve
from micota_merge.core.ownership import OWN as _OWN
from micota_merge.data.export import ExportOptions
from micota_merge.data.mix import MixOptions
from micota_merge.evaluation.evaluate import EvalOptions
from micota_merge.generation.options import GenerateOptions
from micota_merge.merge.build import BuildOptions
from micota_merge.merge.sweep.run import SweepOptions
from micota_merge.pipeline.run import RunOptions
from micota_merge.training.align import AlignOptions
from micota_merge.training.distill import DistillConfig

# Every stage's flags, help and defaults come from its options model (core/options.py); a command
# only names its positional arguments and hands the resolved model to its stage.

_LOG_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
_DEBUG_HELP = "Show full tracebacks instead of one-line errors."
_VERBOSE_HELP = "More log output (-vv for debug logs)."


def _end_progress_bars() -> None:
    """Close the progress bars a failed stage left open (lm-eval's, tqdm's): the error line then starts a
    line of its own instead of trailing a half-drawn bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) if tqdm else ()):
        try:
            bar.close()
        except (OSError, ValueError, AttributeError):  # a bar of a dead stream: nothing to tidy
            pass


def _run_stage(fn):
    """Turn UserError into one clean line and exit code 2 (a traceback only with --debug).

    Also gives the command its own --debug and -v, so they work after the subcommand as well as
    before it (`micota-merge build R --debug`); the two places add up."""

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, verbose: int = 0, **kwargs):
        ctx = click.get_current_context()
        root = ctx.find_root().params or {}
        debug = debug or root.get("debug", False)
        if verbose:
            logging.getLogger().setLevel(_LOG_LEVELS[min(verbose + root.get("verbose", 0), 2)])
        try:
            return fn(*args, **kwargs)
        except (UserError, StageFailed) as e:
            if debug:
                raise
            _end_progress_bars()
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            # A path a user gave that the OS refuses (permissions, a file where a folder must be,
            # a full disk) reached a write we did not check ahead: still one line, not a traceback.
            if debug:
                raise
            _end_progress_bars()
            path = getattr(e, "filename", None)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                # a write's own error often carries no file name: the command's output is where it was
                path = path or next((ctx.params[k] for k in ("out", "output") if ctx.params.get(k)), None)
                where = f"the disk holding {path}" if path else "the output's disk"
                click.secho(
                    f"error: no space left on {where}: free space there (or write to another disk) "
                    "and run the same command again",
                    fg="red",
                    err=True,
                )
                sys.exit(2)
            where = f": {path}" if path else ""
            click.secho(f"error: {e.strerror or e}{where}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho(
                "interrupted: outputs written so far are intact; run the same command again to resume",
                fg="yellow",
                err=True,
            )
            sys.exit(130)

    click.option("--debug", is_flag=True, help=_DEBUG_HELP)(wrapper)
    click.option("-v", "--verbose", count=True, help=_VERBOSE_HELP)(wrapper)
    return wrapper


def _config_option(example: str):
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help=f"YAML of these options (e.g. {example}); flags win.",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="micota-merge")
@click.option("--debug", is_flag=True, help=_DEBUG_HELP)
@click.option("-v", "--verbose", count=True, help=_VERBOSE_HELP)
def cli(debug: bool, verbose: int):
    """Build teacher assistants (TAs) for reasoning distillation, MiCoTA-style.

    A TA is a merge of a long-CoT checkpoint (e.g. DeepSeek-R1-Distill-Qwen) and a
    short-CoT one (e.g. Qwen2.5-Instruct); it writes intermediate-length chains of thought
    that small students learn from better than from long ones.

    \b
    Stages:  build -> sweep -> generate -> mix -> distill -> eval / align
    Whole method:  micota-merge run PIPELINE.yaml
    First run:     micota-merge demo init && micota-merge build micota_merge/recipes/merge/demo.yaml
    """
    logging.basicConfig(level=_LOG_LEVELS[min(verbose, 2)], format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- build


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click_options(BuildOptions, skip=("recipe",))
@_run_stage
def build(**flags):
    """Merge a long-CoT and a short-CoT checkpoint into a teacher assistant.

    RECIPE is a micota recipe (models.long_cot / short_cot / base, merge.method / ratio /
    density / seed / dtype, tokenizer, output) or a plain mergekit YAML. Everything is
    checked from config.json and safetensors headers before any weight is read; the TA
    folder appears only when complete (safetensors, the chosen side's tokenizer and chat
    template, and micota.json with the recipe, mergekit config and input hashes).

    \b
    ratio λ:  linear / slerp      λ·long_cot + (1−λ)·short_cot
              task-vector methods base + merge(λ·Δlong_cot, (1−λ)·Δshort_cot)
    """
    from micota_merge.merge import build as merge

    opts = resolve(BuildOptions, flags)
    if opts.print_mergekit:
        click.echo(merge.mergekit_yaml(opts.recipe, opts.ratio), nl=False)
        return
    merge.build(opts, echo=click.echo)


# ---------------------------------------------------------------- demo


@cli.group()
def demo():
    """Offline demo checkpoints for a first run on a laptop CPU."""


@demo.command("init")
@click.option(
    "--out", default="outputs/demo-checkpoints", show_default=True, help="Folder for base/, long_cot/ and short_cot/."
)
@click.option("--force", is_flag=True, help="Rewrite demo checkpoints that demo init wrote." + _OWN)
@_run_stage
def demo_init(out, force):
    """Write tiny random Qwen2 base, long-CoT and short-CoT checkpoints (real Qwen2 tokenizer).

    They are what micota_merge/recipes/merge/demo.yaml merges. Random weights: they show the machinery in
    seconds, not the method's effect.
    """

    from micota_merge.core.ownership import owner_stage
    from micota_merge.demo.family import demo_init as make

    if owner_stage(out) == "demo" and not force:
        click.echo(f"demo checkpoints already in {out}; nothing to do (--force rewrites them)")
        return
    paths = make(out, force=True)
    for role, path in paths.items():
        click.echo(f"{role:>9}: {path}")


@demo.command("standin")
@click.option(
    "--meta",
    default=None,
    help="A checkpoint's metadata folder (config.json, generation_config.json, tokenizer_config.json), "
    "or with --recipe a folder of org__name metadata folders. Default: the shipped real metadata "
    "(micota_merge/assets/model_meta, sources in its SOURCES.md).",
)
@click.option(
    "--recipe",
    "recipe_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write stand-ins for every checkpoint this recipe names, and OUT/recipe.yaml pointing at them.",
)
@click.option("--out", required=True, help="Folder to write the stand-in (or, with --recipe, the stand-ins) into.")
@click.option(
    "--shard-size",
    default=None,
    help="Split the weights into shards of at most this size (e.g. 5GB) with an index; default one file.",
)
@click.option("--force", is_flag=True, help="Replace a stand-in folder that demo standin wrote." + _OWN)
@_run_stage
def demo_standin(meta, recipe_path, out, shard_size, force):
    """Checkpoints that are real in every header and empty in every weight.

    The safetensors files carry the tensor names, shapes and dtypes transformers gives the real
    config, with sparse data (a 32B stand-in takes kilobytes of disk), so `build --dry-run` meets
    a paper-scale pair's real traps in seconds. What each file came from is in STANDIN.json.

    \b
      micota-merge demo standin --recipe micota_merge/recipes/merge/r1-qwen7b-ta.yaml --out /tmp/r1-7b
      micota-merge build /tmp/r1-7b/recipe.yaml --dry-run
    """
    from pathlib import Path

    from micota_merge.demo.standin import MODEL_META, make_standin, recipe_standins
    from micota_merge.merge.build import parse_size

    shard_bytes = parse_size(shard_size) if shard_size else None
    manifest = Path(out) / "micota.json"
    before = manifest.stat().st_ino if manifest.is_file() else None
    if recipe_path:
        made = recipe_standins(recipe_path, meta or MODEL_META, out, force=force, shard_bytes=shard_bytes)
        done = "already there, nothing to do" if before == manifest.stat().st_ino else "written"
        click.echo(f"stand-ins and {made} {done}; check it with: micota-merge build {made} --dry-run")
        return
    if not meta:
        raise click.UsageError("give --meta (one checkpoint's metadata folder) or --recipe")
    made = make_standin(meta, out, force=force, shard_bytes=shard_bytes)
    if before == manifest.stat().st_ino:
        click.echo(f"stand-in already in {made} from the same metadata; nothing to do")
    else:
        click.echo(f"stand-in written to {made}")


@demo.command("verify")
@click.argument("records", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@_run_stage
def demo_verify(records, as_json):
    """Check micro-world answers line by line: of each generate output or lm-eval samples file (RECORDS),
    how many are right by the final number, by the whole chain (every person, thing, amount and value the
    question states), and by the chain's numbers alone, overall and by difficulty (the question's number of
    steps); and what first went wrong in those right by the number only. Reads the files, writes nothing.

    \b
      micota-merge demo verify outputs/demo-pipeline/data/ta/data.jsonl
      micota-merge demo verify outputs/demo-pipeline/eval/student-ta-seed0/run/samples_*.jsonl
    """
    import json

    from micota_merge.demo.verify import verify_records

    for path in records:
        v = verify_records(path)
        if as_json:
            click.echo(json.dumps({"file": path, **v}))
            continue
        n = max(v["records"], 1)
        click.echo(
            f"{path}: {v['records']} answers; final number right {v['final_right']} ({v['final_right'] / n:.1%}), "
            f"whole chain right {v['chain_right']} ({v['chain_right'] / n:.1%}), its numbers right "
            f"{v['values_right']} ({v['values_right'] / n:.1%})"
        )
        for d, c in v["by_difficulty"].items():
            k = max(c["records"], 1)
            click.echo(
                f"  {d}: {c['records']} answers; final number {c['final_right'] / k:.1%}, whole chain "
                f"{c['chain_right'] / k:.1%}, numbers {c['values_right'] / k:.1%}"
            )
        for kind, count in v["right_by_number_only"].items():
            click.echo(f"  right by the number only, first wrong: {kind}  x{count}")


@demo.command("train")
@click.option(
    "--out",
    default="outputs/microworld",
    show_default=True,
    help="Folder for base/, long_cot/, short_cot/, student/, question files and training.json.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the task, the data order and the weights."
)
@click.option(
    "--scale",
    default=1.0,
    show_default=True,
    type=float,
    help="Fraction of the full schedule's steps (e.g. 0.05 for a smoke run).",
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(list(WEIGHT_DTYPES)),
    help="Precision of the saved weights.",
)
@click.option(
    "--eval-questions",
    default=200,
    show_default=True,
    type=click.IntRange(1, 500),
    help="Held-out questions scored for training.json.",
)
@click.option(
    "--min-accuracy",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Refuse the world (write nothing, exit 1) unless both experts answer this share of its validation "
    "questions (training-split questions outside pretraining, never the held-out ones): a world that did not "
    "learn the task voids every figure after it.",
)
@click.option("--force", is_flag=True, help="Replace a micro world that demo train wrote." + _OWN)
@_run_stage
def demo_train(out, seed, scale, dtype, eval_questions, min_accuracy, force):
    """Train the micro world from a seed: a word-level tokenizer, a base pretrained on
    arithmetic word problems, its long-CoT and short-CoT chat experts, and a smaller student.

    The committed copy in micota_merge/assets/microworld was made with
    `micota-merge demo train --out micota_merge/assets/microworld --seed 0 --force`
    (19 minutes on one thread of a 2-core machine that was training another world at the
    same time; bit-for-bit deterministic on CPU).
    """
    from micota_merge.demo.microworld import train_world

    rec = train_world(
        out,
        seed=seed,
        scale=scale,
        dtype=dtype,
        n_eval=eval_questions,
        force=force,
        min_accuracy=min_accuracy,
        log=lambda s: click.echo(s, err=True),
    )
    for role, r in rec["heldout"].items():
        click.echo(f"{role:>28}: accuracy {r['accuracy']:.3f}  mean tokens {r['mean_tokens']:.1f}")
    click.echo(f"wrote {out} in {rec['seconds']:.0f} s")


# ---------------------------------------------------------------- eval


@cli.command("eval")
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False))
@click_options(EvalOptions)
@click.option("--compare", is_flag=True, help="Compare finished runs: micota-merge eval --compare DIR DIR ...")
@_run_stage
def eval_cmd(runs, compare, **flags):
    """Score a checkpoint on AIME24, AMC23, OlympiadBench, MATH-500 and GSM8K with lm-eval.

    Zero-shot, the model's chat template, the papers' prompt ("... put your final answer
    within \\boxed{}"); greedy decoding, or k sampled answers per question (--protocol r1,
    --samples). Accuracy by micota_merge.evaluation.grading on the text after the thinking block
    (</think>): avg@k, pass@k, maj@k, each with a 95 % bootstrap interval; lengths in the
    model's tokens (whole, thinking, answer) and the share truncated at --max-tokens.
    Offline: the benchmark data ships with the package.

    \b
    Writes to --output: lm-eval's results_*.json and samples_micota_*.jsonl (each record
    with every answer: response, pred, correct, lengths), summary.json, summary.md, micota.json.
    A killed greedy run resumes from its cached responses when run again (sampled answers
    are not cached: lm-eval reuses no sampled answer).

    \b
    --compare DIR DIR ...: the runs side by side; each run after the first is tested against
    the first with a paired bootstrap over the questions both answered, per benchmark and on
    the average (which differences are more than noise).

    \b
    Examples:
      micota-merge eval --model outputs/demo-ta --limit 2
      micota-merge eval --model DIR --protocol r1 --limit 4
      micota-merge eval --model DIR --tasks gsm8k,math500 --samples 8 --temperature 0.6 --top-p 0.95
      micota-merge eval --model DIR --tasks gsm8k,math500 --backend vllm --tensor-parallel-size 2
      micota-merge eval --model DIR --base-url http://node1:8000/v1 --base-url http://node2:8000/v1
      micota-merge eval --compare outputs/eval/student-long outputs/eval/student-mid -o outputs/cmp
    """
    from micota_merge.evaluation import evaluate

    if compare:
        from micota_merge.evaluation.compare import compare as compare_runs

        if flags.get("model"):
            raise UserError("--compare reads finished runs; drop --model (or drop --compare to score a model)")
        seed = flags.get("seed") or 0
        compare_runs(runs, output=flags.get("output"), force=bool(flags.get("force")), seed=seed, echo=click.echo)
        return
    if runs:
        raise UserError(f"unexpected arguments {' '.join(runs)}: to compare runs pass --compare")
    if not flags.get("model"):
        raise UserError("--model is required: the checkpoint folder to score (or --compare DIR DIR ...)")
    opts = resolve(EvalOptions, flags)
    tasks = evaluate.parse_tasks(opts.tasks)  # checked before any heavy import
    evaluate.sampling_settings(opts.protocol, opts.samples, opts.temperature, opts.top_p, tasks)
    evaluate.evaluate(opts, echo=click.echo)


# ---------------------------------------------------------------- generate, mix


@cli.command()
@_config_option("a file holding `max_tokens: 8192` and `backend: vllm`")
@click_options(GenerateOptions)
@_run_stage
def generate(config_file, **flags):
    """Answer a question set with a model; write chat records as they finish.

    Records (OUT.jsonl): id, messages [user, assistant], answer, pred, correct, num_tokens,
    finish_reason (stop | length), model, sample, system (the system prompt the chat template
    injected by itself, e.g. Qwen2.5-Instruct's, or null). A template's prefill (R1's
    "<think>\\n") starts the assistant content. Beside it: OUT.jsonl.meta.json (the settings;
    a resume with other settings is refused), OUT.correct.jsonl (--keep correct) and
    OUT.stats.json (accuracy, acceptance rate, lengths, truncations).

    Killed? Run the same command again: finished records are kept, a torn last line is cut,
    and generation resumes where it stopped without duplicates.

    \b
    Servers (one per node, or one `vllm serve --data-parallel-size N`):
      micota-merge generate --model outputs/ta --questions gsm8k-train --out data/ta.jsonl \
        --base-url http://node1:8000/v1 --base-url http://node2:8000/v1 --concurrency 64
    """
    from micota_merge.generation.generate import generate as run

    run(resolve(GenerateOptions, flags, config_file, label="generate options"), echo=click.echo)


@cli.command()
@click.argument("parts", nargs=-1, required=True, metavar="PART=WEIGHT...")
@click_options(MixOptions, skip=("parts",))
@_run_stage
def mix(**flags):
    """Mix Distillation: draw records from several JSONL files by weight.

    Example, the long:short 1:4 mix that beat either alone for students <= 3B
    (arXiv 2502.12143):  micota-merge mix long.jsonl=1 short.jsonl=4 --out mix.jsonl

    Each record gets `mix_part` (its file's stem); the composition is printed and written
    to OUT.stats.json.
    """
    from micota_merge.data.mix import run

    flags["parts"] = list(flags["parts"])  # PART=WEIGHT arguments: no commas to split
    run(resolve(MixOptions, {}, base={k: v for k, v in flags.items() if v is not None}), echo=click.echo)


@cli.command()
@click.argument("data", type=click.Path(dir_okay=False))
@click_options(ExportOptions, skip=("data",))
@_run_stage
def export(**flags):
    """Write chat records (generate's or mix's JSONL) as a data set other trainers read.

    \b
    --to llama-factory:  OUT/NAME.json (ShareGPT: conversations of from/value turns, thinking kept)
                         and OUT/dataset_info.json; train with `dataset: NAME`, `dataset_dir: OUT`.
    --to hf:             a Hugging Face dataset folder: datasets.load_from_disk(OUT).

    The records are those distill trains on (verified, not cut off) unless --keep all.

    \b
      micota-merge export outputs/demo-pipeline/data/ta/data.correct.jsonl --out exports/ta --name micota_ta
    """
    from micota_merge.data.export import export as run

    run(resolve(ExportOptions, flags), echo=click.echo)


# ---------------------------------------------------------------- distill, align


@cli.command()
@_config_option("micota_merge/recipes/distill/qwen2.5-7b-instruct.yaml")
@click_options(DistillConfig)
@_run_stage
def distill(config_file, **flags):
    """Fine-tune a student on chat records (TRL SFT), learning the assistant's tokens only.

    The records (`messages` = [user, assistant], as `generate`/`mix` write them) go through the
    student's own chat template; the prompt carries no loss. Records marked "correct": false are
    skipped unless --keep-incorrect. The output is a Hugging Face folder (transformers / vLLM load
    it) with the student's tokenizer, micota.json (data hashes, options, versions, loss) and
    loss.png; it appears only when complete. Checkpoints go to OUT.work/; after a kill, run the
    same command with --resume.

    \b
    One GPU or CPU:  micota-merge distill --student S --data mid.jsonl --out outputs/student-mid
    Many GPUs:       accelerate launch --config_file micota_merge/recipes/accelerate/fsdp.yaml \\
                       -m micota_merge.cli distill --config micota_merge/recipes/distill/qwen2.5-7b-instruct.yaml \\
                       --data mid.jsonl --out outputs/qwen7b-mid
    """
    from micota_merge.training.distill import distill as run_distill

    cfg = resolve(DistillConfig, flags, config_file, label="distill options")
    try:
        run_distill(cfg, echo=click.echo)
    except KeyboardInterrupt:
        click.secho(
            f"interrupted: checkpoints so far are in {cfg.out}.work/; run the same command with --resume to continue",
            fg="yellow",
            err=True,
        )
        sys.exit(130)


@cli.command()
@click_options(AlignOptions)
@_run_stage
def align(**flags):
    """Per-token NLL and perplexity of each data set's assistant tokens under MODEL.

    The paper's measure of how close long-, short- and mid-CoT data are to a student: the lower
    the NLL, the nearer the data sits to what the model already writes. Tokens are the ones
    `distill` trains (same template, same mask); the spread is over per-record mean NLLs.
    """
    from micota_merge.training.align import align as run_align

    run_align(resolve(AlignOptions, flags), echo=click.echo)


# ---------------------------------------------------------------- sweep


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click_options(SweepOptions, skip=("recipe",))
@_run_stage
def sweep(**flags):
    """Merge at several ratios (x densities), measure CoT length and accuracy, keep the intermediate TA.

    Every point's TA is built in one pass over the inputs (each input tensor read once, outputs
    bit-for-bit those of separate `build`s) for linear, task_arithmetic, ties, dare_ties,
    dare_linear, breadcrumbs, breadcrumbs_ties, della and della_linear (on CPU: where a GPU
    makes `build` run mergekit on it, that family is built point by point); each TA answers the
    probe questions and is scored by the grader. The long-CoT and short-CoT checkpoints are
    probed too; the target length 'mid' is the geometric mean of their mean lengths. The chosen
    point is the one closest to the target among those within TOLERANCE accuracy points of the
    best, and is set against the length-accuracy Pareto front. Writes
    <output>/sweep/sweep.{json,csv,md,png} and front.png; a killed sweep resumes point by point.
    """
    from micota_merge.merge.sweep.run import sweep as run

    run(resolve(SweepOptions, flags), echo=click.echo)


# ---------------------------------------------------------------- run


@cli.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click_options(RunOptions, skip=("pipeline",))
@_run_stage
def run_pipeline(**flags):
    """Run the whole method from one YAML file and write report.md.

    \b
    build (or sweep) -> generate -> mix -> distill -> eval -> report
    PIPELINE is a recipe with a `pipeline:` section (a bare recipe only builds). Each stage
    keeps its outputs and a fingerprint of its options and inputs under pipeline.workdir; a
    stage that is done with the same fingerprint is skipped, so a killed run restarts where it
    stopped and a changed option reruns only what depends on it.
    """
    from micota_merge.pipeline.run import run

    run(resolve(RunOptions, flags), echo=click.echo)


def main():
    cli(prog_name="micota-merge")


if __name__ == "__main__":
    main()
