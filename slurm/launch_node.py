"""One node's launcher: builds this node's `accelerate launch` command and runs it. qlora.sbatch starts it as the one
srun task per node; everything after the script name goes to src/train.py untouched.

    srun --ntasks-per-node=1 python slurm/launch_node.py --recipe llama2_guanaco --set training.max_steps=500
    # the command node 1 of a 2-node allocation would run, printed instead of run:
    SLURM_NNODES=2 SLURM_NODEID=1 LORAFIT_MAIN_HOST=gpu-a01 LORAFIT_PORT=29500 LORAFIT_LAUNCH=zero3 \\
        LORAFIT_PROCS_PER_NODE=8 python slurm/launch_node.py --print-command --recipe llama2_guanaco

Inputs (qlora.sbatch exports them; see `bash slurm/qlora.sbatch --help`): SLURM_NNODES and SLURM_NODEID (the machine
rank, read here inside the srun task: on the batch host it is always 0), LORAFIT_LAUNCH (ddp, zero2, zero3, fsdp2, cpu),
LORAFIT_PROCS_PER_NODE, LORAFIT_MAIN_HOST (the first host of the allocation), LORAFIT_PORT, and optionally
LORAFIT_STATUS_FILE.

Why `accelerate launch` runs inside this process (its own parser and launcher) rather than as a child:
- Slurm delivers a signal sent to a job step (srun's forwarding, `scancel --signal`, the kill at the time limit) to
  every process of the step, launcher included. The launcher must live through USR1/TERM, whose default action would
  kill it and orphan the training processes, and must not pass them on again (the training processes got them
  already; a second one makes lorafit stop at once, without a checkpoint). Only a handler in the launcher's own
  process can do that, and torch elastic must be kept off SIGTERM (TORCHELASTIC_SIGNALS_TO_HANDLE).
- The `accelerate launch` command turns every failure of the training processes into exit code 1, so "stopped after
  saving a checkpoint, resume me" (exit 75 from every process) would look like a crash. In-process, its launcher
  raises the processes' own exit codes (torch elastic's ChildFailedError).

Exit code: 0 when the training processes finished, or all stopped to be resumed (75): a normal, coordinated stop must
not trip srun --kill-on-bad-exit and take the other nodes down while they finish. Otherwise the failing process's
code. On node 0 the verdict (0, 75 or the failure code) is written to LORAFIT_STATUS_FILE for the batch script.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_STOPPED_TO_RESUME = 75  # lorafit.errors.EXIT_STOPPED_TO_RESUME; this helper runs before lorafit is importable
CONFIGS = {"ddp": "ddp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml", "fsdp2": "fsdp2.yaml",
           "cpu": "cpu_ddp.yaml"}


class LaunchError(Exception):
    """A variable this helper needs is missing or invalid; printed as one line, exit code 2."""


def _int(env: dict, key: str, minimum: int) -> int:
    value = env.get(key, "")
    if not value.isdigit() or int(value) < minimum:
        raise LaunchError(f"{key}={value!r} must be a whole number >= {minimum} (run inside qlora.sbatch, or set it)")
    return int(value)


def build_command(env: dict, train_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command of this node, and the environment variables it needs on top of `env`."""
    nnodes = _int(env, "SLURM_NNODES", 1)
    node = _int(env, "SLURM_NODEID", 0)
    per_node = _int(env, "LORAFIT_PROCS_PER_NODE", 1)
    port = _int(env, "LORAFIT_PORT", 1)
    launch = env.get("LORAFIT_LAUNCH", "ddp")
    if launch not in CONFIGS:
        raise LaunchError(f"LORAFIT_LAUNCH={launch!r} is not one of {', '.join(CONFIGS)}")
    if node >= nnodes:
        raise LaunchError(f"SLURM_NODEID={node} is not below SLURM_NNODES={nnodes}")
    host = env.get("LORAFIT_MAIN_HOST") or ("127.0.0.1" if nnodes == 1 else "")
    if not host:
        raise LaunchError("LORAFIT_MAIN_HOST is not set: the first host of the allocation (scontrol show hostnames)")
    config = REPO / "launch" / CONFIGS[launch]
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(config),
        "--num_machines",
        str(nnodes),
        "--machine_rank",
        str(node),
        "--num_processes",
        str(nnodes * per_node),  # the total; torchrun gets num_processes // num_machines
        "--main_process_ip",
        host,
        "--main_process_port",
        str(port),
        "--max_restarts",
        "0",
    ]  # a restart would redo the work since the last checkpoint; Slurm's requeue resumes
    if nnodes > 1:
        # c10d: every node's agent meets at host:port and the ranks are handed out there. Only across nodes: on one
        # node accelerate gives torchrun no endpoint, and the default static rendezvous needs none.
        cmd += ["--rdzv_backend", "c10d"]
        if launch.startswith("zero"):
            cmd += ["--deepspeed_multinode_launcher", "standard"]  # torchrun on every node (no pdsh/ssh)
    cmd += [str(REPO / "src" / "train.py"), *train_args]
    extra = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}  # SIGTERM: see the module docstring
    if launch == "cpu":
        extra["ACCELERATE_USE_CPU"] = "1"  # lorafit's layout and accelerate's state both read it: gloo, no CUDA
    return cmd, extra


