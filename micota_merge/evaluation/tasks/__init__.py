"""The five benchmarks the MiCoTA papers report, as lm-evaluation-harness tasks.

This folder is `eval/` in the repository and the package `micota_merge.evaluation.tasks` once
installed; the tasks read their data from `data/<benchmark>/test.jsonl` beside this file,
so they work offline wherever the package lives.

Task names carry a `micota_` prefix (`micota_gsm8k`, ...) because lm-eval already ships
tasks called `aime24`, `gsm8k` and `math500` with other prompts and metrics; an unprefixed
name would silently override them (or be overridden) for anyone passing `--include_path`.
`micota-merge eval --tasks` takes the short names.

Plain lm-eval works too:
    lm_eval --model hf --model_args pretrained=DIR --include_path eval \\
            --tasks micota_math --apply_chat_template --log_samples --output_path out
"""

from __future__ import annotations

# What each benchmark is (data, fields, prompt, gold format, r1's k) is in the registry,
# micota_merge.evaluation.benchmarks; these names are its view at import time.
from micota_merge.evaluation.benchmarks import GROUP, PREFIX, PROMPT, TASK_DIR, benchmark_of, names, papers, task_name

DATA_DIR = TASK_DIR / "data"

# The papers' order: hardest first.
BENCHMARKS = papers()
# Not one of the papers' (so not in `all` / micota_math): the micro world's held-out questions.
EXTRA_TASKS = tuple(b for b in names() if b not in BENCHMARKS)
ALL_TASKS = BENCHMARKS + EXTRA_TASKS

__all__ = [
    "ALL_TASKS",
    "BENCHMARKS",
    "DATA_DIR",
    "EXTRA_TASKS",
    "GROUP",
    "PREFIX",
    "PROMPT",
    "TASK_DIR",
    "benchmark_of",
    "task_name",
]
