"""trace.html while a run is live: it reloads itself until the run ends, and is never half-written."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from clvr_agent.app.trace import trace_html, write_trace
from clvr_agent.types import Trajectory

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)


@pytest.fixture(scope="module")
def finished() -> Trajectory:
    """A real ShapeWorld run's trajectory (canvases on disk)."""
    from clvr_agent import create_clvr

    out = create_clvr("shapeworld", max_iterations=4).invoke(
        {"prompt": "a photo of two red circles left of a blue square", "seed": 3})
    traj = Trajectory.model_validate(out["trajectory"])
    assert traj.status != "running" and traj.steps and traj.final_canvas is not None
    return traj


def _running(traj: Trajectory) -> Trajectory:
    """The same run as it looked after its first step."""
    return traj.model_copy(update={"status": "running", "stop_reason": "", "steps": traj.steps[:1],
                                   "final_canvas": None})


def test_running_page_refreshes_and_finished_page_does_not(finished, tmp_path):
    running = trace_html(_running(finished), tmp_path, refresh_s=3)
    assert '<meta http-equiv="refresh" content="3">' in running
    assert 'class="badge running"' in running
    done = trace_html(finished, tmp_path)
    assert "http-equiv" not in done and "reloads" not in done
    assert f'class="badge {finished.status}"' in done


def test_write_replaces_the_page_atomically(finished, tmp_path, monkeypatch):
    page = tmp_path / "trace.html"
    write_trace(_running(finished), page)
    before = page.read_text()
    assert oct(page.stat().st_mode & 0o777) != oct(0o600)  # readable like any file the run writes

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_trace(finished, page)
    assert page.read_text() == before  # the old page is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.html"]  # and no temp file is left
    monkeypatch.undo()
    write_trace(finished, page)
    assert "http-equiv" not in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.html"]


class _RunFolder(http.server.SimpleHTTPRequestHandler):
    """Serves the run folder; the first time the browser fetches trace.html the run 'finishes'."""

    requests: list[str]
    on_first_page: callable

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        super().do_GET()
        if self.path == "/trace.html" and self.requests.count("/trace.html") == 1:
            self.on_first_page()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _served(folder: Path, on_first_page=lambda self: None):
    """Serve ``folder`` on a loopback port → (the handler class with its request log, the base URL)."""
    handler = type("Handler", (_RunFolder,), {"requests": [], "on_first_page": on_first_page})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_reload_in_the_same_second_gets_the_finished_page(finished, tmp_path):
    """A browser reloading a served running page with If-Modified-Since is sent the finished page.

    http.server (like most servers) validates at one-second resolution: a finished page written in the same
    second as the running page it replaced was answered "304 Not Modified", and the browser reloaded the
    running page forever.
    """
    import urllib.error
    import urllib.request

    write_trace(_running(finished), tmp_path / "trace.html")
    with _served(tmp_path) as (_, base):
        url = f"{base}/trace.html"
        with urllib.request.urlopen(url, timeout=10) as first:
            assert 'class="badge running"' in first.read().decode()
            stamp = first.headers["Last-Modified"]
        write_trace(finished, tmp_path / "trace.html")  # milliseconds later: the same second
        reload = urllib.request.Request(url, headers={"If-Modified-Since": stamp})
        try:
            with urllib.request.urlopen(reload, timeout=10) as second:
                status, body = second.status, second.read().decode()
        except urllib.error.HTTPError as e:  # urllib raises on 304
            status, body = e.code, ""
    assert status == 200, f"the reload was answered {status}: the browser would keep the running page"
    assert f'class="badge {finished.status}"' in body and "http-equiv" not in body


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")
def test_headless_chromium_follows_a_running_page_until_it_finishes(finished, tmp_path):
    """The browser opens the running page, reloads it, gets the finished one and stops reloading.

    A real headless browser in real time (no --virtual-time-budget: under load its virtual clock can stall
    on a reloading page and never dump). What the browser did is read from the server's request log.
    """
    run = tmp_path / "run"
    steps = run / "steps"
    steps.mkdir(parents=True)
    moved = []
    for s in finished.steps:  # the page links canvases relative to itself: put them in the run folder
        if s.canvas is not None:
            shutil.copy(s.canvas.path, steps / s.canvas.name)
            s = s.model_copy(update={"canvas": s.canvas.model_copy(update={"path": str(steps / s.canvas.name)})})
        moved.append(s)
    final = finished.final_canvas.model_copy(update={"path": str(steps / finished.final_canvas.name)})
    done = finished.model_copy(update={"steps": moved, "final_canvas": final})
    assert len(done.steps) >= 2 and done.steps[-1].canvas is not None
    write_trace(_running(done), run / "trace.html", refresh_s=1)
    last_canvas = f"/steps/{done.steps[-1].canvas.name}"  # linked only from the finished page

    with _served(run, on_first_page=lambda self: write_trace(done, run / "trace.html")) as (handler, base):
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"{base}/trace.html"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            shown = _wait_for(lambda: last_canvas in handler.requests or browser.poll() is not None, 90)
            time.sleep(3)  # three refresh periods of the running page: a page still reloading would show here
        finally:
            browser.terminate()
            try:
                _, err = browser.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                browser.kill()
                _, err = browser.communicate()
    assert shown and last_canvas in handler.requests, (handler.requests, (err or "")[-2000:])
    pages = handler.requests.count("/trace.html")
    assert pages == 2, handler.requests  # reloaded once while running, then never again
    assert handler.requests.index(last_canvas) > handler.requests.index("/trace.html")
    final_page = (run / "trace.html").read_text()
    assert f'class="badge {done.status}"' in final_page and "http-equiv" not in final_page
