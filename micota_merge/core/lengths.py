"""How long an answer is and whether it was cut off: one definition for `generate`, `eval` and the sweep probe.

- `num_tokens`: the tokens the engine generated for the answer, up to and including the stop token
  it ended on (EOS or the chat template's end of turn). Where the engine returns the generated ids
  (transformers, vLLM: in `generate` and in `eval`'s transformers and vllm backends) they are counted; an
  OpenAI-compatible server's count is its `usage.completion_tokens` (vLLM's server counts the same
  ids). It is never a re-tokenisation of the decoded text, which differs wherever the model spelled
  out, token by token, a string its tokenizer merges (a random tiny model's 16 newlines re-tokenize
  as 1), and which cannot see a stop token left out of the text.
- `finish_reason`: "length" when the answer ran to the max-new-tokens cap without a stop token, else
  "stop". vLLM's and the server's own `finish_reason` ("length" is theirs too); for transformers,
  whether the generated ids reached the cap without a stop token or stop string.
- `truncated` is `finish_reason == "length"`.
- `thinking_tokens` / `answer_tokens` split `num_tokens` at the end of the think block: the thinking
  part re-tokenized with the model's tokenizer (at most `num_tokens`), the answer the rest; with no
  tokenizer at hand (a hosted model) the split is by characters.

Only where the generator reports nothing is there an estimate: plain `lm_eval` with its stock models
passes text alone, and a server may leave out `finish_reason` or (eval only: `generate` retries such a
response as malformed) `usage`. A missing count is the response re-tokenized with the model's
tokenizer (none without one); a missing finish reason is `estimate()`: "length" when the count
reached the cap. In eval's per-sample logs those answers have `finish_reason` null.
"""

from __future__ import annotations

from typing import Callable, Optional

LENGTH, STOP = "length", "stop"


class Answer(str):
    """An answer's text, carrying how its generator ended it: lm-eval passes responses along as strings
    (through its filters, its response cache and its per-sample logs), so the facts travel with them."""

    finish_reason: Optional[str]
    num_tokens: Optional[int]

    def __new__(cls, text: str, finish_reason: Optional[str] = None, num_tokens: Optional[int] = None):
        obj = super().__new__(cls, text)
        obj.finish_reason = finish_reason
        obj.num_tokens = None if num_tokens is None else int(num_tokens)
        return obj

    def __reduce__(self):
        # lm-eval's response cache pickles answers; a resumed run must read back the same facts
        return Answer, (str(self), self.finish_reason, self.num_tokens)


def finish(token_ids: list[int], stop_ids: set[int], max_tokens: int) -> tuple[list[int], str]:
    """The answer's tokens up to and including the first stop token, and why it ended."""
    for i, t in enumerate(token_ids):
        if t in stop_ids:
            return list(token_ids[: i + 1]), STOP
    return list(token_ids[:max_tokens]), LENGTH if len(token_ids) >= max_tokens else STOP


def from_server(
    finish_reason: Optional[str], completion_tokens, max_tokens: Optional[int] = None
) -> tuple[Optional[str], Optional[int]]:
    """An OpenAI-compatible server's verdict: "stop" covers EOS, stop tokens and stop strings, "length"
    is the max_tokens cap. Where it gives no finish reason: the estimate, from its count and `max_tokens`
    (None without them)."""
    num = None if completion_tokens is None else int(completion_tokens)
    if finish_reason is None:
        return estimate(num, max_tokens), num
    return (LENGTH if finish_reason == LENGTH else STOP), num


def estimate(num_tokens: Optional[int], max_tokens: Optional[int]) -> Optional[str]:
    """The finish reason where the generator gave none: "length" when the count reached the cap."""
    if num_tokens is None or not max_tokens:
        return None
    return LENGTH if num_tokens >= max_tokens else STOP


def split_tokens(num_tokens: int, thinking: str, generated_chars: int, count: Optional[Callable[[str], int]]) -> int:
    """How many of the answer's `num_tokens` are thinking (`thinking`: the generated text up to and
    including the end-of-thinking tag; `generated_chars`: the length of the whole generated text),
    counted with `count` (the model's tokenizer) or, without one, by characters."""
    if not thinking:
        return 0
    if count is not None:
        return min(num_tokens, count(thinking))
    return min(num_tokens, round(num_tokens * len(thinking) / max(generated_chars, 1)))
