"""`distill`: supervised fine-tuning of the student on chat records (TRL's SFTTrainer).

The student learns the assistant turn only, through its own chat template. Each record
becomes TRL's conversational prompt/completion pair (prompt = the messages before the last
assistant message, completion = that message), tokenized exactly as TRL does it (the
completion starts where the rendered prompt and prompt+completion diverge), and TRL masks the
prompt with `completion_only_loss`. This works with any chat template; TRL's
`assistant_only_loss` needs `{% generation %}` markers that most templates (Qwen2's ChatML
among them) lack. We tokenize before handing the data to TRL so that records over
`max_length` are dropped or truncated by choice and counted, and so that `align` scores
exactly the tokens `distill` trains.

Layout while training: `<out>.work/checkpoints/checkpoint-N` (Trainer checkpoints, what
`--resume` continues from), `<out>.work/final/` (the model being written). The finished model
is renamed to `<out>` in one step, so `<out>` is either absent or complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import Field, field_validator

from micota_merge.core.errors import UserError, disk_full, free_mib
from micota_merge.core.identity import changed, describe
from micota_merge.core.options import ModelDtype, StageOptions, chat_template_kwargs_field, template_switches
from micota_merge.core.ownership import (
    check_free_space,
    check_replaceable,
    claim,
    claim_workdir,
    distributed_rank,
    identity_of,
    output_lock,
    remove_ours,
)
from micota_merge.core.strict import Float, Int
from micota_merge.data.questions import jsonl_lines

log = logging.getLogger(__name__)


class DistillConfig(StageOptions):
    """Every option of `micota-merge distill`; flags and `--config` YAML keys are these names."""

    student: str = Field(
        description="Student checkpoint: a Hugging Face folder or hub id (e.g. Qwen/Qwen2.5-3B-Instruct)."
    )
    data: list[str] = Field(
        description="Training JSONL file(s) of chat records, as `generate` / `mix` "
        "write them (messages = [user, assistant])."
    )
    out: str = Field(description="Output folder for the distilled student.")
    # -- what to train
    lora: bool = Field(
        False,
        description="Train LoRA adapters (peft) instead of all weights; the "
        "saved model is still the merged full model.",
    )
    lora_r: Int = Field(64, description="LoRA rank.")
    lora_alpha: Int = Field(128, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: Float = Field(0.05, description="Dropout on the LoRA path.")
    lora_target: str = Field(
        "all-linear",
        description="Modules that get adapters (peft target_modules; comma-separated names or all-linear).",
    )
    save_adapter: bool = Field(False, description="With --lora, also keep the adapter in OUT/adapter/.")
    # -- schedule (the papers: AdamW, lr 1e-5, 2 epochs, cosine)
    epochs: Float = Field(2.0, description="Passes over the data.")
    max_steps: Int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    lr: Float = Field(1e-5, description="Peak learning rate (AdamW).")
    lr_scheduler: str = Field(
        "cosine", description="transformers scheduler name (cosine, linear, constant_with_warmup, ...)."
    )
    warmup_ratio: Float = Field(0.05, description="Share of the steps spent warming the lr up linearly.")
    weight_decay: Float = Field(0.0, description="AdamW weight decay.")
    batch_size: Int = Field(1, description="Records (or packed sequences with --packing) per device per step.")
    grad_accum: Int = Field(
        1, description="Gradient accumulation steps (global batch = batch-size x grad-accum x GPUs)."
    )
    # -- data
    max_length: Int = Field(16384, description="Longest training sequence in tokens (prompt + answer).")
    overlong: Literal["drop", "truncate"] = Field(
        "drop",
        description="Records longer than --max-length: drop them (a cut CoT loses its answer) or "
        "keep their first max-length tokens.",
    )
    keep_incorrect: bool = Field(
        False,
        description='Also train on records marked "correct": false or cut '
        'off at generate\'s token limit (finish_reason "length"); '
        "by default only verified, finished answers are learnt.",
    )
    limit: Optional[Int] = Field(None, description="Use only the first N usable records (quick runs).")
    chat_template_kwargs: dict[str, Any] = chat_template_kwargs_field()
    template_system: Literal["keep", "drop"] = Field(
        "keep",
        description="The system prompt the teacher's chat template injected (Qwen2.5-Instruct's "
        '"You are Qwen...", kept in each record\'s "system"): keep it in the student\'s '
        "prompt, or drop it and let the student's template decide (R1's card: no system prompt).",
    )
    packing: bool = Field(
        False,
        description="Padding-free packing: records are packed (best-fit) into "
        "max-length rows with no padding and no cross-record attention.",
    )
    # -- machinery
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (needed for long CoT on big students)."
    )
    dtype: ModelDtype = Field(
        "auto", description="Weights' dtype while training; auto = bfloat16 on a GPU that has it, else float32."
    )
    attn_implementation: Optional[str] = Field(
        None, description="Attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice."
    )
    seed: Int = Field(42, description="Seed for init of adapters, shuffling and dropout.")
    save_steps: Int = Field(200, description="Write a resumable checkpoint every N optimizer steps.")
    save_total_limit: Int = Field(2, description="Keep only the newest N checkpoints.")
    logging_steps: Int = Field(10, description="Log loss, lr and tokens/s every N steps.")
    report_to: str = Field("none", description="Trainer loggers: none, tensorboard, wandb, ...")
    keep_checkpoints: bool = Field(False, description="Keep OUT.work/ (checkpoints) after a successful run.")
    resume: bool = Field(
        False, description="Continue from the newest complete checkpoint in OUT.work/ (starts fresh if there is none)."
    )
    force: bool = Field(
        False,
        description="Replace an OUT that distill wrote itself (its micota.json says so; "
        "anything else is refused); without --resume also discard old checkpoints.",
    )

    @field_validator("data", mode="before")
    @classmethod
    def _split_commas(cls, v):
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    @field_validator("data")
    @classmethod
    def _data_given(cls, v):
        if not v:
            raise ValueError("give at least one JSONL file")
        return v

    @field_validator(
        "lr",
        "epochs",
        "lora_alpha",
        "lora_r",
        "batch_size",
        "grad_accum",
        "save_steps",
        "logging_steps",
        "save_total_limit",
    )
    @classmethod
    def _positive(cls, v):
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v):
        if v == 0 or v < -1:
            raise ValueError(f"must be a positive number of steps, or -1 for all epochs; got {v}")
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be at least 1 record, got {v}")
        return v

    @field_validator("max_length")
    @classmethod
    def _length(cls, v):
        if v < 16:
            raise ValueError(f"must be at least 16 tokens, got {v}")
        return v

    @field_validator("warmup_ratio", "lora_dropout")
    @classmethod
    def _ratio(cls, v):
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v


# Options that change what a checkpoint means: resuming with different ones would mix two runs.
_RESUME_KEYS = (
    "student",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_target",
    "epochs",
    "max_steps",
    "lr",
    "lr_scheduler",
    "warmup_ratio",
    "batch_size",
    "grad_accum",
    "max_length",
    "overlong",
    "keep_incorrect",
    "limit",
    "packing",
    "seed",
    "template_system",
)


# ---------------------------------------------------------------- data


@dataclass
class ChatRecord:
    """One training conversation: the prompt messages and the assistant answer to learn."""

    file: str
    line: int
    prompt: list[dict]
    completion: dict
    correct: Optional[bool] = None
    id: Optional[str] = None
    cut_off: bool = False  # generation stopped at its token limit (finish_reason "length")
    system: Optional[str] = None  # the system prompt the teacher's chat template injected (generate's "system")


def read_chat_records(path: str | os.PathLike, option: str = "--data") -> list[ChatRecord]:
    """Read a JSONL file of `{"messages": [...]}` records; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: {path} does not exist")
    out = []
    for n, line in jsonl_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON record") from None
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise UserError(
                f'{where}: no "messages" list; records need messages = [{{role: user, ...}}, '
                f"{{role: assistant, ...}}] (the format `micota-merge generate` writes)"
            )
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f'{where}: messages[{i}] must be an object with string "role" and "content"')
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise UserError(
                f"{where}: record has no assistant message, so there is nothing to learn; "
                f'give records with the answer as a message of role "assistant"'
            )
        if last != len(msgs) - 1:
            raise UserError(
                f"{where}: messages continue after the last assistant message "
                f"(role {msgs[-1]['role']!r}); the assistant's answer must come last"
            )
        if last == 0:
            raise UserError(f"{where}: the assistant message has no prompt before it")
        correct = rec.get("correct")
        out.append(
            ChatRecord(
                str(path),
                n,
                msgs[:last],
                msgs[last],
                correct if isinstance(correct, bool) else None,
                rec.get("id"),
                rec.get("finish_reason") == "length",
                rec.get("system") if isinstance(rec.get("system"), str) else None,
            )
        )
    return out


