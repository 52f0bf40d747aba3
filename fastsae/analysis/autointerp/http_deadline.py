"""The wall-clock deadline of one HTTP request: `Deadline`, and the urllib opener whose connections report to it
(`with Deadline(seconds): deadline_opener().open(...)`)."""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request


class Deadline:
    """A wall-clock limit on the request this thread makes inside `with Deadline(s):`. urllib's timeout bounds
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

    def __enter__(self) -> Deadline:
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


_CURRENT = threading.local()  # .deadline: the Deadline of this thread's request in flight, if any


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


def deadline_opener() -> urllib.request.OpenerDirector:
    """A urllib opener whose connections report to the request's Deadline (and keep urlopen's proxies from the
    environment and its redirects)."""
    return urllib.request.build_opener(_HTTPHandler(), _HTTPSHandler())
