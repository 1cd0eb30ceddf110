"""The SLURM scripts (slurm/) on a real SLURM: a controller and two emulated hosts on this
machine (tests/slurm_cluster.py), the tiny model on CPU (configs/ci/slurm_cpu.yaml).

- ``slurm/chain.sh`` runs the three try-on stages in order, each on two nodes (one rank per
  node, DDP over gloo), each stage starting from the previous stage's weights.
- SIGUSR1 to a running stage (what ``--signal=USR1@180`` sends before the time limit) makes
  ``leffa.requeue.SlurmRequeue`` save ``hpc_ckpt_1.ckpt`` at a step boundary and requeue the job;
  the requeued job resumes from it and finishes at ``max_steps``.

Needs root, the SLURM and munge packages (``make slurm-deps``) and network namespaces; skips
otherwise. Takes a few minutes: deselect with ``-k "not slurm"``.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from slurm_cluster import (
    FINISHED,
    ClusterUnavailable,
    SlurmCluster,
    missing_requirements,
)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
# The stage scripts ask for 4 nodes x 8 GPUs: this cluster has 2 nodes of 1 CPU and no GRES.
OVERRIDES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
NODES = ["lnode1", "lnode2"]
STAGES = {1: "vton_512", 2: "vton_1024", 3: "vton_1024_leffa"}
CI_STEPS = 6  # trainer.max_steps of configs/ci/slurm_cpu.yaml
# A frozen tensor (the VAE is never trained) that the chain test marks in stage 1's checkpoint
MARK_KEY = "vae.decoder.conv_out.bias"
REQUEUE_STEPS = 60


def _leffa_bin() -> str | None:
    return shutil.which("leffa", path=str(Path(sys.executable).parent)) or shutil.which("leffa")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    if _leffa_bin() is None:
        pytest.skip("the leffa command is not installed next to this Python (make install)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=tuple(NODES), cpus=1)
    try:
        cluster.start()
    except ClusterUnavailable as error:
        cluster.stop()
        pytest.skip(str(error))
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic shards: 4 train and 4 test shards (every rank needs a shard of each split)."""
    root = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "data_prep", "synthetic", "--out", str(root / "synthetic"),
                    "--count", "8", "--height", "64", "--width", "48", "--shard-size", "2", "--split", "all"],
                   cwd=REPO, check=True, capture_output=True)
    return root


def _job_env(cluster: SlurmCluster, shards: Path, runs: Path, extra_config: str) -> dict:
    # The test cluster binds no task to its CPU (TaskPlugin=task/none), so each rank would start
    # one compute thread per core of the machine: two ranks on two cores then run ~30x slower.
    # One thread per rank, as --cpus-per-task=1 means.
    return cluster.job_env(
        LEFFA_TASK="vton", LEFFA_HOME=str(REPO), LEFFA_EXTRA_CONFIG=extra_config,
        LEFFA_SHARDS=str(shards), LEFFA_RUNS=str(runs), LEFFA_BIN=_leffa_bin(), PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )


def _time(value: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(value)


def _hostnames(cluster: SlurmCluster, nodelist: str) -> list[str]:
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


def _wait_all(cluster: SlurmCluster, jobs: dict[int, str], logs: Path, timeout: float) -> dict[int, dict]:
    """Poll the jobs until all are COMPLETED; fail as soon as one fails or can never start."""
    deadline = time.monotonic() + timeout
    while True:
        records = {stage: cluster.show_job(job) for stage, job in jobs.items()}
        bad = {stage: r for stage, r in records.items()
               if r["JobState"] in FINISHED - {"COMPLETED"} or r.get("Reason") == "DependencyNeverSatisfied"}
        if bad or time.monotonic() > deadline:
            outputs = "\n".join(f"--- stage {s} output\n{_tail(next(logs.glob(f'*-{j}.out'), logs / f'{j}.out'))}"
                                 for s, j in jobs.items())
            states = {s: (r["JobState"], r.get("Reason")) for s, r in records.items()}
            pytest.fail(f"jobs {states} after {timeout - (deadline - time.monotonic()):.0f} s\n{outputs}\n"
                        + cluster.diagnostics())
        if all(r["JobState"] == "COMPLETED" for r in records.values()):
            return records
        time.sleep(1)


def _output(logs: Path, job: str) -> Path:
    found = list(logs.glob(f"*-{job}.out"))
    assert len(found) == 1, f"no output file of job {job} in {logs}: {os.listdir(logs)}"
    return found[0]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _saved_config(runs: Path, stage: int) -> dict:
    configs = sorted((runs / STAGES[stage] / "tb").glob("version_*/config.yaml"))
    assert configs, f"stage {stage} saved no config.yaml under {runs / STAGES[stage] / 'tb'}"
    return yaml.safe_load(configs[-1].read_text())


def test_chain_runs_three_stages_on_two_nodes(cluster, shards, tmp_path):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    env = _job_env(cluster, shards, runs, "configs/ci/slurm_cpu.yaml")
    submitted = cluster.run(str(REPO / "slurm" / "chain.sh"), *OVERRIDES, f"--output={logs}/%x-%j.out",
                            env=env, cwd=tmp_path).stdout
    jobs = {int(stage): job for stage, job in re.findall(r"stage (\d): job (\d+)", submitted)}
    assert sorted(jobs) == [1, 2, 3], submitted
    # Stage 2 waits here until the test has marked stage 1's checkpoint (below); stage 1 needs
    # far longer than this to finish, and stage 3 is left to its dependency alone.
    cluster.run("scontrol", "hold", jobs[2])
    assert cluster.show_job(jobs[2])["Dependency"].startswith(f"afterok:{jobs[1]}")
    assert cluster.show_job(jobs[3])["Dependency"].startswith(f"afterok:{jobs[2]}")

    _wait_all(cluster, {1: jobs[1]}, logs, timeout=300)
    ckpt1 = runs / STAGES[1] / "checkpoints" / "last.ckpt"
    assert ckpt1.is_file(), _tail(_output(logs, jobs[1]))
    # Mark a frozen tensor of the weights stage 2 is to start from: if stage 2 loads this file,
    # its checkpoints hold the marked values exactly (nothing trains the VAE).
    checkpoint = _load(ckpt1)
    assert checkpoint["global_step"] == CI_STEPS
    marked = checkpoint["state_dict"][MARK_KEY] + 0.5
    checkpoint["state_dict"][MARK_KEY] = marked
    torch.save(checkpoint, ckpt1)
    ckpt1_mtime = ckpt1.stat().st_mtime
    cluster.run("scontrol", "release", jobs[2])

    records = _wait_all(cluster, jobs, logs, timeout=600)

    for stage, record in records.items():
        output = _output(logs, jobs[stage]).read_text(errors="replace")
        assert record["ExitCode"] == "0:0", (stage, record)
        assert record["NumNodes"] == "2", (stage, record)
        assert _hostnames(cluster, record["NodeList"]) == NODES, (stage, record["NodeList"])
        # one rank per node: rank 1's task ran on lnode2 (its slurmd launched the step)
        for rank in (0, 1):
            assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output, (stage, output[-3000:])
        for node in NODES:
            slurmd_log = (cluster.workdir / "log" / f"slurmd-{node}.log").read_text()
            assert f"launch task StepId={jobs[stage]}.0 " in slurmd_log, (stage, node)
        last = runs / STAGES[stage] / "checkpoints" / "last.ckpt"
        assert last.is_file(), (stage, output[-3000:])
        assert _load(last)["global_step"] == CI_STEPS, stage

    # in order: each stage started after the previous one had ended
    for stage in (2, 3):
        assert _time(records[stage]["StartTime"]) >= _time(records[stage - 1]["EndTime"]), records
    # stage 1's checkpoint was final before stage 2 started (second resolution of StartTime)
    assert ckpt1_mtime < _time(records[2]["StartTime"]).timestamp() + 1
    assert ckpt1.stat().st_mtime == ckpt1_mtime

    # each later stage was configured to start from the previous stage's last.ckpt ...
    for stage in (2, 3):
        previous = str(runs / STAGES[stage - 1] / "checkpoints" / "last.ckpt")
        assert _saved_config(runs, stage)["model"]["init_from"] == previous
        last = _load(runs / STAGES[stage] / "checkpoints" / "last.ckpt")
        assert last["hyper_parameters"]["init_from"] == previous
        # ... and did: the marked tensor went from stage 1's file to stage 2 and on to stage 3
        # (live and EMA weights alike)
        assert torch.equal(last["current_model_state"][MARK_KEY], marked), stage
        assert torch.equal(last["state_dict"][MARK_KEY], marked), stage
    assert _saved_config(runs, 3)["model"]["use_leffa_loss"] is True


def _progress(output: Path) -> int:
    """The last training batch count the progress bar of rank 0 printed (0 before any)."""
    counts = re.findall(r"\|\s*(\d+)/(?:\d+|\?) \[", output.read_text(errors="replace")) if output.exists() else []
    return int(counts[-1]) if counts else 0


def _logged_steps(version_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version_dir), size_guidance={"scalars": 0})
    events.Reload()
    return sorted({s.step for s in events.Scalars("train/loss")})