def encode_records(
    tokenizer,
    records: list[ChatRecord],
    batch: int = 256,
    template_system: str = "keep",
    template_kwargs: Optional[dict] = None,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, completion_mask) per record, through the tokenizer's own chat template.

    The same rule as TRL's conversational prompt-completion tokenization: render the prompt with
    the generation prompt and the whole conversation, tokenize both, and let the completion start
    where the two token lists diverge. Rendering then tokenizing in batches is what
    `apply_chat_template(tokenize=True)` does one by one, only faster.

    The conversation is rendered by `templates.render_completion`: the answer goes in verbatim,
    so a template that rewrites finished answers (R1's keeps only the text after `</think>`)
    cannot drop the reasoning, and a template that prefills `<think>\\n` finds it in the prompt
    (a `generate` record's answer starts with it), so the prefill is not learnt as output.
    `template_system`: "keep" puts the system prompt the teacher's template injected (the record's
    "system") back in front of the prompt; "drop" leaves the student's template to decide.
    `template_kwargs` are the template's switches: with Qwen3's `enable_thinking=False` the prompt ends
    with an empty think block, which, like R1's prefill, is prompt and never learnt.
    """
    from micota_merge.core.templates import render_completion, render_with_tokenizer

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template; distill and align format records "
            "through the student's own template (use an -Instruct checkpoint, or add one)"
        )
    render = render_with_tokenizer(tokenizer, template_kwargs)
    out = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        rendered = [
            render_completion(render, _prompt_messages(r, template_system), r.completion["content"]) for r in chunk
        ]
        prompts = [p for p, _ in rendered]
        fulls = [f for _, f in rendered]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
        for p, ids in zip(p_ids, f_ids):
            n = 0
            for a, b in zip(p, ids):
                if a != b:
                    break
                n += 1
            out.append((list(ids), [0] * n + [1] * (len(ids) - n)))
    return out


def _prompt_messages(rec: ChatRecord, template_system: str) -> list[dict]:
    if template_system == "keep" and rec.system is not None and rec.prompt[0].get("role") != "system":
        return [{"role": "system", "content": rec.system}] + rec.prompt
    return rec.prompt


@dataclass
class DataReport:
    files: list[dict] = field(default_factory=list)
    records_read: int = 0
    dropped_incorrect: int = 0
    dropped_cut_off: int = 0
    dropped_empty: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    limited: int = 0
    kept: int = 0
    tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept} records kept of {self.records_read}"]
        for name in (
            "dropped_incorrect",
            "dropped_cut_off",
            "dropped_overlong",
            "truncated",
            "dropped_empty",
            "limited",
        ):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        if self.kept:
            parts.append(
                f"{self.tokens:,} tokens ({self.completion_tokens:,} trained), "
                f"mean {self.tokens / self.kept:,.0f}, max {self.max_tokens:,}"
            )
        return "; ".join(parts)


def prepare_examples(
    tokenizer,
    files: list[str],
    max_length: int,
    overlong: str = "drop",
    keep_incorrect: bool = False,
    limit: int | None = None,
    template_system: str = "keep",
    template_kwargs: Optional[dict] = None,
) -> tuple[list[tuple[list[int], list[int]]], DataReport]:
    """Read, filter and tokenize the training files; count every record that is left out."""
    from micota_merge.core.artifacts import sha256_file

    report = DataReport()
    records: list[ChatRecord] = []
    for f in files:
        recs = read_chat_records(f)
        report.files.append({"path": str(Path(f).resolve()), "sha256": sha256_file(f), "records": len(recs)})
        records.extend(recs)
    report.records_read = len(records)
    if not keep_incorrect:
        report.dropped_incorrect = sum(r.correct is False for r in records)
        records = [r for r in records if r.correct is not False]
        report.dropped_cut_off = sum(r.cut_off for r in records)
        records = [r for r in records if not r.cut_off]
    examples = []
    for ids, mask in encode_records(
        tokenizer, records, template_system=template_system, template_kwargs=template_kwargs
    ):
        if not any(mask):
            report.dropped_empty += 1
            continue
        if len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            if overlong == "drop" or not any(mask):  # a prompt that fills max_length leaves nothing to learn
                report.dropped_overlong += 1
                continue
            report.truncated += 1
        examples.append((ids, mask))
    if limit is not None and len(examples) > limit:
        report.limited = len(examples) - limit
        examples = examples[:limit]
    report.kept = len(examples)
    report.tokens = sum(len(ids) for ids, _ in examples)
    report.completion_tokens = sum(sum(m) for _, m in examples)
    report.max_tokens = max((len(ids) for ids, _ in examples), default=0)
    return examples, report


# ---------------------------------------------------------------- checkpoints


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N that was written to the end (trainer_state.json is saved last)."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit():
            found.append((int(p.name[11:]), p))
    for _, p in sorted(found, reverse=True):
        if (p / "trainer_state.json").is_file():
            return p
    return None


def _drop_incomplete_checkpoints(folder: Path) -> None:
    """A kill during saving leaves a checkpoint without trainer_state.json; it must not be resumed."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and not (p / "trainer_state.json").is_file():
            log.warning("removing incomplete checkpoint %s (killed while saving)", p)
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- trainer pieces


def _progress_callback_class():
    """The Trainer's tqdm bar (steps, ETA) with loss, lr and tokens/s as its postfix."""
    from transformers.trainer_callback import ProgressCallback

    class DistillProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            self._last = (time.time(), 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:
                return
            now, tokens = time.time(), logs.get("num_tokens")
            if tokens is not None:
                t0, n0 = self._last
                # Also written into the Trainer's log entry, so it lands in train_log.json and micota.json.
                tps = round((tokens - n0) / max(now - t0, 1e-9), 1)
                logs["tokens_per_second"] = tps
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1]["tokens_per_second"] = tps
                self._last = (now, tokens)
            if not state.is_world_process_zero or self.training_bar is None:
                return
            post = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
            if "tokens_per_second" in logs:
                post["tok/s"] = f"{logs['tokens_per_second']:,.0f}"
            self.training_bar.set_postfix(post, refresh=False)
            self.training_bar.write(
                f"step {state.global_step}/{state.max_steps}  " + "  ".join(f"{k} {v}" for k, v in post.items())
            )

    return DistillProgress


def _step_counter_class():
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        """Counts the optimizer steps this process ran (after --resume: fewer than global_step)."""

        def __init__(self):
            self.steps = 0
            self.first_step = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_step is None:
                self.first_step = state.global_step
            self.steps += 1
            # The Trainer checkpoints the last step too (model + optimizer: ~12 bytes per parameter);
            # the final model is saved right after, so that checkpoint would only be written and deleted.
            if state.global_step >= state.max_steps:
                control.should_save = False
                control.should_log = True  # the final loss in micota.json is the last step's

    return StepCounter


def resolve_dtype(dtype: str) -> tuple[str, bool]:
    """(weights' dtype, bf16 autocast on?) — bf16 on a GPU that supports it, fp32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    if not cuda and dtype != "float32":
        log.warning("training in %s on CPU: most CPU kernels are slow or missing in half precision", dtype)
    return dtype, dtype == "bfloat16"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _checkpointing_args(config_cls, enabled: bool) -> dict[str, Any]:
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name
    warns); GPU users on older releases have only the old one, so use whichever exists."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def sft_config(cfg: DistillConfig, output_dir: Path):
    """TRL's SFTConfig for these options. Creating it also sets up the distributed state
    (torchrun / accelerate launch env), so it comes before anything asks which rank it is."""
    from trl import SFTConfig

    dtype, bf16 = resolve_dtype(cfg.dtype)
    model_kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.attn_implementation:
        model_kwargs["attn_implementation"] = cfg.attn_implementation
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a share of the steps (transformers 5)
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        packing=cfg.packing,
        packing_strategy="bfd",  # best-fit decreasing: whole records per row, padding-free
        padding_free=cfg.packing,
        completion_only_loss=True,  # labels = -100 wherever completion_mask is 0 (the prompt)
        **_checkpointing_args(SFTConfig, cfg.gradient_checkpointing),
        bf16=bf16,
        fp16=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=cfg.report_to,
        model_init_kwargs=model_kwargs,
        dataloader_pin_memory=_cuda_available(),
        use_cpu=not _cuda_available(),  # without it, ranks on a CPU machine would each train alone
    )
    return args


def build_trainer(
    cfg: DistillConfig,
    student_path: Path,
    tokenizer,
    examples,
    output_dir: Path,
    callbacks: list | None = None,
    args=None,
):
    """The SFTTrainer for these pre-tokenized examples (also used by bench/distill_throughput.py)."""
    from datasets import Dataset
    from trl import SFTTrainer

    args = args if args is not None else sft_config(cfg, output_dir)
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        targets = (
            cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
        )
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
    dataset = Dataset.from_dict(
        {"input_ids": [ids for ids, _ in examples], "completion_mask": [m for _, m in examples]}
    )
    trainer = SFTTrainer(
        model=str(student_path),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    from transformers.trainer_callback import ProgressCallback

    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_progress_callback_class()())
    return trainer


# ---------------------------------------------------------------- outputs


def _data_label(file: str | Path) -> str:
    """A data file as a reader knows it: the folder for the generic names generate and mix write
    (outputs/x/data/ta/data.correct.jsonl -> "ta data"), else the file's name."""
    f = Path(file)
    stem = f.name.split(".")[0]
    if stem == "data" and f.parent.name not in ("", ".", "data"):
        return f"{f.parent.name} data"
    return f.name


def loss_title(student: str | Path, data: list[str], seed: int) -> str:
    """The loss plot's title: what was trained on what, with which seed ("student on ta data, seed 1")."""
    labels = [_data_label(f) for f in data]
    what = " + ".join(labels) if len(labels) <= 3 else f"{len(labels)} data files ({labels[0]}, …)"
    return f"{Path(str(student)).name or student} on {what}, seed {seed}"


def plot_loss(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 40 else None, lw=1.5)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no "2.5"
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens, nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})  # the title readable without looking
    plt.close(fig)


