"""Language models for autointerp, behind one small interface with two calls:

    backend.generate(prompt, max_tokens, top_logprobs=0, stop=())  -> Reply (text, per-token alternatives)
    backend.slot_logprobs(text, slots, candidates) -> [{candidate: logprob}] per slot, or None (not offered)

`slot_logprobs` reads the model's next-token distribution at given character offsets of one prompt, in
one pass: what the all-at-once simulator (Bills et al. 2023) and the yes/no judges need. Two backends:

- `LocalBackend`: any `transformers` causal LM, offline (default `fastsae.model.load("gemma-3-270m")`,
  a 270M base model: a weak explainer). Greedy decoding; exact log-probabilities.
- `OpenAIBackend`: any OpenAI-compatible HTTP server (vLLM, llama.cpp server, TGI, a hosted API) through
  the standard library (urllib + threads; no new dependency). Bounded concurrency, retries with
  exponential back-off on 429/5xx and timeouts, clear errors for 401/403/404. The API key is read from an
  environment variable and lives only in the request header: never in a message, a log or a file.
  `slot_logprobs` uses the completions endpoint with `echo` and `logprobs`; servers without it get None,
  and the simulator falls back to generated numbers.
  A server that misbehaves, or is hostile, cannot hang, exhaust or crash a run: each try has a wall-clock
  deadline (not only a per-read timeout) and a cap on the answer's size, Retry-After is clamped and retries are
  bounded, and every malformed answer is a BackendError naming what was wrong.

Nothing here caches; `cache.CachedBackend` wraps any backend with the on-disk cache.
"""

from __future__ import annotations

import datetime
import email.utils
import http.client
import itertools
import json
import math
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field

from .llm_prompts import Prompt

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # rate limits, overload and transient server faults
MAX_RETRY_AFTER = 60.0  # seconds: the longest wait between tries (a longer Retry-After or back-off is cut to it)
# An echo of a prompt with top-5 logprobs takes about 180 bytes a token (measured on a vLLM-shaped answer), so
# 16 MiB holds ~90k tokens: far past any autointerp prompt, yet a bound on what a broken server makes us hold.
MAX_ANSWER_BYTES = 16 * 2 ** 20
# OpenAI answers nest 6 levels deep (choices[0].logprobs.content[i].top_logprobs[j]); json's C parser recurses
# once a level and fails with a RecursionError near 1,000 (or crashes, if the recursion limit was raised).
MAX_JSON_DEPTH = 100
ERROR_BYTES = 64 * 2 ** 10  # of an error answer's body, read for its message (of which 300 characters are shown)
PREFIX_MIN = 32  # tokens: a shared prompt prefix shorter than this is not worth keeping the key/value cache of
PREFIX_SLOTS = 4  # prefixes kept (the global instructions, the current feature's explanation, ...)


