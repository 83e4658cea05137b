"""`Cluster`: a real multi-process Ray cluster on loopback for the tests, started with the `ray` CLI.

A head on 127.0.0.2 and more raylets on 127.0.0.3, 127.0.0.4, ... (real nodes on one machine,
docs/design.md §8), on free ports and in a temp dir of their own, so it neither joins nor
disturbs any other Ray on the machine (nor the in-process session cluster of the other test
modules). Token authentication is on, with the test session's token (conftest.py) in the
environment of every command (the project's policy, see docs/ray.md, Authentication). Each
`ray start --block` runs in its own process group, which `stop` kills, so no
Ray process outlives it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from orchestration import common
from orchestration import train as otrain
from orchestration.storage import RunStorage
from vfnet.core.checkpoint import load_checkpoint
from vfnet.core.errors import EnvError

HEAD_IP = "127.0.0.2"
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often Ray Train's controller polls its workers
HEALTH_CHECK_INTERVAL = "0.5"  # seconds (Ray's default: 2)
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up


def node_ip(index: int) -> str:
    """The address of raylet `index` (0: the first besides the head)."""
    return f"127.0.0.{3 + index}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class _StartTimedOut(Exception):
    """`ray start` exited because its raylet did not register with the GCS within Ray's 30 s."""


