"""The OpenAI-compatible client against a hostile server: a scripted stub on 127.0.0.1 (ephemeral port, started
and stopped by each test) that trickles bytes, sends bodies too large or not text, nests JSON 200,000 deep,
answers 429 with absurd Retry-After headers, or answers well-formed JSON of the wrong shape. Every case must
end in a BackendError that says what was wrong, within a time set by the client's own limits (kept short here).
"""

import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastsae.analysis.autointerp.llm_backends import BackendError
from fastsae.analysis.autointerp.llm_prompts import Prompt
from fastsae.analysis.autointerp.openai_client import OpenAIBackend

PROMPT = Prompt("We are studying features.", "Text: the cat\nAnswer:")
GOOD = {"choices": [{"message": {"role": "assistant", "content": " yes"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1}}


class HostileServer:
    """Answers the n-th POST with plays[n] (a function of the request handler that writes the whole answer),
    and every POST after the last play with GOOD. `stop` ends any play still trickling when the test is over,
    so no handler thread outlives it by more than one trickle step."""

    def __init__(self, *plays):
        self.plays, self.requests, self.stop = list(plays), [], threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(time.perf_counter())
                play = server.plays.pop(0) if server.plays else answer(GOOD)
                try:
                    play(self, server.stop)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: what it should do
                    pass
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def raw(body: bytes, status: int = 200, headers: dict | None = None, length: bool = True):
    """A play: status, headers and body as given (no Content-Length when length=False: the body then ends
    when the connection closes)."""
    def play(h, stop):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return play


def answer(obj, status: int = 200, headers: dict | None = None):
    return raw(json.dumps(obj).encode(), status, headers)


def trickle(every: float = 0.25, n: int = 10, headers_too: bool = False):
    """A play that sends one byte every `every` seconds, n of them (a bounded stall: 2.5 s at the defaults), in
    the body after prompt headers, or from the status line on (headers_too)."""
    def play(h, stop):
        if headers_too:
            data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        else:
            h.send_response(200)
            h.send_header("Content-Length", str(n))
            h.end_headers()
            h.wfile.flush()
            data = b" " * n
        for byte in data[:n]:
            if stop.wait(every):
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
    return play


def backend(server, **kw) -> OpenAIBackend:
    kw = {"timeout": 1.0, "max_retries": 0, "backoff": 0.01, "max_wait": 0.2, **kw}
    return OpenAIBackend(server.url, "m", api_key_env="FASTSAE_TEST_NO_KEY", **kw)


# --- a whole-request deadline -----------------------------------------------------------------------------------

@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "status-line"])
def test_a_trickled_answer_is_cut_off_at_the_deadline(headers_too):
    with HostileServer(trickle(headers_too=headers_too), trickle(headers_too=headers_too)) as server:
        start = time.perf_counter()
        with pytest.raises(BackendError, match=r"no answer after 2 tries \(last: no complete answer within the "
                                               r"0.6 s deadline"):
            backend(server, timeout=0.6, max_retries=1).generate(PROMPT, 4)
        took = time.perf_counter() - start
        # each of the 2 tries stops at its 0.6 s deadline, although no single read waits longer than 0.25 s
        assert 1.2 <= took < 2.4 and len(server.requests) == 2


def test_an_answer_that_trickles_then_a_good_one_is_retried():
    with HostileServer(trickle()) as server:
        start = time.perf_counter()
        assert backend(server, timeout=0.6, max_retries=1).generate(PROMPT, 4).text == " yes"
        assert time.perf_counter() - start < 2.0 and len(server.requests) == 2  # not the 2.5 s the trickle takes


def test_too_many_headers_or_a_garbled_status_line_is_a_backend_error():
    many = {f"X-Junk-{i}": "x" for i in range(150)}  # http.client takes at most 100
    with HostileServer(raw(b"{}", headers=many), lambda h, stop: h.wfile.write(b"HELLO THERE\r\n\r\n")) as server:
        with pytest.raises(BackendError, match=r"no answer after 1 tries \(last: HTTPException: got more than 100 "
                                               r"headers\)"):
            backend(server).generate(PROMPT, 4)
        with pytest.raises(BackendError, match=r"no answer after 1 tries \(last: BadStatusLine: HELLO THERE"):
            backend(server).generate(PROMPT, 4)


# --- a cap on the answer's size ---------------------------------------------------------------------------------

