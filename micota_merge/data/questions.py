"""Question sets, chat formatting and Mix Distillation.

Question records are `{"id", "question", "answer", "benchmark"}`: `answer` is the gold answer
as the grader reads it (GSM8K's `#### N` reduced to `N`, OlympiadBench's list of answers kept as
a list), `benchmark` tells the grader how to parse it (None for a user's own data).

Where questions come from (`load_questions(spec)`):
- a shipped set by name: `gsm8k-train` (the GSM8K train split, 7,473 questions) or a benchmark
  (`gsm8k`, `math500`, `aime24`, `amc23`, `olympiadbench`: every question set of the benchmark
  registry, `micota_merge.evaluation.benchmarks`, which says each one's file and fields);
- a JSONL file, one object per line;
- a Hugging Face dataset saved with `save_to_disk` (a folder; `split` picks from a DatasetDict);
- a Hub dataset, `hf:ORG/NAME[:CONFIG][@SPLIT]` (split `train` unless said), through
  huggingface_hub's cache and `datasets.load_dataset`: downloaded once, read offline from the
  cache after that (with `HF_HUB_OFFLINE=1` only the cache is read). Its identity is the resolved
  revision's snapshot and the content of its files.

Fields are detected as for a file (question: question / problem / prompt / ...; answer: answer /
final_answer / ...); a `solution` field gives its last `\\boxed{}` as the gold answer, and rows that
are chat records (`messages`) give their first user turn as the question and the box of the last
assistant turn as the gold when no answer field exists.

Ids. Shipped sets use the source's own id (`aime24-60`, `gsm8k-test-17`, `math500-<row>`).
A user's file uses `id_field` when given (or an `id` column when there is one); otherwise the id
is `<file stem>-<first 12 hex of sha256(question)>`, so ids survive reordering, filtering and
appending to the file; a question that occurs twice gets `-2`, `-3`, ... in order of occurrence.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from micota_merge.core.errors import UserError
from micota_merge.evaluation import benchmarks as _benchmarks

# The papers' prompt (MiCoTA, DeepSeek-R1, Qwen2.5-Math); only {question} is filled in.
DEFAULT_PROMPT = _benchmarks.PROMPT

# The GSM8K train split: training questions, not a benchmark (graded as GSM8K, read with its fields).
_TRAIN_FILE = Path(__file__).resolve().parents[1] / "assets" / "train" / "gsm8k_train.jsonl"


def _shipped() -> dict[str, tuple]:
    """name -> (file, question field, answer field, id field or None, id prefix, benchmark): the
    training set and every question set of the benchmark registry, as registered now."""
    gsm8k = _benchmarks.get("gsm8k")
    out = {"gsm8k-train": (_TRAIN_FILE, gsm8k.question_field, gsm8k.gold_field, None, "gsm8k-train", "gsm8k")}
    for name in _benchmarks.question_sets():
        b = _benchmarks.get(name)
        out[name] = (b.data_file(), b.question_field, b.gold_field, b.id_field, b.id_prefix or name, b.grader)
    return out


def shipped_sets() -> tuple[str, ...]:
    return tuple(_shipped())


SHIPPED_SETS = shipped_sets()  # at import; shipped_sets() includes benchmarks registered since

# Field names tried, in order, when a user's file does not say.
_QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
_ANSWER_FIELDS = ("answer", "final_answer", "gold", "target", "solution")
_ID_FIELDS = ("id", "idx", "unique_id", "uid")


def shipped_path(name: str) -> Path:
    return _shipped()[name][0]


HUB = "hf:"


def parse_hub(spec: str) -> tuple[str, str | None, str]:
    """hf:ORG/NAME[:CONFIG][@SPLIT] -> (repo id, config or None, split)."""
    body, split = spec[len(HUB) :], "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    repo, _, config = body.partition(":")
    org, _, name = repo.partition("/")
    if not org or not name or "/" in name or not split:
        raise UserError(f"questions {spec!r}: write a Hub dataset as hf:ORG/NAME[:CONFIG][@SPLIT]")
    return repo, config or None, split


def hub_snapshot(spec: str) -> Path:
    """The local snapshot of a Hub dataset: from the cache when offline, downloaded (once) otherwise."""
    import huggingface_hub
    from huggingface_hub import constants

    repo, _, _ = parse_hub(spec)
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", local_files_only=offline))
    except Exception as e:  # not cached offline, no such repository, no network: all one line
        where = "is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)" if offline else "failed"
        raise UserError(
            f"questions {spec}: {repo} {where} ({type(e).__name__}); fetch it once with "
            f"`huggingface-cli download --repo-type dataset {repo}`, or give a local file"
        ) from None


def _read_hub_dataset(spec: str) -> list[dict]:
    import datasets

    repo, config, split = parse_hub(spec)
    folder = hub_snapshot(spec)
    try:
        ds = datasets.load_dataset(str(folder), name=config, split=split)
    except Exception as e:  # a missing split or config: datasets says which exist
        raise UserError(f"questions {spec}: {str(e).splitlines()[0][:300]}") from None
    return [dict(r) for r in ds]


def questions_source(spec: str | Path) -> Path:
    """The file or folder a question set is read from (a shipped set's own file, a Hub dataset's snapshot)."""
    spec_s = str(spec)
    if spec_s in _shipped():
        return shipped_path(spec_s)
    if spec_s.startswith(HUB):
        return hub_snapshot(spec_s)
    path = Path(spec_s)
    if not path.exists():
        raise UserError(
            f"questions {spec_s!r}: no such file or folder, and not a shipped set "
            f"(shipped: {', '.join(shipped_sets())})"
        )
    return path


def require_answers(questions: list[dict], source: str) -> None:
    """Refuse a question set without gold answers: nothing in it could be verified, and a sweep
    on it would "choose" a ratio from accuracies that are all zero."""
    missing = [i for i, q in enumerate(questions) if q["answer"] in (None, "", [])]
    if not missing:
        return
    if len(missing) == len(questions):
        raise UserError(
            f"questions {source}: no gold answers found (tried fields {list(_ANSWER_FIELDS)}); "
            "name the answer field with --answer-field, since answers are verified against it"
        )
    q = questions[missing[0]]
    raise UserError(
        f"questions {source}: {len(missing)} of {len(questions)} questions have no gold answer "
        f"(first: row {missing[0] + 1}, id {q['id']!r}); fix the file or drop those rows"
    )


def _plain_gold(x: Any) -> bool:
    return isinstance(x, (str, int, float)) and not isinstance(x, bool)


def check_gold(raw: Any, benchmark: str | None, where: str) -> None:
    """A gold answer is a string or a number; a list of them only where the benchmark has multi-answer
    golds (OlympiadBench). Anything else would be graded as its Python repr, which no answer equals."""
    if raw is None or raw == [] or _plain_gold(raw):  # an empty one is require_answers' to name
        return
    lists = [b for b in _benchmarks.graded() if _benchmarks.get(b).list_golds]
    if isinstance(raw, list) and benchmark in lists and all(_plain_gold(x) for x in raw):
        return
    kind = type(raw).__name__
    hint = (
        f" (pass --benchmark {' or '.join(lists)} for OlympiadBench's multi-answer golds)"
        if isinstance(raw, list) and benchmark not in lists and lists
        else ""
    )
    raise UserError(
        f"{where} holds a {kind} ({json.dumps(raw, default=str)[:60]}); a gold answer is a string or a "
        f"number, a list only for OlympiadBench's multi-answer golds{hint}: fix that record"
    )


def gold_answer(raw: Any, benchmark: str | None) -> str | list[str] | None:
    """The gold answer as the grader compares it: one string, or a list when several are required."""
    from micota_merge.evaluation.grading import parse_gold

    if raw is None:
        return None
    golds = parse_gold(raw, benchmark)
    return golds[0] if len(golds) == 1 else golds


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a JSONL file. Decoded line by line, so bytes that are not
    UTF-8 (a file saved as Latin-1 or cp1252) are refused with the line they are on."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "JSONL must be UTF-8: convert the file, e.g. iconv -f latin1 -t utf-8"
                ) from None
            yield lineno, line


def check_utf8(path: str | Path) -> None:
    """Refuse a JSONL file that is not UTF-8 before a stage writes anything (reads, does not parse)."""
    for _ in jsonl_lines(path):
        pass


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in jsonl_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); every line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def _read_hf_dataset(path: Path, split: str | None) -> list[dict]:
    import datasets

    saved = any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))
    if not saved:  # a dataset repository's files (data/train.jsonl, parquet shards, a README's configs)
        try:
            ds = datasets.load_dataset(str(path), split=split or "train")
        except Exception as e:
            raise UserError(
                f"{path}: neither a dataset saved with save_to_disk nor a dataset repository datasets can read "
                f"({str(e).splitlines()[0][:200]})"
            ) from None
        return [dict(r) for r in ds]
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError with varying text
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise UserError(f"{path} holds splits {sorted(ds)}: pick one with --split")
            split = next(iter(ds))
        if split not in ds:
            raise UserError(f"{path} has no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    return [dict(r) for r in ds]


def _pick(
    row_fields: Iterable[str],
    given: str | None,
    candidates: tuple[str, ...],
    what: str,
    source: str,
    flag: str,
    required: bool = True,
) -> str | None:
    fields = list(row_fields)
    if given is not None:
        if given not in fields:
            raise UserError(f"{source}: no field {given!r} (given by {flag}); fields are {fields}")
        return given
    for c in candidates:
        if c in fields:
            return c
    if required:
        raise UserError(
            f"{source}: cannot tell which field holds the {what} (tried {list(candidates)}); "
            f"fields are {fields}: name it with {flag}"
        )
    return None


def _solution_answer(text: Any) -> str | None:
    from micota_merge.evaluation.grading import _boxed

    return _boxed(text) if isinstance(text, str) else None


def _from_chat_records(rows: list[dict], question_field: str | None, answer_field: str | None) -> list[dict]:
    """Rows that are chat records (a `messages` list and no question field): the first user turn is the
    question, and without an answer field the last assistant turn's box is the gold."""
    first = rows[0]
    if question_field or any(f in first for f in _QUESTION_FIELDS) or not isinstance(first.get("messages"), list):
        return rows
    has_answer = answer_field is not None or any(f in first for f in _ANSWER_FIELDS)
    out = []
    for r in rows:
        msgs = [m for m in r.get("messages") or [] if isinstance(m, dict)]
        user = next((m.get("content") for m in msgs if m.get("role") == "user"), None)
        reply = next((m.get("content") for m in reversed(msgs) if m.get("role") == "assistant"), None)
        row = {**r, "question": user}
        if not has_answer:
            row["answer"] = _solution_answer(reply)
        out.append(row)
    return out