class Cluster:
    """A head and `nodes` more raylets, each a `ray start --block` process group with 2 logical
    CPUs; `node_args`: more `ray start` flags for every raylet, the head included (e.g.
    `--memory=...`); `env`: more environment variables for every raylet (so for the Ray Train
    controller and workers it starts) and for the commands of the test (`self.env`)."""

    def __init__(self, nodes: int = 1, node_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.nodes = nodes
        self.node_args = list(node_args)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vr-"))  # short: Ray's socket paths
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",  # with the session's token (conftest.py) or ~/.ray's
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            HEALTH_CHECK_ENV: HEALTH_CHECK_INTERVAL,  # faster checkpoint registration, failure detection
            # the GCS probes every raylet each second (Ray's default: 3 s), so a SIGKILLed node
            # (its probes refused at once) is marked dead after 5 probes, ~5 s instead of ~15 s; a
            # live node still has Ray's 10 s per probe to answer
            "RAY_health_check_period_ms": "1000",
            # `python` in job entrypoints is this interpreter
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []  # the head first, then the live raylets
        self.ips: dict[int, str] = {}  # raylet pid -> its address
        self.log_files: dict[int, Path] = {}  # raylet pid -> its `ray start` output
        self.dead: list[subprocess.Popen] = []  # nodes killed by a test

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start_and_wait(self, args: list[str], name: str, ip: str, attempts: int = 3) -> None:
        """`_start` a node and wait until it has started (`_wait_started`). `ray start` gives a
        new raylet 30 s (hard-coded in Ray) to register with the GCS and exits when a loaded
        machine takes longer ("timed out during startup"): that node is started again, up to
        `attempts` times in all; any other exit fails the test."""
        for attempt in range(attempts):
            self._start(args, f"{name}-{attempt}", ip)
            try:
                self._wait_started(self.procs[-1])
                return
            except _StartTimedOut:
                proc = self.procs.pop()
                self.ips.pop(proc.pid)
                proc.wait(timeout=30)
        raise TimeoutError(f"Ray node {name} timed out during startup {attempts} times: {self.logs()}")

    def _start(self, args: list[str], name: str, ip: str) -> None:
        common = ["--block", "--num-cpus=2", "--object-store-memory=80000000",
                  f"--dashboard-agent-listen-port={_free_port()}",
                  f"--dashboard-agent-grpc-port={_free_port()}",
                  f"--runtime-env-agent-port={_free_port()}",
                  f"--metrics-export-port={_free_port()}", "--disable-usage-stats", *self.node_args]
        log_file = self.temp_dir / f"{name}.log"
        log = open(log_file, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", *args, f"--node-ip-address={ip}", *common],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.ips[proc.pid] = ip
        self.log_files[proc.pid] = log_file

    def start(self) -> None:
        self._start_and_wait(["--head", f"--port={self.port}",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                              f"--ray-client-server-port={_free_port()}", f"--temp-dir={self.temp_dir}"],
                             "head", HEAD_IP)
        for index in range(self.nodes):  # one at a time: raylets starting together can time out
            self._start_and_wait([f"--address={self.address}"], f"node{index}", node_ip(index))

    def kill_node(self) -> str:
        """SIGKILL the newest raylet's whole process group (raylet, its workers): a lost
        machine. Returns its address."""
        node = self.procs[-1]
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=30)
        self.dead.append(node)
        self.procs.remove(node)
        return self.ips.pop(node.pid)

    def add_node(self) -> str:
        """Start a (new) raylet on the lowest free address and wait until it is active.
        Returns its address."""
        ip = next(node_ip(i) for i in range(len(self.procs)) if node_ip(i) not in self.ips.values())
        self._start_and_wait([f"--address={self.address}"], f"node-{len(self.dead)}-{ip}", ip)
        return ip

    def _wait_started(self, proc: subprocess.Popen, timeout: float = 120.0) -> None:
        """Wait until `ray start` prints "Ray runtime started.": it does so once its raylet is
        registered with the GCS (and, on the head, once the dashboard is up), so the node's
        resources are then schedulable. Reading the log costs nothing, where polling `ray status`
        cost ~1.7 CPU-s a call (a fresh interpreter importing Ray)."""
        log_file = self.log_files[proc.pid]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = log_file.read_text()
            if STARTED in log:
                return
            if proc.poll() is not None:
                if "timed out during startup" in log:
                    raise _StartTimedOut(log[-2000:])
                raise AssertionError(f"ray start exited: {self.logs()}")
            time.sleep(0.1)
        raise TimeoutError(f"Ray node at {self.ips[proc.pid]} not up after {timeout} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.temp_dir.glob("*.log")))

    def stop(self) -> None:
        """SIGKILL every node's process group and wait until each is gone (within ~2 s; Ray's own
        shutdown on SIGTERM took longer than the 5 s it was given, and nothing of the cluster
        outlives it: its temp dir is removed here)."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_group_alive(p) for p in self.procs):
            time.sleep(0.1)
        for proc in self.procs:
            proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader: a zombie still counts as a group member
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# A run's storage, as the tests read it


def run_storage(run: Path | RunStorage) -> RunStorage:
    """A run directory as a storage: a local path, or a RunStorage (e.g. on the S3 server)."""
    return run if isinstance(run, RunStorage) else RunStorage.parse(run)


def worker_records(run_dir: Path | RunStorage) -> list[dict]:
    """The run's worker records (`workers/rank<r>-<start>.json`: one per rank per group start)."""
    run = run_storage(run_dir)
    return [run.read_json(run.path(otrain.WORKERS_DIR, n)) for n in run.list(run.path(otrain.WORKERS_DIR))]


def metrics_records(run_dir: Path | RunStorage) -> list[dict]:
    """The records of the run's work dir `metrics.jsonl`, in file order."""
    run = run_storage(run_dir)
    with run.fs.open_input_stream(run.path(otrain.WORKDIR_NAME, "metrics.jsonl")) as src:
        return [json.loads(line) for line in src.read().decode().splitlines()]


def registered_checkpoints(run_dir: Path | RunStorage) -> list[dict]:
    """The checkpoints Ray Train's controller has registered (its snapshot file), or []."""
    run = run_storage(run_dir)
    try:
        snapshot = run.read_json(run.path("checkpoint_manager_snapshot.json"))
    except (EnvError, ValueError):  # not written yet, or caught mid-write
        return []
    return snapshot.get("checkpoint_results", [])


def load_run_checkpoint(run_dir: Path | RunStorage, checkpoint_dir: str) -> dict:
    """The engine checkpoint in a Ray checkpoint directory of the run's storage (a local path,
    or a URI of the object store as worker records and result.json name it)."""
    run = run_storage(run_dir)
    with tempfile.TemporaryDirectory() as tmp, \
            run.fs.open_input_stream(f"{checkpoint_dir.split('://', 1)[-1]}/{common.CHECKPOINT_NAME}") as src:
        local = Path(tmp) / common.CHECKPOINT_NAME
        local.write_bytes(src.read())
        return load_checkpoint(local)


def assert_registered_checkpoints_verify(run_dir: Path | RunStorage) -> list[int]:
    """Every checkpoint Ray registered loads and verifies (content hash): never a partial one.
    Returns their iterations."""
    iterations = []
    for entry in registered_checkpoints(run_dir):
        state = load_run_checkpoint(run_dir, run_storage(run_dir).path(entry["checkpoint_dir_name"]))
        iterations.append(state["iteration"])
    assert iterations
    return iterations
