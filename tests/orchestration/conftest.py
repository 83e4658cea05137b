"""Fixtures of the Ray tests: tiny synthetic data, a tiny config, one in-process Ray per session.

Tests that need a cluster of their own (`ray start` heads for `ray job submit`, the SIGKILL and
two-node runs) live in test_cluster.py and start it in subprocesses (see `Cluster` there); the
in-process session cluster is started with `address="local"`, so it never joins one of those.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Token authentication (Ray's default since 2.59) with a fresh token of this test session: the
# tests neither read nor write ~/.ray/auth_token, and every cluster they start, in process or by
# `ray start`, uses this token. Ray reads the mode when it is imported, so this comes before the
# first import of Ray (the skip below imports it); if something imported Ray already, Ray's own
# default (a token in ~/.ray/auth_token) would apply instead, and the session stops here.
if not os.environ.get("RAY_AUTH_MODE"):
    if "ray" in sys.modules:
        raise RuntimeError("Ray was imported before tests/orchestration/conftest.py set its token "
                           "authentication; set RAY_AUTH_MODE (and RAY_AUTH_TOKEN) yourself")
    os.environ["RAY_AUTH_MODE"] = "token"
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)

pytest.importorskip("ray", reason="the orchestration tests need Ray")

from ray_cluster import HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL  # noqa: E402

from vfnet.core.config import Config, config_from_dict  # noqa: E402

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's
# default 2 s) and sees their reports, checkpoints and exit only then: a test run of a few
# seconds' training spends a good part of its time waiting for these polls, so the tests poll
# every 0.5 s (test_train, test_tune and test_storage together: 91 s instead of 107 s). Set
# before the session's Ray starts (its controllers inherit it); the test clusters
# (`ray_cluster.Cluster`) set it for their raylets.
os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL)

# MLflow >= 3 refuses its file store (the tests' tracking store) unless this is set; set before
# the session's Ray starts so that its workers (rank 0 logs to MLflow) inherit it.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The run-storage tests talk to an S3-compatible server on loopback (moto's standalone server,
# `s3_storage` below) with throw-away credentials in the standard AWS variables, set before any
# Ray starts so that Ray workers, `ray start` nodes and job drivers inherit them. The metadata
# service lookup is off (no credential probing outside the machine).
S3_PORT = free_port()
os.environ.update({"AWS_ACCESS_KEY_ID": "vfnet-test", "AWS_SECRET_ACCESS_KEY": "vfnet-test-secret",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
                   "AWS_EC2_METADATA_DISABLED": "true"})
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
S3_BUCKET = "vfnet-test"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1:S3_PORT with the bucket S3_BUCKET; yields `s3://S3_BUCKET`.
    Stopped (its process group terminated) at the end of the session."""
    import boto3

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def s3_storage(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh prefix of the test bucket for one test: `s3://S3_BUCKET/<test name>`."""
    return f"{s3_server}/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training and 4 validation shapes images of 64 px."""
    from vfnet.data.synth import synthesize

    root = tmp_path_factory.mktemp("shapes")
    synthesize(root, images=16, size=64, seed=0)
    return root


def tiny_config_dict(data_dir: Path) -> dict:
    """A ResNet-18 VFNet at a quarter of its widths (`base_channels = 16`) with 16-channel FPN/head
    on 64 px images, the reference kernels, on the CPU: 4 iterations of batch 2 per worker (one
    epoch on two workers), a checkpoint every 2 and an evaluation at the end. These tests are about
    orchestration: the narrow backbone keeps a checkpoint near 1 MB (the full-width one was 46 MB
    frozen, 90 MB trained; each is written, uploaded and read back several times a test), and the
    whole backbone is frozen (`frozen_stages = 4`), so a step skips its backward."""
    return {
        "model": {"depth": 18, "base_channels": 16, "num_classes": 4, "fpn_channels": 16, "head_channels": 16,
                  "gn_groups": 4, "stacked_convs": 1, "kernels": "torch", "frozen_stages": 4},
        "infer": {"nms_pre": 100, "max_per_img": 20},
        "data": {"train_ann": str(data_dir / "annotations" / "train.json"),
                 "train_images": str(data_dir / "images" / "train"),
                 "val_ann": str(data_dir / "annotations" / "val.json"),
                 "val_images": str(data_dir / "images" / "val"),
                 "img_scale": [64, 64], "num_workers": 0},
        "train": {"batch_size": 2, "max_iters": 4, "warmup_iters": 1, "checkpoint_interval": 2,
                  "log_interval": 1, "device": "cpu", "amp": False, "keep_checkpoints": 2,
                  "max_failures": 2},
    }


def with_overrides(raw: dict, overrides: dict[str, object]) -> dict:
    """`raw` (nested config dicts) with each dotted key of `overrides` set."""
    for key, value in overrides.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return raw


@pytest.fixture
def tiny_config(synth_dir: Path) -> Callable[..., Config]:
    """`tiny_config(data_dir=None, **{"train.max_iters": 6, ...})`: the tiny config on
    `data_dir` (default: the session's shapes data) with dotted-key overrides."""

    def make(data_dir: Path | None = None, **overrides: object) -> Config:
        return config_from_dict(with_overrides(tiny_config_dict(data_dir or synth_dir), overrides),
                                source="tiny test config")

    return make


@pytest.fixture
def tiny_config_toml(synth_dir: Path) -> Callable[..., Path]:
    """`tiny_config_toml(path, **{"tune.search": "tpe", ...})`: the tiny config with dotted-key
    overrides written as a TOML file at `path`; returns `path`."""

    def write(path: Path, **overrides: object) -> Path:
        import tomli_w

        path.write_text(tomli_w.dumps(with_overrides(tiny_config_dict(synth_dir), overrides)))
        return path

    return write


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local in-process Ray for the whole session: 4 logical CPUs, no dashboard."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=80 * 1024 * 1024)
    yield
    ray.shutdown()
