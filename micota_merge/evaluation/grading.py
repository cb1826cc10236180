"""The one grader: answer extraction and equivalence for every stage.

Filtering generated data, lm-eval scoring (``eval/utils.py``) and sweep probes all call
:func:`grade` / :func:`is_correct`, so a response is judged the same way everywhere.

Extraction (:func:`extract_answer`) takes, in order:

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; ``\\boxed 5`` without braces;
   empty boxes such as an echoed "put your answer in \\boxed{}" are skipped). Boxes that
   follow each other separated only by commas, "and", "or" or ``$`` are read together as a
   list ("\\boxed{69} and \\boxed{84}" -> "69, 84"): a hedged "\\boxed{5} or \\boxed{6}" is
   therefore a two-item answer and wrong against a single gold;
2. else the last clear final-answer phrase ("The final answer is $X$", "Final Answer:",
   "The answer is", "**Answer:**", "Answer:");
3. else, for ``benchmark="gsm8k"``, the last number (commas, ``$`` and a trailing
   period stripped);
4. else, for the other four benchmarks, a concluding sentence (:func:`_concluding`): when
   the response *ends* with a complete sentence that opens with a conclusion word ("So",
   "Therefore", "Thus", "Hence", "In total", "Altogether", "This gives", ...) and states
   something, the last ``$...$`` expression of that sentence, else its last number ("So the
   bakery sells 42 loaves in all." -> 42). This is where Qwen2.5-Math's evaluator and
   math-verify on the whole text land too (the last number / expression), restricted to
   the one place where it is the model's answer: not a truncated response (no final full
   stop), not a sentence that asks or plans ("So we need to find ...", "Thus, let x = 3."),
   not a number in the middle of the reasoning.
   With ``benchmark=None`` neither fallback applies: a response that never states a final
   answer is not counted, which is what filtering generated data wants (the papers' prompt
   asks for ``\\boxed{}``).

Thinking (:func:`split_thinking`): reasoning models write ``<think> ... </think>`` (or
``<|begin_of_thought|> ... <|end_of_thought|>``, ``◁think▷ ... ◁/think▷``) before the
answer. Only the text after the last end-of-thinking tag is graded; a response that opened
a think block and never closed it has no answer (a box written while still thinking is a
draft, not the answer). R1-distill chat templates open ``<think>`` in the prompt itself, so
callers pass ``thinking_open=True`` when the prompt ends inside a think block.

Equivalence (:func:`is_correct`): each benchmark's gold is parsed its own way
(:func:`parse_gold`), plain numbers are compared exactly with :class:`fractions.Fraction`,
anything else goes through math-verify (``math_verify.parse`` + ``math_verify.verify``).
OlympiadBench golds with several answers need every answer, in any order, and nothing more.

Safety: math-verify's own timeout uses ``signal.alarm``, which raises outside the main
thread, so it is disabled here and the work is bounded instead: only the response's tail is
searched for phrases and numbers, answers longer than ``MAX_ANSWER_CHARS`` are wrong
without parsing, parsed expressions whose numbers would have more than ``MAX_DIGITS`` digits
(power towers, ``100!!!``) are refused before sympy evaluates them, and in the main thread a
CPU-time timer (SIGVTALRM) backs this up. Every public function returns normally on any input.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import threading
import time
from fractions import Fraction
from typing import Any

from micota_merge.evaluation import benchmarks as _benchmarks

__all__ = [
    "BENCHMARKS",
    "THINK_TAGS",
    "split_thinking",
    "prompt_opens_thinking",
    "equivalent",
    "check_benchmark",
    "extract_answer",
    "parse_gold",
    "is_correct",
    "grade",
]

# Which benchmark reads its gold how: the registry's gold formats (benchmarks.NUMBER, LATEX, LATEX_LIST).
BENCHMARKS = _benchmarks.papers()

# A real final answer is short; the longest gold in the shipped data (an OlympiadBench list
# of 16 triples) is ~200 characters.
MAX_ANSWER_CHARS = 600
# Phrases and the GSM8K last number are looked for in this many final characters only: the
# answer of a long CoT is at its end, and it keeps regex work bounded on 100k-char inputs.
TAIL_CHARS = 4000
# How many boxes (from the end) are looked at before giving up on malformed ones.
MAX_BOXES_SCANNED = 64
# sympy evaluates integer powers and factorials eagerly; refuse anything whose value would
# have more digits than this, before it reaches sympy.
MAX_DIGITS = 5000
MAX_NODES = 400
# Main-thread backstop for a slow sympy simplification (CPU seconds, per parse or verify).
ALARM_SECONDS = 0.5


class _Timeout(Exception):
    pass


def check_benchmark(benchmark: str | None) -> str | None:
    """Return the benchmark name, or raise ValueError listing the valid ones."""
    if benchmark is None:
        return None
    name = str(benchmark).strip().lower()
    valid = _benchmarks.graded()
    if name in _benchmarks.names() and name not in valid:
        return None  # registered without a gold format of its own (the micro world): the generic rules
    if name not in valid:
        raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(valid)} (or None)")
    return name


def _gold_format(bench: str | None) -> str | None:
    """The registry's gold format of a (checked) benchmark name; None for the generic rules."""
    return None if bench is None else _benchmarks.get(bench).gold_format


