"""The benchmark registry: everything the Python code knows about a benchmark, in one entry.

Read by the lm-eval task functions (`tasks/utils.py`: data file, prompt, question and gold
fields), the grader (`grading.py`: which gold format and extraction fallback), `eval`
(`evaluate.py`: the task names, `all`, the r1 protocol's k) and the question sets of
`generate` and the sweep probe (`data/questions.py`). The lm-eval task YAMLs stay (lm-eval
reads them), one per benchmark, each `include:`-ing `tasks/_template.yaml`.

Adding a benchmark: its data JSONL, its task YAML and one `register_benchmark(...)` call
(below for the shipped ones; from a user's code for one that lives in its own folder, with
`task_dir` where its YAML is). docs/extending.md says how.

This module imports nothing of the package, so every layer can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TASK_DIR = Path(__file__).resolve().parent / "tasks"
PREFIX = "micota_"  # lm-eval task names: micota_<benchmark> (lm-eval ships its own gsm8k, aime24, ...)
GROUP = "micota_math"  # the papers' table: their benchmarks and the plain average (tasks/micota_math.yaml)

# The papers' zero-shot instruction (Qwen2.5-Math evaluation, MiCoTA, Mix Distillation, DeepSeek-R1);
# only {question} is filled in (by str.replace: the prompt holds \boxed{} braces).
PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."

# Gold formats: how grading.parse_gold reads a gold and which fallback extract_answer uses
# when a response has neither a box nor a final-answer phrase.
NUMBER = "number"  # GSM8K: the solution text with the answer after "####", or a bare number;
# commas dropped; falls back to the response's last number
LATEX = "latex"  # one LaTeX answer (a float such as 27.0 reads "27"); falls back to a
# concluding sentence
LATEX_LIST = "latex_list"  # OlympiadBench: one or several LaTeX answers, all required (a list, or
# split on top-level commas); golds may be lists; falls back as LATEX
GOLD_FORMATS = (NUMBER, LATEX, LATEX_LIST)

# What a benchmark's whole-answer `verifier` is scored as: metric -> the verdict it is the share of
# (the whole chain right; its numbers right), beside `accuracy`, the final answer.
VERIFIED_METRICS = {"chain_accuracy": "chain_right", "values_accuracy": "values_right"}


@dataclass(frozen=True)
class Benchmark:
    name: str
    data: Path  # its JSONL; a relative path is under the task folder (tasks/)
    question_field: str = "question"
    gold_field: str = "answer"
    id_field: Optional[str] = "id"  # None: the row number
    id_prefix: str = ""  # question ids are <id_prefix>-<id>; "" means the name
    gold_format: Optional[str] = LATEX  # None: the grader's generic rules (grading benchmark None)
    tolerance_field: Optional[str] = None  # a numerical tolerance beside the gold (OlympiadBench "error")
    r1_samples: int = 1  # answers per question under `eval --protocol r1`
    prompt: Optional[str] = PROMPT  # the user turn, with {question}; None: the bare question
    paper: bool = False  # one of the papers' benchmarks: in `eval --tasks all` and micota_math
    question_set: bool = True  # a `generate --questions NAME` / `sweep.probe.questions` set
    task_dir: Optional[Path] = None  # folder of its task YAML; None: tasks/
    # how a training question can leak it (data/decontaminate.py): "ngram", a shared word 8-gram;
    # "exact", only the same question (for questions written from templates, which share 8-grams by design)
    contamination: str = "ngram"
    # "module:function" that reads a whole answer against its question: (question, response, gold) ->
    # {"chain_right": bool, "values_right": bool, ...}; eval then scores chain_accuracy and values_accuracy
    # beside accuracy (a synthetic benchmark whose every step can be checked). None: the final answer only
    verifier: Optional[str] = None
    # "module:function" that names a question's group (question -> str or None), e.g. the micro world's
    # difficulty; the pipeline report then gives every model's scores by group. None: no groups
    groups: Optional[str] = None

    @property
    def task(self) -> str:
        return PREFIX + self.name

    @property
    def list_golds(self) -> bool:
        """Whether a gold may be a list of answers, all required."""
        return self.gold_format == LATEX_LIST

    @property
    def grader(self) -> Optional[str]:
        """The benchmark name the grader is given: None where the generic rules apply."""
        return None if self.gold_format is None else self.name

    def data_file(self, task_dir: Optional[Path] = None) -> Path:
        """The data file; a relative one under `task_dir` (default: this package's tasks/)."""
        return self.data if self.data.is_absolute() else (task_dir or TASK_DIR) / self.data

    def yaml_file(self, task_dir: Optional[Path] = None) -> Path:
        return (self.task_dir or task_dir or TASK_DIR) / f"{self.name}.yaml"


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(name: str, data: str | Path, **fields) -> Benchmark:
    """Add (or replace) a benchmark; `fields` are Benchmark's. Returns the entry."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"benchmark name {name!r}: lower-case letters, digits and _ only")
    fmt = fields.get("gold_format", LATEX)
    if fmt is not None and fmt not in GOLD_FORMATS:
        raise ValueError(f"benchmark {name}: gold_format {fmt!r}; use one of {', '.join(GOLD_FORMATS)} or None")
    if int(fields.get("r1_samples", 1)) < 1:
        raise ValueError(f"benchmark {name}: r1_samples must be at least 1")
    if fields.get("prompt") is not None and "{question}" not in fields["prompt"]:
        raise ValueError(f"benchmark {name}: the prompt must contain {{question}}")
    if fields.get("contamination", "ngram") not in ("ngram", "exact"):
        raise ValueError(f"benchmark {name}: contamination must be 'ngram' or 'exact'")
    if fields.get("task_dir") is not None:
        fields["task_dir"] = Path(fields["task_dir"])
    if fields.get("verifier") is not None and ":" not in fields["verifier"]:
        raise ValueError(f"benchmark {name}: verifier is 'module:function', got {fields['verifier']!r}")
    entry = Benchmark(name=name, data=Path(data), **fields)
    _REGISTRY[name] = entry
    return entry


def _function(spec: Optional[str]):
    if spec is None:
        return None
    import importlib

    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def verifier(name: str):
    """The benchmark's whole-answer verifier (a function), or None."""
    return _function(get(name).verifier)


def grouper(name: str):
    """The benchmark's question -> group function (its `groups`), or None."""
    return _function(get(name).groups)


def unregister_benchmark(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Benchmark:
    """The entry of a registered benchmark (KeyError naming the registered ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; registered: {', '.join(names())}") from None


def papers() -> tuple[str, ...]:
    """The papers' benchmarks, in the papers' order (hardest first): `eval --tasks all`."""
    return tuple(b for b, e in _REGISTRY.items() if e.paper)


def names() -> tuple[str, ...]:
    """Every registered benchmark: the papers' first, then the others in the order registered."""
    return papers() + tuple(b for b, e in _REGISTRY.items() if not e.paper)


def graded() -> tuple[str, ...]:
    """The benchmarks with a gold format of their own (the grader's valid `benchmark` names)."""
    return tuple(b for b in names() if _REGISTRY[b].gold_format is not None)


def question_sets() -> tuple[str, ...]:
    return tuple(b for b in names() if _REGISTRY[b].question_set)


def task_dirs(task_dir: Optional[Path] = None) -> list[Path]:
    """The folders lm-eval reads task YAMLs from: tasks/ (or `task_dir`) and each registered one's own."""
    first = task_dir or TASK_DIR
    extra = [e.task_dir for e in _REGISTRY.values() if e.task_dir is not None and e.task_dir != first]
    return [first] + list(dict.fromkeys(extra))


def task_name(benchmark: str) -> str:
    return PREFIX + benchmark


def benchmark_of(task: str) -> str:
    return task[len(PREFIX) :] if task.startswith(PREFIX) else task


# ------------------------------------------------------------------------ the shipped ones
# Data, origin and licence: tasks/data/SOURCES.md. r1_samples: DeepSeek-R1's evaluation as
# open-r1 / lighteval run it (64 for the 30- and 40-question sets).

register_benchmark("aime24", "data/aime24/test.jsonl", r1_samples=64, paper=True)
register_benchmark("amc23", "data/amc23/test.jsonl", r1_samples=64, paper=True)
register_benchmark(
    "olympiadbench",
    "data/olympiadbench/test.jsonl",
    gold_field="final_answer",
    gold_format=LATEX_LIST,
    tolerance_field="error",
    r1_samples=4,
    paper=True,
)
register_benchmark(
    "math500", "data/math500/test.jsonl", question_field="problem", id_field=None, r1_samples=4, paper=True
)
register_benchmark(
    "gsm8k", "data/gsm8k/test.jsonl", id_field="idx", id_prefix="gsm8k-test", gold_format=NUMBER, paper=True
)
# The micro world's held-out questions: the embedded demo's benchmark (micota_merge/assets/microworld).
# Its experts were trained on the bare question; its golds are graded by the generic rules. Its
# questions are written from a handful of sentence templates (93 % of its training questions share a
# word 8-gram with a held-out one, none is identical), so only an identical question is a leak.
register_benchmark(
    "microworld",
    Path(__file__).resolve().parents[1] / "assets" / "microworld" / "heldout.jsonl",
    gold_format=None,
    r1_samples=4,
    prompt=None,
    question_set=False,
    contamination="exact",
    verifier="micota_merge.demo.verify:check",
    groups="micota_merge.demo.verify:difficulty",
)
