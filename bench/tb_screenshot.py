"""TensorBoard as people see it: serve a finished run, open it in headless Chromium, check the loss chart, screenshot.

    python bench/tb_screenshot.py runs/quickstart                                   # -> runs/quickstart/tensorboard.png
    python bench/tb_screenshot.py runs/quickstart --out docs/img/tensorboard.png    # the README's picture
    python bench/tb_screenshot.py runs/quickstart --tags 'loss|exact|perplexity' --timeout 180

Starts `tensorboard --logdir RUN/tb` on a free localhost port, opens its Time Series page (filtered to --tags) in
Debian's `chromium` (apt-get install chromium; no browser is downloaded), waits until the train/loss card has drawn
its chart with the run's last loss step in its data table, and saves a PNG. Exit code 0: the chart is there; 1: it
did not appear in time (the page text is printed); 2: no chromium, no events or no train/loss in them.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: NUL-separated JSON on file
descriptors 3 and 4), so neither a websocket client nor a debugging port is needed. Our own ~40 lines rather than
Playwright/Selenium: those download their own browser or need a matching driver, and the machines are offline.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]
EXIT_NO_CHART, EXIT_SETUP = 1, 2

# Returns {ok, why}. The train/loss card must exist, hold a sized chart canvas and list the last step in its data
# table, which it does only once the scalars arrived from the server and the chart was laid out.
CHECK_JS = """(() => {
  const cards = [...document.querySelectorAll('scalar-card')];
  const titles = cards.map(c => c.innerText.split('\\n').slice(0, 2).join('').replace(/\\s/g, ''));
  const card = cards.find((c, i) => titles[i].startsWith('train/loss'));
  if (!card) return {ok: false, why: 'no train/loss card; cards: ' + JSON.stringify(titles)};
  const canvas = card.querySelector('line-chart canvas');
  if (!canvas || canvas.width < 50 || canvas.height < 50) return {ok: false, why: 'train/loss card has no chart'};
  const cells = [...card.querySelectorAll('td, .row, [role=cell]')].map(e => e.innerText.trim());
  if (!cells.includes(STEP) && !card.innerText.split(/\\s+/).includes(STEP))
    return {ok: false, why: 'train/loss chart has no data for step ' + STEP + ' yet'};
  return {ok: true, why: 'train/loss chart drawn, ' + cards.length + ' cards'};
})()"""
# Outlier clipping would cut the step-0 losses (the base model's) off the y axes; then the settings pane is closed.
SETTINGS_JS = """(() => {
  const label = [...document.querySelectorAll('mat-checkbox, label')].find(
    e => e.innerText.trim().startsWith('Ignore outliers'));
  const box = label && (label.querySelector('input[type=checkbox]') || label.closest('mat-checkbox')?.querySelector('input'));
  if (box && box.checked) box.click();
  document.querySelector('button[aria-label="Close side pane"]')?.click();
  return Boolean(box);
})()"""


class Chromium:
    """A headless Chromium spoken to over the DevTools protocol on fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, binary: str, width: int, height: int):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="lorafit-chromium-")

        def child_fds():
            # Move both ends above 9 first: a pipe end may itself be fd 3 or 4 and be overwritten by the other.
            # os.dup2 makes 3 and 4 inheritable; every other fd of ours is close-on-exec (Python's default), which is
            # why close_fds=False is safe here (close_fds=True would close 3 and 4 after this function ran).
            r, w = fcntl.fcntl(to_r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            close_fds=False,
            preexec_fn=child_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self._w = os.fdopen(self._to_w, "wb")
        self._r = os.fdopen(self._from_r, "rb")
        self._buf = b""
        self._id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.page(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._w.write(json.dumps(msg).encode() + b"\0")
        self._w.flush()
        while True:  # events arrive interleaved with replies; skip them
            while b"\0" not in self._buf:
                chunk = self._r.read1(1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()}) during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self.session)

    def evaluate(self, js: str):
        return self.page("Runtime.evaluate", {"expression": js, "returnByValue": True})["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to close
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_loss_step(tb_dir: Path) -> int:
    from lorafit.tb import read_scalars

    scalars = read_scalars(tb_dir)
    if "train/loss" not in scalars:
        raise SystemExit(f"tb_screenshot: {tb_dir} has no train/loss scalar (tags: {list(scalars)})")
    return scalars["train/loss"][-1][0]


def start_tensorboard(tb_dir: Path, port: int, log_file) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tb_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}; see {log_file.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"tensorboard did not answer on port {port} within 120 s; see {log_file.name}")


def screenshot(run: Path, out: Path, tags: str, timeout: float, width: int = 1760, height: int = 640) -> str:
    """Serve `run`, wait for the train/loss chart, save `out`; returns what the check saw. Raises TimeoutError."""
    tb_dir = run / "tb" if (run / "tb").is_dir() else run
    step = last_loss_step(tb_dir)
    binary = os.environ.get("LORAFIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        raise SystemExit("tb_screenshot: no chromium on PATH; install Debian's: apt-get install -y chromium")
    port = free_port()
    with tempfile.NamedTemporaryFile("w", prefix="tensorboard-", suffix=".log", delete=False) as log_file:
        tb = start_tensorboard(tb_dir, port, log_file)
        browser = None
        try:
            browser = Chromium(binary, width, height)
            query = urllib.request.quote(tags, safe="")
            browser.page("Page.navigate", {"url": f"http://127.0.0.1:{port}/?tagFilter={query}&smoothing=0#timeseries"})
            deadline = time.monotonic() + timeout
            state = {"ok": False, "why": "page not loaded"}
            while time.monotonic() < deadline:
                time.sleep(1)
                state = browser.evaluate(CHECK_JS.replace("STEP", json.dumps(str(step)))) or state
                if state.get("ok"):
                    break
            if not state.get("ok"):
                text = browser.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise TimeoutError(f"{state.get('why')} after {timeout:.0f} s; page text:\n{text}")
            browser.evaluate(SETTINGS_JS)
            time.sleep(2)  # the cards re-lay out to the freed width and redraw
            png = base64.b64decode(browser.page("Page.captureScreenshot", {"format": "png"})["data"])
        finally:
            if browser is not None:
                browser.close()
            tb.terminate()
            tb.wait(timeout=30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    os.unlink(log_file.name)
    return state["why"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished run folder (with tb/) or a TensorBoard log folder")
    p.add_argument("--out", type=Path, help="PNG to write (default: RUN/tensorboard.png)")
    p.add_argument(
        "--tags", default="train/loss|eval/loss|eval/exact", help="tag filter regex (default: train/loss|eval/loss|eval/exact)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the chart (default 120)")
    args = p.parse_args(argv)
    if not args.run.is_dir():
        print(f"tb_screenshot: {args.run} is not a folder", file=sys.stderr)
        return EXIT_SETUP
    out = args.out or args.run / "tensorboard.png"
    try:
        seen = screenshot(args.run, out, args.tags, args.timeout)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return EXIT_SETUP
    except TimeoutError as e:
        print(f"tb_screenshot: the loss chart did not appear: {e}", file=sys.stderr)
        return EXIT_NO_CHART
    print(f"{out}: {seen} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