def content_id(prefix: str, question: str) -> str:
    return f"{prefix}-{hashlib.sha256(question.encode('utf-8')).hexdigest()[:12]}"


def load_questions(
    spec: str | Path,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    benchmark: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Question records from a shipped set name, a JSONL file or a saved HF dataset (see module doc)."""
    spec_s = str(spec)
    # the graded ones parse their golds their own way; any other registered one (the micro world) grades by
    # the generic rules and may verify whole answers (generate --keep chain)
    valid = _benchmarks.names()
    if benchmark is not None and benchmark not in valid:
        raise UserError(f"unknown benchmark {benchmark!r}: use one of {list(valid)}")
    shipped = _shipped()
    if spec_s in shipped:
        path, qf, af, idf, prefix, bench = shipped[spec_s]
        rows = _read_jsonl(path)
        source = spec_s
        qf, af, idf = question_field or qf, answer_field or af, id_field or idf
        benchmark = benchmark or bench
    else:
        if spec_s.startswith(HUB):
            rows, source, prefix = _read_hub_dataset(spec_s), spec_s, parse_hub(spec_s)[0].split("/")[1]
        else:
            path = Path(spec_s)
            if not path.exists():
                raise UserError(
                    f"questions {spec_s!r}: no such file or folder, and not a shipped set (shipped: "
                    f"{', '.join(shipped)}), and not a Hub dataset (hf:ORG/NAME)"
                )
            rows = _read_hf_dataset(path, split) if path.is_dir() else _read_jsonl(path)
            source, prefix = str(path), path.name.split(".")[0] if path.is_file() else path.name
        if not rows:
            raise UserError(f"{source}: no questions in it")
        rows = _from_chat_records(rows, question_field, answer_field)
        qf = _pick(rows[0], question_field, _QUESTION_FIELDS, "question", source, "--question-field")
        af = _pick(rows[0], answer_field, _ANSWER_FIELDS, "answer", source, "--answer-field", required=False)
        idf = _pick(rows[0], id_field, _ID_FIELDS, "id", source, "--id-field", required=False)
        if af == "solution":  # a worked solution: its final boxed answer is the gold
            rows = [{**r, "solution": _solution_answer(r.get("solution"))} for r in rows]
    out, seen = [], Counter()
    for i, row in enumerate(rows):
        q = row.get(qf)
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{source}: row {i + 1} has no text in field {qf!r}")
        if idf is not None:
            if row.get(idf) is None:
                raise UserError(f"{source}: row {i + 1} has no value in id field {idf!r}")
            qid = f"{prefix}-{row[idf]}" if spec_s in shipped else str(row[idf])
        elif spec_s in shipped:
            qid = f"{prefix}-{i}"  # shipped files never change, so the row number is stable
        else:
            qid = content_id(prefix, q)
        seen[qid] += 1
        if seen[qid] > 1:
            if idf is not None:
                raise UserError(f"{source}: id {qid!r} occurs more than once in field {idf!r}")
            qid = f"{qid}-{seen[qid]}"
        if af:
            check_gold(row.get(af), benchmark, f"{source}: record {i + 1} (id {qid!r}), field {af!r},")
        out.append(
            {
                "id": qid,
                "question": q,
                "answer": gold_answer(row.get(af), benchmark) if af else None,
                "benchmark": benchmark,
            }
        )
        if limit is not None and len(out) >= limit:
            break
    return out


def format_prompt(
    tokenizer, question: str, template: str = DEFAULT_PROMPT, template_kwargs: Optional[dict] = None
) -> tuple[str, str]:
    """(user message, full prompt text through the model's own chat template, with its switches)."""
    if "{question}" not in template:
        raise UserError("--prompt must contain {question} where the question goes")
    user = template.replace("{question}", question)  # not str.format: prompts hold \boxed{} braces
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )
    else:  # a base model without a template sees the bare prompt
        import warnings

        warnings.warn("the tokenizer has no chat template: prompting with the bare text", stacklevel=2)
        text = user
    return user, text


# ---------------------------------------------------------------- mix (Mix Distillation)


def parse_parts(specs: Iterable[str]) -> list[tuple[str, Path, float]]:
    """`PATH=WEIGHT` -> (label, path, weight); the label is the file stem."""
    parts = []
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"mix part {spec!r}: write it as PATH=WEIGHT, e.g. long.jsonl=1 short.jsonl=4")
        path_s, w_s = spec.rsplit("=", 1)
        try:
            w = float(w_s)
        except ValueError:
            raise UserError(f"mix part {spec!r}: weight {w_s!r} is not a number") from None
        if not (w > 0) or math.isinf(w):
            raise UserError(f"mix part {spec!r}: weights must be positive, got {w_s}")
        path = Path(path_s)
        if path.is_dir():
            raise UserError(f"mix part {spec!r}: {path} is a folder; give a JSONL file of generate's records")
        if not path.is_file():
            raise UserError(f"mix part {spec!r}: file {path} does not exist")
        if any(path.resolve() == p.resolve() for _, p, _ in parts):
            raise UserError(f"mix part {spec!r}: {path} is given twice; give each file once, with its total weight")
        label = path.name.split(".")[0]
        parts.append((label, path, w))
    if not parts:
        raise UserError("mix needs at least one PATH=WEIGHT part")
    labels = [p[0] for p in parts]
    if len(set(labels)) != len(labels):
        # different folders with the same file name: fall back to the full paths as labels
        parts = [(str(p), p, w) for _, p, w in parts]
    return parts


