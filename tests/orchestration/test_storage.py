"""Run storage on an object store: `RunStorage` against moto's S3 server on loopback, and a Tune
sweep stored there (a 2-worker Ray Train run on S3 is test_train.py's train-and-resume test)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from holding_proxy import HoldingProxy
from pyarrow.fs import FileSelector

from orchestration import train as otrain
from orchestration.storage import RetryPolicy, RunStorage, WorkdirSync, attempt_workdir, is_transient, redact
from vfnet.core.atomic import atomic_write
from vfnet.core.errors import ArgumentError
from vfnet.train.metrics_log import MetricsLog


def test_local_path_and_uri_parsing(tmp_path: Path) -> None:
    local = RunStorage.parse(tmp_path / "runs")
    assert local.is_local and local.root == str((tmp_path / "runs").resolve())
    assert local.display(local.path("a", "b")) == f"{local.root}/a/b"
    with pytest.raises(ArgumentError, match="--storage nosuch://bucket/x: not a usable file system URI"):
        RunStorage.parse("nosuch://bucket/x")
    assert redact("s3://KEY:SECRET@bucket/runs?secret_key=SECRET") == "s3://bucket/runs"
    # a child of a URI with a query keeps the query (the file system's options) at the end
    proxied = RunStorage.parse("s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http").child("a", "b")
    assert proxied.location == "s3://bucket/runs/a/b?endpoint_override=127.0.0.1:9&scheme=http"
    assert proxied.root == "bucket/runs/a/b" and proxied.display(proxied.path("c")) == "s3://bucket/runs/a/b/c"


def test_list_skips_atomic_write_temporaries(tmp_path: Path) -> None:
    """A record being written (its temporary file, still empty) is not listed, so a reader of
    the listed files never reads a partial one."""
    storage = RunStorage.parse(tmp_path)
    storage.write_json(storage.path("workers", "rank0-1.json"), {"rank": 0})
    with atomic_write(tmp_path / "workers" / "rank1-2.json"):
        assert storage.list(storage.path("workers")) == ["rank0-1.json"]
    assert storage.list(storage.path("workers")) == ["rank0-1.json", "rank1-2.json"]


def test_files_on_s3(s3_storage: str, tmp_path: Path) -> None:
    storage = RunStorage.parse(s3_storage)
    assert not storage.is_local and storage.display(storage.path("x")) == f"{s3_storage}/x"
    assert storage.list(storage.path("workers")) == [] and not storage.exists(storage.path("r.json"))
    storage.write_json(storage.path("r.json"), {"a": 1})
    storage.write_json(storage.path("workers", "rank0-1.json"), {"rank": 0})
    assert storage.read_json(storage.path("r.json")) == {"a": 1}
    assert storage.list(storage.path("workers")) == ["rank0-1.json"]
    # a work dir round trip: checkpoints/ stays local, the rest goes up and comes back
    local = tmp_path / "wd"
    (local / "tensorboard").mkdir(parents=True)
    (local / "checkpoints").mkdir()
    (local / "metrics.jsonl").write_text('{"iter": 1}\n')
    (local / "tensorboard" / "events.out.tfevents.1").write_bytes(b"\0\1")
    (local / "checkpoints" / "last.pt").write_bytes(b"big")
    WorkdirSync(storage, storage.path("workdir"), local).push()
    again = tmp_path / "wd2"
    WorkdirSync(storage, storage.path("workdir"), again).pull()
    assert sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file()) == [
        "metrics.jsonl", "tensorboard/events.out.tfevents.1"]
    assert (again / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"\0\1"


def test_an_abandoned_attempt_writes_outside_the_next_attempts_work_dir(tmp_path: Path) -> None:
    """When Ray restarts a worker group, the old rank 0 can still run for a moment on the node
    where the new rank 0 starts: the new attempt pulls the run's work dir and drops the iterations
    it will redo, and the old attempt's late appends must not land in the new attempt's
    `metrics.jsonl` (with one directory per run they did: iterations 1, 2, 3, 4, 3, 4)."""
    storage = RunStorage.parse(tmp_path / "store")
    remote = storage.path("run", otrain.WORKDIR_NAME)
    name = f"test-run-{os.getpid()}-{tmp_path.name}"

    def train_record(log: MetricsLog, iteration: int) -> None:
        log.write({"mode": "train", "iter": iteration})

    with attempt_workdir(name) as old_dir:
        old = MetricsLog(old_dir / "metrics.jsonl", resume_iter=None)
        train_record(old, 1)
        train_record(old, 2)
        WorkdirSync(storage, remote, old_dir).push()  # before the report of the checkpoint of iteration 2
        with attempt_workdir(name) as new_dir:  # the restarted group's rank 0, resuming from 2
            assert new_dir != old_dir and not any(new_dir.iterdir())
            sync = WorkdirSync(storage, remote, new_dir)
            sync.pull()
            new = MetricsLog(new_dir / "metrics.jsonl", resume_iter=2)
            train_record(old, 3)  # the abandoned attempt, not yet ended by Ray
            train_record(old, 4)
            train_record(new, 3)
            train_record(new, 4)
            sync.push()
        assert not new_dir.exists() and old_dir.is_dir()
    old_dir.parent.rmdir()
    lines = Path(storage.path("run", otrain.WORKDIR_NAME, "metrics.jsonl")).read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [1, 2, 3, 4]


def test_work_dirs_of_ended_attempts_are_removed(tmp_path: Path) -> None:
    """A SIGKILLed attempt cannot remove its work dir; the next attempt of the run on the node
    removes it, and leaves alone the one of an attempt whose process still runs."""
    name = f"test-run-{os.getpid()}-{tmp_path.name}"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    with attempt_workdir(name) as running:
        parent = running.parent
        killed = parent / f"attempt-{int(ended.stdout)}-abc"
        (killed / "checkpoints").mkdir(parents=True)
        with attempt_workdir(name) as current:
            assert not killed.exists() and running.is_dir() and current.is_dir()
    assert not any(parent.iterdir())
    parent.rmdir()


@pytest.mark.ray
def test_sweep_on_s3(tiny_config, s3_storage: str, tmp_path: Path, ray_session) -> None:
    """Tune's experiment state and results, and each trial's engine files, reach the store."""
    from orchestration import tune as otune

    cfg = tiny_config(**{"train.eval_interval": 2})
    cfg.tune.space = {"loss.alpha": {"type": "uniform", "low": 0.25, "high": 1.0}}
    rows = otune.run_sweep(cfg, num_samples=1, out=tmp_path / "out", storage=s3_storage, name="sweep")
    assert [r["status"] for r in rows] == ["completed"]
    storage = RunStorage.parse(s3_storage)
    files = [i.path for i in storage.fs.get_file_info(FileSelector(storage.path("sweep"), recursive=True))]
    assert any(p.endswith("/result.json") for p in files)  # Tune's per-trial results
    assert any(p.endswith("/workdir/metrics.jsonl") for p in files)  # the engine's files, synced
    assert any("/checkpoint_" in p and p.endswith("/checkpoint.pt") for p in files)


# ---------------------------------------------------------------------------------------------
# Transient errors: retried with backoff (RetryPolicy), injected by the proxy's error mode


def test_retry_policy_retries_only_transient_errors() -> None:
    waits: list[float] = []
    policy = RetryPolicy(attempts=4, backoff_s=0.5, max_backoff_s=1.5)
    outcomes = [OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
                OSError("AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 56"),
                ConnectionResetError(104, "Connection reset by peer"), "done"]

    def action():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert policy.call(action, "x", sleep=waits.append) == "done"
    assert waits == [0.5, 1.0, 1.5]  # doubling, capped
    denied = OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied")
    assert not is_transient(denied) and not is_transient(FileNotFoundError("x")) and not is_transient(ValueError())

    def refuse():
        raise denied

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        policy.call(refuse, "x", sleep=waits.append)
    assert len(waits) == 3  # not retried

    def always_busy():
        raise OSError("AWS Error SERVICE_UNAVAILABLE")

    with pytest.raises(OSError, match="SERVICE_UNAVAILABLE"):
        policy.call(always_busy, "x", sleep=waits.append)
    assert len(waits) == 3 + 3  # 4 attempts, then the last error


def test_storage_writes_ride_out_injected_errors(s3_storage: str) -> None:
    """40 503 SlowDown answers in a row to the PUT of result.json: more than the S3 client's own
    retries absorb (about 30 here; measured: with one attempt the write fails), ridden out by
    RunStorage's retries."""
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = HoldingProxy(port, rb"PUT /[^ ]*/result\.json[ ?]", fail=40)
    try:
        storage = RunStorage.parse(proxy.uri(s3_storage.removeprefix("s3://")))
        storage = replace(storage, retry=RetryPolicy(attempts=4, backoff_s=0.01))
        storage.write_json(storage.path("result.json"), {"ok": 1})
        assert proxy.failures_done.is_set() and proxy.failed == 40
        assert RunStorage.parse(s3_storage).read_json(f"{s3_storage.removeprefix('s3://')}/result.json") == {"ok": 1}
    finally:
        proxy.close()
