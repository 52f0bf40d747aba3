"""`OpenAIBackend`: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, TGI, a hosted API) as an autointerp
backend, through the standard library (urllib + threads; no new dependency). Bounded concurrency, retries with
exponential back-off on 429/5xx and timeouts, clear errors for 401/403/404. The API key is read from an
environment variable and lives only in the request header: never in a message, a log or a file.
`slot_logprobs` uses the completions endpoint with `echo` and `logprobs`; servers without it get None, and the
simulator falls back to generated numbers.

A server that misbehaves, or is hostile, cannot hang, exhaust or crash a run: each try has a wall-clock deadline
(http_deadline.py; not only a per-read timeout) and a cap on the answer's size, Retry-After is clamped and retries
are bounded, and every malformed answer is a BackendError naming what was wrong (openai_answers.py).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request

from .http_deadline import Deadline, deadline_opener
from .llm_backends import Backend, BackendError, Reply, SlotReply, cut_at_stop, match_candidates
from .llm_prompts import Prompt
from .openai_answers import (
    MalformedAnswer,
    TryAgain,
    parse_json,
    read_capped,
    read_chat,
    read_completion,
    read_usage,
    retry_after_seconds,
    server_message,
)

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # rate limits, overload and transient server faults
MAX_RETRY_AFTER = 60.0  # seconds: the longest wait between tries (a longer Retry-After or back-off is cut to it)
# An echo of a prompt with top-5 logprobs takes about 180 bytes a token (measured on a vLLM-shaped answer), so
# 16 MiB holds ~90k tokens: far past any autointerp prompt, yet a bound on what a broken server makes us hold.
MAX_ANSWER_BYTES = 16 * 2 ** 20


class OpenAIBackend(Backend):
    """An OpenAI-compatible server at base_url (e.g. "http://127.0.0.1:8000/v1"). The API key comes from the
    environment variable named by api_key_env (none needed for a local server without one).

    timeout: seconds for one whole try (connecting, waiting, reading the answer), not only for each read.
    max_retries: tries after the first, on 429/5xx, timeouts, dropped connections and bodies that are not one
    JSON document (never on 401/403/404, nor on well-formed JSON of the wrong shape: asking again gets the same).
    max_wait: the longest sleep between tries, whatever the back-off or a Retry-After header says.
    max_answer_bytes: a longer answer is refused."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, chat: bool = True,
                 echo_logprobs: int = 5, max_wait: float = MAX_RETRY_AFTER, max_answer_bytes: int = MAX_ANSWER_BYTES):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected http(s)://host[:port]/v1, got {base_url!r}")
        if not model:
            raise ValueError("model: an OpenAI-compatible backend needs a model name (--model or $OPENAI_MODEL)")
        if concurrency < 1 or max_retries < 0 or not 0 < timeout < math.inf:
            raise ValueError(f"concurrency >= 1, max_retries >= 0 and 0 < timeout < inf expected, got {concurrency}, "
                             f"{max_retries}, {timeout}")
        if not 0 <= max_wait < math.inf or max_answer_bytes < 1:  # `not` so that a nan is refused too
            raise ValueError(f"0 <= max_wait < inf and max_answer_bytes >= 1 expected, got {max_wait}, "
                             f"{max_answer_bytes}")
        self.base_url = base_url.rstrip("/")
        self.name, self.model = f"openai:{self.base_url}", model
        self.api_key_env, self.timeout, self.max_retries, self.backoff = api_key_env, timeout, max_retries, backoff
        self.max_wait, self.max_answer_bytes = max_wait, max_answer_bytes
        self.chat, self.echo_logprobs = chat, echo_logprobs
        self.parallelism = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        # built once (building one per request costs ~2 ms); urlopen's proxies from the environment, its redirects
        self._opener = deadline_opener()
        self._echo: bool | None = None  # learnt on the first slot_logprobs call
        self._chat_logprobs = True
        self.requests = 0  # HTTP requests sent (retries included)

    def __repr__(self) -> str:  # no key here, ever
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r}, key from ${self.api_key_env})"

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _scrub(self, message: str) -> str:
        """message with the API key blanked out (a server may quote it back in an error)."""
        key = os.environ.get(self.api_key_env)
        return message.replace(key, "***") if key else message

    def _post(self, path: str, body: dict) -> object:
        """The JSON answer to body at path, after at most max_retries retries."""
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt * (1 + random.random() / 4)  # jitter spreads the retries
            with self._slots:
                self.requests += 1
                try:
                    return self._try(url, data)
                except TryAgain as err:
                    last = self._scrub(str(err))
                    wait = wait if err.wait is None else err.wait
            if attempt < self.max_retries:
                time.sleep(min(wait, self.max_wait))  # outside the semaphore: waiting does not hold a request slot
        raise BackendError(f"{url}: no answer after {self.max_retries + 1} tries (last: {last})")

    def _try(self, url: str, data: bytes) -> object:
        """One request and its JSON answer, all within self.timeout seconds. TryAgain when it failed in a way the
        next try may not; BackendError when retrying cannot help."""
        request = urllib.request.Request(url, data, self._headers(), method="POST")
        late = f"no complete answer within the {self.timeout:g} s deadline (timed out)"
        with Deadline(self.timeout) as deadline:
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = read_capped(resp, self.max_answer_bytes)
            except urllib.error.HTTPError as err:
                raise self._refusal(url, err) from None
            except (OSError, http.client.HTTPException) as err:  # timeouts, resets, a garbled status line
                if deadline.expired:  # the deadline shut the socket: that is the reason, not what it caused
                    raise TryAgain(late) from None
                reason = getattr(err, "reason", err)
                raise TryAgain(f"{type(reason).__name__}: {reason}") from None
            if deadline.expired:  # a body cut short by the deadline can still look whole to http.client
                raise TryAgain(late)
        return parse_json(raw)

    def _refusal(self, url: str, err: urllib.error.HTTPError) -> Exception:
        """What an HTTP error status becomes: BackendError when retrying does not fix it, else TryAgain with the
        wait the server asked for (when it gave one that can be read)."""
        detail = self._scrub(server_message(err))
        if err.code in (401, 403):
            where = (f"the key in ${self.api_key_env}" if os.environ.get(self.api_key_env)
                     else f"no key was sent (${self.api_key_env} is not set)")
            return BackendError(f"{err.code} from {url}: the server refused the request ({where}){detail}", err.code)
        if err.code == 404:
            return BackendError(f"404 from {url}: no such endpoint, or the server has no model {self.model!r}"
                                f"{detail}", 404)
        if err.code not in RETRY_STATUS:
            return BackendError(f"{err.code} from {url}{detail}", err.code)
        retry_after = err.headers.get("Retry-After") if err.headers else None
        return TryAgain(f"{err.code}{detail}", retry_after_seconds(retry_after, self.max_wait))

    def _ask(self, path: str, body: dict, read):
        """(read(answer), (prompt_tokens, completion_tokens)) for the answer to body at path. A malformed answer
        is a BackendError naming the endpoint and the field; it is not asked again (a server that sent
        well-formed JSON of the wrong shape would send it again)."""
        answer = self._post(path, body)
        try:
            return read(answer), read_usage(answer)
        except MalformedAnswer as err:
            raise BackendError(f"{self.base_url}{path}: malformed answer: {err}") from None

    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0}
        if stop:
            body["stop"] = list(stop)[:4]  # the OpenAI API takes at most 4
        if self.chat:
            body["messages"] = prompt.messages()
            if top_logprobs and self._chat_logprobs:
                body.update(logprobs=True, top_logprobs=top_logprobs)
            try:
                (text, tokens), usage = self._ask("/chat/completions", body, read_chat)
            except BackendError as err:
                if "logprobs" not in body or err.status != 400:
                    raise
                self._chat_logprobs = False  # this server refuses logprobs on chat: ask without them
                del body["logprobs"], body["top_logprobs"]
                (text, tokens), usage = self._ask("/chat/completions", body, read_chat)
        else:
            body["prompt"] = prompt.text()
            if top_logprobs:
                body["logprobs"] = top_logprobs
            (text, tokens), usage = self._ask("/completions", body, read_completion)
        cut = cut_at_stop(text, stop)
        if tokens is not None:
            tokens = [g for g in tokens if g.offset < len(cut)]
        return Reply(cut, tokens, *usage)

    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply | None:
        if self._echo is False:
            return None
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "echo": True,
                "logprobs": self.echo_logprobs}
        try:
            (_, tokens), (prompt_tokens, _) = self._ask("/completions", body, read_completion)
        except BackendError as err:
            if err.status in (400, 404, 422, 501):  # no completions endpoint, or no echo
                self._echo = False
                return None
            raise
        if not tokens:
            self._echo = False
            return None
        starts = {g.offset: g for g in tokens}
        self._echo = True
        return SlotReply([match_candidates(starts[s].top, candidates) if s in starts else {} for s in slots],
                         prompt_tokens)