def check_chat_record(r: dict, where: str) -> None:
    """A training record as `generate` writes it: an id and messages [.., user, assistant]."""
    if "id" not in r or "messages" not in r:
        raise UserError(f"{where} lacks 'id' or 'messages' (mix reads generate's records)")
    msgs = r["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
        raise UserError(f"{where}: 'messages' must be a list of at least a user and an assistant message")
    roles = [m.get("role") for m in msgs]
    bad = [x for x in roles if x not in ("system", "user", "assistant")]
    if bad:
        raise UserError(f"{where}: message role {bad[0]!r} is not system, user or assistant")
    if roles[-1] != "assistant" or "user" not in roles:
        raise UserError(f"{where}: messages must end with the assistant's answer to a user turn, got roles {roles}")
    if any(not isinstance(m.get("content"), str) for m in msgs):
        raise UserError(f"{where}: every message needs a text 'content'")


def allocate(total: int, weights: list[float]) -> list[int]:
    """Split `total` by weight (largest remainder; ties to the earlier part)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(pools: list[list[dict]], targets: list[int], order: list[int], per_question: int):
    """Each part's records in pool order, at most `per_question` per question id over all parts.
    Returns (taken, chosen, index of the first part left short or None)."""
    taken: Counter = Counter()
    chosen: list[list[dict]] = [[] for _ in pools]
    for i in order:
        for r in pools[i]:
            if len(chosen[i]) == targets[i]:
                break
            if taken[r["id"]] < per_question:
                taken[r["id"]] += 1
                chosen[i].append(r)
        if len(chosen[i]) < targets[i]:
            return taken, chosen, i
    return taken, chosen, None


def mix(
    parts: list[tuple[str, Path, float]], total: int | None = None, seed: int = 0, per_question: int = 1
) -> tuple[list[dict], dict]:
    """Draw records from each part by weight; at most `per_question` records per question id overall.

    Without `total`, the largest mix that keeps the weights exactly. Parts with the least slack
    draw first, so a part that is short of questions is not starved by a bigger one that shares
    its question ids. Returns (records shuffled together, composition).
    """
    if per_question < 1:
        raise UserError(f"--per-question must be at least 1, got {per_question}")
    rng = random.Random(seed)
    pools, avail = [], []
    for label, path, _ in parts:
        rows = _read_jsonl(path)
        for i, r in enumerate(rows):
            check_chat_record(r, f"{path}: record {i + 1}")
        rng.shuffle(rows)
        pools.append(rows)
        per_id = Counter(r["id"] for r in rows)
        avail.append(sum(min(c, per_question) for c in per_id.values()))
    weights = [w for _, _, w in parts]
    share = [w / sum(weights) for w in weights]
    union = len({r["id"] for rows in pools for r in rows}) * per_question
    max_total = min(min(math.floor(a / s + 1e-9) for a, s in zip(avail, share)), union)
    # the weights must hold exactly: shrink until the allocation fits every part
    while max_total > 0 and any(c > a for c, a in zip(allocate(max_total, weights), avail)):
        max_total -= 1
    describe = ", ".join(f"{lab}: {a} usable of {len(p)} records" for (lab, _, _), a, p in zip(parts, avail, pools))
    auto_total = total is None
    if total is None:
        total = max_total
        if total == 0:
            raise UserError(f"nothing to mix: {describe}")
    elif total < 1:
        raise UserError(f"--total must be positive, got {total}")
    elif total > max_total:
        raise UserError(
            f"--total {total} is more than these parts can give at weights "
            f"{':'.join(f'{w:g}' for w in weights)} with at most {per_question} answer(s) per "
            f"question: at most {max_total} ({describe}; {union // per_question} distinct questions)"
        )
    while True:
        targets = allocate(total, weights)
        # parts with the least slack draw first
        order = sorted(range(len(parts)), key=lambda i: (avail[i] - targets[i], i))
        taken, chosen, short = _draw(pools, targets, order, per_question)
        if short is None:
            break
        if auto_total and total > 1:
            # parts that share question ids can give fewer together than each alone: the largest
            # mix is the largest total whose draw fits
            total -= 1
            continue
        i = short
        raise UserError(
            f"part {parts[i][0]} has only {len(chosen[i])} records whose questions are not "
            f"already taken by other parts, {targets[i]} needed; lower --total (or raise "
            f"--per-question): {describe}"
        )
    records = [dict(r, mix_part=parts[i][0]) for i in range(len(parts)) for r in chosen[i]]
    rng.shuffle(records)
    composition = {
        "total": len(records),
        "seed": seed,
        "per_question": per_question,
        "parts": [
            {
                "label": lab,
                "path": str(path),
                "weight": w,
                "share": round(s, 6),
                "records_in_file": len(p),
                "usable": a,
                "drawn": len(c),
                "mean_tokens": _mean_tokens(c),
            }
            for (lab, path, w), s, p, a, c in zip(parts, share, pools, avail, chosen)
        ],
        "distinct_questions": len(taken),
    }
    return records, composition


def _mean_tokens(records: list[dict]) -> float | None:
    n = [r["num_tokens"] for r in records if isinstance(r.get("num_tokens"), (int, float))]
    return round(sum(n) / len(n), 1) if n else None
