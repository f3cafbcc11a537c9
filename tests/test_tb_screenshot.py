"""bench/tb_screenshot.py: TensorBoard served on a finished tiny run and opened in headless Chromium shows the
train/loss chart (the screenshot is a real PNG), and the check fails when the chart is not on the page."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def _have_chromium() -> bool:
    return shutil.which("chromium") is not None or shutil.which("chromium-browser") is not None


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """Debian's chromium, installed here when missing and we are root with apt (a fresh CI machine), as the slurm
    tier installs slurm-wlm; elsewhere the tests skip with the reason."""
    if not _have_chromium() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", "-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                        "chromium"], capture_output=True, text=True, timeout=900)
    if not _have_chromium():
        pytest.skip("Debian's chromium is not installed and could not be (apt-get install -y chromium as root)")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir, guanaco_dir):
    out = tmp_path_factory.mktemp("tb") / "run"
    r = run_cli(["--recipe", "llama2_guanaco", *tiny_overrides(tiny_llama_dir, guanaco_dir, out, steps=4)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_the_loss_chart_is_drawn_and_captured(finished_run, tmp_path):
    png = tmp_path / "tb.png"
    r = run_cli([str(finished_run), "--out", str(png)], script="bench/tb_screenshot.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train/loss chart drawn" in r.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 1_000_000


def test_the_check_fails_without_the_loss_chart(finished_run, tmp_path):
    # A tag filter that hides train/loss: the page loads, but the chart the check waits for is not there.
    r = run_cli(
        [str(finished_run), "--out", str(tmp_path / "x.png"), "--tags", "^eval", "--timeout", "20"],
        script="bench/tb_screenshot.py",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "no train/loss card" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_run_without_loss_events_is_refused(tmp_path):
    (tmp_path / "tb").mkdir()
    r = run_cli([str(tmp_path)], script="bench/tb_screenshot.py")
    assert r.returncode == 2 and "no train/loss" in r.stderr, r.stderr
