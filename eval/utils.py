"""Functions the task YAMLs reach with `!function utils.<name>`.

Data: each task loads `data/<benchmark>/test.jsonl` (beside this file) with the `json`
dataset builder, so no network and no dependence on where the package is installed.

Metrics, per response:
- `accuracy`: 1.0 when `micota_merge.grading.is_correct(response, gold, benchmark)` says so.
  One grader for every stage: the scores here are the ones `generate` filters with.
- `mean_tokens`: the response's length in the evaluated model's own tokens (the decoded
  response, as lm-eval kept it after stop sequences, re-tokenized without special tokens).
  The tokenizer comes from the run's metadata: `micota-merge eval` passes `tokenizer=<model>`;
  the `lm_eval` CLI merges `--model_args` (so `pretrained=...`) into the metadata itself.
  Without either, `mean_tokens` is left out and a warning says why.
  Re-tokenizing counts what the answer says, the same way for the hf and vllm backends; it
  can differ from the number of generation steps where the model spelled out, token by
  token, a string its tokenizer merges (a random tiny model's 16 newlines count as 1).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from micota_merge import grading
from micota_merge.tasks import DATA_DIR as _PACKAGE_DATA, EXTRA_TASKS, GOLD_FIELD, PROMPT

LOG = logging.getLogger("micota_merge.tasks")

# lm-eval imports this file by path (module name = the path), so a user-copied eval/ folder
# still reads the data next to it; the installed package's data is the fallback.
_HERE_DATA = Path(__file__).resolve().parent / "data"
DATA_DIR = _HERE_DATA if _HERE_DATA.is_dir() else _PACKAGE_DATA

_tokenizer_lock = threading.Lock()
_tokenizer = None
_tokenizer_source: str | None = None
_warned_no_tokenizer = False


# ------------------------------------------------------------------------------------ data


def data_file(benchmark: str) -> Path:
    if benchmark == "microworld":
        from micota_merge.microworld import ASSETS

        return ASSETS / "heldout.jsonl"
    path = DATA_DIR / benchmark / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data {path} is missing: reinstall micota-merge "
                                f"(the data ships in eval/data/) or restore the file")
    return path


def load_benchmark(benchmark: str, **metadata):
    """custom_dataset for every task: {"test": the benchmark's rows}."""
    import datasets

    set_tokenizer(metadata.get("tokenizer") or metadata.get("pretrained"))
    return datasets.load_dataset("json", data_files={"test": str(data_file(benchmark))})


def _loader(benchmark: str):
    def load(**metadata):
        return load_benchmark(benchmark, **metadata)

    load.__name__ = f"load_{benchmark}"
    return load


def doc_to_text(doc: dict) -> str:
    question = doc.get("question") if doc.get("question") is not None else doc.get("problem")
    return PROMPT.format(question=question.strip())


def doc_to_text_bare(doc: dict) -> str:
    """The micro world's experts were trained on the bare question as the user turn."""
    return doc["question"].strip()


def grader_benchmark(benchmark: str):
    """Extra tasks have no gold format of their own: the grader's generic rules apply."""
    return None if benchmark in EXTRA_TASKS else benchmark


def gold_of(doc: dict, benchmark: str):
    """The gold as grading.parse_gold reads it: the raw field; for OlympiadBench the answers
    with their numerical tolerance (`error`, e.g. "1e-1"), which the grader honours."""
    if benchmark == "olympiadbench":
        return {"final_answer": doc["final_answer"], "error": doc.get("error")}
    return doc[GOLD_FIELD[benchmark]]


def target_text(gold, benchmark: str) -> str:
    """The gold as the grader reads it, for the per-sample logs' `target`."""
    return ", ".join(grading.parse_gold(gold, grader_benchmark(benchmark)))


def _doc_to_target(benchmark: str):
    def doc_to_target(doc: dict) -> str:
        return target_text(gold_of(doc, benchmark), benchmark)

    doc_to_target.__name__ = f"doc_to_target_{benchmark}"
    return doc_to_target


# --------------------------------------------------------------------------------- metrics


def set_tokenizer(source) -> None:
    """Load (once) the tokenizer that `mean_tokens` counts with."""
    global _tokenizer, _tokenizer_source
    if not source:  # a model with no local tokenizer (a hosted one): an earlier run's would count wrong
        with _tokenizer_lock:
            _tokenizer, _tokenizer_source = None, None
        return
    if str(source) == _tokenizer_source:
        return
    from transformers import AutoTokenizer

    with _tokenizer_lock:
        _tokenizer = AutoTokenizer.from_pretrained(str(source))
        _tokenizer_source = str(source)


def count_tokens(text: str) -> int | None:
    global _warned_no_tokenizer
    if _tokenizer is None:
        if not _warned_no_tokenizer:
            LOG.warning("mean_tokens needs the model's tokenizer: pass metadata tokenizer=<path> "
                        "(micota-merge eval does) or --model_args pretrained=<path>; leaving it out")
            _warned_no_tokenizer = True
        return None
    return len(_tokenizer(text, add_special_tokens=False)["input_ids"])


def score(response: str, doc: dict, benchmark: str) -> dict:
    """The per-response record behind both metrics: pred, correct, num_tokens."""
    graded = grading.grade(response, gold_of(doc, benchmark), grader_benchmark(benchmark))
    return {"pred": graded["pred"], "correct": bool(graded["correct"]), "num_tokens": count_tokens(response)}


def _process_results(benchmark: str):
    def process_results(doc: dict, results: list[str]) -> dict:
        s = score(results[0], doc, benchmark)
        out = {"accuracy": float(s["correct"])}
        if s["num_tokens"] is not None:
            out["mean_tokens"] = float(s["num_tokens"])
        return out

    process_results.__name__ = f"process_results_{benchmark}"
    return process_results


# One named function per benchmark: YAML `!function` needs a plain attribute name.
load_aime24, load_amc23, load_olympiadbench, load_math500, load_gsm8k, load_microworld = (
    _loader(b) for b in ("aime24", "amc23", "olympiadbench", "math500", "gsm8k", "microworld"))
doc_to_target_microworld = _doc_to_target("microworld")
process_results_microworld = _process_results("microworld")
doc_to_target_aime24, doc_to_target_amc23, doc_to_target_olympiadbench, doc_to_target_math500, \
    doc_to_target_gsm8k = (_doc_to_target(b) for b in ("aime24", "amc23", "olympiadbench", "math500", "gsm8k"))
process_results_aime24, process_results_amc23, process_results_olympiadbench, process_results_math500, \
    process_results_gsm8k = (_process_results(b) for b in ("aime24", "amc23", "olympiadbench", "math500", "gsm8k"))
