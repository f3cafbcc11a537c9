"""Offline detection for the Hugging Face Hub, decided once per process before any HF library is imported.

huggingface_hub retries a request that cannot connect five times with back-off (~25 s), logging each retry, before
transformers or datasets report that the file is not cached. lorafit decides up front instead:
- HF_HUB_OFFLINE already set: nothing to do;
- the run names no hub id (model, tokenizer and data are local paths, a package or synthetic data): offline, so no
  library reaches for the network behind the user's back (bitsandbytes asks for a hub kernel at import on
  AVX512-BF16 CPUs);
- otherwise one TCP connection to the hub's host (HF_ENDPOINT, or the HTTPS proxy when one is set) with a short
  timeout; no answer means offline, and hub ids then load from the local cache or fail at once with one line.

The decision is written to HF_HUB_OFFLINE, which huggingface_hub and datasets read when imported, so this runs
before them (lorafit.console's setup comes first, then this, then the libraries); where one is imported already, its
module-level flag is set too.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("lorafit")

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def looks_local(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else is meant as a local path: it starts with . / ~, has two
    slashes or more, names a data file, or exists here. The one rule for models, tokenizers and data."""
    return (name.startswith((".", "/", "~")) or name.count("/") >= 2 or name.lower().endswith(DATA_SUFFIXES)
            or Path(name).expanduser().exists())


def hub_ids(cfg) -> list[str]:
    """The recipe's sources that are hub ids (model, tokenizer, data)."""
    names = [cfg.model.name, cfg.model.tokenizer, cfg.data.path]
    return [n for n in names if n and not n.startswith(("package:", "synthetic:")) and not looks_local(n)]


def _endpoint() -> tuple[str, int]:
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    return url.hostname or "huggingface.co", port


def reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection within `timeout` seconds, name lookup included (run in a thread: getaddrinfo has no
    timeout of its own)."""
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = sys.modules.get("huggingface_hub.constants")
    if hf is not None:
        hf.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = ds.HF_DATASETS_OFFLINE = True


def decide_offline(cfg) -> bool:
    """Go offline when the run needs no hub or cannot reach it; returns whether the process is offline."""
    if is_offline():
        return True
    ids = hub_ids(cfg)
    if not ids:
        go_offline()
        return True
    host, port = _endpoint()
    if reachable(host, port):
        return False
    go_offline()
    log.info("the hub (%s:%d) is not reachable: working offline, so %s load from the local hub cache only",
             host, port, ", ".join(ids))
    return True
