"""Offline detection (lorafit.hub): decided before any HF library is imported, so a run without a network fails in a
second or two with one line instead of huggingface_hub's five retries (~25 s)."""

from __future__ import annotations

import os
import socket
import time

import pytest
from conftest import run_cli

from lorafit import hub
from lorafit.recipe import load_recipe, set_value


@pytest.fixture
def online(monkeypatch):
    """No offline flag, no proxy: the decision is lorafit's."""
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
              "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    os.environ.pop("HF_HUB_OFFLINE", None)


def test_a_run_with_only_local_sources_is_offline(online, tmp_path):
    cfg = set_value(load_recipe("quickstart"), "model.name", str(tmp_path))  # package: -> a local folder
    assert hub.hub_ids(cfg) == []
    assert hub.decide_offline(cfg) and os.environ["HF_HUB_OFFLINE"] == "1"


def test_an_unreachable_hub_means_offline(online):
    online.setenv("HF_ENDPOINT", "https://lorafit-test.invalid")  # .invalid never resolves (RFC 2606)
    cfg = load_recipe("llama2_guanaco")
    assert hub.hub_ids(cfg) == ["NousResearch/Llama-2-7b-chat-hf", "mlabonne/guanaco-llama2-1k"]
    assert hub.decide_offline(cfg) and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_reachable_hub_stays_online(online):
    with socket.socket() as server:  # something listening stands for the hub
        server.bind(("127.0.0.1", 0))
        server.listen()
        online.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert not hub.decide_offline(load_recipe("llama2_guanaco"))
    assert "HF_HUB_OFFLINE" not in os.environ


def test_plan_of_a_hub_model_without_a_network_is_one_line_within_5_s(tmp_path):
    """The issue-18 bound: no retry loop. Measured here: 2.2 s, most of it importing torch and transformers."""
    t0 = time.monotonic()
    r = run_cli(["--recipe", "llama2_guanaco_fast", "--plan", "--set", "model.name=lorafit-tests/not-cached-7b"],
                env={"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_DATASETS_OFFLINE": "",
                     "HF_ENDPOINT": "https://lorafit-test.invalid", "HF_HOME": str(tmp_path / "hf")})
    elapsed = time.monotonic() - t0
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("lorafit: error: could not read the config of model 'lorafit-tests/not-cached-7b'")
    assert "the hub (lorafit-test.invalid:443) is not reachable: working offline" in r.stdout
    assert elapsed < 5.0, f"{elapsed:.1f} s"
