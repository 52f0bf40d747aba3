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

Nothing here caches; `cache.CachedBackend` wraps any backend with the on-disk cache.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field

from .prompts import Prompt

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # rate limits, overload and transient server faults
MAX_RETRY_AFTER = 60.0  # seconds: a Retry-After header longer than this is capped
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
    environment variable named by api_key_env (none needed for a local server without one)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, chat: bool = True,
                 echo_logprobs: int = 5):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected http(s)://host[:port]/v1, got {base_url!r}")
        if not model:
            raise ValueError("model: an OpenAI-compatible backend needs a model name (--model or $OPENAI_MODEL)")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"concurrency >= 1, max_retries >= 0 and timeout > 0 expected, got {concurrency}, "
                             f"{max_retries}, {timeout}")
        self.base_url = base_url.rstrip("/")
        self.name, self.model = f"openai:{self.base_url}", model
        self.api_key_env, self.timeout, self.max_retries, self.backoff = api_key_env, timeout, max_retries, backoff
        self.chat, self.echo_logprobs = chat, echo_logprobs
        self.parallelism = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
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

    def _post(self, path: str, body: dict) -> dict:
        url = f"{self.base_url}{path}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt * (1 + random.random() / 4)  # jitter spreads the retries
            with self._slots:
                self.requests += 1
                try:
                    with urllib.request.urlopen(urllib.request.Request(url, data, self._headers(), method="POST"),
                                                timeout=self.timeout) as resp:
                        return json.loads(resp.read())
                except urllib.error.HTTPError as err:
                    detail = self._scrub(_server_message(err))
                    if err.code in (401, 403):
                        where = (f"the key in ${self.api_key_env}" if os.environ.get(self.api_key_env)
                                 else f"no key was sent (${self.api_key_env} is not set)")
                        raise BackendError(f"{err.code} from {url}: the server refused the request ({where})"
                                           f"{detail}", err.code) from None
                    if err.code == 404:
                        raise BackendError(f"404 from {url}: no such endpoint, or the server has no model "
                                           f"{self.model!r}{detail}", 404) from None
                    if err.code not in RETRY_STATUS:
                        raise BackendError(f"{err.code} from {url}{detail}", err.code) from None
                    last = f"{err.code}{detail}"
                    retry_after = err.headers.get("Retry-After") if err.headers else None
                    if retry_after is not None:
                        try:
                            wait = min(float(retry_after), MAX_RETRY_AFTER)
                        except ValueError:
                            pass
                except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                    reason = getattr(err, "reason", err)
                    last = self._scrub(f"{type(reason).__name__}: {reason}")
                except json.JSONDecodeError:
                    last = "the answer was not JSON"
            if attempt < self.max_retries:
                time.sleep(wait)  # outside the semaphore: waiting does not hold a request slot
        raise BackendError(f"{url}: no answer after {self.max_retries + 1} tries (last: {last})")

    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0}
        if stop:
            body["stop"] = list(stop)[:4]  # the OpenAI API takes at most 4
        if self.chat:
            body["messages"] = prompt.messages()
            if top_logprobs and self._chat_logprobs:
                body.update(logprobs=True, top_logprobs=top_logprobs)
            try:
                answer = self._post("/chat/completions", body)
            except BackendError as err:
                if "logprobs" not in body or err.status != 400:
                    raise
                self._chat_logprobs = False  # this server refuses logprobs on chat: ask without them
                del body["logprobs"], body["top_logprobs"]
                answer = self._post("/chat/completions", body)
            choice = _first_choice(answer)
            text = (choice.get("message") or {}).get("content") or ""
            tokens = _chat_tokens(choice.get("logprobs"))
        else:
            body["prompt"] = prompt.text()
            if top_logprobs:
                body["logprobs"] = top_logprobs
            choice = _first_choice(answer := self._post("/completions", body))
            text = choice.get("text") or ""
            tokens = _completion_tokens(choice.get("logprobs"), 0)
        usage = answer.get("usage") or {}
        cut = _cut(text, stop)
        if tokens is not None:
            tokens = [g for g in tokens if g.offset < len(cut)]
        return Reply(cut, tokens, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply | None:
        if self._echo is False:
            return None
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "echo": True,
                "logprobs": self.echo_logprobs}
        try:
            answer = self._post("/completions", body)
        except BackendError as err:
            if err.status in (400, 404, 422, 501):  # no completions endpoint, or no echo
                self._echo = False
                return None
            raise
        tokens = _completion_tokens(_first_choice(answer).get("logprobs"), 0)
        if not tokens:
            self._echo = False
            return None
        starts = {g.offset: g for g in tokens}
        self._echo = True
        usage = answer.get("usage") or {}
        return SlotReply([match_candidates(starts[s].top, candidates) if s in starts else {} for s in slots],
                         usage.get("prompt_tokens", 0))


def _server_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        msg = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        return f" ({str(msg)[:300]})" if msg else ""
    except (ValueError, AttributeError, OSError):
        return ""


def _first_choice(answer: dict) -> dict:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices:
        raise BackendError(f"the server's answer has no choices: {str(answer)[:200]}")
    return choices[0]


def _chat_tokens(logprobs: dict | None) -> list[Generated] | None:
    """Chat logprobs ({"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]})."""
    content = (logprobs or {}).get("content")
    if not content:
        return None
    tokens, offset = [], 0
    for item in content:
        top = {t["token"]: t["logprob"] for t in item.get("top_logprobs") or []}
        top.setdefault(item["token"], item.get("logprob"))
        tokens.append(Generated(item["token"], offset, top))
        offset += len(item["token"])
    return tokens


def _completion_tokens(logprobs: dict | None, base: int) -> list[Generated] | None:
    """Legacy completions logprobs ({"tokens", "text_offset", "top_logprobs": [{token: logprob} | None]})."""
    if not logprobs or not logprobs.get("tokens"):
        return None
    tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
    offsets = logprobs.get("text_offset")
    tokens, offset = [], 0
    for i, (t, top) in enumerate(zip(logprobs["tokens"], tops, strict=False)):
        start = offsets[i] - base if offsets else offset
        tokens.append(Generated(t, start, dict(top or {})))
        offset = start + len(t)
    return tokens


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
