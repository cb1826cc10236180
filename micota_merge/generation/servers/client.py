"""OpenAI-compatible servers as a generation backend: `vllm serve` (one GPU, data-parallel over
many, or many nodes through Ray), SGLang, or a hosted API.

The client is aiohttp (already a dependency of lm-eval and datasets): chat completions with the
model's chat template applied by the server, at most `concurrency` requests in flight over all
servers together, each request sent to the server with the fewest requests in flight. A request
that fails to connect, is cut off, times out, or gets HTTP 429 / 5xx is retried with exponential
backoff on another server (the failed one rests for the backoff first); other HTTP errors are the
user's to fix and stop the run with the server's message. Results come back through a callback in
completion order, so the caller writes each record as soon as it exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from micota_merge.core.errors import StageFailed, UserError
from micota_merge.core.lengths import Answer, from_server
from micota_merge.core.options import default_of
from micota_merge.generation.options import ServerOptions

log = logging.getLogger(__name__)

# Errors worth another try (on another server): the server is down, restarting or overloaded.
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def normalize_url(url: str) -> str:
    """`http://host:port/v1` (a trailing slash or /chat/completions is dropped)."""
    u = url.strip().rstrip("/")
    for tail in ("/chat/completions", "/completions"):
        if u.endswith(tail):
            u = u[: -len(tail)]
    if not u.startswith(("http://", "https://")):
        raise UserError(f"--base-url {url!r}: give the API root with its scheme, e.g. http://127.0.0.1:8000/v1")
    return u


def api_key(env_name: Optional[str]) -> Optional[str]:
    """The key from the environment variable the user named (never from a flag: it would show in `ps`)."""
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise UserError(
            f"--api-key-env {env_name}: the environment variable {env_name} is not set (or empty); "
            f"export {env_name}=<your key>, or drop --api-key-env for a server without keys"
        )
    return key


def _headers(key: Optional[str]) -> dict:
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def list_models(url: str, key: Optional[str], timeout: float = 15.0) -> list[dict]:
    """GET <url>/models: the check that a --base-url is an OpenAI-compatible server we may use."""
    req = urllib.request.Request(url + "/models", headers=_headers(key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise UserError(
                f"--base-url {url}: the server refused the request (HTTP {e.code}): pass "
                "--api-key-env NAME with the variable that holds its API key"
            ) from None
        if e.code == 404:
            raise UserError(
                f"--base-url {url}: {url}/models was not found (HTTP 404); an OpenAI-compatible "
                "server's API root usually ends in /v1"
            ) from None
        raise UserError(f"--base-url {url}: {url}/models answered HTTP {e.code}; is the server healthy?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"--base-url {url}: cannot reach the server ({reason}); start it (e.g. `vllm serve MODEL "
            "--port PORT`) or fix the URL"
        ) from None
    try:
        data = json.loads(body)["data"]
        assert isinstance(data, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(
            f"--base-url {url}: {url}/models did not answer with an OpenAI model list; is this an "
            "OpenAI-compatible server's API root (.../v1)?"
        ) from None
    return data


def served_model(
    urls: list[str], key: Optional[str], model: str, local: Optional[Path], served: Optional[str] = None
) -> str:
    """The model name to send in requests, checked against what every server lists.

    `served` (--served-model) wins; else the name is --model itself when a server lists it; else, for
    a local checkpoint folder, the served model loaded from that folder (vLLM lists it as `root`), or
    the only model a server serves."""
    listed = {u: list_models(u, key) for u in urls}
    want = served
    first = listed[urls[0]]
    ids = [m.get("id") for m in first]
    if want is None:
        if model in ids:
            want = model
        elif local is not None:
            same = [m["id"] for m in first if _same_folder(m.get("root"), local) or _same_folder(m.get("id"), local)]
            if not same:
                # never guess: records are labelled with this folder's content, so the server must serve it
                raise UserError(
                    f"--base-url {urls[0]} serves {', '.join(map(str, ids[:8])) or 'nothing'}, not the "
                    f"folder {model}; if one of those is this checkpoint (loaded from another path), pass "
                    "--served-model NAME"
                )
            want = same[0]
        else:
            raise UserError(
                f"--model {model}: not a local checkpoint folder and not served by {urls[0]} (it serves "
                f"{', '.join(map(str, ids[:8])) or 'nothing'}); pass one of those, or --served-model"
            )
    for u, models in listed.items():
        if want not in [m.get("id") for m in models]:
            raise UserError(
                f"--base-url {u} does not serve {want!r} (it serves "
                f"{', '.join(str(m.get('id')) for m in models[:8]) or 'nothing'}): every --base-url must "
                "serve the same model"
            )
    return want


def _same_folder(name: Any, folder: Path) -> bool:
    if not isinstance(name, str) or not name:
        return False
    try:
        return Path(name).resolve() == folder.resolve()
    except OSError:
        return False


# ---------------------------------------------------------------- the client


@dataclass
class Request:
    key: Any  # the caller's handle, given back with the result
    payload: dict  # the chat-completions body, without `model`


@dataclass
class Result:
    key: Any
    text: str
    num_tokens: int  # usage.completion_tokens
    finish_reason: str
    server: str


@dataclass
class _Server:
    url: str
    in_flight: int = 0
    resting_until: float = 0.0
    done: int = 0
    failures: int = 0
    streak: int = 0  # failures in a row: how long it rests


@dataclass
class ServerPool:
    """Which server takes the next request, and how long a failing one rests: the one policy of the
    generate client and of eval's lm-eval model. The least busy awake server (fewest requests in
    flight; ties drawn at random), not the one that just failed this request when another is awake;
    a failing server rests `backoff` seconds, doubling per failure in a row up to `max_backoff`, or
    as long as the server's Retry-After says."""

    urls: list[str]
    backoff: float = 0.5  # first rest of a failing server; doubles per failure in a row
    max_backoff: float = 30.0
    servers: list[_Server] = field(init=False)

    def __post_init__(self):
        self.servers = [_Server(u) for u in self.urls]

    def pick(self, avoid: Optional[_Server] = None) -> _Server:
        now = time.monotonic()
        awake = [s for s in self.servers if s.resting_until <= now]
        pool = [s for s in awake if s is not avoid] or awake
        if not pool:  # everyone rests: the one that wakes first
            return min(self.servers, key=lambda s: s.resting_until)
        low = min(s.in_flight for s in pool)
        return random.choice([s for s in pool if s.in_flight == low])

    def succeeded(self, server: _Server) -> None:
        server.done += 1
        server.streak = 0

    def failed(self, server: _Server, after: float = 0.0) -> float:
        """Count the failure and rest the server; returns the rest in seconds."""
        server.failures += 1
        server.streak += 1
        rest = min(self.max_backoff, self.backoff * 2 ** (server.streak - 1)) * random.uniform(0.8, 1.2)
        rest = max(rest, after)  # a rate limit says how long
        server.resting_until = max(server.resting_until, time.monotonic() + rest)
        return rest