class BackendError(RuntimeError):
    """A language-model request that failed for a reason retrying does not fix (or retries ran out)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status, when there was one


@dataclass
class Generated:
    """One generated token: its text, where it starts in Reply.text, and its top alternatives."""
    text: str
    offset: int
    top: dict[str, float] = field(default_factory=dict)  # token text -> log-probability


@dataclass
class Reply:
    text: str
    tokens: list[Generated] | None = None  # when top_logprobs were asked for and given
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "tokens": None if self.tokens is None else [[g.text, g.offset, g.top] for g in self.tokens]}

    @classmethod
    def from_dict(cls, d: dict) -> Reply:
        tokens = None if d.get("tokens") is None else [Generated(t, o, top) for t, o, top in d["tokens"]]
        return cls(d["text"], tokens, d.get("prompt_tokens", 0), d.get("completion_tokens", 0))


@dataclass
class SlotReply:
    logprobs: list[dict[str, float]]  # per slot: {candidate: log-probability} for the candidates it could score
    prompt_tokens: int = 0


class Backend(ABC):
    name: str  # "local:gemma-3-270m", "openai:http://127.0.0.1:8000/v1": part of every cache key
    model: str
    parallelism: int = 1  # how many requests the pipeline may have in flight at once

    @abstractmethod
    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        """Greedy continuation of prompt (temperature 0), cut before the first stop string."""

    @abstractmethod
    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply | None:
        """For each character offset in slots, the log-probability of each candidate string being the next
        token after text[:offset] (candidates the model cannot score there are left out). None when the
        backend cannot read prompt log-probabilities."""


def _cut(text: str, stop: tuple[str, ...]) -> str:
    ends = [text.find(s) for s in stop if s and s in text]
    return text[:min(ends)] if ends else text


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def match_candidates(top: dict[str, float], candidates: list[str]) -> dict[str, float]:
    """Log-probabilities of the candidates among a token -> logprob map; tokens that differ only by
    surrounding whitespace or case (" 3", "3"; " Yes", "yes") are pooled."""
    pooled: dict[str, list[float]] = {}
    wanted = {c.strip().lower(): c for c in candidates}
    for token, lp in top.items():
        c = wanted.get(token.strip().lower())
        if c is not None and lp is not None and math.isfinite(lp):
            pooled.setdefault(c, []).append(lp)
    return {c: logsumexp(v) for c, v in pooled.items()}


# --- local transformers models -------------------------------------------------------------------------------

class LocalBackend(Backend):
    """A `transformers` causal LM on this machine: `LocalBackend("gemma-3-270m")` (a `fastsae.model.load`
    name or a local directory), or `LocalBackend(model=..., tokenizer=...)`. Greedy decoding, one request at
    a time (a lock; the forward passes already use every core)."""

    def __init__(self, name: str = "gemma-3-270m", *, model=None, tokenizer=None, device: str = "cpu"):
        self.model_name, self.device = name, device
        self.name, self.model = f"local:{name}", name
        self._lm, self._tok = model, tokenizer
        self._lock = threading.Lock()
        self._prefixes: OrderedDict[tuple, object] = OrderedDict()  # prompt prefix ids -> key/value cache
        self._last_ids: list[int] = []

    def _load(self):
        if self._lm is None:
            from ...model import load

            self._lm, self._tok = load(self.model_name, device=self.device)
        return self._lm, self._tok

    def _encode(self, text: str, first: bool):
        ids = self._tok(text, add_special_tokens=first).input_ids
        return list(ids)

    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        import torch

        with self._lock, torch.inference_mode():
            lm, tok = self._load()
            ids = torch.tensor([self._encode(prompt.text(), True)], device=self.device)
            kwargs = {"stopping_criteria": [_StopOnText(tok, ids.shape[1], stop)]} if stop else {}
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              output_logits=bool(top_logprobs), return_dict_in_generate=True, pad_token_id=pad,
                              **kwargs)
            new = out.sequences[0, ids.shape[1]:].tolist()
            text = tok.decode(new, skip_special_tokens=True)
            tokens = None
            if top_logprobs:
                tokens = []
                for i, logits in enumerate(out.logits):  # logits: (1, vocab) at step i
                    lp = logits[0].float().log_softmax(-1)
                    values, idx = lp.topk(top_logprobs)
                    top: dict[str, float] = {}
                    for v, j in zip(values.tolist(), idx.tolist(), strict=True):
                        t = tok.decode([j])
                        top[t] = logsumexp([top[t], v]) if t in top else v
                    piece = tok.decode([new[i]])
                    # where the token ends in the decoded text, less its length: right for tokenizers that
                    # decode with separators between tokens as well as for those that do not
                    offset = max(0, len(tok.decode(new[:i + 1], skip_special_tokens=True)) - len(piece))
                    tokens.append(Generated(piece, offset, top))
            cut = _cut(text, stop)
            if tokens is not None:
                tokens = [g for g in tokens if g.offset < len(cut)]
            return Reply(cut, tokens, ids.shape[1], len(new))

    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply:
        import torch

        if any(b < a for a, b in zip(slots, slots[1:], strict=False)) or (slots and not 0 < slots[0] <= slots[-1]
                                                                             <= len(text)):
            raise ValueError(f"slots must be increasing offsets in (0, {len(text)}], got {slots[:5]}…")
        with self._lock, torch.inference_mode():
            lm, tok = self._load()
            # Tokenise the text piece by piece at the slots so that every slot falls on a token boundary;
            # the model's prediction for a slot is the logits at the last token before it.
            ids, positions, prev = [], [], 0
            for s in slots:
                ids += self._encode(text[prev:s], prev == 0)
                positions.append(len(ids) - 1)
                prev = s
            ids += self._encode(text[prev:], prev == 0)
            single = {}
            for c in candidates:
                cid = self._encode(c, False)
                if len(cid) == 1:  # a candidate that is not one token ("10" where digits split) is left out
                    single[c] = cid[0]
            logits = self._logits_at(ids, positions)  # (slots, vocab)
            lp = logits.float().log_softmax(-1)[:, list(single.values())].tolist()  # (slots, candidates)
            return SlotReply([dict(zip(single, row, strict=True)) for row in lp], len(ids))

    def _logits_at(self, ids: list[int], positions: list[int]):
        """The model's logits at positions of ids, computed only there (Gemma's 262k vocabulary at every
        position would take GBs), reusing the key/value cache of a prefix shared with earlier prompts: the
        prompts of one feature share their instructions, worked example and explanation (about 3/4 of each
        simulation or judge prompt), so reusing them cuts the tokens run through the model by about 4x."""
        import copy

        import torch

        lm = self._lm
        prefix = self._prefix(ids, limit=positions[0])
        x = torch.tensor([ids], device=self.device)
        if prefix is None:
            return lm(input_ids=x, logits_to_keep=torch.tensor(positions, device=self.device), use_cache=False
                      ).logits[0]
        n, cache = prefix
        keep = torch.tensor([p - n for p in positions], device=self.device)
        return lm(input_ids=x[:, n:], past_key_values=copy.deepcopy(cache), use_cache=True,
                  logits_to_keep=keep).logits[0]

    def _prefix(self, ids: list[int], limit: int):
        """(n, key/value cache of ids[:n]) for the longest stored prefix of ids with n <= limit; failing that,
        the prefix ids shares with the previous prompt is run, stored and returned (when long enough)."""
        best = None
        for key in list(self._prefixes):
            n = len(key)
            if n <= limit and (best is None or n > best[0]) and tuple(ids[:n]) == key:
                best = (n, self._prefixes[key])
                self._prefixes.move_to_end(key)
        last, self._last_ids = self._last_ids, ids
        shared = 0
        for a, b in zip(last, ids, strict=False):
            if a != b:
                break
            shared += 1
        shared = min(shared, limit)
        if shared < PREFIX_MIN or (best is not None and best[0] >= shared - PREFIX_MIN):
            return best
        import torch

        out = self._lm(input_ids=torch.tensor([ids[:shared]], device=self.device), use_cache=True, logits_to_keep=1)
        self._prefixes[tuple(ids[:shared])] = out.past_key_values
        while len(self._prefixes) > PREFIX_SLOTS:
            self._prefixes.popitem(last=False)
        return shared, out.past_key_values


class _StopOnText:
    """Stop generating once the decoded continuation holds a stop string (transformers' StopStringCriteria
    needs a tokenizer that round-trips single tokens, which not every tokenizer does)."""

    def __init__(self, tokenizer, prompt_length: int, stop: tuple[str, ...]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_length:], skip_special_tokens=True)
        done = any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# --- OpenAI-compatible servers -------------------------------------------------------------------------------

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
        self._opener = urllib.request.build_opener(_HTTPHandler(), _HTTPSHandler())
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
                except _Retry as err:
                    last = self._scrub(str(err))
                    wait = wait if err.wait is None else err.wait
            if attempt < self.max_retries:
                time.sleep(min(wait, self.max_wait))  # outside the semaphore: waiting does not hold a request slot
        raise BackendError(f"{url}: no answer after {self.max_retries + 1} tries (last: {last})")

    def _try(self, url: str, data: bytes) -> object:
        """One request and its JSON answer, all within self.timeout seconds. _Retry when it failed in a way the
        next try may not; BackendError when retrying cannot help."""
        request = urllib.request.Request(url, data, self._headers(), method="POST")
        late = f"no complete answer within the {self.timeout:g} s deadline (timed out)"
        with _Deadline(self.timeout) as deadline:
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    raw = _read_capped(resp, self.max_answer_bytes)
            except urllib.error.HTTPError as err:
                raise self._refusal(url, err) from None
            except (OSError, http.client.HTTPException) as err:  # timeouts, resets, a garbled status line
                if deadline.expired:  # the deadline shut the socket: that is the reason, not what it caused
                    raise _Retry(late) from None
                reason = getattr(err, "reason", err)
                raise _Retry(f"{type(reason).__name__}: {reason}") from None
            if deadline.expired:  # a body cut short by the deadline can still look whole to http.client
                raise _Retry(late)
        return _parse_json(raw)

    def _refusal(self, url: str, err: urllib.error.HTTPError) -> Exception:
        """What an HTTP error status becomes: BackendError when retrying does not fix it, else _Retry with the
        wait the server asked for (when it gave one that can be read)."""
        detail = self._scrub(_server_message(err))
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
        return _Retry(f"{err.code}{detail}", _retry_after(retry_after, self.max_wait))

    def _ask(self, path: str, body: dict, read):
        """(read(answer), (prompt_tokens, completion_tokens)) for the answer to body at path. A malformed answer
        is a BackendError naming the endpoint and the field; it is not asked again (a server that sent
        well-formed JSON of the wrong shape would send it again)."""
        answer = self._post(path, body)
        try:
            return read(answer), _usage(answer)
        except _Malformed as err:
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
                (text, tokens), usage = self._ask("/chat/completions", body, _read_chat)
            except BackendError as err:
                if "logprobs" not in body or err.status != 400:
                    raise
                self._chat_logprobs = False  # this server refuses logprobs on chat: ask without them
                del body["logprobs"], body["top_logprobs"]
                (text, tokens), usage = self._ask("/chat/completions", body, _read_chat)
        else:
            body["prompt"] = prompt.text()
            if top_logprobs:
                body["logprobs"] = top_logprobs
            (text, tokens), usage = self._ask("/completions", body, _read_completion)
        cut = _cut(text, stop)
        if tokens is not None:
            tokens = [g for g in tokens if g.offset < len(cut)]
        return Reply(cut, tokens, *usage)

    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply | None:
        if self._echo is False:
            return None
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "echo": True,
                "logprobs": self.echo_logprobs}
        try:
            (_, tokens), (prompt_tokens, _) = self._ask("/completions", body, _read_completion)
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


class _Retry(Exception):
    """A try that failed in a way the next may not: a timeout, a dropped connection, a 429/5xx, or a body that
    did not arrive as one JSON document (a proxy may cut it short). wait: the seconds the server asked for."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Malformed(ValueError):
    """A JSON answer of the wrong shape; the message names the field, what it held and what was expected."""


