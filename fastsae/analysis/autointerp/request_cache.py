"""Every language-model request, cached on disk: an interrupted run resumes where it stopped and a rerun
costs nothing.

One JSON file per request, named by the SHA-256 of (backend, model, call, arguments) — never the API
key — under `<dir>/<first two hex digits>/`, and written atomically (`fastsae.io.atomic_write`: a
temporary file, fsync, rename). A killed run leaves no partial entry, and two processes that answer the
same request at once both rename a complete file over the same name: the last one wins, and either is
correct. A backend that cannot give prompt log-probabilities has that answer cached too, so a rerun asks
the server nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from ... import io
from .llm_backends import Backend, Reply, SlotReply
from .llm_prompts import Prompt

FORMAT_VERSION = 1


@dataclass
class Usage:
    """What a run cost: requests answered by the model (misses) and from the cache (hits), and the tokens
    the misses spent (prompt and completion, as the backend counted them)."""
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def cost(self, price_in: float, price_out: float) -> float:
        """Dollars at price_in / price_out per million prompt / completion tokens."""
        return (self.prompt_tokens * price_in + self.completion_tokens * price_out) / 1e6


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CachedBackend(Backend):
    """backend with every answer kept in directory; `usage` counts what was asked and what was spent."""

    def __init__(self, backend: Backend, directory: str | Path):
        self.inner = backend
        self.name, self.model, self.parallelism = backend.name, backend.model, backend.parallelism
        self.directory = Path(directory)
        self.usage = Usage()
        self._lock = threading.Lock()

    def _path(self, request: dict) -> tuple[Path, str]:
        key = digest({"backend": self.name, "model": self.model, **request})
        return self.directory / key[:2] / f"{key}.json", key

    def _lookup(self, path: Path) -> dict | None:
        try:
            entry = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None  # absent (atomic writes leave no partial file; a damaged one is asked again)
        return entry if entry.get("format_version") == FORMAT_VERSION else None

    def _store(self, path: Path, request: dict, response: dict | None) -> None:
        io.write_json(path, {"format_version": FORMAT_VERSION, "backend": self.name, "model": self.model,
                             "request": request, "response": response})

    def _count(self, hit: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self._lock:
            if hit:
                self.usage.cached += 1
            else:
                self.usage.requests += 1
                self.usage.prompt_tokens += prompt_tokens
                self.usage.completion_tokens += completion_tokens

    def generate(self, prompt: Prompt, max_tokens: int, top_logprobs: int = 0, stop: tuple[str, ...] = ()) -> Reply:
        request = {"call": "generate", "system": prompt.system, "user": prompt.user, "max_tokens": max_tokens,
                   "top_logprobs": top_logprobs, "stop": list(stop)}
        path, _ = self._path(request)
        entry = self._lookup(path)
        if entry is not None:
            self._count(True)
            return Reply.from_dict(entry["response"])
        reply = self.inner.generate(prompt, max_tokens, top_logprobs, stop)
        self._store(path, request, reply.to_dict())
        self._count(False, reply.prompt_tokens, reply.completion_tokens)
        return reply

    def slot_logprobs(self, text: str, slots: list[int], candidates: list[str]) -> SlotReply | None:
        request = {"call": "slot_logprobs", "text": text, "slots": slots, "candidates": candidates}
        path, _ = self._path(request)
        entry = self._lookup(path)
        if entry is not None:
            self._count(True)
            r = entry["response"]
            return None if r is None else SlotReply(r["logprobs"], r.get("prompt_tokens", 0))
        reply = self.inner.slot_logprobs(text, slots, candidates)
        self._store(path, request, None if reply is None else {"logprobs": reply.logprobs,
                                                               "prompt_tokens": reply.prompt_tokens})
        self._count(False, 0 if reply is None else reply.prompt_tokens)
        return reply
