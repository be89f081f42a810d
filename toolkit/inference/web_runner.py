"""The web export's page run by a real browser: Chromium driven by Playwright, the folder served by a plain
static file server on 127.0.0.1, every request to anywhere else refused. ``verify`` and ``bench`` run it as
the runtime ``chromium-ort-web``: model inputs go through ``window.toolkitRunTensor``; image files through
``window.toolkitRunFiles``, the page's own decoding and preparation (the runner's ``files``).

Needs ``playwright`` (Python) and a Chromium: ``$TOOLKIT_CHROMIUM``, else ``chromium`` or ``chromium-browser``
on the PATH (Debian's package), else Playwright's own download.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import http.server
import importlib.util
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.core.errors import ToolkitError, first_line

RUNTIME = "chromium-ort-web"
CHROMIUM_ENV = "TOOLKIT_CHROMIUM"
# as a machine's own browser runs headless: no sandbox as root, no GPU process, no calls out of its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
FILES_PER_CALL = 256


def chromium() -> str | None:
    """The Chromium to drive: $TOOLKIT_CHROMIUM, else one on the PATH; None: Playwright's own, if installed."""
    found = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and Path(found).exists() else None


def web_missing() -> str | None:
    """Why the page cannot be run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "running the web page needs a browser driver: pip install playwright, and a Chromium (apt-get install chromium)"
    if chromium() is None and not any(Path.home().glob(".cache/ms-playwright/chromium*")):
        return "running the web page needs a Chromium: apt-get install chromium, or $TOOLKIT_CHROMIUM naming one"
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


_BROWSER: dict = {"users": 0}


def _browser():
    """The process's one Chromium (Playwright's sync API allows one driver per thread), shared by every page
    open; closed when the last one closes (``_release``), or at exit."""
    _BROWSER["users"] += 1
    if "browser" not in _BROWSER:
        from playwright.sync_api import sync_playwright

        driver = sync_playwright().start()
        try:
            _BROWSER["browser"] = driver.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        except Exception:
            driver.stop()
            _BROWSER["users"] -= 1
            raise
        _BROWSER["driver"] = driver
        atexit.register(_close_browser)
    return _BROWSER["browser"]


def _release() -> None:
    _BROWSER["users"] = max(0, _BROWSER["users"] - 1)
    if _BROWSER["users"] == 0:
        _close_browser()


@contextlib.contextmanager
def browser_page(**options) -> Iterator:
    """A Playwright page of the shared Chromium (for callers that drive a page themselves, such as tests)."""
    page = _browser().new_page(**options)
    try:
        yield page
    finally:
        try:
            page.close()
        finally:
            _release()


def _close_browser() -> None:
    for key, close in (("browser", lambda b: b.close()), ("driver", lambda d: d.stop())):
        try:
            close(_BROWSER.pop(key))
        except Exception:  # noqa: BLE001 - closing what may be half open
            pass


class Page:
    """One browser page on one web folder, open until ``close`` (or the process's end)."""

    def __init__(self, folder: Path, timeout_s: float = 120.0) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.blocked: list[str] = []
        self.page = None
        self._held = False
        try:
            browser = _browser()
            self._held = True
            self.page = browser.new_page()
            self.page.route("**/*", self._only_here)
            self.page.goto(f"{self.origin}/index.html", wait_until="load")
            self.page.wait_for_function("() => window.toolkitReady !== undefined", timeout=timeout_s * 1000)
            self.page.evaluate("() => window.toolkitReady")
        except Exception as exc:  # noqa: BLE001 - Playwright's and the page's errors, in one line
            self.close()
            raise ToolkitError(f"{folder}: the page did not load in Chromium ({first_line(exc)})") from None
        atexit.register(self.close)

    def _only_here(self, route) -> None:
        if route.request.url.startswith(self.origin + "/"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def close(self) -> None:
        for step in (lambda: self.page and self.page.close(), self.server.shutdown, self.server.server_close):
            try:
                step()
            except Exception:  # noqa: BLE001 - closing what may be half open
                pass
        if self._held:
            self._held = False
            _release()


def web_runner(folder: Path, classes: int | None = None):
    """A runner (model inputs -> logits) on the page in ``folder``, with ``files(list of image bytes)`` ->
    (logits, the page's prepared pixels, the indices it refused) beside it."""
    page = Page(folder)
    spec = page.evaluate("() => window.toolkitModel.spec")
    if classes is not None and len(spec["classes"]) != classes:
        raise ToolkitError(f"{folder}: the page's model.json has {len(spec['classes'])} classes, the export {classes}")
    dtype = np.uint8 if spec["input"]["dtype"] == "uint8" else np.float32
    n = len(spec["classes"])

    def run(x: np.ndarray) -> np.ndarray:
        data = base64.b64encode(np.ascontiguousarray(x, dtype=dtype).tobytes()).decode()
        out = page.evaluate("([b64, batch]) => window.toolkitRunTensor(b64, batch)", [data, int(len(x))])
        return np.frombuffer(base64.b64decode(out), dtype=np.float32).reshape(len(x), n).copy()

    def files(sources: list[bytes]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        logits, pixels, failed = [], [], []
        for start in range(0, len(sources), FILES_PER_CALL):
            chunk = [base64.b64encode(s).decode() for s in sources[start:start + FILES_PER_CALL]]
            out = page.evaluate("(files) => window.toolkitRunFiles(files)", chunk)
            logits.append(np.frombuffer(base64.b64decode(out["logits"]), dtype=np.float32).reshape(len(chunk), n))
            pixels.append(np.frombuffer(base64.b64decode(out["pixels"]), dtype=np.uint8).reshape(len(chunk), -1))
            failed += [start + i for i, _ in out["failed"]]
        return np.concatenate(logits), np.concatenate(pixels), failed

    def time_calls(x: np.ndarray, warmup: int, min_iters: int, min_seconds: float, max_iters: int) -> list[float]:
        """bench's timing, inside the page (no round trip to Python per call): microseconds per call."""
        data = base64.b64encode(np.ascontiguousarray(x, dtype=dtype).tobytes()).decode()
        return page.evaluate("(a) => window.toolkitTime(...a)", [data, int(len(x)), warmup, min_iters, min_seconds * 1000, max_iters])

    run.files = files
    run.time_calls = time_calls
    run.close = page.close  # the browser goes with the last page closed
    run.page = page
    return run
