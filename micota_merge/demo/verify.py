"""The micro world's chain verifier: every line of an answer checked against its question.

Grading by the final number passes an answer that narrates another person, takes a wrong amount
and lands on the right sum by luck; in a synthetic world every step can be checked instead. The
question is parsed back into its problem (the world's own grammar, `microworld.Problem`), and the
answer must be, line by line, what the world's two styles write about that problem:

  start       "<name> starts with <start> <item>."             name, amount and item of the question
  step k      "Step k: <pronoun> <clause>: a ± n = v."          the question's k-th clause verbatim (its
                                                                other person and amount), the running
                                                                value a, the clause's sign, v = a ± n
  correction  "Wait, that's not right. Let me recompute: ... So it is X, not Y."
                                                                after a step that wrote Y: Y was that
                                                                step's value, X is right; X carries on
  reflections "Let me check: v ∓ n = a. Yes." / "Let me re-read the question: <pronoun> <clause>, so I
              add|subtract n. Yes, it is v." / "Let me recompute: a ± p = m, m ± q = v. Yes, it is v."
                                                                each number and clause the step's own
  final check "Let me double-check the whole thing: start ± n ... = answer. Correct."
  closing     "The answer is \\boxed{answer}."                  the running value, and the gold

Anything else (a line the world never writes, a step out of order, a missing step) makes the chain
wrong. `check()` returns both verdicts: the final number alone, and the whole chain.
"""

from __future__ import annotations

import re
from typing import Optional

# the world's own spellings of the start line, an operation and the whole sum: held to what it writes
from micota_merge.demo.microworld import (
    ADD_CLAUSES,
    CONNECTIVES,
    NAMES,
    OPS_RANGE,
    SUB_CLAUSES,
    Problem,
    _op,
    _start_line,
    _whole_sum,
)

_PRONOUN = dict(NAMES)
_OTHER = "|".join(n for n, _ in NAMES)


def _clause_patterns() -> list[tuple[int, re.Pattern]]:
    out = []
    for sign, clauses in ((1, ADD_CLAUSES), (-1, SUB_CLAUSES)):
        for c in clauses:
            pat = re.escape(c).replace(re.escape("{n}"), r"(?P<n>\d+)").replace(re.escape("{other}"), f"(?:{_OTHER})")
            out.append((sign, re.compile(pat + "$")))
    return out


_CLAUSES = _clause_patterns()
_QUESTION = re.compile(
    r"^(?P<name>\w+) has (?P<start>\d+) (?P<item>\w+)\. (?P<ops>.*) How many (?P=item) does (?P=name) have now\?$"
)


def parse_question(question: str) -> Optional[Problem]:
    """The problem a micro-world question states, or None for a question not in the world's grammar."""
    m = _QUESTION.match(question.strip())
    if not m or m["name"] not in _PRONOUN:
        return None
    pronoun = _PRONOUN[m["name"]]
    p = Problem(m["name"], pronoun, m["item"], int(m["start"]))
    sentences = [s for s in m["ops"].split(". ") if s]
    sentences[-1] = sentences[-1].removesuffix(".")
    for i, s in enumerate(sentences):
        lead = pronoun.capitalize() + " " if i == 0 else None
        if lead is None:
            lead = next((f"{c} {pronoun} " for c in CONNECTIVES if s.startswith(f"{c} {pronoun} ")), None)
        if lead is None or not s.startswith(lead):
            return None
        clause = s[len(lead) :]
        for sign, pat in _CLAUSES:
            cm = pat.match(clause)
            if cm:
                p.ops.append((sign, int(cm["n"]), clause))
                break
        else:
            return None
    return p if p.ops and p.question == question.strip() else None


_START = re.compile(r"^\w+ starts with (\d+) \w+\.$")
_BOXED = re.compile(r"^The answer is \\boxed\{(-?\d+)\}\.$")
_STEP = re.compile(r"^Step (\d+): (.*): (\d+) ([+-]) (\d+) = (-?\d+)\.$")
_CORRECTION = re.compile(
    r"^Wait, that's not right\. Let me recompute: (.*)\. So it is (-?\d+), not (-?\d+)\.(?: (.*))?$"
)
_RECOMPUTE = re.compile(r"^(?:Wait, let me recompute|Let me recompute): (.*)\. Yes, it is (-?\d+)\.$")
_CHECK = re.compile(r"^(?:Wait, let me check|Let me check): (\d+) ([+-]) (\d+) = (-?\d+)\. Yes\.$")
_REREAD = re.compile(
    r"^(?:Wait, let me re-read|Let me re-read) the question: (.*), so I (add|subtract) (\d+)\. Yes, it is (-?\d+)\.$"
)
_FINAL = re.compile(r"^Let me double-check the whole thing: (.*) = (-?\d+)\. Correct\.$")