def _restore_special_ids(student: Path, final: Path) -> None:
    """Keep the student's own eos/bos/pad ids: the Trainer aligns the config with the tokenizer's
    eos, which for some chat models (Qwen2's <|endoftext|> vs <|im_end|>) is not the stop token."""
    for name in ("config.json", "generation_config.json"):
        src, dst = student / name, final / name
        if not src.is_file():
            continue
        if name == "generation_config.json" or not dst.is_file():
            shutil.copyfile(src, dst)
            continue
        s, d = json.loads(src.read_text()), json.loads(dst.read_text())
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if key in s:
                d[key] = s[key]
        dst.write_text(json.dumps(d, indent=2) + "\n")


def _merge_lora(student: Path, adapter: Path, dst: Path, dtype: str) -> None:
    """Base + adapter -> one full model. Done once on the main process from the saved adapter,
    so it works the same whether training ran on a CPU, one GPU, FSDP or ZeRO-3."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(student, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(dst, safe_serialization=True)


# ---------------------------------------------------------------- the stage


# Options that only say where, how often or whether to keep: not part of what the student is.
_NOT_IDENTITY = {
    "out",
    "force",
    "resume",
    "student",
    "data",
    "keep_checkpoints",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "report_to",
}


def distill(cfg: DistillConfig, echo: Callable[[str], None] = print) -> Path:
    """Fine-tune `cfg.student` on `cfg.data`; returns the output folder.

    The output and its work folder follow the ownership rule (micota_merge.core.ownership): a foreign
    OUT or OUT.work/ is refused, and one process at a time writes them (rank 0 holds the lock)."""
    from micota_merge.core.artifacts import sha256_file
    from micota_merge.core.checkpoints import check_model_files, resolve_model_path
    from micota_merge.data.questions import check_utf8

    out = Path(cfg.out)
    work = out.parent / f"{out.name}.work"
    # -- setup: refuse early, before any model is loaded
    student = resolve_model_path(cfg.student, "--student")
    student_meta = check_model_files(student, "--student")
    for f in cfg.data:
        if Path(f).is_dir():
            raise UserError(f"--data: {f} is a folder; give JSONL files of chat records")
        if not Path(f).is_file():
            raise UserError(f"--data: {f} does not exist")
        check_utf8(f)  # before OUT.work/ exists; the records themselves are parsed once, in _distill
    inputs = {"--student": student, **{f"--data {f}": f for f in cfg.data}}
    claimed = claim(out, "distill", inputs=inputs, option="--out")
    identity = identity_of(
        {
            "options": {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IDENTITY},
            "student": student_meta.fingerprint()["content"],
            "data": [sha256_file(f) for f in cfg.data],
        }
    )
    if claimed.same(identity):
        echo(
            f"already distilled: {out} holds this student trained on data of the same content with the same "
            "options; nothing to do"
        )
        return out
    if claimed.state == "ours":
        check_replaceable(out, "--out")  # before hours of training, not after
    if claimed.state == "ours" and not cfg.force:
        raise UserError(
            f"output {out} already exists and holds a student distilled from other data or options: "
            "pass --force to replace "
            "it, or choose another --out"
        )
    if distributed_rank() == 0 and claimed.state != "ours":
        # The floor, not an estimate: the final weights plus one checkpoint's weights. A checkpoint's
        # optimizer state (2x fp32 per trained parameter for AdamW) comes on top; LoRA trains far fewer.
        weights = student_meta.n_bytes(None if cfg.dtype == "auto" else cfg.dtype)
        check_free_space(
            out.parent, 2 * weights, f"{out} and its checkpoints in {work}", "free space, or choose another --out"
        )
    with output_lock(out, "distill", log=echo) if distributed_rank() == 0 else contextlib.nullcontext():
        if distributed_rank() == 0:
            claim_workdir(work, "distill", out, inputs=inputs, option="--out", create=False)
        try:
            return _distill(cfg, echo, student, student_meta, identity, inputs)
        except Exception as e:
            # torch.save and safetensors report a full disk as RuntimeError / SafetensorError, not OSError
            if isinstance(e, UserError) or not disk_full(e, work):
                raise
            raise UserError(
                f"no space left on the disk holding {work} ({free_mib(work)} MiB free) while distill "
                f"wrote its checkpoints or model: free space there (or give --out on a bigger disk), "
                f"then run the same command with --resume to continue from the last complete "
                f"checkpoint"
            ) from None


def _check_attn_implementation(cfg: DistillConfig) -> None:
    if cfg.attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "attn_implementation flash_attention_2 needs the flash-attn package (pip install "
                "flash-attn, GPU only); or pass --attn-implementation sdpa"
            )


def _refuse_earlier_checkpoints(cfg: DistillConfig, ckpt_dir: Path) -> None:
    """An earlier run's checkpoints are neither resumed nor thrown away unless the user says which."""
    existing = last_complete_checkpoint(ckpt_dir)
    if existing and not cfg.resume and not cfg.force:
        raise UserError(
            f"{ckpt_dir} holds checkpoints of an earlier run (newest {existing.name}): pass --resume "
            f"to continue it, or --force to start over"
        )


