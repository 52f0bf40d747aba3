"""Test doubles for autointerp: synthetic features whose meaning is known, an oracle that reads the prompts
and answers as a perfect interpreter would (in-process, or behind a stub OpenAI-compatible HTTP server).

The feature fires on the token " cat" (activation 5) and nowhere else. The oracle explains it as "the
word cat", predicts 10 at " cat" and 0 elsewhere, and judges by looking for " cat": with it, every score
must come out perfect, which checks that prompts, placeholders and answers line up end to end.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastsae.analysis.autointerp.interpret import FeatureExamples
from fastsae.analysis.autointerp.llm_backends import Backend, Reply, SlotReply
from fastsae.analysis.autointerp.llm_prompts import CUE, show_token
from fastsae.analysis.features.feature_contexts import Example

WORDS = [" the", " dog", " sat", " on", " a", " mat", " and", " ran", " far", " big", "."]
TARGET = " cat"


def context(rng: random.Random, n: int, with_cat: bool, window: int) -> Example:
    tokens = [rng.choice(WORDS) for _ in range(n)]
    acts = [0.0] * n
    if with_cat:
        for i in rng.sample(range(1, n), rng.randint(1, 2)):
            tokens[i], acts[i] = TARGET, 5.0  # one level: the oracle, predicting 10, is exact
    ids = [WORDS.index(t) + 10 if t in WORDS else 99 for t in tokens]
    return Example(ids, tokens, acts, window=window, start=0)


def cat_feature(seed: int = 0, n_top: int = 12, n_samples: int = 12, n_random: int = 14, n: int = 20
                ) -> FeatureExamples:
    rng = random.Random(seed)
    top = sorted((context(rng, n, True, w) for w in range(n_top)), key=lambda e: -e.max_activation)
    samples = [context(rng, n, True, 100 + w) for w in range(n_samples)]
    rand = [context(rng, n, False, 200 + w) for w in range(n_random)]
    return FeatureExamples(top, samples, rand)


# --- the oracle: a perfect reader of the prompts ---------------------------------------------------------------

def _last_text_line(user: str) -> str:
    return [ln for ln in user.split("\n") if ln.startswith("Text: ")][-1][len("Text: "):]


def oracle_answer(system: str, user: str) -> str:
    """What a perfect interpreter writes after the prompt."""
    if user.endswith(f"Explanation of feature B: {CUE}"):
        return " the word cat\n"
    if "Tokens: " in user:  # the simulator writes the lines itself
        tokens = json.loads(user.rsplit("Tokens: ", 1)[1].split("\n", 1)[0])
        return "".join(f"{show_token(t)}\t{10 if t == TARGET else 0}\n" for t in tokens) + "<end>\n"
    text = _last_text_line(user)
    if "marked" in system:  # fuzzing
        marked = re.findall(r"<<(.*?)>>", text)
        return " yes" if marked and all(m == TARGET for m in marked) else " no"
    return " yes" if TARGET in text else " no"


def oracle_slot(text: str, slot: int) -> dict[str, float]:
    """The oracle's next-token log-probabilities at a character offset of a prompt."""
    if slot == len(text):  # a judge's answer
        system, user = text.split("\n\n", 1)
        return {oracle_answer(system, user): 0.0}
    token = text[text.rfind("\n", 0, slot) + 1:slot - 1]  # the line's token, before its tab
    return {"10" if token == show_token(TARGET) else "0": 0.0}


class OracleBackend(Backend):
    """In-process oracle. logprobs=False: no prompt log-probabilities (the generated-numbers path);
    constant=v: a simulator that predicts v everywhere."""

    def __init__(self, logprobs: bool = True, constant: int | None = None):
        self.name, self.model = "fake", "oracle"
        self.logprobs, self.constant = logprobs, constant
        self.calls = 0

    def generate(self, prompt, max_tokens, top_logprobs=0, stop=()):
        self.calls += 1
        text = oracle_answer(prompt.system, prompt.user)
        if self.constant is not None and "Tokens: " in prompt.user:
            text = re.sub(r"\t\d+", f"\t{self.constant}", text)
        for s in stop:
            text = text.split(s)[0] if s in text else text
        return Reply(text, None, len(prompt.text()), len(text))

    def slot_logprobs(self, text, slots, candidates):
        self.calls += 1
        if not self.logprobs:
            return None
        if self.constant is not None and slots[-1] != len(text):
            return SlotReply([{str(self.constant): 0.0} for _ in slots], len(text))
        return SlotReply([oracle_slot(text, s) for s in slots], len(text))