def _two_parts(text: str, a: int, sign: int, n: int, b: int) -> bool:
    """'a ± p = m, m ± q = b' with p + q = n, the signs the step's."""
    m = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+), (\d+) ([+-]) (\d+) = (\d+)", text)
    if not m:
        return False
    a1, o1, p, mid, mid2, o2, q, end = m.groups()
    s = _op(sign)
    return (
        int(a1) == a
        and o1 == o2 == s
        and int(p) + int(q) == n
        and int(mid) == a + sign * int(p)
        and int(mid2) == int(mid)
        and int(end) == b
    )


def _sentences(line: str) -> list[str]:
    """A reflection line's sentences, each ending in '.' (the world writes one or two per line)."""
    parts = re.split(r"(?<=\.) (?=(?:Let me|Wait|Yes)\b)", line)
    out: list[str] = []
    for part in parts:
        if part.startswith("Yes") and out:
            out[-1] += " " + part  # "... Yes." belongs to the sentence before it
        else:
            out.append(part)
    return out


def _reflection_ok(sentence: str, p: Problem, k: int, a: int, b: int, words: bool = True) -> bool:
    sign, n, clause = p.ops[k]
    m = _CHECK.match(sentence)
    if m:
        return int(m[1]) == b and m[2] == _op(-sign) and int(m[3]) == n and int(m[4]) == a
    m = _REREAD.match(sentence)
    if m:
        same = m[1] == f"{p.pronoun} {clause}" or not words
        return same and m[2] == ("add" if sign > 0 else "subtract") and int(m[3]) == n and int(m[4]) == b
    m = _RECOMPUTE.match(sentence)
    if m:
        return _two_parts(m[1], a, sign, n, b) and int(m[2]) == b
    return False


def check(question: str, response: str, gold=None) -> dict:
    """The verdicts on one answer: `final_right`, the boxed number against the gold (the question's own
    answer when gold is None); `chain_right`, every line against the question (module docstring);
    `values_right`, the chain's numbers alone (every amount, operation and value right, whatever it calls
    the people, things and actions); and `errors`, what first went wrong in the whole chain."""
    p = parse_question(question)
    boxed = [m for m in (_BOXED.match(ln.strip()) for ln in response.splitlines()) if m]
    want = p.answer if p is not None else None
    gold_value = want if gold is None else _number(gold)
    final_right = bool(boxed) and gold_value is not None and int(boxed[-1][1]) == gold_value
    if p is None:
        return {
            "final_right": final_right,
            "chain_right": False,
            "values_right": False,
            "errors": ["the question is not a micro-world question"],
        }
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    errors = _chain_errors(p, lines)
    numbers = errors and _chain_errors(p, lines, words=False)
    return {
        "final_right": final_right,
        "chain_right": final_right and not errors,
        "values_right": final_right and not numbers,
        "errors": errors,
    }


VERDICTS = ("final_right", "chain_right", "values_right")


def difficulty(question: str) -> Optional[str]:
    """A micro-world question's difficulty, its number of steps ("4 steps"), None outside the world: the
    benchmark registry's `groups` for it (the report's scores by difficulty)."""
    p = parse_question(question)
    return f"{len(p.ops)} steps" if p is not None else None


difficulty.order = tuple(f"{k} steps" for k in range(OPS_RANGE[0], OPS_RANGE[1] + 1))  # the report's columns


def verify_records(path) -> dict:
    """The verdicts over a generate output (records with the question and the answer in `messages`) or an
    lm-eval samples file (`micota-merge eval`'s, each answer of each question):
    how many answers are right by the final number, by the whole chain and by its numbers, the same by the
    question's difficulty (its number of steps), and what first went wrong in the answers right by the
    number alone, alike errors counted together."""
    import json
    from collections import Counter
    from pathlib import Path

    from micota_merge.core.errors import UserError
    from micota_merge.data.questions import jsonl_lines

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (give a generate output, a JSONL of records)")
    by_difficulty: dict[str, dict] = {}
    first_errors: Counter = Counter()
    for i, line in jsonl_lines(path):  # a line that is not UTF-8 is refused with its number
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if "doc" in rec:  # lm-eval's samples file: every answer of the question
                pairs = [(rec["doc"]["question"], r, rec["doc"].get("answer")) for r in rec["filtered_resps"][0]]
            else:
                pairs = [(rec["messages"][0]["content"], rec["messages"][-1]["content"], rec.get("answer"))]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(
                f"{path}: line {i} is neither a generate record (messages: the question, the answer) nor an "
                "lm-eval sample (doc, filtered_resps)"
            ) from None
        for question, answer, gold in pairs:
            v = check(question, str(answer), gold)
            where = by_difficulty.setdefault(
                difficulty(question) or "not the world's", {"records": 0, **dict.fromkeys(VERDICTS, 0)}
            )
            where["records"] += 1
            for key in VERDICTS:
                where[key] += v[key]
            if v["final_right"] and not v["chain_right"]:
                first_errors[_kind(v["errors"][0])] += 1
    # the totals are the groups' sums: every answer is counted in exactly one group
    return {
        **{key: sum(c[key] for c in by_difficulty.values()) for key in ("records", *VERDICTS)},
        "by_difficulty": {d: by_difficulty[d] for d in (*difficulty.order, "not the world's") if d in by_difficulty},
        "right_by_number_only": dict(first_errors.most_common()),
    }


