"""lm-eval's hf and vllm models, each answer carrying how its engine ended it (`lengths.Answer`).

lm-eval's `generate_until` hands back text alone, so its task code can only re-tokenize the text to
guess a length and a truncation. These thin subclasses keep, per context, what the engine returned
for every answer of a batch (the generated ids; vLLM's `finish_reason`), and hand each answer back as
an `Answer` with that finish reason and count (`micota_merge.core.lengths`), matched to lm-eval's text by
context and text. The response cache, including the partial entries lm-eval writes per batch (what a
killed run resumes from), stores the answers with their facts. (`--backend openai` is `servers.py`'s
`micota-chat-completions`: the server's `finish_reason` and `usage.completion_tokens`.)
"""

from __future__ import annotations

import logging
from typing import Optional

from micota_merge.core.lengths import LENGTH, STOP, Answer

LOG = logging.getLogger("micota_merge.evaluation.evaluate")

HF, VLLM = "micota-hf", "micota-vllm"


class _Ledger:
    """The answers the engine gave, per context, until lm-eval's text for each is matched to one."""

    def __init__(self):
        self.by_context: dict[str, list[Answer]] = {}

    def add(self, context: str, text: str, reason: Optional[str], num_tokens: Optional[int]) -> None:
        self.by_context.setdefault(context, []).append(Answer(text, reason, num_tokens))

    def find(self, context: str, text: str, take: bool = False) -> Optional[Answer]:
        answers = self.by_context.get(context) or []
        for i, a in enumerate(answers):
            # several answers to one context with the same text are alike: any one of them is right
            if str(a) == text:
                return answers.pop(i) if take else a
        return None


class _CacheHook:
    """lm-eval's partial-cache hook, storing the engine's facts with each answer of a finished batch."""

    def __init__(self, hook, ledger_of):
        self.hook, self.ledger_of = hook, ledger_of

    def add_partial(self, attr, req, res) -> None:
        ledger = self.ledger_of()
        if attr == "generate_until" and ledger is not None and isinstance(res, str) and not isinstance(res, Answer):
            res = ledger.find(req[0], res) or res
        self.hook.add_partial(attr, req, res)


class _Recorder:
    """What both subclasses share: a ledger per generate_until call, and the answers made of it."""

    _ledger: Optional[_Ledger] = None
    _unmatched_warned = False

    def set_cache_hook(self, cache_hook) -> None:
        super().set_cache_hook(_CacheHook(cache_hook, lambda: self._ledger))

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._ledger = _Ledger()
        try:
            texts = super().generate_until(requests, disable_tqdm=disable_tqdm)
            out, unmatched = [], 0
            for req, text in zip(requests, texts):
                answer = self._ledger.find(req.args[0], text, take=True) if isinstance(text, str) else None
                unmatched += answer is None
                out.append(text if answer is None else answer)
            if unmatched and not _Recorder._unmatched_warned:
                _Recorder._unmatched_warned = True
                LOG.warning(
                    "%d answer(s) could not be matched to what the engine returned (a context cut to fit "
                    "the model's length?); their length and truncation are estimated from the text",
                    unmatched,
                )
            return out
        finally:
            self._ledger = None


def _first_stop_string(decode, toks: list[int], stops: list[str]) -> Optional[int]:
    """The shortest prefix of `toks` whose text holds a stop string (spelled out in pieces, as lm-eval's
    stopping criteria and post-processing see it), or None."""
    stops = [s for s in stops if s]
    if not stops or not any(s in decode(toks) for s in stops):
        return None
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(toks[:mid]) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def register(backend: str) -> str:
    """Register the subclass of lm-eval's model `backend` (lm-eval's names: "hf" for our transformers
    backend, "vllm"); its name for simple_evaluate."""
    from lm_eval.api.registry import get_model

    name = {"hf": HF, "vllm": VLLM}[backend]
    try:
        get_model(name)
        return name
    except Exception:  # not registered yet
        pass
    (_register_hf if backend == "hf" else _register_vllm)()
    return name


