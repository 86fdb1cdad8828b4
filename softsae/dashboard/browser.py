"""Headless Chromium driven over the Chrome DevTools Protocol on a pipe (no port, no extra package).

    with HeadlessChromium() as b:                  # finds chromium / chromium-browser / google-chrome
        b.open(Path("out/index.html"))             # waits for the load event
        n = b.evaluate("document.querySelectorAll('.latent-card').length")
        png = b.screenshot()                       # bytes
        b.console_errors(), b.requests             # errors logged by the page, URLs it requested

``--remote-debugging-pipe``: the browser reads NUL-terminated JSON messages on its fd 3 and writes
them on fd 4, so nothing listens on the network. Used by the dashboard's browser test and by
``benchmarks/dashboard_screenshot.py``.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable (``$SOFTSAE_CHROMIUM`` first), or None."""
    env = os.environ.get("SOFTSAE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """The browser did not start, answered with an error, or did not answer in time."""


class HeadlessChromium:
    """One headless browser with one page; see the module docstring."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900,
                 timeout: float = 60.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError("no chromium executable found (apt-get install chromium, or set SOFTSAE_CHROMIUM)")
        self.timeout = timeout
        self.width, self.height = width, height
        self._profile = tempfile.mkdtemp(prefix="softsae-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:  # chromium expects its pipe ends at fds 3 (reads) and 4 (writes)
            # (close_fds=False: Python's own descriptors are not inheritable anyway (PEP 446); the
            # dup2 copies are, so they survive the exec)
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
                f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"]
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     close_fds=False, preexec_fn=child_fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._consumed = 0  # events before this index were seen by wait_event
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None
        self.requests: list[str] = []
        self._console: list[str] = []
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ protocol
    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome, "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    msg, buf = buf.split(b"\0", 1)
                    self._inbox.put(json.loads(msg))
        self._inbox.put(None)

    def _take(self, deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"no answer from the browser within {self.timeout:.0f} s")
        try:
            msg = self._inbox.get(timeout=left)
        except queue.Empty:
            raise BrowserError(f"no answer from the browser within {self.timeout:.0f} s") from None
        if msg is None:
            raise BrowserError(f"the browser exited (code {self.proc.poll()}): {self.stderr()[-2000:]}")
        if "method" in msg:
            self._event(msg)
        return msg

    def _event(self, msg: dict[str, Any]) -> None:
        self._events.append(msg)
        m, p = msg["method"], msg.get("params", {})
        if m == "Network.requestWillBeSent":
            self.requests.append(p["request"]["url"])
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self._console.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self._console.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                              for a in p.get("args", [])))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            self._console.append("log: " + p["entry"].get("text", ""))

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are recorded)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session is not None:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._take(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def wait_event(self, method: str) -> dict[str, Any]:
        """Wait for the next event ``method`` after the last one waited for (or after ``open`` began)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i in range(self._consumed, len(self._events)):
                if self._events[i]["method"] == method:
                    self._consumed = i + 1
                    return self._events[i].get("params", {})
            self._take(deadline)

    # ------------------------------------------------------------------ page
    def open(self, path_or_url: str | Path) -> None:
        """Navigate to a file (path) or URL and wait for its load event."""
        url = path_or_url if isinstance(path_or_url, str) and "://" in path_or_url else \
            Path(path_or_url).resolve().as_uri()
        self._consumed = len(self._events)
        res = self.call("Page.navigate", {"url": url})
        if res.get("errorText"):
            raise BrowserError(f"cannot open {url}: {res['errorText']}")
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-able; promises awaited)."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            err = res["exceptionDetails"].get("exception", {}).get("description")
            raise BrowserError(f"{expression!r} threw: {err}")
        return res["result"].get("value")

    def screenshot(self, full_page: bool = False) -> bytes:
        """PNG of the viewport (``full_page``: of the whole document)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])

    def console_errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries of the page so far."""
        return list(self._console)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", session=False) if self._reader.is_alive() else None
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.close(self._to_chrome)
        except OSError:
            pass
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m softsae.dashboard.browser PAGE OUT.png``: a screenshot of a page (the README's)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m softsae.dashboard.browser", description=main.__doc__)
    p.add_argument("page", help="an HTML file (or URL)")
    p.add_argument("png", help="output PNG")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--scroll-to", default=None, metavar="SELECTOR", help="scroll this element to the top first")
    p.add_argument("--click", default=None, metavar="SELECTOR", help="click this element first")
    a = p.parse_args(argv)
    with HeadlessChromium(width=a.width, height=a.height) as b:
        b.open(a.page)
        if a.click:
            b.evaluate(f"document.querySelector({json.dumps(a.click)}).click()")
        if a.scroll_to:
            b.evaluate(f"document.querySelector({json.dumps(a.scroll_to)}).scrollIntoView({{block: 'start'}})")
        png = b.screenshot()
        errors = b.console_errors()
    Path(a.png).write_bytes(png)
    for e in errors:
        print(f"page error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
