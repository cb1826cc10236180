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

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
DATA_DIR = TASK_DIR / "data"

# The papers' order: hardest first.
BENCHMARKS = ("aime24", "amc23", "olympiadbench", "math500", "gsm8k")
# Not one of the papers' five (so not in `all` / micota_math): the micro world's held-out
# questions (micota_merge/assets/microworld), the embedded demo's benchmark.
EXTRA_TASKS = ("microworld",)
ALL_TASKS = BENCHMARKS + EXTRA_TASKS
PREFIX = "micota_"
GROUP = "micota_math"

# Where each benchmark keeps its gold answer (raw; grading.parse_gold reads every form).
# The question is `question` everywhere except MATH-500's `problem`.
GOLD_FIELD = {"aime24": "answer", "amc23": "answer", "olympiadbench": "final_answer",
              "math500": "answer", "gsm8k": "answer", "microworld": "answer"}

# The papers' zero-shot instruction (Qwen2.5-Math evaluation, MiCoTA, Mix Distillation).
PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def task_name(benchmark: str) -> str:
    return PREFIX + benchmark


def benchmark_of(task: str) -> str:
    return task[len(PREFIX):] if task.startswith(PREFIX) else task