def test_a_20_mb_binary_answer_is_refused_as_too_large():
    body = b"\xc3\x28" * (10 * 2 ** 20)  # 20 MiB, not UTF-8 (an old client raised UnicodeDecodeError)
    with HostileServer(raw(body), raw(body, length=False)) as server:
        for _ in range(2):  # declared by Content-Length (refused unread), then ended by closing the connection
            start = time.perf_counter()
            with pytest.raises(BackendError, match=r"no answer after 1 tries \(last: the answer is (20,971,520 "
                                                   r"bytes|more than 16,777,216 bytes), over the 16,777,216-byte "
                                                   r"limit \(max_answer_bytes\)"):
                backend(server, timeout=5.0).generate(PROMPT, 4)
            assert time.perf_counter() - start < 4.0


def test_an_answer_over_a_smaller_cap_and_one_that_is_not_text():
    good = json.dumps(GOOD).encode()
    with HostileServer(raw(good + b" " * 2000, length=False), raw(b"\xff\xfe" + bytes(range(256)))) as server:
        with pytest.raises(BackendError, match=r"more than 1,000 bytes, over the 1,000-byte limit"):
            backend(server, max_answer_bytes=1000).generate(PROMPT, 4)
        with pytest.raises(BackendError, match=r"the answer is not UTF-8 text \(byte 0xff at offset 0"):
            backend(server).generate(PROMPT, 4)
        assert backend(server, max_answer_bytes=1000).generate(PROMPT, 4).text == " yes"  # under the cap: fine


# --- Retry-After, parsed defensively ----------------------------------------------------------------------------

def _in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


def _waited(server, value: str) -> float:
    """Seconds between a 429 with `Retry-After: value` and the try after it (which gets GOOD)."""
    server.plays.append(answer({"error": {"message": "slow down"}}, 429, {"Retry-After": value}))
    n = len(server.requests)
    assert backend(server, max_retries=1, max_wait=0.2).generate(PROMPT, 4).text == " yes"
    assert len(server.requests) == n + 2
    return server.requests[-1] - server.requests[-2]


@pytest.mark.parametrize("value", ["-1", "-inf", "nan", "-0.5"])
def test_a_negative_or_nan_retry_after_waits_nothing(value):
    with HostileServer() as server:
        assert _waited(server, value) < 0.15  # no "sleep length must be non-negative"


@pytest.mark.parametrize("value", ["inf", "1e999", "5" * 400, "3600"])
def test_a_huge_retry_after_is_cut_to_max_wait(value):
    with HostileServer() as server:
        assert 0.2 <= _waited(server, value) < 0.6  # max_wait=0.2, not the 60 s default nor forever


def test_retry_after_as_an_http_date():
    with HostileServer() as server:
        assert 0.15 <= _waited(server, _in(3600)) < 0.6  # an hour ahead: cut to max_wait
        # past dates, bad dates and garbage: no wait beyond the 10 ms back-off
        for value in (_in(-3600), "Mon, 99 Foo 2025 99:99:99 GMT", "Wed, 21 Oct 99999 07:28:00 GMT", "soon", ""):
            assert _waited(server, value) < 0.15, value


def test_retries_on_429_are_bounded_whatever_retry_after_says():
    plays = [answer({"error": {"message": "slow down"}}, 429, {"Retry-After": v}) for v in ("inf", "-1", "nan")]
    with HostileServer(*plays, *plays) as server:
        start = time.perf_counter()
        with pytest.raises(BackendError, match=r"no answer after 3 tries \(last: 429 \(slow down\)\)"):
            backend(server, max_retries=2, max_wait=0.2).generate(PROMPT, 4)
        assert time.perf_counter() - start < 1.5 and len(server.requests) == 3