def _training_data(cfg: DistillConfig, student: Path, echo) -> tuple[Any, list, DataReport]:
    """The student's tokenizer and the examples it learns, refused when filtering leaves none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    examples, report = prepare_examples(
        tokenizer,
        cfg.data,
        cfg.max_length,
        cfg.overlong,
        cfg.keep_incorrect,
        cfg.limit,
        cfg.template_system,
        cfg.chat_template_kwargs,
    )
    if not examples:
        raise UserError(
            f"nothing left to train on after filtering: {report.summary()} "
            f"(see --keep-incorrect, --max-length, --overlong truncate)"
        )
    echo(f"data: {report.summary()}")
    return tokenizer, examples, report


def _clear_workdir(cfg: DistillConfig, work: Path, out: Path) -> None:
    """What an earlier, interrupted run left that must not become part of this one (main process only)."""
    if cfg.force and not cfg.resume:
        remove_ours(work, "distill")
    _drop_incomplete_checkpoints(work / "checkpoints")
    shutil.rmtree(work / "final", ignore_errors=True)
    shutil.rmtree(work / "adapter", ignore_errors=True)
    claim_workdir(work, "distill", out, option="--out")


def _resume_checkpoint(cfg: DistillConfig, work: Path, student_meta, report: DataReport, main: bool, echo):
    """The checkpoint --resume continues from (None without --resume or before the first one).
    The checkpoints must belong to this very run, so run.json records what it is."""
    from micota_merge.core.artifacts import write_json_atomic

    ckpt_dir = work / "checkpoints"
    run_file = work / "run.json"
    # identity by content: the student's weights and the data's bytes, not their paths
    run_id = {
        "options": {**{k: getattr(cfg, k) for k in _RESUME_KEYS}, **template_switches(cfg.chat_template_kwargs)},
        "student_content": student_meta.fingerprint()["content"],
        "data": [{"sha256": f["sha256"]} for f in report.files],
    }
    resume_from = last_complete_checkpoint(ckpt_dir) if cfg.resume else None
    if resume_from is not None and run_file.is_file():
        _refuse_another_run(json.loads(run_file.read_text()), run_id, ckpt_dir)
    if main:
        write_json_atomic(run_file, run_id)
    if cfg.resume:
        echo(f"resuming from {resume_from}" if resume_from else "--resume: no checkpoint yet, starting at step 0")
    return resume_from


def _refuse_another_run(before: dict, run_id: dict, ckpt_dir: Path) -> None:
    if changed(before, run_id):
        diff = changed(before.get("options"), run_id["options"])
        what = (
            f"options {', '.join(diff)}"
            if diff
            else describe(
                before,
                run_id,
                {
                    "student_content": "student (its weights, config or tokenizer changed)",
                    "data": "data files (content changed)",
                },
            )
        )
        raise UserError(
            f"--resume: the checkpoints in {ckpt_dir} come from a run with different {what}; "
            f"rerun with the same options, or --force without --resume to start over"
        )


def _complete_model(cfg: DistillConfig, student: Path, tokenizer, work: Path, dtype: str) -> Path:
    """work/final as a model folder of its own: full weights, the tokenizer, the student's special ids."""
    final = work / "final"
    if cfg.lora:
        _merge_lora(student, work / "adapter", final, dtype)
        if cfg.save_adapter:
            shutil.copytree(work / "adapter", final / "adapter")
    tokenizer.save_pretrained(final)
    _restore_special_ids(student, final)
    for junk in ("training_args.bin", "README.md"):  # Trainer's run files, not part of a model
        if (final / junk).is_file():
            (final / junk).unlink()
    return final