def _verdict(codes: dict[int, int]) -> int:
    """One code from the training processes' exit codes (rank -> code; only the ones that did not exit 0)."""
    if not codes:
        return 0
    if set(codes.values()) == {EXIT_STOPPED_TO_RESUME}:
        return EXIT_STOPPED_TO_RESUME
    bad = [c for c in codes.values() if c != EXIT_STOPPED_TO_RESUME]
    code = bad[0]
    return 128 - code if code < 0 else code  # killed by signal N -> 128+N, as a shell reports it


def run(cmd: list[str], extra: dict[str, str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.update(extra)
    args = launch_command_parser().parse_args(cmd[2:])
    try:
        launch_command(args)
    except ChildFailedError as e:  # torchrun: every configuration here launches through it
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
    except subprocess.CalledProcessError as e:  # accelerate's single-process launcher
        codes = {0: e.returncode}
    else:
        codes = {}
    verdict = _verdict(codes)
    if codes:
        said = "stopped after saving a checkpoint" if verdict == EXIT_STOPPED_TO_RESUME else "failed"
        print(f"lorafit-slurm: training processes {said}; exit codes by rank: {codes}", file=sys.stderr, flush=True)
    return verdict


def _hold(signum, _frame) -> None:
    # Slurm signalled every process of the step; the training processes act on it. Passing it on would be a second
    # signal to them, which means "stop now, without a checkpoint".
    name = signal.Signals(signum).name
    os.write(2, f"lorafit-slurm: launcher got {name}; the training processes got it too\n".encode())


def main(argv: list[str]) -> int:
    print_only = bool(argv) and argv[0] == "--print-command"
    train_args = argv[1:] if print_only else argv
    env = dict(os.environ)
    try:
        cmd, extra = build_command(env, train_args)
    except LaunchError as e:
        print(f"launch_node.py: error: {e}", file=sys.stderr)
        return 2
    line = " ".join(f"{k}={v}" for k, v in extra.items()) + " " + shlex.join(cmd)
    if print_only:
        print(line)
        return 0
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, _hold)
    node, nnodes = env["SLURM_NODEID"], env["SLURM_NNODES"]
    print(f"lorafit-slurm: node {node} of {nnodes} on {os.uname().nodename}: {line}", flush=True)
    verdict = run(cmd, extra)
    status = env.get("LORAFIT_STATUS_FILE")
    if status and node == "0":
        Path(status).write_text(f"{verdict}\n")
    return 0 if verdict == EXIT_STOPPED_TO_RESUME else verdict


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
