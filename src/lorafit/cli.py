"""Command line: arguments, the stopwatch, and the error boundary every entry point runs inside (`guarded`).

A user's mistake prints one line `lorafit: error: ...` on stderr and exits with its code (lorafit.errors); any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from lorafit import console
from lorafit.dist import is_main
from lorafit.errors import EXIT_INTERRUPTED, UserError


def process_start_time() -> float:
    """When this process started (epoch seconds), from /proc; the current time where /proc is missing."""
    from lorafit.run.status import start_ticks

    ticks = start_ticks(os.getpid())
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + int(ticks) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, TypeError, StopIteration):
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


def main(run: Callable[[argparse.Namespace], int], argv: list[str] | None = None, description: str = "") -> int:
    """src/train.py's entry: parse, then `run(args)` inside the error boundary (`guarded`)."""
    args = parser(description).parse_args(argv)
    if args.list_recipes:
        from lorafit.recipe import describe_recipes

        return guarded(lambda: print(describe_recipes()) or 0)
    # --print-config prints YAML one can save and pass back as --recipe: lorafit's own lines (the hub-offline note)
    # go to stderr then, as for src/generate.py (--plan's text is for reading; its notes stay beside it)
    return guarded(lambda: run(args), sys.stderr if args.print_config else None)


def guarded(body: Callable[[], int], stream=None) -> int:
    """The error boundary of every entry point: logging first (before any library is imported), then `body()`.

    A UserError becomes one line `lorafit: error: ...` on stderr and its exit code (lorafit.errors' table: 2, or 3
    for a run that learned nothing usable); any other exception is a bug and keeps its traceback (also written to
    the run's log). What the body holds (the run folder's lock and status) is released by its own finally."""
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
        if is_main() or os.environ.get("LORAFIT_ALL_RANKS_ERRORS"):
            sys.stderr.write(f"lorafit: error: {e}\n")  # one write: other ranks may share the stream
        return e.exit_code
    except KeyboardInterrupt:
        print("\nlorafit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug: Python prints the traceback; the run's log keeps it too
        console.file_only("lorafit stopped on an unexpected error", exc_info=True)
        raise
