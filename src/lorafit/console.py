"""The console and the run's log file: lorafit's own lines (and one progress bar) on the console, everything in
RUN/log.txt.

Every entry point calls `setup()` first, before transformers, bitsandbytes, accelerate, datasets or DeepSpeed are
imported: what they log while importing then reaches these handlers instead of Python's last-resort handler, which
prints any warning to stderr (bitsandbytes, on CPUs with AVX512-BF16, asks the `kernels` package for a hub kernel at
import and warns when it cannot have it, so a one-line error would arrive with a second line above it).

- Console (stdout; stderr for src/generate.py, whose stdout is the answer): records of the `lorafit` logger at INFO on
  rank 0 (WARNING on the others), and a library's record only at ERROR or above.
- RUN/log.txt (rank 0): every record at INFO and above from every logger, Python warnings included
  (logging.captureWarnings), kept in memory until the run folder exists (`attach_file`), appended on a resume.
  Nothing is lost by being quiet: the warnings a user does not see on the console are in the file.
- Libraries that bring handlers of their own (transformers and datasets print to stderr, DeepSpeed to stdout) are
  routed back into these by `adopt_library_loggers()`, called after they are imported, and their own progress bars
  are turned off: the console has one bar, the training bar (lorafit.progress).

This module imports nothing from outside the standard library but tqdm (and lorafit.dist, which imports no torch),
so that it can run first.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from lorafit.dist import is_main

log = logging.getLogger("lorafit")

FORMAT = "%(asctime)s lorafit: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
# Loggers that libraries configure with handlers of their own (propagate=False), and their progress bars.
LIBRARY_LOGGERS = ("transformers", "datasets", "DeepSpeed", "huggingface_hub", "accelerate", "peft", "trl",
                   "bitsandbytes", "torch")
_BUFFER_LIMIT = 20_000  # records kept before the run folder exists; beyond it the oldest are dropped


class _ConsoleFilter(logging.Filter):
    """lorafit's records at the console level; another logger's only at ERROR or above; none marked file-only."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "file_only", False):
            return False
        if record.name == "lorafit" or record.name.startswith("lorafit."):
            return record.levelno >= self.level
        return record.levelno >= logging.ERROR


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm, which lifts the progress bar off the line first and redraws it after."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            from tqdm import tqdm

            tqdm.write(msg, file=self.stream)
            self.flush()
        except Exception:  # logging must never raise into the training loop
            self.handleError(record)


class _RunFileHandler(logging.Handler):
    """Holds records in memory until `attach(path)`, then appends them and everything after to `path`."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self.pending: list[logging.LogRecord] | None = []
        self.file = None
        self.path: Path | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.file is not None:
                self.file.write(self.format(record) + "\n")
                self.file.flush()
            elif self.pending is not None:
                self.pending.append(record)
                if len(self.pending) > _BUFFER_LIMIT:
                    del self.pending[: len(self.pending) - _BUFFER_LIMIT]
        except Exception:
            self.handleError(record)

    def attach(self, path: Path) -> None:
        if self.path == path:
            return
        self.close_file()
        self.path = path
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the run
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"---- {stamp} pid {os.getpid()}: {' '.join(sys.argv)}\n")
        for record in self.pending or []:
            self.file.write(self.format(record) + "\n")
        self.pending = None
        self.file.flush()

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> None:
        self.close_file()
        super().close()


_file_handler: _RunFileHandler | None = None


def setup(stream=None, quiet_ranks: bool = True) -> None:
    """Route every logger into the console and the run's log file (see the module docstring). Idempotent."""
    global _file_handler
    main = is_main() or not quiet_ranks
    level = logging.INFO if main else logging.WARNING
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _ConsoleHandler | _RunFileHandler):
            root.removeHandler(h)
    console = _ConsoleHandler(stream or sys.stdout)
    console.setFormatter(logging.Formatter(FORMAT, datefmt=DATEFMT))
    console.addFilter(_ConsoleFilter(level))
    root.addHandler(console)
    if main:
        _file_handler = _RunFileHandler()
        root.addHandler(_file_handler)
    root.setLevel(logging.INFO)
    log.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger: the log file, not the console
    # Progress bars of the libraries: the hub's downloads (read at huggingface_hub's import) and the rest in
    # adopt_library_loggers; lorafit shows one bar, the training bar.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def attach_file(path: str | Path) -> None:
    """Start writing the run's log file (rank 0): what was logged so far first, then everything as it comes."""
    if _file_handler is not None:
        _file_handler.attach(Path(path))


def detach_file() -> None:
    if _file_handler is not None:
        _file_handler.close_file()


def file_only(message: str, *args, exc_info=None) -> None:
    """A record for the log file alone (a bug's traceback, which Python also prints to stderr)."""
    log.error(message, *args, exc_info=exc_info, extra={"file_only": True})


def adopt_library_loggers() -> None:
    """Take back the handlers that libraries installed at import: their records go through ours (the log file; the
    console at ERROR), and their progress bars stay off. Called once they are imported; cheap to call again."""
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    tf = sys.modules.get("transformers.utils.logging")
    if tf is not None:
        tf.disable_progress_bar()  # loading weights, converting a GGUF file, writing shards
    ds = sys.modules.get("datasets")
    if ds is not None:
        ds.disable_progress_bars()
    if "datasets.utils.logging" in sys.modules:
        sys.modules["datasets.utils.logging"].set_verbosity_warning()