def test_bad_limits_are_refused():
    for kw in ({"max_wait": -1.0}, {"max_wait": float("nan")}, {"max_answer_bytes": 0}, {"timeout": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            OpenAIBackend("http://127.0.0.1:1/v1", "m", **kw)


# --- malformed answers ------------------------------------------------------------------------------------------

def test_json_nested_200000_deep_is_refused_without_recursion():
    deep = b"[" * 200_000 + b"]" * 200_000
    inside = b'{"choices": [{"message": {"content": "x", "extra": ' + deep + b"}}]}"
    brackets_in_a_string = {"choices": [{"message": {"content": "[{" * 50_000 + '"]'}}]}
    with HostileServer(raw(deep), raw(inside), answer(brackets_in_a_string)) as server:
        for _ in range(2):
            with pytest.raises(BackendError, match=r"the answer is JSON nested deeper than 100 levels"):
                backend(server).generate(PROMPT, 4)
        assert backend(server).generate(PROMPT, 4).text.startswith("[{[{")  # brackets in strings do not count


def _choice(**fields):
    return {"choices": [{"message": {"role": "assistant", "content": " yes"}, **fields}]}


MALFORMED = {  # answer -> what the error must say
    "not-an-object": ([1, 2], r"expected a JSON object, got a list"),
    "no-choices": ({"id": "x"}, r"no choices"),
    "empty-choices": ({"choices": []}, r"no choices"),
    "choices-a-string": ({"choices": "abc"}, r"choices is a string \('abc'\), expected a list"),
    "choice-a-string": ({"choices": ["oops"]}, r"choices\[0\] is a string \('oops'\), expected an object"),
    "no-message": ({"choices": [{"index": 0}]}, r"choices\[0\]\.message is missing, expected an object"),
    "message-a-string": ({"choices": [{"message": "hi"}]}, r"choices\[0\]\.message is a string \('hi'\)"),
    "content-a-number": ({"choices": [{"message": {"content": 5}}]}, r"choices\[0\]\.message\.content is a "
                                                                       r"number \(5\), expected a string"),
    "usage-a-string": ({**_choice(), "usage": "lots"}, r"usage is a string \('lots'\), expected an object"),
    "usage-count-a-string": ({**_choice(), "usage": {"prompt_tokens": "9"}}, r"usage\.prompt_tokens is a string "
                                                                                 r"\('9'\), expected an integer"),
    "usage-count-a-bool": ({**_choice(), "usage": {"completion_tokens": True}}, r"usage\.completion_tokens is a "
                                                                                    r"boolean \(True\)"),
    "logprobs-a-list": (_choice(logprobs=[1]), r"choices\[0\]\.logprobs is a list \(\[1\]\), expected an object"),
    "token-missing": (_choice(logprobs={"content": [{"logprob": 0.0}]}),
                      r"choices\[0\]\.logprobs\.content\[0\]\.token is missing, expected a string"),
    "top-a-string": (_choice(logprobs={"content": [{"token": "a", "logprob": 0.0, "top_logprobs": ["a"]}]}),
                     r"choices\[0\]\.logprobs\.content\[0\]\.top_logprobs\[0\] is a string \('a'\), expected an "
                     r"object"),
    "logprob-a-string": (_choice(logprobs={"content": [{"token": "a", "logprob": "high"}]}),
                         r"choices\[0\]\.logprobs\.content\[0\]\.logprob is a string \('high'\), expected a number"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_chat_answer_says_what_was_wrong(case):
    bad, what = MALFORMED[case]
    with HostileServer(answer(bad)) as server:
        with pytest.raises(BackendError, match=r"/v1/chat/completions: malformed answer: " + what):
            backend(server, max_retries=2).generate(PROMPT, 4, top_logprobs=2)
        assert len(server.requests) == 1  # a well-formed JSON answer of the wrong shape is not asked again


ECHO = {"tokens": ["a", "b"], "text_offset": [0, 1], "token_logprobs": [None, 0.0], "top_logprobs": [None, {"b": 0.0}]}
MALFORMED_ECHO = {
    "text-a-list": ({"choices": [{"text": ["a"]}]}, r"choices\[0\]\.text is a list \(\['a'\]\), expected a string"),
    "offsets-short": ({"choices": [{"text": "ab", "logprobs": {**ECHO, "text_offset": [0]}}]},
                      r"choices\[0\]\.logprobs\.text_offset has 1 items, expected 2 \(one per token\)"),
    "offset-a-string": ({"choices": [{"text": "ab", "logprobs": {**ECHO, "text_offset": [0, "1"]}}]},
                        r"choices\[0\]\.logprobs\.text_offset\[1\] is a string \('1'\), expected an integer"),
    "top-a-list": ({"choices": [{"text": "ab", "logprobs": {**ECHO, "top_logprobs": [None, ["b"]]}}]},
                   r"choices\[0\]\.logprobs\.top_logprobs\[1\] is a list \(\['b'\]\), expected an object"),
    "top-value-a-string": ({"choices": [{"text": "ab", "logprobs": {**ECHO, "top_logprobs": [None, {"b": "x"}]}}]},
                           r"choices\[0\]\.logprobs\.top_logprobs\[1\]\['b'\] is a string \('x'\), expected a "
                           r"number"),
    "token-a-number": ({"choices": [{"text": "ab", "logprobs": {**ECHO, "tokens": ["a", 7]}}]},
                       r"choices\[0\]\.logprobs\.tokens\[1\] is a number \(7\), expected a string"),
}


@pytest.mark.parametrize("case", list(MALFORMED_ECHO))
def test_a_malformed_completions_answer_says_what_was_wrong(case):
    bad, what = MALFORMED_ECHO[case]
    with HostileServer(answer(bad), answer(bad)) as server:
        with pytest.raises(BackendError, match=r"/v1/completions: malformed answer: " + what):
            backend(server).slot_logprobs("ab", [1], ["b"])
        with pytest.raises(BackendError, match=r"/v1/completions: malformed answer: " + what):
            backend(server, chat=False).generate(PROMPT, 4, top_logprobs=2)