def _run_results(trainer, counter, result, resume_from: Path | None, train_seconds: float, world_size: int) -> dict:
    """The manifest's `results`: where training ended and how fast this process got there."""
    losses = [h for h in trainer.state.log_history if "loss" in h]
    tps = [h["tokens_per_second"] for h in losses if "tokens_per_second" in h]
    tokens_run = losses[-1].get("num_tokens") if losses else None
    return {
        "global_step": trainer.state.global_step,
        "steps_this_run": counter.steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "mean_train_loss": result.training_loss,
        "epochs": trainer.state.epoch,
        "train_seconds_this_run": round(train_seconds, 2),
        "tokens_this_run": tokens_run,
        "tokens_per_second": round(tokens_run / train_seconds, 1) if tokens_run else None,
        "tokens_per_second_logged_mean": round(sum(tps) / len(tps), 1) if tps else None,
        "world_size": world_size,
    }


def _write_records(
    final: Path,
    cfg: DistillConfig,
    history: list[dict],
    results: dict,
    student_meta,
    report: DataReport,
    started: str,
    identity: str,
) -> None:
    """The loss plot, the log history, the model card and the manifest beside the weights."""
    from micota_merge.core import cards
    from micota_merge.core.artifacts import now, write_json_atomic, write_manifest

    plot_loss(history, final / "loss.png", loss_title(cfg.student, cfg.data, cfg.seed))  # as the user named it
    write_json_atomic(final / "train_log.json", history)
    write_manifest(
        final,
        "distill",
        options=cfg.model_dump(),
        inputs={"student": student_meta.fingerprint(), "data": report.files},
        data=report.__dict__ | {"files": None},
        results=results,
        started=started,
        finished=now(),
        identity=identity,  # write_manifest records the versions
    )
    cards.write_student_card(final)  # from the manifest just written