# --- the request deadline --------------------------------------------------------------------------------------

class _Deadline:
    """A wall-clock limit on the request this thread makes inside `with _Deadline(s):`. urllib's timeout bounds
    each socket operation, not their sum: a server that sends a byte every 0.5 s would hold a request forever.
    At the deadline a timer shuts the request's sockets down, which wakes a read blocked on them in another
    thread at once (close() would not). urllib is synchronous, so the connections it opens for the request
    (a redirect's too) find the deadline in a thread-local."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True  # an abandoned timer must not keep the interpreter alive

    def __enter__(self) -> _Deadline:
        _CURRENT.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        _CURRENT.deadline = None

    def watch(self, sock: socket.socket):
        with self._lock:
            self._sockets.append(sock)
            late = self.expired  # connected after the deadline (a slow name lookup or connect)
        if late:
            _shut(sock)

    def _expire(self):
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


_CURRENT = threading.local()  # .deadline: the _Deadline of this thread's request in flight, if any


def _shut(sock: socket.socket):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed, by either end
        pass


class _Watched:
    """Mixin for http.client connections: gives the socket to the request's deadline once connected (urllib
    drops the connection's own reference before the body is read, so it must be taken here)."""

    def connect(self):
        super().connect()
        deadline = getattr(_CURRENT, "deadline", None)
        if deadline is not None:
            deadline.watch(self.sock)


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):  # the TLS handshake is bounded per read only
    pass