def _kind(error: str) -> str:
    """An error without its particulars (the line quoted, the expected text, the numbers), so that alike
    ones count together."""
    e = re.sub(r":? '.*'$", "", error)
    e = re.sub(r" \([^)]*\)", "", e)
    return re.sub(r"\d+", "N", e)


def _number(x) -> Optional[int]:
    try:
        return int(str(x).strip())
    except ValueError:
        return None


def _chain_errors(p: Problem, lines: list[str], words: bool = True) -> list[str]:
    """What is wrong with the chain, in order of the lines (empty: every line checks out). Without
    `words`, only its numbers are held to the question: who and what a line names is not read."""
    vals = p.values()
    start = _start_line(p)
    said = _START.match(lines[0]) if lines else None
    if not lines or (lines[0] != start if words else not said or int(said[1]) != p.start):
        return [f"line 1 is not the question's start ({start}): {lines[0] if lines else ''!r}"]
    k, pending, i = 0, None, 1  # steps written, a wrong value a step wrote (awaiting its correction), line
    while i < len(lines) and not (_FINAL.match(lines[i]) or _BOXED.match(lines[i])):
        line, where = lines[i], f"line {i + 1}"
        if pending is not None and not _CORRECTION.match(line):
            return [f"step {k} wrote {pending} (it is {vals[k]}) and was not corrected"]
        m = _STEP.match(line)
        if m:
            if k >= len(p.ops) or int(m[1]) != k + 1:
                return [f"{where}: step {m[1]} where step {k + 1} of {len(p.ops)} belongs"]
            sign, n, clause = p.ops[k]
            if (words and m[2] != f"{p.pronoun} {clause}") or m[4] != _op(sign) or int(m[5]) != n:
                return [
                    f"{where}: step {k + 1} is not the question's ({p.pronoun} {clause}: {_op(sign)} {n}): {line!r}"
                ]
            if int(m[3]) != vals[k]:
                return [f"{where}: step {k + 1} starts from {m[3]}; the value so far is {vals[k]}"]
            k += 1
            pending = int(m[6]) if int(m[6]) != vals[k] else None
        elif k == 0:
            return [f"{where} is not a line of the chain: {line!r}"]
        else:
            a, b = vals[k - 1], vals[k]
            sign, n, _ = p.ops[k - 1]
            m = _CORRECTION.match(line)
            rest = line
            if m:
                if pending is None or int(m[3]) != pending or int(m[2]) != b or not _two_parts(m[1], a, sign, n, b):
                    return [f"{where}: not a right correction of step {k}: {line!r}"]
                pending, rest = None, m[4] or ""
            if rest and not all(_reflection_ok(x, p, k - 1, a, b, words) for x in _sentences(rest)):
                return [f"{where}: a reflection on step {k} that is wrong or not the world's: {line!r}"]
        i += 1
    if pending is not None:
        return [f"step {k} wrote {pending} (it is {vals[k]}) and was not corrected"]
    if k != len(p.ops):
        return [f"{k} of the question's {len(p.ops)} steps are written"]
    tail = lines[i:]
    if tail and _FINAL.match(tail[0]):
        m = _FINAL.match(tail[0])
        chain = _whole_sum(p)
        if m[1] != chain or int(m[2]) != p.answer:
            return [f"line {i + 1}: the double-check is not the question's chain ({chain} = {p.answer})"]
        tail = tail[1:]
    if len(tail) != 1 or not _BOXED.match(tail[0]) or int(_BOXED.match(tail[0])[1]) != p.answer:
        return [f"the answer does not end with its one closing line, \\boxed{{{p.answer}}}"]
    return []
