"""A small headless-Chromium driver over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ended by NUL on file descriptors 3 and 4), standard library only. The browser tests and the
feature bench use it to load pages from file://, read the DOM, collect console errors and every network
request, and take screenshots.

    with Chromium() as chrome:
        page = chrome.open("file:///…/feature.html#12", ready="document.querySelector('.context')")
        page.evaluate("document.title"), page.errors, page.requests, page.screenshot("out.png")
        page.screenshot_element("#logit-hist-box", "hist.png")

    screenshot_feature(browser_dir, 12, "hist.png", selector="#logit-hist-box")  # one call, its own Chromium

Chromium comes from the system's package manager (`make browser`); `find_chromium()` is None without it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable, or None."""
    for name in (os.environ.get("FASTSAE_CHROMIUM"), *NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Page:
    """One tab: its DevTools session, and what it logged."""

    def __init__(self, chrome: Chromium, session: str):
        self.chrome, self.session = chrome, session
        self.errors: list[str] = []  # console errors, uncaught exceptions, failed loads
        self.requests: list[str] = []  # every URL the page asked for

    def send(self, method: str, **params):
        return self.chrome.send(method, params, self.session)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (JSON-able) in the page."""
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r} raised {reply['exceptionDetails'].get('text')}: "
                               f"{reply['exceptionDetails'].get('exception', {}).get('description')}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        """Poll until expression is truthy."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.evaluate(f"Boolean({expression})"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{expression!r} still false after {timeout} s; errors: {self.errors}")

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        params = {"format": "png", "captureBeyondViewport": full_page}
        data = self.send("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def screenshot_element(self, selector: str, path: str | Path, margin: int = 4) -> Path:
        """A PNG of the first element selector matches: its bounding box in the document, plus margin pixels."""
        box = self.evaluate(f"(e => e && (r => [r.left + scrollX, r.top + scrollY, r.width, r.height])"
                            f"(e.getBoundingClientRect()))(document.querySelector({json.dumps(selector)}))")
        if not box or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"selector {selector!r} matches no visible element of the page")
        x, y, w, h = box
        clip = {"x": max(x - margin, 0), "y": max(y - margin, 0), "width": w + 2 * margin, "height": h + 2 * margin,
                "scale": 1}
        data = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)


class Chromium:
    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no Chromium found: `make browser` installs it (apt-get install chromium)")
        self.size = (width, height)
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._pages: dict[str, Page] = {}
        self._lock = threading.Condition()

    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="fastsae-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--mute-audio",
                f"--user-data-dir={self._profile.name}", f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank"]

        def child_fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            high_r, high_w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)  # dup2 copies are inheritable; every other descriptor is not (PEP 446)
            os.dup2(high_w, 4)

        self._proc = subprocess.Popen(args, close_fds=False, preexec_fn=child_fds, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", {}, timeout=5)
        except Exception:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_chrome)
        self._profile.cleanup()

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    message = json.loads(raw)
                    if "id" in message:
                        with self._lock:
                            self._replies[message["id"]] = message
                            self._lock.notify_all()
                    else:
                        self._on_event(message)

    def _on_event(self, message: dict) -> None:
        page = self._pages.get(message.get("sessionId"))
        if page is None:
            return
        method, params = message["method"], message.get("params", {})
        if method == "Network.requestWillBeSent":
            page.requests.append(params["request"]["url"])
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            page.errors.append(f"exception: {details.get('exception', {}).get('description') or details['text']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = (str(a.get("value", a.get("description"))) for a in params["args"])
            page.errors.append("console: " + " ".join(args))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            page.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            page.errors.append(f"load failed: {params.get('errorText')}")

    def send(self, method: str, params: dict, session: str | None = None, timeout: float = 30.0) -> dict:
        with self._lock:
            self._id += 1
            ident = self._id
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                left = end - time.monotonic()
                if left <= 0 or self._proc.poll() is not None:
                    raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
                self._lock.wait(min(left, 0.5))
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def open(self, url: str, ready: str | None = None, timeout: float = 30.0) -> Page:
        """A new tab showing url, once `document.readyState` is complete and `ready` (JS) is truthy."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        self._pages[session] = page
        for domain in ("Runtime", "Log", "Network", "Page"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=url)
        page.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", timeout)
        if ready:
            page.wait_for(ready, timeout)
        return page


def screenshot_feature(browser: str | Path, latent: int, path: str | Path, *, selector: str | None = None,
                       chrome: Chromium | None = None) -> Path:
    """A PNG of latent's page of the feature browser in directory browser (whole page), or of one element of it
    (selector, e.g. "#logit-hist-box" for the logit-drop histogram), once the page has rendered. Starts its own
    Chromium unless given one."""
    page_file = Path(browser) / "feature.html"
    if not page_file.is_file():
        raise FileNotFoundError(f"{page_file}: not a feature browser (`fastsae browse` writes one)")
    if chrome is None:
        with Chromium() as own:
            return screenshot_feature(browser, latent, path, selector=selector, chrome=own)
    page = chrome.open(page_file.resolve().as_uri() + f"#{latent}", ready="document.body.dataset.readyMs")
    if page.errors:
        raise RuntimeError(f"latent {latent}'s page reported errors: {page.errors}")
    return page.screenshot(path) if selector is None else page.screenshot_element(selector, path)