def _publish(cfg: DistillConfig, final: Path, out: Path, work: Path, inputs: dict) -> None:
    """Renames the finished model to `out` in one step, so `out` is either absent or complete."""
    from micota_merge.core.artifacts import move_into_place

    claimed = claim(out, "distill", inputs=inputs, option="--out")  # ours or new: we hold the lock
    if claimed.state == "ours" and not cfg.force:
        raise UserError(f"output {out} appeared during training: pass --force to replace it")
    move_into_place(final, out)
    if not cfg.keep_checkpoints:
        remove_ours(work, "distill")


def _distill(cfg: DistillConfig, echo, student: Path, student_meta, identity: str, inputs: dict) -> Path:
    """`distill` once OUT is claimed and locked: train, then put the finished model in place."""
    from micota_merge.core.artifacts import now

    started = now()
    out = Path(cfg.out)
    work = out.parent / f"{out.name}.work"
    ckpt_dir = work / "checkpoints"
    _check_attn_implementation(cfg)

    from accelerate import PartialState

    args = sft_config(cfg, ckpt_dir)  # first: it initialises the process group under torchrun / accelerate
    state = PartialState()
    main = state.is_main_process
    _refuse_earlier_checkpoints(cfg, ckpt_dir)
    tokenizer, examples, report = _training_data(cfg, student, echo)
    if main:
        _clear_workdir(cfg, work, out)
    state.wait_for_everyone()
    resume_from = _resume_checkpoint(cfg, work, student_meta, report, main, echo)

    counter = _step_counter_class()()
    trainer = build_trainer(cfg, student, tokenizer, examples, ckpt_dir, callbacks=[counter], args=args)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - t0

    # Every rank saves (FSDP / ZeRO-3 gather the weights); the main process finishes alone.
    dtype, _ = resolve_dtype(cfg.dtype)
    trainer.save_model(str(work / "adapter") if cfg.lora else str(work / "final"))
    state.wait_for_everyone()
    if main:
        final = _complete_model(cfg, student, tokenizer, work, dtype)
        results = _run_results(trainer, counter, result, resume_from, train_seconds, state.num_processes)
        _write_records(final, cfg, trainer.state.log_history, results, student_meta, report, started, identity)
        _publish(cfg, final, out, work, inputs)
        losses = [h for h in trainer.state.log_history if "loss" in h]
        loss_txt = f"{losses[-1]['loss']:.4f}" if losses else "n/a"
        echo(f"wrote {out} (step {trainer.state.global_step}, final loss {loss_txt}, {train_seconds:.0f} s this run)")
    state.wait_for_everyone()
    return out