class RetryableError(Exception):
    def __init__(self, message: str, after: float = 0.0):
        super().__init__(message)
        self.after = after  # the server's Retry-After, seconds


def _retry_after(value: Optional[str]) -> float:
    try:
        return min(300.0, max(0.0, float(value))) if value else 0.0
    except ValueError:  # an HTTP date: rare, and the backoff covers it
        return 0.0


@dataclass
class Client:
    urls: list[str]
    model: str
    key: Optional[str] = None
    # the defaults are the stages' own (ServerOptions), so a client made here agrees with the CLI's
    concurrency: int = default_of(ServerOptions, "concurrency")
    retries: int = default_of(ServerOptions, "retries")  # further tries of one request, over all servers
    timeout: float = default_of(ServerOptions, "request_timeout")
    backoff: float = 0.5  # first rest of a failing server; doubles per failure in a row
    max_backoff: float = 30.0
    pool: ServerPool = field(init=False)

    def __post_init__(self):
        self.pool = ServerPool(self.urls, self.backoff, self.max_backoff)

    @property
    def servers(self) -> list[_Server]:
        return self.pool.servers

    def counts(self) -> dict[str, int]:
        return {s.url: s.done for s in self.servers}

    def failures(self) -> dict[str, int]:
        return {s.url: s.failures for s in self.servers}

    def run(self, requests: list[Request], on_result: Callable[[Result], None]) -> None:
        """Send every request; `on_result` is called (in this thread) as each one finishes."""
        if requests:
            asyncio.run(self._run(requests, on_result))

    async def _run(self, requests: list[Request], on_result: Callable[[Result], None]) -> None:
        import aiohttp

        sem = asyncio.Semaphore(self.concurrency)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout)
        conn = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=conn, headers=_headers(self.key)) as session:

            async def one(req: Request) -> None:
                async with sem:
                    on_result(await self._send(session, req))

            tasks = [asyncio.create_task(one(r)) for r in requests]
            try:
                # the first failure (a request out of retries, a user error) stops the rest
                for fut in asyncio.as_completed(tasks):
                    await fut
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, session, req: Request) -> Result:
        import aiohttp

        body = {"model": self.model, **req.payload}
        last_error, server = "", None
        for attempt in range(self.retries + 1):
            server = self.pool.pick(server)
            if server.resting_until > time.monotonic():
                await asyncio.sleep(server.resting_until - time.monotonic())
            server.in_flight += 1
            try:
                result = await self._post(session, server, req.key, body)
                self.pool.succeeded(server)
                return result
            except (RetryableError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                last_error = f"{server.url}: {_describe(e)}"
                # the retry goes to an awake server, or waits for the first to wake
                rest = self.pool.failed(server, getattr(e, "after", 0.0))
                if attempt < self.retries:
                    log.warning(
                        "request %s failed (%s); retry %d/%d (the server rests %.1f s)",
                        req.key,
                        last_error,
                        attempt + 1,
                        self.retries,
                        rest,
                    )
            finally:
                server.in_flight -= 1
        raise StageFailed(
            f"a request failed {self.retries + 1} times over {len(self.servers)} server(s) (last: "
            f"{last_error}); the records written so far are kept: run the same command again to "
            "resume once the servers are up"
        )

    async def _post(self, session, server: _Server, key: Any, body: dict) -> Result:
        async with session.post(server.url + "/chat/completions", json=body) as r:
            text = await r.text()
            if r.status in RETRY_STATUS:
                raise RetryableError(f"HTTP {r.status}: {text[:200]}", _retry_after(r.headers.get("Retry-After")))
            if r.status in (401, 403):
                raise UserError(
                    f"--base-url {server.url}: the server refused the API key (HTTP {r.status}); check --api-key-env"
                )
            if r.status >= 400:
                raise UserError(f"--base-url {server.url} rejected a request (HTTP {r.status}): {_message(text)}")
        try:
            data = json.loads(text)
            choice = data["choices"][0]
            content = choice["message"]["content"] or ""
            reason, num = from_server(
                choice.get("finish_reason"), int(data["usage"]["completion_tokens"]), body.get("max_tokens")
            )
            reason = reason or "stop"  # no cap in the request: nothing could have cut the answer
            reasoning = choice["message"].get("reasoning") or choice["message"].get("reasoning_content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RetryableError(f"not a chat completion: {text[:200]}") from None
        if reasoning:
            # a reasoning model behind a reasoning parser (vLLM `reasoning`, DeepSeek's API `reasoning_content`)
            # sends its chain of thought apart; the record keeps the whole answer, as R1 writes it
            content = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
        return Result(key, content, num, reason, server.url)


def _message(text: str) -> str:
    try:
        data = json.loads(text)
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else str(err)
        return str(msg or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


# ---------------------------------------------------------------- lm-eval


def register_lm_eval_model() -> str:
    """lm-eval's `local-chat-completions` over several servers: the name to pass as its model.

    lm-eval sends each request to one `base_url`; this subclass sends each to the least busy of
    `base_urls` and each retry (lm-eval retries with tenacity) to another, resting a server that failed.
    The API key is read from the environment variable `api_key_env`, so it never enters lm-eval's
    results file (which records model_args)."""
    name = "micota-chat-completions"
    from lm_eval.api.registry import register_model
    from lm_eval.models.openai_completions import LocalChatCompletion

    try:
        from lm_eval.api.registry import get_model

        get_model(name)
        return name
    except Exception:  # not registered yet
        pass

    import contextvars

    current = contextvars.ContextVar("micota_base_url", default=None)

    @register_model(name)
    class ServersChatCompletion(LocalChatCompletion):
        def __init__(self, base_urls=None, api_key_env=None, chat_template_kwargs=None, **kwargs):
            urls = list(base_urls or [kwargs.get("base_url")])
            self._pool = ServerPool(urls)
            self._api_key_env = api_key_env
            self._template_kwargs = dict(chat_template_kwargs or {})
            super().__init__(**{**kwargs, "base_url": urls[0]})

        def _create_payload(self, messages, *args, **kwargs):
            # the server renders the template: its switches (enable_thinking) go with every request
            payload = super()._create_payload(messages, *args, **kwargs)
            if self._template_kwargs:
                payload["chat_template_kwargs"] = dict(self._template_kwargs)
            return payload

        # lm-eval reads self.base_url inside each request: per asyncio task, the server chosen for it
        @property
        def base_url(self):
            return current.get() or self._pool.servers[0].url

        @base_url.setter
        def base_url(self, value):
            pass

        @property
        def api_key(self):
            return os.environ.get(self._api_key_env, "") if self._api_key_env else ""

        @property
        def header(self):
            return _headers(self.api_key or None)

        async def amodel_call(self, session, sem, messages, **kwargs):
            server = self._pool.pick()
            token = current.set(server.url)
            server.in_flight += 1
            try:
                out = await super().amodel_call(session, sem, messages, **kwargs)
                self._pool.succeeded(server)
                return out
            except BaseException:
                self._pool.failed(server)  # lm-eval retries (tenacity); the next try prefers an awake server
                raise
            finally:
                server.in_flight -= 1
                current.reset(token)

        def parse_generations(self, outputs, **kwargs):
            # each answer carries the server's finish_reason and usage count (lengths.py), which eval's
            # scoring reads instead of re-tokenising the text
            answers = []
            for out in outputs if isinstance(outputs, list) else [outputs]:
                texts = super().parse_generations(out, **kwargs)
                choices = out.get("choices") if isinstance(out, dict) else None
                choices = choices if isinstance(choices, list) else []
                usage = out.get("usage") if isinstance(out, dict) else None
                # usage covers the whole response: one answer's count only when it holds one answer
                tokens = usage.get("completion_tokens") if isinstance(usage, dict) and len(choices) == 1 else None
                for i, text in enumerate(texts):
                    if text is None:
                        answers.append(None)
                        continue
                    choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == i), {})
                    reason, num = from_server(choice.get("finish_reason"), tokens)
                    answers.append(Answer(text, reason, num))
            return answers

        def model_call(self, messages, **kwargs):
            server = self._pool.pick()
            token = current.set(server.url)
            try:
                return super().model_call(messages, **kwargs)
            finally:
                current.reset(token)

    return name
