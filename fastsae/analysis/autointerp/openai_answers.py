"""Reading an OpenAI-compatible server's answers as if it were hostile: a body capped in size, JSON checked for
bad UTF-8 and deep nesting before it is parsed, every field checked for its type (a malformed answer names the
field, what it held and what was expected), and Retry-After read and clamped whatever it says."""

from __future__ import annotations

import datetime
import email.utils
import http.client
import itertools
import json
import math
import re
import urllib.error

from .llm_backends import Generated

# OpenAI answers nest 6 levels deep (choices[0].logprobs.content[i].top_logprobs[j]); json's C parser recurses
# once a level and fails with a RecursionError near 1,000 (or crashes, if the recursion limit was raised).
MAX_JSON_DEPTH = 100
ERROR_BYTES = 64 * 2 ** 10  # of an error answer's body, read for its message (of which 300 characters are shown)


class TryAgain(Exception):
    """A try that failed in a way the next may not: a timeout, a dropped connection, a 429/5xx, or a body that
    did not arrive as one JSON document (a proxy may cut it short). wait: the seconds the server asked for."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class MalformedAnswer(ValueError):
    """A JSON answer of the wrong shape; the message names the field, what it held and what was expected."""


def retry_after_seconds(value: str | None, most: float) -> float | None:
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


def read_capped(resp, cap: int) -> bytes:
    """The body of resp, refused unread when its Content-Length is over cap, and cut after cap + 1 bytes when
    it has none (a chunked body, or one that ends when the connection closes)."""
    length = (resp.headers.get("Content-Length") or "").strip()
    if length.isdigit() and int(length) > cap:
        raise TryAgain(f"the answer is {int(length):,} bytes, over the {cap:,}-byte limit (max_answer_bytes)")
    body = resp.read(cap + 1)
    if len(body) > cap:
        raise TryAgain(f"the answer is more than {cap:,} bytes, over the {cap:,}-byte limit (max_answer_bytes)")
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


def parse_json(data: bytes) -> object:
    """data as JSON, checked first for what json.loads handles badly: bytes that are not UTF-8 (a
    UnicodeDecodeError) and deep nesting (a RecursionError)."""
    try:
        text = data.decode("utf-8-sig")  # as json.loads(bytes) did: a byte-order mark is allowed
    except UnicodeDecodeError as err:
        raise TryAgain(f"the answer is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start} of "
                     f"{len(data):,})") from None
    if _too_deep(data):
        raise TryAgain(f"the answer is JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as err:  # a JSONDecodeError, or an integer of over 4,300 digits
        raise TryAgain(f"the answer was not JSON ({str(err)[:200]})") from None


def server_message(err: urllib.error.HTTPError) -> str:
    """" (the server's message)" from an error answer's JSON body, or "" (any other body is not shown)."""
    try:
        body = parse_json(err.read(ERROR_BYTES))
    except (TryAgain, OSError, http.client.HTTPException):
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
        raise MalformedAnswer(f"{name} is {_show(value)}, expected {_KINDS[kind]}")
    return value


def _get(obj: dict, key: str, kind: type, where: str, required: bool = False):
    """obj[key] checked to be a kind; where is the path to obj ("choices[0].")."""
    if required and key not in obj:
        raise MalformedAnswer(f"{where}{key} is missing, expected {_KINDS[kind]}")
    return _check(obj.get(key), kind, f"{where}{key}", required)


def _choice(answer) -> dict:
    if not isinstance(answer, dict):
        raise MalformedAnswer(f"expected a JSON object, got {_show(answer)}")
    choices = _get(answer, "choices", list, "")
    if not choices:
        raise MalformedAnswer(f"no choices: {_show(answer)}")
    return _check(choices[0], dict, "choices[0]")


def read_usage(answer: dict) -> tuple[int, int]:
    usage = _get(answer, "usage", dict, "") or {}
    return _get(usage, "prompt_tokens", int, "usage.") or 0, _get(usage, "completion_tokens", int, "usage.") or 0


def read_chat(answer) -> tuple[str, list[Generated] | None]:
    """(text, tokens) of a chat completion."""
    choice = _choice(answer)
    message = _get(choice, "message", dict, "choices[0].", required=True)
    text = _get(message, "content", str, "choices[0].message.") or ""  # null: a refusal, or tool calls
    return text, _chat_tokens(_get(choice, "logprobs", dict, "choices[0]."))


def read_completion(answer) -> tuple[str, list[Generated] | None]:
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
            raise MalformedAnswer(f"{where}{key} has {len(lists[key])} items, expected {len(tokens)} (one per token)")
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