def test_sigusr1_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    # stage 1 with more steps, no validation (the signal comes in mid-training) and a DataLoader
    # worker process per rank (SLURM signals every process of the step, workers included)
    extra = tmp_path / "requeue.yaml"
    extra.write_text(f"base: {REPO / 'configs' / 'ci' / 'slurm_cpu.yaml'}\n"
                     f"trainer:\n  max_steps: {REQUEUE_STEPS}\n  limit_val_batches: 0\n"
                     "data:\n  num_workers: 1\n")
    env = _job_env(cluster, shards, runs, str(extra))
    job = cluster.run("sbatch", "--parsable", *OVERRIDES, f"--output={logs}/%x-%j.out",
                      str(REPO / "slurm" / "stage1_512.sh"), env=env, cwd=tmp_path).stdout.strip().split(";")[0]
    output = logs / f"leffa-stage1-{job}.out"
    root = runs / STAGES[1]
    hpc = root / "hpc_ckpt_1.ckpt"

    cluster.wait_for(job, {"COMPLETED"}, timeout=240, until=lambda r: _progress(output) >= 3)
    signalled_at = _progress(output)
    assert signalled_at < REQUEUE_STEPS - 5, "training ran too fast to be interrupted"
    # SIGUSR1 to the processes of the job's steps (the training processes on both nodes and
    # their DataLoader workers), not to the batch shell: what --signal=USR1@180 does
    cluster.run("scancel", "--signal=USR1", job)

    deadline = time.monotonic() + 60
    while not hpc.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert hpc.is_file(), (f"no {hpc.name} in {root} 60 s after SIGUSR1 (did the ranks deadlock "
                           f"in the checkpoint's collectives?)\n{_tail(output)}")
    requeued = cluster.wait_for(job, {"COMPLETED"}, timeout=60, until=lambda r: int(r.get("Restarts", 0)) >= 1)
    assert requeued["JobId"] == job and int(requeued["Restarts"]) == 1, requeued

    record = cluster.wait_for(job, {"COMPLETED"}, timeout=300)
    text = output.read_text(errors="replace")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (record, text[-3000:])
    assert int(record["Restarts"]) == 1, record
    assert _hostnames(cluster, record["NodeList"]) == NODES

    saved_step = _load(hpc)["global_step"]
    assert signalled_at <= saved_step < REQUEUE_STEPS, (signalled_at, saved_step)
    assert f"Restoring states from the checkpoint path at {hpc}" in text, text[-3000:]
    assert not (root / "hpc_ckpt_2.ckpt").exists()
    assert _load(root / "checkpoints" / "last.ckpt")["global_step"] == REQUEUE_STEPS
    # the first run logged to version_0, the requeued one to version_1: it trained the steps
    # after the checkpoint's, and only those
    versions = sorted((root / "tb").glob("version_*"))
    assert [v.name for v in versions] == ["version_0", "version_1"], versions
    resumed = _logged_steps(versions[1])
    assert resumed == list(range(saved_step, REQUEUE_STEPS)), (saved_step, resumed)
    assert _logged_steps(versions[0])[0] == 0
