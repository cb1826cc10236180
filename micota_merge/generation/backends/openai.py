"""`openai`: OpenAI-compatible servers (`vllm serve`, SGLang, a hosted API) through --base-url.

generate: our client (`servers/client.py`), one chat request per (question, sample), seeded as the
vllm backend seeds that sample; the server applies the chat template and `num_tokens` is its usage
count. eval: lm-eval's local-chat-completions, subclassed to spread requests over several servers
(`micota-chat-completions`). The vllm backend's `vllm serve` path (--data-parallel-size) uses
`run_servers` too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from micota_merge.generation.backends import Backend, EvalJob, GenerateJob, register


def server_payload(opts, question_id: str, user: str, sample: int, stop_ids: list[int]) -> dict:
    """One chat-completions request per (question, sample).

    vLLM draws sample i of a request with n samples from the seed `seed + i`, so this request draws the
    sample that `--backend vllm` (one request, n samples, the question's seed) writes as sample i; and
    its usage counts this answer's tokens alone."""
    from micota_merge.generation.generate import question_seed

    body = {
        "messages": [{"role": "user", "content": user}],
        "n": 1,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "max_tokens": opts.max_tokens,
        "seed": question_seed(opts.seed, question_id) + sample,
    }
    if stop_ids:  # a local checkpoint: stop where the local backends stop (vLLM and SGLang read this field)
        body["stop_token_ids"] = stop_ids
    if opts.chat_template_kwargs:  # the server applies the template: its switches travel with the request
        body["chat_template_kwargs"] = dict(opts.chat_template_kwargs)
    return body


def run_servers(job: GenerateJob, urls: list[str], key: Optional[str], name: str, concurrency: int) -> dict:
    """Send every pending (question, sample) to the servers; returns how the work was shared."""
    from micota_merge.generation.servers.client import Client, Request

    opts, users, prefill = job.opts, job.users, job.prefill
    client = Client(urls, name, key, concurrency=concurrency, retries=opts.retries, timeout=opts.request_timeout)
    # longest prompts first, as the local backends do: the slowest answers do not come last
    order = sorted(job.pending, key=lambda it: (-len(users[it[0]]), it[0], it[1]))
    requests = [
        Request((qi, s), server_payload(opts, job.questions[qi]["id"], users[qi], s, job.stop_ids)) for qi, s in order
    ]
    job.timing["loaded"] = time.perf_counter()
    # the template's prefill was prompt on the server too; the record keeps it, as the local
    # backends' do (unless the server sent the thinking apart and it was rebuilt)
    client.run(
        requests,
        lambda res: job.write(
            [
                job.answer_record(
                    *res.key,
                    res.text if res.text.startswith(prefill.strip() or "\0") else prefill + res.text,
                    res.num_tokens,
                    res.finish_reason,
                )
            ]
        ),
    )
    # how the work was shared, and what failed over
    return {
        "served_model": client.model,
        "requests_per_server": client.counts(),
        "failed_requests_per_server": client.failures(),
    }


def server_model_args(
    urls: Sequence[str],
    served: str,
    *,
    max_tokens: int,
    concurrency: int,
    retries: int,
    timeout: float,
    api_key_env: Optional[str],
    chat_template_kwargs: Optional[dict] = None,
) -> dict:
    """model_args of `micota-chat-completions` (lm-eval's local-chat-completions over several servers).

    The messages go as chat: the server applies the model's chat template, as the papers' setup does
    (with `chat_template_kwargs` in every request when given)."""
    return {
        **({"chat_template_kwargs": dict(chat_template_kwargs)} if chat_template_kwargs else {}),
        "model": served,
        "base_urls": [u + "/chat/completions" for u in urls],
        "num_concurrent": concurrency,
        "max_retries": retries + 1,
        "max_gen_toks": max_tokens,
        "timeout": int(timeout),
        "tokenizer_backend": None,
        "tokenized_requests": False,
        "api_key_env": api_key_env,
    }


class OpenAI(Backend):
    name = "openai"
    summary = "OpenAI-compatible servers given by --base-url (vllm serve, SGLang, a hosted API)"
    remote = True
    eval_fixed_batch_size = 1  # chat completions carry one conversation each; concurrency is num_concurrent

    def connect(
        self,
        base_urls: Sequence[str],
        api_key_env: Optional[str],
        model: str,
        local: Optional[Path],
        served_model: Optional[str],
    ) -> tuple[list[str], Optional[str], str]:
        """(normalized URLs, API key, the served model name): every server is asked before anything is
        written, so a typo in one URL is one line, not a late failure."""
        from micota_merge.generation.servers.client import api_key, normalize_url
        from micota_merge.generation.servers.client import served_model as find_served

        urls = list(dict.fromkeys(normalize_url(u) for u in base_urls))
        key = api_key(api_key_env)
        return urls, key, find_served(urls, key, model, local, served_model)

    def prepare_generate(self, opts, model_dir: Path, local: bool):
        _, _, name = self.connect(
            opts.base_url, opts.api_key_env, opts.model, model_dir if local else None, opts.served_model
        )
        return opts.model_copy(update={"served_model": name})

    def generate(self, job: GenerateJob) -> Optional[dict]:
        from micota_merge.generation.servers.client import api_key, normalize_url

        opts = job.opts
        urls = list(dict.fromkeys(normalize_url(u) for u in opts.base_url))
        return run_servers(job, urls, api_key(opts.api_key_env), opts.served_model, opts.concurrency)

    def lm_eval(self, job: EvalJob) -> tuple[str, dict]:
        from micota_merge.generation.servers.client import register_lm_eval_model

        return register_lm_eval_model(), server_model_args(
            job.urls,
            job.served,
            max_tokens=job.max_tokens,
            concurrency=job.concurrency,
            retries=job.retries,
            timeout=job.request_timeout,
            api_key_env=job.api_key_env,
            chat_template_kwargs=job.chat_template_kwargs,
        )


register(OpenAI())
