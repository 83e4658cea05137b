"""Real multi-process Ray clusters: `ray start` heads, `ray job submit`, two nodes, a lost node, a
SIGKILLed worker, a killed driver.

The module starts its own cluster (`ray_cluster.Cluster`): a head on 127.0.0.2 and a second
raylet on 127.0.0.3, two real nodes on one machine, stopped at the end of the module.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from holding_proxy import HoldingProxy
from ray_cluster import (
    HEAD_IP,
    Cluster,
    assert_registered_checkpoints_verify,
    load_run_checkpoint,
    metrics_records,
    node_ip,
    registered_checkpoints,
    worker_records,
)

from orchestration import common
from orchestration import train as otrain
from orchestration.storage import RunStorage
from vfnet.core.config import Config, save_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
NODE_IP = node_ip(0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _config_file(cfg: Config, directory: Path) -> Path:
    path = directory / "config.toml"
    save_config(cfg, path)
    return path


# ---------------------------------------------------------------------------------------------
# Faults: a worker killed mid-upload, a lost node, a killed driver; registered checkpoints always verify


def _faulty_run_config(tiny_config, tmp_path: Path) -> Path:
    """96 shapes images, 16 iterations, a checkpoint every 4, all of them kept."""
    from vfnet.data.synth import synthesize

    data_dir = tmp_path / "shapes"
    synthesize(data_dir, images=96, size=64, seed=1)
    return _config_file(tiny_config(data_dir, **{"train.max_iters": 16, "train.checkpoint_interval": 4,
                                                  "train.keep_checkpoints": 20}), tmp_path)


def _train_args(config: Path, storage: Path | str, name: str | None, *flags: str) -> list[str]:
    """The arguments of `python` for `-m orchestration.train` (no --name: named after the config)."""
    named = ["--name", name] if name else []
    return ["-m", "orchestration.train", "--config", str(config), "--storage", str(storage), *named, *flags]


def _driver(cluster: Cluster, config: Path, storage: Path | str, name: str | None, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *_train_args(config, storage, name, "--address", cluster.address, *flags)],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_until(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the driver exited early: {proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return output


# the request line of a checkpoint file's upload (HoldingProxy's pattern)
_CHECKPOINT_PUT = rb"PUT /[^ ]*/checkpoint_[^/ ]*/" + re.escape(common.CHECKPOINT_NAME.encode()) + rb"[ ?]"


def _s3_port() -> int:
    """The port of the S3 test server (the one `s3_storage` names)."""
    return int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])


def test_worker_killed_mid_checkpoint_upload(cluster: Cluster, tiny_config, tmp_path: Path,
                                             s3_storage: str, capsys) -> None:
    """SIGKILL the worker while it uploads its second checkpoint: no partial checkpoint is
    registered, and the run resumes from the first one and ends.

    The run storage is on the S3 server (no shared disk: checkpoints, worker records, result and
    the work dir), reached through `HoldingProxy`, which freezes the upload of the second
    checkpoint file with half of its first request sent: the worker is then blocked inside
    `ray.train.report`, mid-write, when it is killed."""
    config = _faulty_run_config(tiny_config, tmp_path)
    run_dir = RunStorage.parse(s3_storage).child("ft")  # the test reads the server directly
    proxy = HoldingProxy(_s3_port(), _CHECKPOINT_PUT, skip=1)
    proc = _driver(cluster, config, proxy.uri(s3_storage.removeprefix("s3://")), "ft",
                   "--num-workers", "1", "--cpus-per-worker", "1")
    try:
        _wait_until(proc, lambda: proxy.held.is_set() and bool(registered_checkpoints(run_dir)))
        held_dir = proxy.held_path.decode().split("/")[-2]  # the checkpoint being uploaded
        registered_before = [e["checkpoint_dir_name"] for e in registered_checkpoints(run_dir)]
        victim = worker_records(run_dir)[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        proxy.release()
        output = _finish(proc)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    assert held_dir not in registered_before and len(registered_before) == 1
    registered = [e["checkpoint_dir_name"] for e in registered_checkpoints(run_dir)]
    assert held_dir not in registered, "the checkpoint killed mid-upload was registered"
    assert not run_dir.exists(run_dir.path(held_dir, common.CHECKPOINT_NAME))  # never completed
    result = run_dir.read_json(run_dir.path(otrain.RESULT_NAME))
    assert result["restarts"] >= 1 and result["iterations"] == 16
    assert result["checkpoint"].startswith(f"{s3_storage}/ft/checkpoint_")
    records = worker_records(run_dir)
    assert victim in {r["pid"] for r in records}
    resumed = [r for r in records if r["resumed_from"] is not None]
    assert resumed and all(r["pid"] != victim for r in resumed)
    # resumed from the first checkpoint (iteration 4), the newest registered: one interval redone
    assert resumed[0]["resumed_from"].endswith(f"/ft/{registered_before[0]}")
    assert load_run_checkpoint(run_dir, resumed[0]["resumed_from"])["iteration"] == 4
    assert_registered_checkpoints_verify(run_dir)
    # the work dir came back from S3: every iteration's record once, the redone ones replaced
    assert [r["iter"] for r in metrics_records(run_dir) if r["mode"] == "train"] == list(range(1, 17))
    with capsys.disabled():
        print("\nworker killed mid-upload of the checkpoint of iteration 8: resumed from 4, "
              "4 iterations redone")


def _job_submit(cluster: Cluster, config: Path, storage: str, name: str, *flags: str) -> subprocess.Popen:
    """`ray job submit --working-dir .` of `python -m orchestration.train` (the repository uploaded
    as the job's working directory, its driver on the head node); the command streams the job's
    log and exits with its status."""
    return subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", f"--address={cluster.dashboard}",
         "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": ["/.git/"]}), "--",
         "python", *_train_args(config, storage, name, *flags)],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_submitted_job_on_two_nodes_completes_after_a_lost_node(cluster: Cluster, tiny_config, tmp_path: Path,
                                                                s3_storage: str, capsys) -> None:
    """`ray job submit --working-dir .` of a 2-worker run, one worker per node; the second node's
    raylet and workers are SIGKILLed after a checkpoint was registered. The run restarts on the
    head node from the latest registered checkpoint, completes, the job succeeds, and result.json
    counts the restart.

    The run is held before it can end: the run storage is on the S3 server behind `HoldingProxy`,
    which freezes the upload of the second checkpoint (iteration 8 of 16), so the node is always
    lost while the run still needs it, however late Ray registers the first checkpoint on a
    loaded machine. The frozen upload is let go once the new worker group has started."""
    config = _faulty_run_config(tiny_config, tmp_path)
    run_dir = RunStorage.parse(s3_storage).child("lost-node")  # the test reads the server directly
    proxy = HoldingProxy(_s3_port(), _CHECKPOINT_PUT, skip=1)
    proc = _job_submit(cluster, config, proxy.uri(s3_storage.removeprefix("s3://")), "lost-node",
                       "--num-workers", "2", "--cpus-per-worker", "0.5", "--placement-strategy", "SPREAD")
    try:
        _wait_until(proc, lambda: proxy.held.is_set() and len(worker_records(run_dir)) == 2
                    and bool(registered_checkpoints(run_dir)))
        spread = worker_records(run_dir)
        registered_before = assert_registered_checkpoints_verify(run_dir)
        cluster.kill_node()
        _wait_until(proc, lambda: any(r["resumed_from"] for r in worker_records(run_dir)))
        proxy.release()
        output = _finish(proc)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
        cluster.add_node()  # for the tests after this one
    assert proc.returncode == 0, output[-6000:]
    assert sorted(r["rank"] for r in spread) == [0, 1] and len({r["node_id"] for r in spread}) == 2
    assert {r["node_ip"] for r in spread} == {HEAD_IP, NODE_IP}, "workers not spread"
    assert registered_before == [4]
    result = run_dir.read_json(run_dir.path(otrain.RESULT_NAME))
    assert result["restarts"] >= 1 and result["iterations"] == 16 and result["num_workers"] == 2
    resumed = [r for r in worker_records(run_dir) if r["resumed_from"] is not None]
    assert resumed and all(r["node_ip"] == HEAD_IP for r in resumed)
    assert load_run_checkpoint(run_dir, resumed[0]["resumed_from"])["iteration"] == 4
    assert 16 in assert_registered_checkpoints_verify(run_dir)
    with capsys.disabled():
        print("\nlost node: killed during the upload of the checkpoint of iteration 8, resumed from 4 "
              "on the head node")


def test_killed_driver_same_command_resumes_the_run(cluster: Cluster, tiny_config, tmp_path: Path,
                                                     s3_storage: str, capsys) -> None:
    """SIGKILL the driver (its Ray Train controller and workers go with it) after a checkpoint
    was registered; the same command (no --name: the run is named after the config file) run
    again resumes that run from it, not a new run.

    As in the lost-node test, the upload of the second checkpoint is frozen (`HoldingProxy`), so
    the driver is always killed before the run could end and with exactly one checkpoint
    registered; the proxy lets everything through again before the second command."""
    config = _faulty_run_config(tiny_config, tmp_path)
    run_dir = RunStorage.parse(s3_storage).child(config.stem)
    proxy = HoldingProxy(_s3_port(), _CHECKPOINT_PUT, skip=1)
    storage = proxy.uri(s3_storage.removeprefix("s3://"))
    flags = ("--num-workers", "1", "--cpus-per-worker", "1")
    proc = _driver(cluster, config, storage, None, *flags)
    try:
        _wait_until(proc, lambda: proxy.held.is_set() and bool(worker_records(run_dir))
                    and bool(registered_checkpoints(run_dir)))
        proc.kill()
        proc.wait(timeout=30)
        proxy.release()
        first = {r["pid"] for r in worker_records(run_dir)}
        again = _driver(cluster, config, storage, None, *flags)
        output = _finish(again)
    finally:
        proxy.close()
        if proc.poll() is None:
            proc.kill()
    assert again.returncode == 0, output[-6000:]
    result = run_dir.read_json(run_dir.path(otrain.RESULT_NAME))
    assert result["iterations"] == 16 and result["restarts"] == 0  # a re-run, not a restart
    resumed = [r for r in worker_records(run_dir) if r["pid"] not in first]
    assert resumed and resumed[0]["resumed_from"] is not None
    assert load_run_checkpoint(run_dir, resumed[0]["resumed_from"])["iteration"] == 4
    assert 16 in assert_registered_checkpoints_verify(run_dir)
    with capsys.disabled():
        print("\nkilled driver: killed during the upload of the checkpoint of iteration 8, the same command "
              "resumed from 4")