# ---------------------------------------------------------------------------- thinking

# (start, end) of the thinking block: DeepSeek-R1 / QwQ / Qwen3, Sky-T1 / OpenThoughts, Kimi.
THINK_TAGS = (
    ("<think>", "</think>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
)


def split_thinking(response: str, thinking_open: bool = False) -> tuple[str, str, bool]:
    """(thinking, answer, finished) of a response.

    ``thinking`` runs up to and including the last end-of-thinking tag; ``answer`` is what
    follows. Without an end tag: if the response opened a think block (or the prompt did,
    ``thinking_open``), all of it is unfinished thinking and the answer is empty; otherwise
    the model did not think in tags and all of it is the answer.
    """
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    cut = -1
    for _, end in THINK_TAGS:
        i = response.rfind(end)
        if i >= 0:
            cut = max(cut, i + len(end))
    if cut >= 0:
        return response[:cut], response[cut:], True
    if thinking_open or any(start in response for start, _ in THINK_TAGS):
        return response, "", False
    return "", response, True


def prompt_opens_thinking(prompt: str) -> bool:
    """True when a rendered prompt ends inside a think block (R1-distill templates add
    "<think>\\n" after the assistant tag), so the response starts in thinking mode."""
    tail = prompt.rstrip()
    for start, end in THINK_TAGS:
        i = tail.rfind(start)
        if i >= 0 and tail.rfind(end) < i and len(tail) - i - len(start) < 64:
            return True
    return False


# ---------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")


def _match_braces(s: str, start: int, limit: int) -> int | None:
    """Index just past the brace group opening at s[start] == '{', or None if unbalanced."""
    depth = 0
    end = min(len(s), start + limit)
    i = start
    while i < end:
        c = s[i]
        if c == "\\":
            i += 2  # \{ and \} are literal braces, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _box_at(s: str, pos: int) -> tuple[str, int] | None:
    """Content and end index of the box command starting at pos, or None if malformed."""
    m = _BOX_RE.match(s, pos)
    if m is None:
        return None
    i = m.end()
    if i < len(s) and (s[i].isalpha()):  # \boxedfoo is another command
        return None
    j = i
    while j < len(s) and s[j] in " \t":
        j += 1
    if j < len(s) and s[j] == "{":
        end = _match_braces(s, j, MAX_ANSWER_CHARS * 4)
        if end is None:
            return None
        return s[j + 1 : end - 1], end
    if j > i:  # "\boxed 5": TeX takes the next token
        m2 = re.match(r"[^\s$\\{}]{1,50}", s[j:])
        if m2:
            return m2.group(0), j + m2.end()
    return None


_BOX_JOIN_RE = re.compile(
    r"^(?:\s|,|;|\$|\\\(|\\\)|\\\[|\\\]|\\quad|\\qquad|\\,|~|&|and|or|"
    r"\\text\{\s*(?:and|or|,)?\s*\}|\\(?:mbox|textrm)\{\s*(?:and|or)?\s*\})*$",
    re.IGNORECASE,
)


def _boxed(s: str) -> str | None:
    """The last non-empty box, merged with boxes just before it that form one list."""
    found: list[tuple[int, int, str]] = []  # (start, end, content), from the end backwards
    pos = len(s)
    scanned = 0
    while scanned < MAX_BOXES_SCANNED:
        a = s.rfind("\\boxed", 0, pos)
        b = s.rfind("\\fbox", 0, pos)
        start = max(a, b)
        if start < 0:
            break
        scanned += 1
        pos = start
        box = _box_at(s, start)
        if box is None:
            continue
        content, end = box
        content = _clean(content)
        if not content:
            if found:
                break
            continue
        if found and end > found[-1][0]:
            # \boxed{\boxed{5}}: this box encloses the ones found inside it
            while found and found[-1][0] < end:
                found.pop()
        elif found:
            gap = s[end : found[-1][0]]
            if len(gap) > 40 or not _BOX_JOIN_RE.match(gap):
                break
        found.append((start, end, content))
        if len(found) > 16:
            break
    if not found:
        return None
    return ", ".join(c for _, _, c in reversed(found))


def _strip_math(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def _clean(ans: str) -> str:
    """Normalise an extracted answer string without changing its meaning."""
    ans = ans.strip()
    # \boxed{\boxed{5}} and \boxed{\text{5}} are common wrappers
    for _ in range(3):
        inner = _box_at(ans, 0) if _BOX_RE.match(ans) else None
        if inner and inner[1] == len(ans):
            ans = inner[0].strip()
    ans = _strip_math(ans)
    ans = re.sub(r"^\\displaystyle\s*", "", ans)
    ans = re.sub(r"(?:\\[,;!:]|\\quad|\s)+$", "", ans)
    ans = ans.rstrip()
    # a sentence's full stop, but not the "." of "3." as part of e.g. "\ldots."
    while ans.endswith(".") and not ans.endswith("..") and not ans.endswith("\\ldots."):
        ans = ans[:-1].rstrip()
    return ans.strip()


# "The final answer is $X$", "Final Answer:", "**Answer:** X", "the answer is X".
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:\*\*)?\s*(?:is|:|=)\s*(?:\*\*)?\s*(?::)?",
    re.IGNORECASE,
)