# --- a stub OpenAI-compatible server ---------------------------------------------------------------------------

def _tokenize(text: str) -> list[tuple[str, int]]:
    """The stub's tokens: runs of word characters, or single other characters, with their offsets."""
    return [(m.group(), m.start()) for m in re.finditer(r"\w+|.", text, re.S)]


class StubServer:
    """An OpenAI-compatible server on 127.0.0.1 (ephemeral port) answering as the oracle. Set `script` to a
    list of HTTP statuses (or "slow") to answer the next requests with, before the normal answers; `delay`
    seconds per request; `echo=False` to refuse the completions endpoint (404); `chat_logprobs` to give
    top_logprobs on chat. It records every request and the largest number in flight at once."""

    def __init__(self, *, echo: bool = True, chat_logprobs: bool = True, delay: float = 0.0, slow: float = 2.0):
        self.echo, self.chat_logprobs, self.delay, self.slow = echo, chat_logprobs, delay, slow
        self.script: list = []
        self.requests: list[dict] = []  # {"path", "body", "authorization"}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.status_only = None  # answer every request with this status (e.g. 401)
        self.message = None  # request -> the error message of scripted statuses
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = {"path": self.path, "body": body, "authorization": self.headers.get("Authorization")}
                with stub.lock:
                    stub.requests.append(request)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    action = stub.status_only or (stub.script.pop(0) if stub.script else None)
                time.sleep(stub.delay)
                if action == "slow":
                    time.sleep(stub.slow)
                    action = None
                if action is not None:
                    message = stub.message(request) if stub.message else f"scripted {action}"
                    status, answer = action, {"error": {"message": message}}
                else:
                    status, answer = stub.answer(self.path, body)
                with stub.lock:  # no longer in flight once answered (before sending: the client may move on)
                    stub.in_flight -= 1
                self._send(status, answer, {"Retry-After": "0"} if status == 429 else {})

            def _send(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if body.get("model") != "oracle-1":
            return 404, {"error": {"message": f"model {body.get('model')} not found"}}
        if path == "/v1/chat/completions":
            system, user = body["messages"][0]["content"], body["messages"][1]["content"]
            text = oracle_answer(system, user)
            for s in body.get("stop", []):
                text = text.split(s)[0]
            message = {"choices": [{"message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": len(system + user) // 4, "completion_tokens": len(text) // 4}}
            if body.get("logprobs") and self.chat_logprobs:
                message["choices"][0]["logprobs"] = {"content": [
                    {"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]}
                    for t, _ in _tokenize(text)]}
            return 200, message
        if path == "/v1/completions" and not body.get("echo"):  # a base model's completion of the text
            system, user = body["prompt"].split("\n\n", 1)
            text = oracle_answer(system, user)
            for s in body.get("stop", []):
                text = text.split(s)[0]
            return 200, {"choices": [{"text": text}], "usage": {"prompt_tokens": len(body["prompt"]) // 4,
                                                                "completion_tokens": len(text) // 4}}
        if path == "/v1/completions" and self.echo and body.get("echo"):
            text = body["prompt"]
            tokens = _tokenize(text)
            tops = [None] + [oracle_slot(text, off) for _, off in tokens[1:]]
            answer = oracle_slot(text, len(text)) if text.endswith("Answer:") else {"\n": 0.0}
            nxt = next(iter(answer))
            logprobs = {"tokens": [t for t, _ in tokens] + [nxt], "text_offset": [o for _, o in tokens] + [len(text)],
                        "token_logprobs": [None] + [0.0] * len(tokens), "top_logprobs": tops + [answer]}
            return 200, {"choices": [{"text": text + nxt, "logprobs": logprobs}],
                         "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1}}
        return 404, {"error": {"message": f"no route {path}"}}
