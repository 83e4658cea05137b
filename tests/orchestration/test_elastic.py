"""Elastic Ray Train on a real loopback cluster: `--num-workers 2-3` on three raylets.

Every raylet (the head included) offers 3 GiB of Ray `memory` and every worker reserves 2 GiB
(`--memory-per-worker 2`), so a node holds exactly one worker: the cluster's size is the run's
size. The run starts on 3 workers; a raylet is SIGKILLed and the run goes on at 2; a raylet is
started again and the run grows back to 3 and completes. The seconds from the node's loss (and
from the new node's arrival) to the next trained iteration, and the iterations redone, are
printed: docs/ray.md, Elastic training, quotes them.

The run is held still (its workers SIGSTOPped) twice, so that how far it gets while the test
reacts depends less on the machine's speed: the 3 workers once they have a checkpoint
registered, just before the node is killed (so they cannot train on while the node dies and Ray
notices: the 2 workers resume from the checkpoint registered then), and the 2 workers once they
have a checkpoint registered, until the run has grown back (otherwise a fast machine, or a slow
test process, could let the run finish before Ray notices the new node). Ray ends the stopped
workers itself when it replaces the group, after asking them to tear down their torch process
group: stopped, they never answer, so the cluster's Ray waits `SHUTDOWN_TIMEOUT` seconds for
that instead of its default 30 s (`TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S`; healthy workers
answer at once). A doubly loaded machine once let the unheld 3 workers train on during the
kill, and the 2 workers finish the run before the test held them.
A worker-group start waits `START_TIMEOUT` seconds for its resources (the driver's elastic
default: 30 s): the first restart after the loss asks for 3 workers on Ray's stale view of the
cluster and waits that long before it decides again; with the test clusters' 1 s GCS probes
(`ray_cluster.Cluster`) the shrink is decided after ~15 s instead of ~37 s (docs/ray.md).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ray_cluster import Cluster, assert_registered_checkpoints_verify, registered_checkpoints, worker_records

from orchestration import train as otrain
from vfnet.core.checkpoint import load_checkpoint
from vfnet.core.config import save_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
MAX_ITERS = 24  # global batch 6 (2 x 3 workers) on 96 images: 16 iterations an epoch
INTERVAL = 4  # checkpoint interval, iterations
SHUTDOWN_TIMEOUT = 3  # seconds Ray waits for the held workers' process-group teardown
START_TIMEOUT = 10  # seconds a worker-group start waits for its resources (the driver's default: 30)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A head and two raylets, each with room for one training worker."""
    cluster = Cluster(nodes=2, node_args=[f"--memory={3 * GIB}"],
                      env={"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT),
                           otrain.START_TIMEOUT_ENV: str(START_TIMEOUT)})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _rank0_groups(run_dir: Path) -> list[dict]:
    """The rank-0 worker records (one per worker-group start), oldest first."""
    return sorted((r for r in worker_records(run_dir) if r["rank"] == 0), key=lambda r: r["started"])


def _train_iters(run_dir: Path) -> list[int]:
    """The iterations of the train records in the run's metrics.jsonl, in file order."""
    try:
        lines = (run_dir / otrain.WORKDIR_NAME / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    records = [json.loads(line) for line in lines if line.strip().endswith("}")]
    return [r["iter"] for r in records if r.get("mode") == "train"]


class _Driver:
    """`python -m orchestration.train` in a subprocess; its output lines are read as they come,
    each with the time.monotonic() it arrived (Ray forwards its controller's log lines to the
    driver within about a second)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestration.train", *argv], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def output(self) -> str:
        return "".join(line for _, line in list(self.lines))

    def first(self, text: str) -> float:
        """When the first line containing `text` arrived (inf: none yet)."""
        return next((t for t, line in list(self.lines) if text in line), math.inf)

    def finish(self, timeout: float) -> str:
        """Wait up to `timeout` seconds for the driver to exit, then kill it; its whole output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=30)
        return self.output()


def _wait(driver: _Driver, what: str, ready: Callable[[], object], timeout: float = 400) -> float:
    """Poll `ready()` until true (the driver must stay alive); the time.monotonic() it was seen."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert driver.proc.poll() is None, f"the driver exited while waiting for {what}: {driver.output()[-6000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return time.monotonic()


def _trained_from(run_dir: Path, group: dict) -> bool:
    """The group has trained an iteration: metrics.jsonl, written since the group started (its
    rank 0 drops the records past the iteration it resumed at, then appends), logs one past it."""
    try:
        written = (run_dir / otrain.WORKDIR_NAME / "metrics.jsonl").stat().st_mtime
    except OSError:
        return False
    return written > group["started"] and max(_train_iters(run_dir), default=0) > group["iteration"]


def _group_pids(run_dir: Path, world_size: int) -> list[int]:
    """The pids of the workers of the run's groups of `world_size` (from their worker records)."""
    return [r["pid"] for r in worker_records(run_dir) if r["world_size"] == world_size]