def _phrase(tail: str) -> str | None:
    matches = list(_PHRASE_RE.finditer(tail))
    for m in reversed(matches[-20:]):
        rest = tail[m.end() :].lstrip(" \t*:")
        if not rest or rest[0] == "\n":
            # "Final Answer:\n$X$" or a heading with the answer on the next line
            rest = rest.lstrip()
            if not rest:
                continue
        ans = _phrase_value(rest)
        if ans and not _PHRASE_RE.search(ans):  # "The answer is The answer is ..." is no value
            return ans
    return None


def _phrase_value(rest: str) -> str | None:
    rest = rest[: MAX_ANSWER_CHARS * 2]
    # the answer is in math mode: take that span
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(left):
            end = len(left)
            while True:  # the closing delimiter, not an escaped \$ inside ("\$32,\!348")
                end = rest.find(right, end)
                if end < 0 or right != "$" and right != "$$" or rest[end - 1] != "\\":
                    break
                end += 1
            if end > len(left):
                return _clean(rest[len(left) : end]) or None
    line = rest.split("\n", 1)[0]
    # stop at the end of the sentence: ". " or a final "." (not a decimal point)
    m = re.search(r"\.(?:\s|$)|(?<![\d.])\.(?=[A-Z])", line)
    if m:
        line = line[: m.start()]
    line = line.strip().strip("*").strip()
    line = re.sub(r"\s+I hope it is correct$", "", line)
    return _clean(line) or None