class _DeadlineHandler:
    """Mixin for urllib's HTTP(S) handlers: their connections report to the request's deadline. Keeping urllib
    (rather than http.client alone) keeps its proxies from the environment and its redirects."""
    connection: type

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.connection, req, **kwargs)


class _HTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    connection = _WatchedHTTP


class _HTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    connection = _WatchedHTTPS


# --- reading answers -------------------------------------------------------------------------------------------

def _retry_after(value: str | None, most: float) -> float | None:
    """The wait a Retry-After header asks for (RFC 9110: seconds or an HTTP date), clamped into [0, most]; None
    when absent or unreadable (the back-off applies). A server or a proxy may send anything here: "-1", "nan",
    "inf", "soon", a date in the past or in the year 99999."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):  # TypeError: Python 3.10 on a non-date
            return None
        if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return None if math.isnan(seconds) else min(max(seconds, 0.0), most)


def _read_capped(resp, cap: int) -> bytes:
    """The body of resp, refused unread when its Content-Length is over cap, and cut after cap + 1 bytes when
    it has none (a chunked body, or one that ends when the connection closes)."""
    length = (resp.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) > cap:
        raise _Retry(f"the answer is {int(length):,} bytes, over the {cap:,}-byte limit (max_answer_bytes)")
    body = resp.read(cap + 1)
    if len(body) > cap:
        raise _Retry(f"the answer is more than {cap:,} bytes, over the {cap:,}-byte limit (max_answer_bytes)")
    return body


# A JSON string, or an unterminated one up to the end (which a lone trailing backslash may end): it cannot fail to
# match once started, so re.sub stays linear in time on any input.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[{]}")))


def _too_deep(data: bytes) -> bool:
    """Whether [ and { nest more than MAX_JSON_DEPTH deep in data, outside strings: a few C-speed passes and no
    recursion (~30 ms for a 1 MB echo answer, which json.loads takes ~170 ms to parse)."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:  # the usual chat answer: too few to nest deep
        return False
    steps = _JSON_STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    return max(itertools.accumulate(memoryview(steps).cast("b")), default=0) > MAX_JSON_DEPTH


def _parse_json(data: bytes) -> object:
    """data as JSON, checked first for what json.loads handles badly: bytes that are not UTF-8 (a
    UnicodeDecodeError) and deep nesting (a RecursionError)."""
    try:
        text = data.decode("utf-8-sig")  # as json.loads(bytes) did: a byte-order mark is allowed
    except UnicodeDecodeError as err:
        raise _Retry(f"the answer is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start} of "
                     f"{len(data):,})") from None
    if _too_deep(data):
        raise _Retry(f"the answer is JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as err:  # a JSONDecodeError, or an integer of over 4,300 digits
        raise _Retry(f"the answer was not JSON ({str(err)[:200]})") from None


def _server_message(err: urllib.error.HTTPError) -> str:
    """" (the server's message)" from an error answer's JSON body, or "" (any other body is not shown)."""
    try:
        body = _parse_json(err.read(ERROR_BYTES))
    except (_Retry, OSError, http.client.HTTPException):
        return ""
    finally:
        err.close()
    error = body.get("error") if isinstance(body, dict) else None
    msg = error.get("message") if isinstance(error, dict) else error
    return f" ({str(msg)[:300]})" if msg else ""


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _show(value) -> str:
    """What a JSON value is, for an error message: "a string ('abc')"."""
    if value is None:
        return "null"
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else _KINDS.get(type(value), type(value).__name__))
    text = repr(value)
    return f"{kind} ({text if len(text) <= 80 else text[:80] + '…'})"


def _check(value, kind: type, name: str, required: bool = True):
    """value if it is a kind (float takes ints too; a boolean is no number), or None if allowed."""
    if value is None and not required:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)
    if not ok:
        raise _Malformed(f"{name} is {_show(value)}, expected {_KINDS[kind]}")
    return value


def _get(obj: dict, key: str, kind: type, where: str, required: bool = False):
    """obj[key] checked to be a kind; where is the path to obj ("choices[0].")."""
    if required and key not in obj:
        raise _Malformed(f"{where}{key} is missing, expected {_KINDS[kind]}")
    return _check(obj.get(key), kind, f"{where}{key}", required)


def _choice(answer) -> dict:
    if not isinstance(answer, dict):
        raise _Malformed(f"expected a JSON object, got {_show(answer)}")
    choices = _get(answer, "choices", list, "")
    if not choices:
        raise _Malformed(f"no choices: {_show(answer)}")
    return _check(choices[0], dict, "choices[0]")


def _usage(answer: dict) -> tuple[int, int]:
    usage = _get(answer, "usage", dict, "") or {}
    return _get(usage, "prompt_tokens", int, "usage.") or 0, _get(usage, "completion_tokens", int, "usage.") or 0


def _read_chat(answer) -> tuple[str, list[Generated] | None]:
    """(text, tokens) of a chat completion."""
    choice = _choice(answer)
    message = _get(choice, "message", dict, "choices[0].", required=True)
    text = _get(message, "content", str, "choices[0].message.") or ""  # null: a refusal, or tool calls
    return text, _chat_tokens(_get(choice, "logprobs", dict, "choices[0]."))


def _read_completion(answer) -> tuple[str, list[Generated] | None]:
    """(text, tokens) of a (legacy) completion."""
    choice = _choice(answer)
    text = _get(choice, "text", str, "choices[0].", required=True)
    return text, _completion_tokens(_get(choice, "logprobs", dict, "choices[0]."))


def _chat_tokens(logprobs: dict | None) -> list[Generated] | None:
    """Chat logprobs ({"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]})."""
    content = _get(logprobs or {}, "content", list, "choices[0].logprobs.")
    if not content:
        return None
    tokens, offset = [], 0
    for i, item in enumerate(content):
        where = f"choices[0].logprobs.content[{i}]"
        item = _check(item, dict, where)
        token = _get(item, "token", str, f"{where}.", required=True)
        top = {}
        for j, alt in enumerate(_get(item, "top_logprobs", list, f"{where}.") or []):
            alt = _check(alt, dict, f"{where}.top_logprobs[{j}]")
            top[_get(alt, "token", str, f"{where}.top_logprobs[{j}].", required=True)] = _get(
                alt, "logprob", float, f"{where}.top_logprobs[{j}].")
        top.setdefault(token, _get(item, "logprob", float, f"{where}."))
        tokens.append(Generated(token, offset, top))
        offset += len(token)
    return tokens


def _completion_tokens(logprobs: dict | None) -> list[Generated] | None:
    """Legacy completions logprobs ({"tokens", "text_offset", "top_logprobs": [{token: logprob} | None]}), with
    one offset and one top map per token when given."""
    where = "choices[0].logprobs."
    tokens = _get(logprobs or {}, "tokens", list, where)
    if not tokens:
        return None
    lists = {}
    for key in ("top_logprobs", "text_offset"):
        lists[key] = _get(logprobs, key, list, where)
        if lists[key] is not None and len(lists[key]) != len(tokens):
            raise _Malformed(f"{where}{key} has {len(lists[key])} items, expected {len(tokens)} (one per token)")
    tops, offsets = lists["top_logprobs"] or [None] * len(tokens), lists["text_offset"]
    out, offset = [], 0
    for i, token in enumerate(tokens):
        _check(token, str, f"{where}tokens[{i}]")
        start = _check(offsets[i], int, f"{where}text_offset[{i}]") if offsets else offset
        top = _check(tops[i], dict, f"{where}top_logprobs[{i}]", required=False) or {}
        for t, lp in top.items():
            _check(lp, float, f"{where}top_logprobs[{i}][{t!r}]", required=False)
        out.append(Generated(token, start, dict(top)))
        offset = start + len(token)
    return out


def parse_backend(spec: str, model: str | None = None, **kwargs) -> Backend:
    """`local[:NAME]` (default gemma-3-270m) or `openai[:URL]` (URL default $OPENAI_BASE_URL; model default
    $OPENAI_MODEL). kwargs go to the backend (device for local; concurrency, timeout, … for openai)."""
    kind, _, where = spec.partition(":")
    if kind == "local":
        kwargs = {k: v for k, v in kwargs.items() if k == "device"}
        return LocalBackend(where or model or "gemma-3-270m", **kwargs)
    if kind == "openai":
        url = where or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise ValueError("--backend openai: give the server as openai:http://host:port/v1 or set $OPENAI_BASE_URL")
        kwargs.pop("device", None)
        return OpenAIBackend(url, model or os.environ.get("OPENAI_MODEL", ""), **kwargs)
    raise ValueError(f"--backend: expected local[:MODEL] or openai:URL, got {spec!r}")
