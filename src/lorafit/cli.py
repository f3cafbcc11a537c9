"""Command line: arguments, logging on rank 0, the run folder, and the boundary where a UserError becomes exit code 2.

A user's mistake prints one line `lorafit: error: ...` on stderr and exits 2, and a run folder this invocation
created is removed again, so nothing half-written is left. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lorafit import console
from lorafit.console import is_main_process
from lorafit.errors import EXIT_USER_ERROR, UserError


def process_start_time() -> float:
    """When this process started (epoch seconds), from /proc; the current time where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class Stopwatch:
    """Wall time of a run's phases, from the process start: summary.json's `phases_s` and one console line, so a
    user sees where the minute before the first step goes (imports, data, quantizing the base, compiling)."""

    def __init__(self):
        self.last = process_start_time()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        """Records the time since the previous lap under `name` and returns it (unrounded, seconds)."""
        now = time.time()
        elapsed = max(now - self.last, 0.0)
        self.laps[name] = round(elapsed, 2)
        self.last = now
        return elapsed

    def describe(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.laps.items()) + f"; total {sum(self.laps.values()):.1f} s"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="quickstart",
                   help="recipe name in recipes/ (e.g. llama2_guanaco), a .py recipe file, or a saved recipe.yaml "
                        "(default: quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field, e.g. --set lora.r=16 (repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe and the layout that would be used, then exit (loads no model)")
    p.add_argument("--plan", action="store_true",
                   help="print the estimated peak GPU memory per process and the settings the memory planner would "
                        "choose for the visible GPUs, then exit (reads only the model's config)")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes in recipes/ and exit")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (default): continue from the newest verified checkpoint in output.dir, if any; none: "
                        "start fresh (refused if output.dir holds checkpoints); PATH: a checkpoint folder "
                        "(RUN/checkpoints/checkpoint-N) or a run folder. See docs/checkpoints.md")
    return p


class RunDir:
    """The run folder; removed again if this process created it and the run ends in a user error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False

    def create(self) -> Path:
        if is_main_process():
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self.created = True
            console.attach_file(self.path / "log.txt")  # what was logged so far, then everything
        return self.path

    def discard_if_created(self) -> None:
        if self.created:
            console.detach_file()
            shutil.rmtree(self.path, ignore_errors=True)


def main(run: Callable[[argparse.Namespace, list[RunDir]], int], argv: list[str] | None = None,
         description: str = "") -> int:
    """src/train.py's entry: parse, then `run(args, holder)` inside the error boundary (`guarded`)."""
    args = parser(description).parse_args(argv)
    holder: list[RunDir] = []
    if args.list_recipes:
        from lorafit.recipe import describe_recipes

        return guarded(lambda: print(describe_recipes()) or 0)
    return guarded(lambda: run(args, holder), holder)


def guarded(body: Callable[[], int], holder: list[RunDir] | None = None, stream=None) -> int:
    """The error boundary of every entry point: logging first (before any library is imported), then `body()`.

    A UserError becomes one line `lorafit: error: ...` on stderr and exit code 2, and a run folder this invocation
    created is removed; any other exception is a bug and keeps its traceback (also written to the run's log)."""
    console.setup(stream)
    try:
        code = body()
        # Process groups still alive when a peer has exited abort the process at shutdown (SIGABRT, seen after a
        # successful 2-process run in CI); the user-error path releases them in lorafit.dist, this is the normal one.
        if "torch.distributed" in sys.modules:
            from lorafit.dist import release_groups

            release_groups()
        return code
    except UserError as e:
        for rd in holder or []:
            rd.discard_if_created()
        if is_main_process() or os.environ.get("LORAFIT_ALL_RANKS_ERRORS"):
            sys.stderr.write(f"lorafit: error: {e}\n")  # one write: other ranks may share the stream
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nlorafit: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: Python prints the traceback; the run's log keeps it too
        console.file_only("lorafit stopped on an unexpected error", exc_info=True)
        raise