# "-10", "$18", "$ 70,000", "3.5"; "20 - 5" ends in 5, not -5
_NUMBER_RE = re.compile(r"-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _last_number(tail: str) -> str | None:
    nums = _NUMBER_RE.findall(tail)
    if not nums:
        return None
    n = nums[-1].replace(",", "").replace("$", "").replace(" ", "")
    return n.rstrip(".") or None


def _first_number(text: str) -> str | None:
    m = _NUMBER_RE.search(text)
    if m is None:
        return None
    return m.group(0).replace(",", "").replace("$", "").replace(" ", "") or None


# A concluding sentence opens with one of these (after an optional "**", "and" or ",").
_CONCLUDE_RE = re.compile(
    r"^(?:so|thus|therefore|hence|consequently|in\s+total|in\s+all|altogether|overall|"
    r"in\s+conclusion|in\s+summary|finally|this\s+(?:gives|means|yields)|which\s+gives|"
    r"we\s+(?:get|obtain|conclude\s+that|find\s+that|have\s+shown\s+that))\b",
    re.IGNORECASE,
)
# ... and does not ask, plan, suppose or hedge: those sentences carry no answer.
_NOT_ANSWER_RE = re.compile(
    r"\?|\b(?:needs?\s+to|let|lets|let's|suppose|assume|if|must\s+find|want|wants|should|"
    r"can\s+(?:we|you)|try|check|compute|calculate|find|determine|maybe|perhaps|might|"
    r"possibly|probably|either|not)\b",
    re.IGNORECASE,
)
# The end of the previous sentence: ". ", "! ", a blank line, or the start of the text.
_SENTENCE_END_RE = re.compile(r"(?:(?<![\d.])[.!](?=\s)|\n\s*\n)")


def _concluding(tail: str) -> str | None:
    """The answer of a response that ends by stating it in a sentence (rule 4 above)."""
    text = tail.rstrip()
    text = re.sub(r"(?:\*\*|\s)+$", "", text)
    if not text.endswith((".", "!", ".$", ".$$")) and not re.search(r"\$\s*\.$", text):
        return None  # no full stop: a truncated response, or one that trails off
    body = text[:-1]
    starts = [m.end() for m in _SENTENCE_END_RE.finditer(body)]
    sentence = body[starts[-1] :] if starts else body
    sentence = sentence.strip().lstrip("*#> ").strip()
    sentence = re.sub(r"^(?:and|,)\s*", "", sentence, flags=re.IGNORECASE)
    if len(sentence) > 300 or not _CONCLUDE_RE.match(sentence):
        return None
    rest = sentence[_CONCLUDE_RE.match(sentence).end() :]
    if _NOT_ANSWER_RE.search(re.sub(r"\$[^$]*\$", " ", rest)):
        return None
    maths = re.findall(r"\$\$(.+?)\$\$|\$([^$]+)\$|\\\((.+?)\\\)", sentence)
    if maths:
        expr = _clean(next(m for m in maths[-1] if m))
        if "=" in expr and not re.search(r"[<>]|\\[lg]eq?|\\neq", expr):
            # "$x = 5$" / "$a + b = 12$": the value is the right-hand side
            expr = expr.rsplit("=", 1)[1].strip()
        return expr or None
    nums = _NUMBER_RE.findall(rest)
    if not nums:
        return None
    return nums[-1].replace(",", "").replace("$", "").replace(" ", "").rstrip(".") or None


def extract_answer(response: str, benchmark: str | None = None, thinking_open: bool = False) -> str | None:
    """The final answer stated in ``response`` as a string, or None when there is none.

    See the module docstring for the order of rules; the last-number fallback is used only
    for a benchmark whose golds are numbers (gold format ``number``: GSM8K), the
    concluding-sentence rule only for the other benchmarks (not for None).
    Only the text after the thinking block is read (:func:`split_thinking`).
    """
    fmt = _gold_format(check_benchmark(benchmark))
    try:
        if not isinstance(response, str):
            response = "" if response is None else str(response)
        _, response, _ = split_thinking(response, thinking_open)
        ans = _boxed(response)
        if ans is None:
            tail = response[-TAIL_CHARS:]
            ans = _phrase(tail)
            if ans is not None and fmt == _benchmarks.NUMBER and _plain_number(ans) is None:
                # "The answer is 18 dollars per day." -> 18
                ans = _first_number(ans) or ans
            if ans is None and fmt == _benchmarks.NUMBER:
                ans = _last_number(tail)
            if ans is None and fmt is not None and fmt != _benchmarks.NUMBER:
                ans = _concluding(tail)
        if ans is not None and len(ans) > MAX_ANSWER_CHARS:
            ans = ans[:MAX_ANSWER_CHARS]
        return ans or None
    except Exception:  # noqa: BLE001 - a grader must never take a run down
        return None


# ---------------------------------------------------------------------------- gold parsing


def _split_top(s: str) -> list[str]:
    """Split on commas (and ';') outside any brackets; '\\{' and '\\left(' count as brackets."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            cur.append(s[i : i + 2])
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c in ",;" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _float_text(x: float) -> str:
    if math.isfinite(x) and float(x).is_integer():
        return str(int(x))
    return repr(float(x))


def _gold_text(gold: Any) -> str:
    # str() of anything else (a dict, a bool, None) is its Python repr, which no answer ever equals:
    # a silent 0 % instead of a wrong file named (data.check_gold names it for the user)
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise ValueError(f"a gold answer is a string or a number, not a {type(gold).__name__}: {gold!r:.60}")
    if isinstance(gold, int):
        return str(gold)
    if isinstance(gold, float):
        return _float_text(gold)
    return gold


def _is_thousands(s: str) -> bool:
    return re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s.strip()) is not None


def parse_gold(gold: Any, benchmark: str | None = None) -> list[str]:
    """The gold answer(s) as a list of LaTeX strings; every item is required.

    - gsm8k: the full solution text (answer after ``####``) or a bare number; commas dropped.
    - amc23: JSON floats such as ``27.0`` -> ``"27"``.
    - aime24: strings such as ``"033"`` (kept; compared as the number 33).
    - olympiadbench: the row (dict with ``final_answer``), the ``final_answer`` list, or a
      string. ``$`` are dropped and the answers split on top-level commas, so
      ``["$69$,$84$"]`` -> ``["69", "84"]``, while ``(2,4)`` or ``[\\frac12, 8]`` stay whole.
    - math500 / None: the LaTeX string, with surrounding ``$`` and a final period removed.
    A JSON-encoded list string (``'["$1$"]'``) is accepted for olympiadbench too.
    Which rules apply is the benchmark's gold format in the registry (``benchmarks``):
    gsm8k's is ``number``, olympiadbench's ``latex_list``, the others' ``latex``.
    """
    fmt = _gold_format(check_benchmark(benchmark))
    if isinstance(gold, dict):
        if "final_answer" in gold:
            gold = gold["final_answer"]
            fmt = fmt or _benchmarks.LATEX_LIST
        elif "answer" in gold:
            gold = gold["answer"]
    if fmt == _benchmarks.LATEX_LIST and isinstance(gold, str) and gold.strip().startswith("["):
        try:
            loaded = json.loads(gold)
            if isinstance(loaded, list):
                gold = loaded
        except ValueError:
            pass
    if isinstance(gold, (list, tuple)):
        items = [_gold_text(g) for g in gold]
    else:
        items = [_gold_text(gold)]

    out: list[str] = []
    for text in items:
        text = text.strip()
        if fmt == _benchmarks.NUMBER or (fmt is None and "####" in text):
            if "####" in text:
                text = text.rsplit("####", 1)[1]
            text = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
            out.append(text)
            continue
        if fmt == _benchmarks.LATEX_LIST or (fmt is None and isinstance(gold, (list, tuple))):
            flat = _clean(text.replace("$", " ").strip())
            parts = [flat] if _is_thousands(flat) else _split_top(flat)
            out.extend(_clean(p) for p in parts if _clean(p))
            continue
        cleaned = _clean(text)
        if cleaned:
            out.append(cleaned)
    return out or [""]


# ---------------------------------------------------------------------------- comparison

_PLAIN_NUM_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def _plain_number(s: str) -> Fraction | None:
    """Exact value of a plain decimal written as text ("1,234", "$18", "27.0"), else None."""
    t = s.strip()
    t = re.sub(r"^\\\$|^\$", "", t).strip()
    t = t.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace(" ", "")
    if _is_thousands(t):
        t = t.replace(",", "")
    if not _PLAIN_NUM_RE.fullmatch(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _log10_bound(expr, depth: int = 0) -> float:
    """Upper bound on log10 of the size of any number sympy would build evaluating expr."""
    import sympy

    if depth > 60:
        return math.inf
    if isinstance(expr, sympy.Integer):
        v = abs(int(expr))
        return math.log10(v) if v > 1 else 0.0
    if isinstance(expr, sympy.Rational):
        return max(_log10_bound(sympy.Integer(expr.p)), _log10_bound(sympy.Integer(expr.q)))
    if isinstance(expr, sympy.Float):
        try:
            v = abs(float(expr))
        except (OverflowError, ValueError):
            return math.inf
        if not math.isfinite(v):
            return 0.0
        return abs(math.log10(v)) if v > 0 else 0.0
    args = getattr(expr, "args", ())
    if isinstance(expr, sympy.Pow):
        base, exp = expr.args
        b = _log10_bound(base, depth + 1)
        e = _log10_bound(exp, depth + 1)
        if e > 15:
            return math.inf if (b > 0 or base.free_symbols) else 0.0
        return max(b, 1.0) * (10.0**e) + e
    if isinstance(expr, (sympy.factorial, sympy.factorial2, sympy.gamma)) or (
        type(expr).__name__ in ("binomial", "RisingFactorial", "FallingFactorial", "subfactorial")
    ):
        n_bound = max((_log10_bound(a, depth + 1) for a in args), default=0.0)
        if n_bound > 15:
            return math.inf
        n = 10.0**n_bound
        return n * max(math.log10(n), 1.0)
    if isinstance(expr, sympy.Mul):
        return sum(_log10_bound(a, depth + 1) for a in args)
    if not args:
        return 0.0
    return max(_log10_bound(a, depth + 1) for a in args) + math.log10(len(args) + 1)


def _safe_expr(expr) -> bool:
    import sympy

    if isinstance(expr, str):
        return len(expr) <= MAX_ANSWER_CHARS
    try:
        if not isinstance(expr, (sympy.Basic, sympy.MatrixBase)):
            return False
        if isinstance(expr, sympy.MatrixBase):
            if expr.rows * expr.cols > 64:
                return False
            return all(_safe_expr(x) for x in expr)
        n = 0
        for _ in sympy.preorder_traversal(expr):
            n += 1
            if n > MAX_NODES:
                return False
        return _log10_bound(expr) <= MAX_DIGITS
    except Exception:  # noqa: BLE001
        return False


class _alarm:
    """CPU-time backstop (SIGVTALRM), only in the main thread and only if nobody else uses it.

    CPU time rather than wall time, so a busy machine does not turn slow answers into wrong
    ones; math-verify's own SIGALRM timeout is left off (it raises outside the main thread).
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = False

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            return self
        try:
            if (
                signal.getsignal(signal.SIGVTALRM) not in (signal.SIG_DFL, None)
                or signal.getitimer(signal.ITIMER_VIRTUAL)[0]
            ):
                return self

            def handler(signum, frame):
                raise _Timeout()

            self.old = signal.signal(signal.SIGVTALRM, handler)
            signal.setitimer(signal.ITIMER_VIRTUAL, self.seconds)
            self.active = True
        except (ValueError, OSError):
            self.active = False
        return self

    def __exit__(self, *exc):
        if self.active:
            try:
                signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            finally:
                signal.signal(signal.SIGVTALRM, self.old)
        return False


_MV = None
_MV_LOCK = threading.Lock()


def _mv():
    global _MV
    if _MV is not None:
        return _MV
    with _MV_LOCK:
        if _MV is None:
            import math_verify
            import math_verify.grader
            import math_verify.parser

            # We pass timeouts of None on purpose (signal.alarm breaks threads) and bound the
            # work ourselves; math-verify would otherwise warn about it on first use.
            math_verify.parser.TIMEOUT_WARNING_SHOWN = True
            math_verify.grader.TIMEOUT_WARNING_SHOWN = True
            logging.getLogger("math_verify").setLevel(logging.ERROR)
            # The first parse loads the LaTeX grammar and sympy modules (~1 s); do it before
            # any time limit applies so it cannot turn a first correct answer into a timeout.
            for a, b in (
                ("\\frac{1}{2}", "0.5"),
                ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
                ("x \\in [2,5)", "[2, 5)"),
                ("f(x)=2 x", "2x"),
                ("\\text{(B)}", "B"),
                ("\\{1, 2\\}", "2, 1"),
            ):
                math_verify.verify(
                    math_verify.parse("\\boxed{" + a + "}", parsing_timeout=None),
                    math_verify.parse("\\boxed{" + b + "}", parsing_timeout=None),
                    timeout_seconds=None,
                )
            _MV = math_verify
    return _MV


_LOCAL = threading.local()
# CPU-time budget of one grade() call (all comparisons together), in seconds: once spent, no
# further comparison starts. CPU time, so that a loaded machine does not change verdicts.
GRADE_BUDGET_SECONDS = 0.9


def _remaining() -> float:
    deadline = getattr(_LOCAL, "deadline", None)
    if deadline is None:
        return ALARM_SECONDS
    return deadline - time.thread_time()


_PARSE_CACHE: dict[str, list] = {}
_PARSE_CACHE_LOCK = threading.Lock()


def _safe_text(ans: str) -> bool:
    """Cheap screen before parsing: LaTeX whose parse alone can take seconds."""
    if len(ans) > MAX_ANSWER_CHARS or ans.count("^") > 24 or re.search(r"\d{400}", ans):
        return False
    depth = exp_depth = 0
    exp_levels: list[int] = []
    i = 0
    while i < len(ans):
        c = ans[i]
        if c == "^" and i + 1 < len(ans) and ans[i + 1] == "{":
            exp_levels.append(depth + 1)
            exp_depth = max(exp_depth, len(exp_levels))
        elif c == "{":
            depth += 1
        elif c == "}":
            if exp_levels and exp_levels[-1] == depth:
                exp_levels.pop()
            depth -= 1
        if depth > 16 or exp_depth > 3:  # x^{x^{x^{x}}}: sympy builds towers slowly
            return False
        i += 1
    return True


def _mv_parse(ans: str) -> list:
    """math-verify parse of one answer string (as the content of a box), [] if unsafe."""
    if not _safe_text(ans):
        return []
    with _PARSE_CACHE_LOCK:
        hit = _PARSE_CACHE.get(ans)
    if hit is not None:
        return hit
    if _MV is None:
        _mv()
        if getattr(_LOCAL, "deadline", None) is not None:
            # the one-off warm-up is not this answer's time
            _LOCAL.deadline = time.thread_time() + GRADE_BUDGET_SECONDS
    mv = _mv()
    if _remaining() <= 0:
        return []
    try:
        with _alarm(min(ALARM_SECONDS, _remaining())):
            parsed = mv.parse("\\boxed{" + ans + "}", parsing_timeout=None)
    except BaseException as e:  # noqa: BLE001 - includes our _Timeout
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return []  # not cached: a timeout depends on the load, not on the answer
    parsed = [p for p in parsed if _safe_expr(p)]
    with _PARSE_CACHE_LOCK:
        if len(_PARSE_CACHE) > 20000:
            _PARSE_CACHE.clear()
        _PARSE_CACHE[ans] = parsed
    return parsed


def _unit_strip(ans: str) -> str:
    """Drop trailing units a model adds: '45 \\text{ minutes}', '90^\\circ', '10\\%'-free."""
    s = re.sub(r"\\(?:text|mbox|textrm|mathrm)\{\s*[A-Za-z][A-Za-z/^ 0-9.]*\}\s*$", "", ans)
    s = re.sub(r"\s*(?:\^\s*\{?\\circ\}?|°)\s*$", "", s)
    s = re.sub(
        r"(?<=[\d}])\s*(?:minutes?|mins?|hours?|seconds?|km/h|km|cm\^?2?|meters?|m|dollars?|"
        r"cents?|degrees?|units?|feet|inches|miles|mph)\.?\s*$",
        "",
        s,
        flags=re.IGNORECASE,
    )
    return s.strip() or ans


_PM_RE = re.compile(r"\\(?:pm|mp)")


def _expand_pm(ans: str) -> str:
    """'1 \\pm \\sqrt{19}' -> '1 + \\sqrt{19}, 1 - \\sqrt{19}' (math-verify reads one value)."""
    if not _PM_RE.search(ans):
        return ans
    body, braced = ans, False
    m = re.fullmatch(r"\\\{(.*)\\\}", ans.strip())
    if m:
        body, braced = m.group(1), True
    out = []
    for part in _split_top(body):
        signs = _PM_RE.findall(part)
        if len(signs) == 1:
            plus = "+" if signs[0] == "\\pm" else "-"
            minus = "-" if plus == "+" else "+"
            out.append(_PM_RE.sub(plus, part))
            out.append(_PM_RE.sub(minus, part))
        else:
            out.append(part)
    joined = ", ".join(out)
    return "\\{" + joined + "\\}" if braced else joined


def _equal_one(gold: str, pred: str, tol: float | None = None) -> bool:
    """Is pred equivalent to one gold answer? Never raises."""
    gold, pred = _expand_pm(gold), _expand_pm(pred)
    g_num, p_num = _plain_number(gold), _plain_number(_unit_strip(pred))
    if g_num is not None and p_num is not None:
        if tol is not None:
            return abs(float(g_num) - float(p_num)) <= tol + 1e-12
        return g_num == p_num
    if gold.strip() == pred.strip():
        return True
    g = _mv_parse(gold)
    if not g:
        return False
    for cand in dict.fromkeys((pred, _unit_strip(pred))):
        p = _mv_parse(cand)
        if not p or _remaining() <= 0:
            continue
        mv = _mv()
        try:
            with _alarm(min(ALARM_SECONDS, _remaining())):
                if mv.verify(g, p, timeout_seconds=None):
                    return True
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
    return False


def _pred_parts(pred: str) -> list[str]:
    s = _strip_math(pred)
    s = re.sub(r"^\\\{(.*)\\\}$", r"\1", s)  # \{1, 3\} -> 1, 3
    s = re.sub(r"\\text\{\s*(?:and|or)\s*\}|\\(?:quad|qquad)|\s+(?:and|or)\s+", ",", s)
    return [p for p in (_clean(x) for x in _split_top(s)) if p]


def _match_all(golds: list[str], preds: list[str], tol: float | None) -> bool:
    """Every gold matched by a distinct pred, and no pred left over."""
    if len(golds) != len(preds):
        return False
    used = [False] * len(preds)

    def assign(i: int) -> bool:
        if i == len(golds):
            return True
        for j, p in enumerate(preds):
            if not used[j] and _equal_one(golds[i], p, tol):
                used[j] = True
                if assign(i + 1):
                    return True
                used[j] = False
        return False

    return assign(0)


def _unit(gold: Any) -> str | None:
    if isinstance(gold, dict) and isinstance(gold.get("unit"), str):
        return gold["unit"]
    return None


def _tolerance(gold: Any) -> float | None:
    if isinstance(gold, dict) and gold.get("error"):
        try:
            return abs(float(gold["error"]))
        except (TypeError, ValueError):
            return None
    return None


def _compare(pred: str | None, golds: list[str], tol: float | None, unit: str | None) -> bool:
    if pred is None or not golds or not golds[0]:
        return False
    if unit and unit.strip("$ \\") == "%":
        # the gold is already in percent (OlympiadBench "unit": "%"): "4.2\%" means 4.2
        pred = re.sub(r"\s*\\?%\s*$", "", pred)
    # a correct answer is not much longer than its gold; long ones would only cost time
    if len(pred) > max(200, 3 * sum(len(g) for g in golds) + 100):
        return False
    if len(golds) == 1:
        golds = [_expand_pm(golds[0])]
        # a list against one plain value is wrong ("1,234" is a number, "3, 5" a list);
        # golds that are sets, tuples or intervals go on to math-verify
        if (
            not re.search(r"[\[\]()]|\\\{|\\cup|\\in\b", golds[0])
            and len(_split_top(pred)) > 1
            and (len(_split_top(golds[0])) == 1 or _is_thousands(golds[0]))
            and _plain_number(pred) is None
        ):
            return False
        return _equal_one(golds[0], pred, tol)
    parts = _pred_parts(pred)
    if len(parts) > 64:
        return False
    if _match_all(golds, parts, tol):
        return True
    # a set or list of tuples written as one expression: let math-verify compare sets
    return _equal_one(", ".join(golds), pred, tol) if len(parts) == len(golds) else False


def grade(response: str, gold: Any, benchmark: str | None = None, thinking_open: bool = False) -> dict:
    """Grade one response: {"pred": extracted answer or None, "correct": bool, "gold": str}.

    ``benchmark`` must be a registered benchmark with a gold format (``benchmarks.graded()``: the
    papers' five unless more are registered) or None (unknown -> ValueError). Nothing else
    raises: a response that cannot be read is simply not correct. ``thinking_open``: the
    prompt ended inside a think block (see :func:`split_thinking`).
    """
    bench = check_benchmark(benchmark)
    try:
        golds = parse_gold(gold, bench)
    except Exception:  # noqa: BLE001
        golds = [""]
    pred = extract_answer(response, bench, thinking_open)
    _LOCAL.deadline = time.thread_time() + GRADE_BUDGET_SECONDS
    try:
        correct = _compare(pred, golds, _tolerance(gold), _unit(gold))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        correct = False
    finally:
        _LOCAL.deadline = None
    return {"pred": pred, "correct": bool(correct), "gold": ", ".join(golds)}


def is_correct(response: str, gold: Any, benchmark: str | None = None, thinking_open: bool = False) -> bool:
    """True when the answer extracted from ``response`` is equivalent to ``gold``."""
    return grade(response, gold, benchmark, thinking_open)["correct"]


def equivalent(pred: str | None, other: str | None, benchmark: str | None = None) -> bool:
    """Are two extracted answers the same answer (the grader's equivalence, ``other`` read as
    a gold)? Majority voting over samples groups answers with it. Never raises."""
    if pred is None or other is None:
        return False
    if pred.strip() == other.strip():
        return True
    bench = check_benchmark(benchmark)
    try:
        golds = parse_gold(other, bench)
    except Exception:  # noqa: BLE001
        return False
    _LOCAL.deadline = time.thread_time() + GRADE_BUDGET_SECONDS
    try:
        return bool(_compare(pred, golds, None, None))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False
    finally:
        _LOCAL.deadline = None
