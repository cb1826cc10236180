"""What a chat template does besides wrapping turns, found by rendering it with sentinels.

Real templates do more than the ChatML picture suggests:
- DeepSeek-R1's (newer revisions) *prefills* `<think>\\n` after the assistant tag, so the model's
  output starts inside the thought; and when it renders a finished assistant turn it keeps only
  the text after `</think>`, so a record re-rendered for training through it loses its reasoning.
- Qwen3's hybrid template, asked for no thinking (`enable_thinking=False`), writes an empty
  `<think>\n\n</think>\n\n` after the assistant tag: a prefill like R1's, found the same way.
- Qwen2.5-Instruct's *injects a default system prompt* ("You are Qwen, created by Alibaba
  Cloud...") when the conversation has none.

`template_facts` finds these by rendering with sentinel strings, so it works for any template
without parsing it. `render_completion` renders a prompt and a finished answer the way the model
saw and produced them: the prompt exactly as at generation (prefill included), then the answer
verbatim, then the template's end of turn; it never lets the template rewrite the answer. Where
an answer begins is found by rendering a finished answer that thinks (`assistant_tag`): Qwen3's
template writes an empty think block before a plain finished answer, which is not part of the tag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text

_ANSWER = "\u2063MICOTA-ANSWER\u2063"
_SYSTEM = "\u2063MICOTA-SYSTEM\u2063"
_USER = "\u2063MICOTA-USER\u2063"


@dataclass
class TemplateFacts:
    prefill: str = ""  # text the generation prompt adds after the assistant tag (R1: "<think>\n")
    default_system: Optional[str] = None  # system prompt injected when none is given
    end_of_turn: str = ""  # text after a finished assistant answer ("<|im_end|>\n")
    rewrites_answer: bool = False  # the template changes a finished answer (R1 drops the thinking)


def render_with_tokenizer(tokenizer, kwargs: Optional[dict] = None) -> Render:
    """The tokenizer's own template; `kwargs` are the template's switches (Qwen3's `enable_thinking`)."""
    extra = dict(kwargs or {})

    def render(messages: list, add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )

    return render


def render_with_template(
    template: str, bos_token: str = "", eos_token: str = "", kwargs: Optional[dict] = None
) -> Render:
    """Render a raw template string as transformers does (sandboxed jinja, trim/lstrip blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list, add_generation_prompt: bool) -> str:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **(kwargs or {}),
        )

    return render


def _user(text: str = _USER) -> dict:
    return {"role": "user", "content": text}


_REASONING = "\u2063MICOTA-REASONING\u2063"


def assistant_tag(render: Render, prompt: list) -> Optional[str]:
    """The text of `prompt`'s conversation up to where a finished assistant answer's own text begins.

    Rendered with a sentinel answer that thinks first: a template that keeps the reasoning of a finished
    answer (Qwen2.5's, Qwen3's) shows where the answer starts, even where it writes an empty think block
    before a plain answer (Qwen3's); one that drops the reasoning (R1's) is read with a plain sentinel."""
    for content, mark in (
        (f"<think>\n{_REASONING}\n</think>\n\n{_ANSWER}", "<think>\n" + _REASONING),
        (_ANSWER, _ANSWER),
    ):
        turn = render(prompt + [{"role": "assistant", "content": content}], False)
        if mark in turn:
            return turn.split(mark, 1)[0]
    return None


def template_facts(render: Render) -> TemplateFacts:
    facts = TemplateFacts()
    prompt = render([_user()], True)
    turn = render([_user(), {"role": "assistant", "content": _ANSWER}], False)
    tag = assistant_tag(render, [_user()])
    if _ANSWER in turn:
        facts.end_of_turn = turn.split(_ANSWER, 1)[1]
        if tag is not None and prompt.startswith(tag):
            facts.prefill = prompt[len(tag) :]
    thought = "x</think>y"
    facts.rewrites_answer = thought not in render([_user(), {"role": "assistant", "content": thought}], False)
    try:
        with_system = render([{"role": "system", "content": _SYSTEM}, _user()], True)
    except Exception:  # templates that refuse a system role inject none either
        return facts
    if _SYSTEM in with_system:
        pre, post = with_system.split(_SYSTEM, 1)
        if prompt.startswith(pre) and prompt.endswith(post) and len(prompt) > len(pre) + len(post):
            facts.default_system = prompt[len(pre) : len(prompt) - len(post)]
    return facts


def render_completion(render: Render, prompt: list, answer: str) -> tuple[str, str]:
    """(prompt text, full text) for a prompt and its finished answer, as at generation time.

    `answer` is the whole assistant turn as a record holds it, prefill included (a record written
    by `generate` from an R1-templated model starts with "<think>\\n"). The full text is the
    prompt's own rendering up to the assistant tag, the answer verbatim, then the end of turn.
    """
    prompt_text = render(prompt, True)
    turn = render(prompt + [{"role": "assistant", "content": _ANSWER}], False)
    if _ANSWER not in turn:  # a template that drops the answer: fall back to its own rendering
        return prompt_text, render(prompt + [{"role": "assistant", "content": answer}], False)
    after = turn.split(_ANSWER, 1)[1]
    return prompt_text, assistant_tag(render, prompt) + answer + after
