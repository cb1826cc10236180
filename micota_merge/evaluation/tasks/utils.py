"""Functions the task YAMLs reach with `!function utils.<name>`.

Data: each task loads its benchmark's JSONL (`micota_merge.evaluation.benchmarks`: the registry
that says, per benchmark, its file, question and gold fields, prompt and gold format) with the
`json` dataset builder, so no network and no dependence on where the package is installed.
The per-benchmark functions the YAMLs name (`load_<name>`, `doc_to_text_<name>`,
`doc_to_target_<name>`, `process_results_<name>`) are made for every registered benchmark on
first access (`__getattr__` below), so a new benchmark needs no code here.

Samples: a task may draw k answers per question (`repeats: k`, with the filter
`take_first_k` keeping all k; `micota-merge eval --samples/--protocol` sets both). Each
answer is graded on its own; the metrics of one question are over its k answers:
- `accuracy`: the share of correct answers (`micota_merge.evaluation.grading`, the one grader for every
  stage); its mean over questions is avg@k, and with one greedy answer the papers' pass@1.
- `pass@k` for k = 1, 2, 4, ..., n (unbiased estimator) and `maj@n` (majority vote over the
  extracted answers, equivalence by the grader): only when n > 1 (`sample_metrics`).
- `mean_tokens`: the response's length in tokens as the generator counted it
  (`micota_merge.core.lengths`, the one definition `generate` and the sweep use too: the generated
  ids up to and including the stop token; a server's `usage.completion_tokens`);
  `mean_thinking_tokens` / `mean_answer_tokens`: the part up to and including `</think>`
  (or the model's own end-of-thinking tag) and the part after it; only the part after it
  is graded (`grading.split_thinking`; a chat template that opens `<think>` in the prompt,
  as R1-distill's does, is detected from the tokenizer).
- `truncated`: the share of answers the generator ended at the length cap (its own
  `finish_reason` "length": vLLM's, the server's, or transformers reaching max_new_tokens
  without a stop token), not a re-count of the text.
`micota-merge eval` runs lm-eval's models through thin subclasses whose responses carry
that finish reason and count (`lengths.Answer`). Stock lm-eval models (plain `lm_eval`)
report neither: then the response is re-tokenized, and counted as truncated when that
count reaches the cap (`max_gen_toks` from the task's metadata), an estimate that can
differ from the generation steps (a random tiny model's 16 newlines re-tokenize as 1);
those samples have `finish_reason` null.
The tokenizer (for the thinking/answer split, and the fallback count) comes from the run's
metadata: `micota-merge eval` passes `tokenizer=<model>`; the `lm_eval` CLI merges
`--model_args` (so `pretrained=...`) into the metadata itself. Without one, the split is by
characters, and without a count from the generator either the token metrics are left out
and a warning says why.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from micota_merge.core import lengths
from micota_merge.evaluation import benchmarks, grading, scoring
from micota_merge.evaluation.benchmarks import PROMPT

LOG = logging.getLogger("micota_merge.evaluation.tasks")

# lm-eval imports this file by path (module name = the path), so a user-copied eval/ folder
# still reads the data next to it; the installed package's data is the fallback.
_HERE = Path(__file__).resolve().parent
_DATA_ROOT = _HERE if (_HERE / "data").is_dir() else benchmarks.TASK_DIR
DATA_DIR = _DATA_ROOT / "data"

_tokenizer_lock = threading.Lock()
_tokenizer = None
_tokenizer_source: str | None = None
_thinking_open = False  # the chat template's generation prompt opens a think block
_warned_no_tokenizer = False
# the length cap of each benchmark's answers (task metadata `max_gen_toks`)
_max_gen_toks: dict[str, int] = {}


# ------------------------------------------------------------------------------------ data


def data_file(benchmark: str) -> Path:
    path = benchmarks.get(benchmark).data_file(_DATA_ROOT)
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark data {path} is missing: reinstall micota-merge "
            f"(the data ships in eval/data/) or restore the file"
        )
    return path


def load_benchmark(benchmark: str, **metadata):
    """custom_dataset for every task: {"test": the benchmark's rows}."""
    import datasets

    set_tokenizer(metadata.get("tokenizer") or metadata.get("pretrained"))
    if metadata.get("max_gen_toks"):
        _max_gen_toks[benchmark] = int(metadata["max_gen_toks"])
    return datasets.load_dataset("json", data_files={"test": str(data_file(benchmark))})


def _loader(benchmark: str):
    def load(**metadata):
        return load_benchmark(benchmark, **metadata)

    load.__name__ = f"load_{benchmark}"
    return load


def doc_to_text(doc: dict) -> str:
    """The template's default: the papers' prompt around `question` (or `problem`)."""
    question = doc.get("question") if doc.get("question") is not None else doc.get("problem")
    return PROMPT.replace("{question}", question.strip())


def prompt_text(doc: dict, benchmark: str) -> str:
    """The user turn of one question: the benchmark's prompt, or the bare question (prompt None)."""
    entry = benchmarks.get(benchmark)
    question = doc[entry.question_field].strip()
    return question if entry.prompt is None else entry.prompt.replace("{question}", question)


def _doc_to_text(benchmark: str):
    def doc_to_text(doc: dict) -> str:
        return prompt_text(doc, benchmark)

    doc_to_text.__name__ = f"doc_to_text_{benchmark}"
    return doc_to_text


def grader_benchmark(benchmark: str):
    """A benchmark without a gold format of its own (the micro world's) is graded by the generic rules."""
    return benchmarks.get(benchmark).grader


def gold_of(doc: dict, benchmark: str):
    """The gold as grading.parse_gold reads it: the raw field; where the benchmark has a tolerance
    field (OlympiadBench's `error`, e.g. "1e-1") the answers with it, which the grader honours."""
    entry = benchmarks.get(benchmark)
    if entry.tolerance_field:
        return {"final_answer": doc[entry.gold_field], "error": doc.get(entry.tolerance_field)}
    return doc[entry.gold_field]


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
    """Load (once) the tokenizer that the token metrics count with."""
    global _tokenizer, _tokenizer_source, _thinking_open
    if not source:  # a model with no local tokenizer (a hosted one): an earlier run's would count wrong
        with _tokenizer_lock:
            _tokenizer, _tokenizer_source, _thinking_open = None, None, False
        return
    if str(source) == _tokenizer_source:
        return
    from transformers import AutoTokenizer

    with _tokenizer_lock:
        _tokenizer = AutoTokenizer.from_pretrained(str(source))
        _tokenizer_source = str(source)
        _thinking_open = template_opens_thinking(_tokenizer)


def template_opens_thinking(tokenizer) -> bool:
    """Does the chat template end its generation prompt inside `<think>` (R1-distill)?"""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that cannot render a plain turn: lm-eval will say so
        return False
    return grading.prompt_opens_thinking(prompt)


def count_tokens(text: str) -> int | None:
    global _warned_no_tokenizer
    if _tokenizer is None:
        if not _warned_no_tokenizer:
            LOG.warning(
                "mean_tokens needs the model's tokenizer: pass metadata tokenizer=<path> "
                "(micota-merge eval does) or --model_args pretrained=<path>; leaving it out"
            )
            _warned_no_tokenizer = True
        return None
    return len(_tokenizer(text, add_special_tokens=False)["input_ids"])


def sample_metrics(n: int, benchmark: str | None = None) -> list[str]:
    """The metrics a task with n samples per question reports (its metric_list); a benchmark with a
    whole-answer verifier also reports how many answers are right in their chain and in its numbers."""
    names = ["accuracy"]
    if benchmark is not None and benchmarks.get(benchmark).verifier is not None:
        names += list(benchmarks.VERIFIED_METRICS)
    if n > 1:
        names += [f"pass@{k}" for k in scoring.pass_ks(n)] + [f"maj@{n}"]
    return names + ["mean_tokens", "mean_thinking_tokens", "mean_answer_tokens", "truncated"]


def score(response: str, doc: dict, benchmark: str) -> dict:
    """One answer: pred, correct, and its lengths (None where neither the generator nor a tokenizer
    can tell)."""
    thinking, _, finished = grading.split_thinking(response, _thinking_open)
    graded = grading.grade(response, gold_of(doc, benchmark), grader_benchmark(benchmark), _thinking_open)
    # what the generator said (lengths.Answer); a stock lm-eval model says nothing: the documented estimate
    reason = getattr(response, "finish_reason", None)
    num = getattr(response, "num_tokens", None)
    if num is None:
        num = count_tokens(response)
    estimated = lengths.estimate(num, _max_gen_toks.get(benchmark)) if reason is None else reason
    truncated = None if estimated is None else estimated == lengths.LENGTH
    out = {
        "pred": graded["pred"],
        "correct": bool(graded["correct"]),
        "num_tokens": num,
        "thinking_tokens": None,
        "answer_tokens": None,
        "thinking_finished": finished,
        "finish_reason": reason,
        "truncated": truncated,
    }
    verify = benchmarks.verifier(benchmark)
    if verify is not None:  # the whole chain as well as its final answer (the micro world's own check)
        verdict = verify(doc[benchmarks.get(benchmark).question_field], str(response), gold_of(doc, benchmark))
        out.update({metric: bool(verdict[key]) for metric, key in benchmarks.VERIFIED_METRICS.items()})
    if num is not None:
        # the answer part is the rest: the two add up to the whole, and a 32k-token response is
        # tokenized twice rather than three times
        counter = count_tokens if _tokenizer is not None else None
        out["thinking_tokens"] = lengths.split_tokens(num, thinking, len(response), counter)
        out["answer_tokens"] = num - out["thinking_tokens"]
    return out


def responses_of(results: list) -> list[str]:
    """The k answers of one question, from `take_first_k` (a list) or lm-eval's default
    `take_first` (one string)."""
    if len(results) == 1 and isinstance(results[0], (list, tuple)):
        results = results[0]
    # an answer that is already a string is kept as it is: it may carry its finish reason and count
    return [r if isinstance(r, str) else str(r) for r in results]


def question_metrics(samples: list[dict], benchmark: str) -> dict:
    """The metrics of one question from its scored samples (see the module docstring)."""
    n = len(samples)
    correct = sum(s["correct"] for s in samples)
    out = {"accuracy": correct / n}
    if n > 1:
        for k in scoring.pass_ks(n):
            out[f"pass@{k}"] = scoring.pass_at_k(n, correct, k)
        bench = grader_benchmark(benchmark)
        winner = scoring.majority([s["pred"] for s in samples], lambda a, b: grading.equivalent(a, b, bench))
        out[f"maj@{n}"] = float(winner is not None and samples[winner]["correct"])
    for key, name in (
        ("num_tokens", "mean_tokens"),
        ("thinking_tokens", "mean_thinking_tokens"),
        ("answer_tokens", "mean_answer_tokens"),
    ):
        if all(s[key] is not None for s in samples):
            out[name] = sum(s[key] for s in samples) / n
    if all(s["truncated"] is not None for s in samples):
        out["truncated"] = sum(s["truncated"] for s in samples) / n
    for metric in benchmarks.VERIFIED_METRICS:  # each answer's verdict, under the metric's name
        if all(s.get(metric) is not None for s in samples):
            out[metric] = sum(s[metric] for s in samples) / n
    return out


def _process_results(benchmark: str):
    def process_results(doc: dict, results: list) -> dict:
        return question_metrics([score(r, doc, benchmark) for r in responses_of(results)], benchmark)

    process_results.__name__ = f"process_results_{benchmark}"
    return process_results


# One named function per benchmark (YAML `!function` needs a plain attribute name), made for any
# registered benchmark when lm-eval (or anyone) asks for it.
_MAKERS = {
    "load_": _loader,
    "doc_to_text_": _doc_to_text,
    "doc_to_target_": _doc_to_target,
    "process_results_": _process_results,
}


def __getattr__(name: str):
    for prefix, make in _MAKERS.items():
        if name.startswith(prefix) and name[len(prefix) :] in benchmarks.names():
            fn = make(name[len(prefix) :])
            globals()[name] = fn
            return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
