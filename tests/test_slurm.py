"""SLURM: slurm/qlora.sbatch against a real one-node Slurm started by tests/slurm_cluster.py, and its fast checks.

    pytest tests/test_slurm.py                   # the fast ones: --help, bad variables, the per-node commands
    pytest -m slurm tests/test_slurm.py          # a private Slurm (root; installs slurm-wlm and munge if missing)

The jobs train the tiny Llama of conftest.py on CPU (LAUNCH=cpu, one process per node). The uninterrupted job is the
reference of the preempted one: same recipe, seed and steps, so the losses after the resume and the final adapter
must come out identical (CPU kernels are deterministic and the checkpoint carries the RNG and data position).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_scalars, read_summary, tiny_overrides

SBATCH = REPO / "slurm" / "qlora.sbatch"
LAUNCH_NODE = REPO / "slurm" / "launch_node.py"
STEPS = 16  # enough optimizer steps (~0.5 s each here) to signal the job in the middle of training


def clean_env(**extra) -> dict:
    """This environment without Slurm's job variables (pytest may itself run inside a job), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "LORAFIT_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    env.update(extra)
    return env


def without_output_dir(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if a.startswith("output.dir="):
            out.pop()  # its --set
            continue
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fast: no cluster


def test_help_lists_every_variable():
    r = subprocess.run(["bash", str(SBATCH), "--help"], env=clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for var in ("LAUNCH", "GPUS", "PORT", "PYTHON", "LORAFIT_DIR", "RUNS_DIR", "MAX_REQUEUES"):
        assert re.search(rf"^  {var} ", r.stdout, re.M), (var, r.stdout)


@pytest.mark.parametrize(
    ("var", "value"),
    [("LAUNCH", "zero4"), ("GPUS", "two"), ("GPUS", "0"), ("PORT", "http"), ("PORT", "80"), ("MAX_REQUEUES", "many")],
)
def test_a_bad_variable_fails_with_one_line(var, value):
    r = subprocess.run(["bash", str(SBATCH)], env=clean_env(**{var: value}), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"qlora.sbatch: error: {var}={value} "), r.stderr


def node_command(node: int, nnodes: int, launch: str, *train_args: str) -> str:
    env = clean_env(
        SLURM_NNODES=str(nnodes),
        SLURM_NODEID=str(node),
        LORAFIT_MAIN_HOST="gpu-a01",
        LORAFIT_PORT="29400",
        LORAFIT_LAUNCH=launch,
        LORAFIT_PROCS_PER_NODE="8",
    )
    r = subprocess.run(
        [sys.executable, str(LAUNCH_NODE), "--print-command", *train_args], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_each_node_gets_its_machine_rank_and_the_same_rendezvous():
    args = ["--recipe", "llama2_guanaco", "--set", "data.system_prompt=be brief; don't guess"]
    cmds = [node_command(n, 2, "zero3", *args) for n in (0, 1)]
    for n, cmd in enumerate(cmds):
        assert f"--machine_rank {n} " in cmd
        # 2 nodes x 8 processes; the rendezvous is the first host's, c10d; torchrun on every node for DeepSpeed
        for part in (
            "--num_machines 2 ",
            "--num_processes 16 ",
            "--main_process_ip gpu-a01 ",
            "--main_process_port 29400 ",
            "--rdzv_backend c10d ",
            "--deepspeed_multinode_launcher standard ",
            f"--config_file {REPO}/launch/zero3.yaml ",
            "--max_restarts 0 ",
        ):
            assert part in cmd, (part, cmd)
        assert shlex.split(cmd)[-len(args) - 1 :] == [f"{REPO}/src/train.py", *args]  # the arguments, untouched
    assert cmds[0].replace("--machine_rank 0", "--machine_rank 1") == cmds[1]
    one = node_command(0, 1, "ddp")
    assert "--rdzv_backend" not in one and "--num_processes 8 " in one and "launch/ddp.yaml" in one


def test_fsdp2_nodes_get_the_fsdp2_config_and_one_rendezvous():
    cmds = [node_command(n, 2, "fsdp2", "--recipe", "llama2_guanaco") for n in (0, 1)]
    for n, cmd in enumerate(cmds):
        for part in (f"--machine_rank {n} ", "--num_machines 2 ", "--num_processes 16 ", "--rdzv_backend c10d ",
                     f"--config_file {REPO}/launch/fsdp2.yaml "):
            assert part in cmd, (part, cmd)
    assert cmds[0].replace("--machine_rank 0", "--machine_rank 1") == cmds[1]


# ----------------------------------------------------------------------------------------------------------------
# Against a real Slurm


@pytest.fixture(scope="module")
def cluster():
    from slurm_cluster import ClusterUnavailable, SlurmCluster

    c = SlurmCluster()
    try:
        c.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no private Slurm on this machine: {e}")
    yield c
    c.stop()


class Job:
    def __init__(self, cluster, job_id: str, log: Path):
        self.cluster, self.id, self.log = cluster, job_id, log

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float = 240) -> dict:
        """Wait until the job has ended for good (not pending a requeue); return `scontrol show job`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.cluster.job(self.id)
            if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                return info
            time.sleep(1)
        raise AssertionError(
            f"job {self.id} still {self.cluster.job(self.id).get('JobState')} after {timeout}s:\n" + self.text()[-4000:]
        )

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.text())) >= count:
                return
            if self.cluster.job(self.id).get("JobState") not in {"PENDING", "RUNNING", "CONFIGURING"}:
                break
            time.sleep(0.2)
        raise AssertionError(f"job {self.id}: {count} x {pattern!r} not in its log:\n{self.text()[-4000:]}")


def submit(cluster, tmp: Path, args: list[str], **variables) -> Job:
    variables = {"LAUNCH": "cpu", "PYTHON": sys.executable, "RUNS_DIR": str(tmp / "runs"), **variables}
    env = cluster.env(clean_env(**variables))
    r = cluster.run(
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=10",
        f"--output={tmp}/job-%j.log",
        str(SBATCH),
        *args,
        env=env,
        cwd=REPO,
        check=True,
    )
    job_id = r.stdout.strip().split(";")[0]
    return Job(cluster, job_id, tmp / f"job-{job_id}.log")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, tiny_llama_dir, guanaco_dir):
    """The uninterrupted job (submitted once, waited for by whoever needs it first)."""
    tmp = tmp_path_factory.mktemp("slurm-reference")
    args = without_output_dir(tiny_overrides(tiny_llama_dir, guanaco_dir, tmp / "unused", steps=STEPS))
    return submit(cluster, tmp, ["--recipe", "llama2_guanaco", *args]), tmp


def losses(run: Path) -> dict[int, float]:
    scalars = read_scalars(run / "tb")["train/loss"]
    steps = [s for s, _ in scalars]
    assert len(steps) == len(set(steps)), f"duplicate steps in TensorBoard: {steps}"
    return dict(scalars)


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter_model.safetensors")


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(
    cluster, reference, tmp_path, tiny_llama_dir, guanaco_dir
):
    ref_job, ref_tmp = reference  # runs alongside this one (the cluster has a CPU for each)
    args = without_output_dir(tiny_overrides(tiny_llama_dir, guanaco_dir, tmp_path / "unused", steps=STEPS))
    job = submit(cluster, tmp_path, ["--recipe", "llama2_guanaco", *args])
    job.wait_for_log(r"lorafit: step \d+/\d+, loss", count=3)  # training, with lorafit's signal handlers in place
    cluster.run("scancel", "--signal=USR1", "--batch", job.id, check=True)  # what --signal=B:USR1@300 does
    info = job.wait()
    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, log)
    # the batch script's trap passed USR1 on through srun, the launcher lived through it, the training got it once
    assert "qlora.sbatch: USR1: asking the training processes" in log and "launcher got SIGUSR1" in log
    assert log.count("lorafit: SIGUSR1 received") == 1 and "lorafit: second SIGUSR1" not in log
    assert "qlora.sbatch: stopped after saving a checkpoint: requeueing job" in log
    assert "attempt 2 " in log and "attempt 3 " not in log
    m = re.search(r"resuming from \S*/checkpoints/checkpoint-(\d+)", log)
    assert m and 0 < int(m.group(1)) < STEPS, log[-4000:]
    run = tmp_path / "runs" / f"llama2_guanaco-{job.id}"  # the same folder for both attempts: named by job id

    ref_info = ref_job.wait()
    assert ref_info["ExitCode"] == "0:0", ref_job.text()[-4000:]
    ref_run = ref_tmp / "runs" / f"llama2_guanaco-{ref_job.id}"
    got, want = losses(run), losses(ref_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # every step, before and after the resume
    a, b = adapter(run), adapter(ref_run)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), k
    assert read_summary(run)["steps"] == STEPS


@pytest.mark.slurm
def test_sbatch_runs_a_tiny_cpu_recipe_to_completion(cluster, reference):
    job, tmp = reference
    info = job.wait()
    log = job.text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, log)
    assert "1 node(s) x 1 process(es), LAUNCH=cpu" in log and "qlora.sbatch: finished" in log
    assert re.search(r"lorafit-slurm: node 0 of 1 on .*accelerate launch .*--num_machines 1 --machine_rank 0 ", log)
    run = tmp / "runs" / f"llama2_guanaco-{job.id}"  # no output.dir given: named after recipe and job
    assert (run / "adapter_model.safetensors").stat().st_size > 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    assert read_summary(run)["steps"] == STEPS


@pytest.mark.slurm
def test_a_real_failure_ends_the_job_without_requeue(cluster, tmp_path, tiny_llama_dir, guanaco_dir):
    args = tiny_overrides(tiny_llama_dir, guanaco_dir, tmp_path / "bad-run", steps=2)
    bad_key = submit(cluster, tmp_path, ["--recipe", "llama2_guanaco", *args, "--set", "training.learning_rat=1e-4"])
    bad_var = submit(cluster, tmp_path, ["--recipe", "llama2_guanaco", *args], LAUNCH="zero4")
    info = bad_key.wait()
    log = bad_key.text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, log)
    assert "lorafit: error: " in log and "training.learning_rat" in log
    assert "qlora.sbatch: training failed (exit code 2); not requeueing" in log
    assert "requeueing job" not in log and not (tmp_path / "bad-run").exists()
    info = bad_var.wait()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert bad_var.text() == "qlora.sbatch: error: LAUNCH=zero4 is not one of ddp, zero2, zero3, fsdp2, cpu\n"  # no srun


def wait_for_listener(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"node 0 never listened on port {port} (exit code {proc.poll()})")


@pytest.mark.slurm
def test_two_nodes_rendezvous_and_train_with_world_size_2(tmp_path, tiny_llama_dir, guanaco_dir):
    """The launcher qlora.sbatch starts on each node, run twice on this machine: node 0 and node 1 of a 2-node
    allocation whose first host is 127.0.0.1, one CPU process each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = tiny_overrides(tiny_llama_dir, guanaco_dir, run, steps=3)
    procs = []
    for node in (0, 1):
        if node == 1:
            # On one machine both launchers would host the rendezvous store (127.0.0.1 is "this host" for both);
            # on a cluster only the first host does. Start node 1 once node 0 listens, as it would find it there.
            wait_for_listener(port, procs[0])
        env = clean_env(
            SLURM_NNODES="2",
            SLURM_NODEID=str(node),
            LORAFIT_MAIN_HOST="127.0.0.1",
            LORAFIT_PORT=str(port),
            LORAFIT_LAUNCH="cpu",
            LORAFIT_PROCS_PER_NODE="1",
            OMP_NUM_THREADS="1",
        )
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(LAUNCH_NODE), "--recipe", "llama2_guanaco", *args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    for n in (0, 1):
        assert re.search(
            rf"--num_machines 2 --machine_rank {n} --num_processes 2 --main_process_ip 127.0.0.1 "
            rf"--main_process_port {port} .*--rdzv_backend c10d ",
            logs[n],
        ), logs[n][-3000:]
    summary = read_summary(run)
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["effective_batch"] == 4  # per-device batch 2 x 2 processes
    assert "world size 2" in logs[0]
    assert sorted(losses(run)) == [1, 2, 3]