def _stop(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_elastic_run_shrinks_on_a_lost_node_and_grows_back(cluster: Cluster, tiny_config, tmp_path: Path,
                                                           capsys) -> None:
    from vfnet.data.synth import synthesize

    data_dir = tmp_path / "shapes"
    synthesize(data_dir, images=96, size=64, seed=1)
    config = tmp_path / "config.toml"
    save_config(tiny_config(data_dir, **{"train.max_iters": MAX_ITERS, "train.checkpoint_interval": INTERVAL,
                                         "train.keep_checkpoints": 20, "train.max_failures": 4}), config)
    storage, name = tmp_path / "runs", "elastic"
    run_dir = storage / name
    driver = _Driver(["--config", str(config), "--storage", str(storage), "--name", name,
                      "--address", cluster.address, "--num-workers", "2-3", "--cpus-per-worker", "0.5",
                      "--memory-per-worker", "2", "--resize-interval", "5"], cluster.env)
    stopped: list[int] = []
    try:
        # 3 workers, one per node; a checkpoint registered before the loss
        _wait(driver, "3 workers training", lambda: [g["world_size"] for g in _rank0_groups(run_dir)] == [3]
              and INTERVAL in _train_iters(run_dir) and bool(registered_checkpoints(run_dir)))
        stopped = _group_pids(run_dir, 3)
        _stop(stopped, signal.SIGSTOP)
        at_loss = max(_train_iters(run_dir))
        cluster.kill_node()
        lost = time.monotonic()
        _wait(driver, "a group of 2", lambda: len(_rank0_groups(run_dir)) == 2)
        stopped = []  # Ray ended them when it replaced the group
        shrunk = _rank0_groups(run_dir)[1]
        assert shrunk["world_size"] == 2 and shrunk["batch_per_worker"] == 3  # the global batch kept
        trained_at_2 = _wait(driver, "training at 2 workers", lambda: _trained_from(run_dir, shrunk))
        # a checkpoint of the 2 workers registered (the Ray metrics carry the size), then the run
        # is held still (see the module docstring) and the cluster gets its third node back
        _wait(driver, "a checkpoint at 2 workers", lambda: [
            e for e in registered_checkpoints(run_dir)
            if e["metrics"]["iteration"] > shrunk["iteration"] and e["metrics"]["world_size"] == 2])
        stopped = _group_pids(run_dir, 2)
        _stop(stopped, signal.SIGSTOP)
        at_hold = max(_train_iters(run_dir))
        cluster.add_node()
        added = time.monotonic()
        _wait(driver, "a group of 3 again", lambda: len(_rank0_groups(run_dir)) == 3)
        grown = _rank0_groups(run_dir)[2]
        stopped = []  # Ray ended them when it resized the group
        trained_at_3 = _wait(driver, "training at 3 workers again", lambda: _trained_from(run_dir, grown))
        driver.finish(timeout=400)
        shrink_decided = driver.first("Detected ready resources for 2 workers") - lost
        grow_decided = driver.first("Deciding to resize the worker group from 2 -> 3") - added
        costs = (f"elastic 3 -> 2: node lost at iteration >= {at_loss}, Ray decided on 2 after "
                 f"{shrink_decided:.1f} s, training again after {trained_at_2 - lost:.1f} s, resumed from "
                 f"{shrunk['iteration']} ({max(at_loss - shrunk['iteration'], 0)}+ iterations redone)\n"
                 f"elastic 2 -> 3: node added at iteration {at_hold} (held), Ray decided on 3 after "
                 f"{grow_decided:.1f} s, training at 3 after {trained_at_3 - added:.1f} s, resumed from "
                 f"{grown['iteration']} ({at_hold - grown['iteration']} iterations redone)")
        with capsys.disabled():
            print(f"\n{costs}")
    finally:
        _stop(stopped, signal.SIGCONT)  # those Ray has not ended already
        output = driver.finish(timeout=0)  # ended already, unless the test failed
        (tmp_path / "driver.log").write_text(output)  # Ray's resize decisions, for a look afterwards
    assert driver.proc.returncode == 0, output[-6000:]
    assert grown["world_size"] == 3 and grown["batch_per_worker"] == 2
    result = json.loads((run_dir / otrain.RESULT_NAME).read_text())
    assert result["iterations"] == MAX_ITERS and result["world_sizes"] == [3, 2, 3] and result["restarts"] == 2
    assert "worker group resized: 3 -> 2 workers" in output and "worker group resized: 2 -> 3 workers" in output
    # every iteration's metrics once (the redone ones replaced), at the one global batch's lr
    train_iters = _train_iters(run_dir)
    assert train_iters == list(range(1, MAX_ITERS + 1))
    records = [json.loads(line) for line in (run_dir / otrain.WORKDIR_NAME / "metrics.jsonl").read_text().splitlines()]
    assert len({r["lr"] for r in records if r["mode"] == "train" and r["iter"] > 1}) == 1
    # resumed from registered checkpoints that verify; the final one holds the whole run
    assert 0 < shrunk["iteration"] < grown["iteration"] < MAX_ITERS
    for group in (shrunk, grown):
        assert load_checkpoint(Path(group["resumed_from"]) / "checkpoint.pt")["iteration"] == group["iteration"]
    assert load_checkpoint(Path(result["checkpoint"]))["iteration"] == MAX_ITERS
    assert MAX_ITERS in assert_registered_checkpoints_verify(run_dir)
    # the sizes in TensorBoard: ray/world_size at the iteration each group started from
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / otrain.WORKDIR_NAME / "tensorboard" / "ray"))
    events.Reload()
    sizes = [(e.step, e.value) for e in events.Scalars("ray/world_size")]
    assert sizes == [(0, 3), (shrunk["iteration"], 2), (grown["iteration"], 3)]