def _register_hf() -> None:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import postprocess_generated_text

    @register_model(HF)
    class RecordingHFLM(_Recorder, HFLM):
        """transformers: an answer ends at its first stop token (the generation config's EOS ids, or a
        stop string that is one token), at a stop string spelled out in pieces, or at max_new_tokens
        ("length"); lm-eval pads a row that stopped early, so the ids after its stop are not counted."""

        _batch_contexts: Optional[list[str]] = None

        def tok_batch_encode(self, strings, *args, **kwargs):
            self._batch_contexts = list(strings)  # generate_until encodes each batch just before generating it
            return super().tok_batch_encode(strings, *args, **kwargs)

        def _stop_ids(self, stop: list[str]) -> set[int]:
            eos = self.model.generation_config.eos_token_id
            ids = set([eos] if isinstance(eos, int) else (eos or []))
            vocab = self.tokenizer.get_vocab()
            ids.update(vocab[s] for s in stop if s in vocab)
            return ids

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            cont = super()._model_generate(context, max_length, stop, **generation_kwargs)
            contexts, self._batch_contexts = self._batch_contexts, None
            if self._ledger is None or contexts is None or len(contexts) != cont.shape[0]:
                return cont
            width = context.shape[1]
            max_new = max_length - width
            stop_ids = self._stop_ids(list(stop or []))
            think = self.think_end_token
            for ctx, row in zip(contexts, cont.tolist()):
                toks = row[width:]
                end = next((i + 1 for i, t in enumerate(toks) if t in stop_ids), None)
                # a stop string spelled out before that (lm-eval cuts the text there)
                spelled = _first_stop_string(self.tok_decode, toks[:end], list(stop or []))
                end = spelled if spelled is not None else end
                if end is not None:
                    num, reason = end, STOP
                else:
                    num, reason = len(toks), LENGTH if len(toks) >= max_new else STOP
                # the text exactly as HFLM.generate_until makes it, to match the two up
                shown = toks
                if isinstance(think, int) and think in shown:
                    shown = shown[len(shown) - shown[::-1].index(think) :]
                text = self.tok_decode(shown)
                if isinstance(think, int):
                    text = text.lstrip()
                text = postprocess_generated_text(
                    generation=text, stop=stop, think_end_token=think if isinstance(think, str) else None
                )
                self._ledger.add(ctx, text, reason, num)
            return cont


def _register_vllm() -> None:
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import postprocess_generated_text
    from lm_eval.models.vllm_causallms import VLLM as _VLLM  # backends.vllm.prepare_vllm made it importable

    @register_model(VLLM)
    class RecordingVLLM(_Recorder, _VLLM):
        """vLLM: its own `finish_reason` and generated ids (the stop token included, as vLLM counts it)."""

        _contexts_by_ids: Optional[dict[tuple, str]] = None

        def tok_encode(self, string, *args, **kwargs):
            ids = super().tok_encode(string, *args, **kwargs)
            if self._ledger is not None and isinstance(string, (list, tuple)):
                # generate_until encodes every context at once before batching them
                self._contexts_by_ids = {tuple(i): s for s, i in zip(string, ids)}
            return ids

        def _model_generate(self, requests, generate=False, sampling_params=None):
            outs = super()._model_generate(requests=requests, generate=generate, sampling_params=sampling_params)
            if not generate or self._ledger is None or not self._contexts_by_ids:
                return outs
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(requests)
            for ids, out, sp in zip(requests, outs, params):
                ctx = self._contexts_by_ids.get(tuple(ids))
                if ctx is None:  # the context was cut to fit: left to the estimate, with a warning
                    continue
                c = out.outputs[0]
                reason = {"length": LENGTH, "stop": STOP}.get(c.finish_reason)
                text = postprocess_generated_text(c.text, list(getattr(sp, "stop", None) or []), self.think_end_token)
                self._ledger.add(ctx, text, reason, len(c.token_ids))
            return outs
