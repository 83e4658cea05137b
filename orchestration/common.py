"""What the Ray entry points `orchestration.train` and `orchestration.tune` share.

- Flags: `add_common_arguments` (the shared command line) and `Workers`, the training workers'
  flags, checked once, when a `Workers` is built.
- Config resolution: `absolute_paths` (a Ray worker's current directory is not the driver's).
- Running: `run_command` (plan without Ray, then connect and run), `run_on_ray`, `connect`.
- Exit statuses and the error line: `vfnet.core.errors.run_main` (0 done; 2 and one line
  `vfnet: error: ...` for a `UserError`: bad flags, configs, data, checkpoints, an unreachable
  cluster, also when a worker raised it; 1 with a traceback otherwise). Bad flags and configs are
  reported by the plan, before Ray is touched.
- Worker side: `RayReporter` (engine reports to Ray) and `restore_checkpoint` (the newest
  registered Ray checkpoint that verifies -> engine checkpoint file).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from orchestration.tracking import MlflowTarget
from vfnet.core.checkpoint import load_checkpoint
from vfnet.core.config import Config, config_from_dict, load_config
from vfnet.core.errors import ArgumentError, CheckpointError, EnvError, UserError, one_line, run_main

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # the engine's checkpoint file inside a Ray checkpoint dir
DEFAULT_STORAGE = "work_dirs/ray"
PACKED_DIR = "packed"  # under the storage path: the content-keyed cache of packed shards
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Paths in the config that workers open; made absolute on the driver, since a Ray worker's
# current directory is not the driver's (Tune trials even change into their trial dir).
_PATH_KEYS = ("data.train_ann", "data.train_images", "data.val_ann", "data.val_images",
              "data.train_parquet", "data.synth_dir", "model.pretrained")

Plan = TypeVar("Plan")


class TrainingFailed(RuntimeError):
    """The Ray Train run failed (after its allowed restarts) for a reason other than a user
    error (those are re-raised as themselves, see `fit_trainer`)."""


# ---------------------------------------------------------------------------------------------
# Flags and config


@dataclass(frozen=True)
class Workers:
    """The training workers of a run: how many, GPU or not, the logical CPUs and the memory (GiB,
    0: none) Ray reserves for each, and how their resource bundles are placed (Ray placement
    group strategies: PACK fills few nodes, SPREAD / STRICT_SPREAD put workers on different
    nodes). `min_workers` makes the run elastic: it trains on as many workers between
    `min_workers` and `num_workers` as the cluster can hold, and is resized when that changes
    (docs/ray.md, Elastic training); None: exactly `num_workers`. Building one checks the values
    (ArgumentError naming the flag); nothing checks them again."""

    num_workers: int = 1  # the most workers (all of them for a fixed-size run)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    placement_strategy: str = "PACK"
    min_workers: int | None = None
    memory_per_worker: float = 0.0  # GiB
    count_source: str = "--num-workers"  # where the count came from (or train.num_workers), for errors

    def __post_init__(self) -> None:
        if self.fewest < 1:
            raise ArgumentError(f"{self.count_source} must be >= 1, got {self.count_text}")
        if self.fewest > self.num_workers:
            raise ArgumentError(f"{self.count_source} MIN-MAX needs MIN <= MAX, got {self.count_text}")
        if not self.cpus_per_worker > 0:
            raise ArgumentError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if not self.memory_per_worker >= 0:
            raise ArgumentError(f"--memory-per-worker must be >= 0, got {self.memory_per_worker}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ArgumentError(f"--placement-strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                                f"got {self.placement_strategy!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cfg: Config) -> Workers:
        """The flags of `add_common_arguments` and `--num-workers` (an int, or the text `N` or
        `MIN-MAX`, see `parse_worker_count`); without `--num-workers` (None), the config's
        `train.num_workers`, which must then be set."""
        count, source = args.num_workers, "--num-workers"
        if count is None:
            count, source = cfg.train.num_workers, "train.num_workers"
            if not count:
                raise ArgumentError("how many workers? give --num-workers N|MIN-MAX or set train.num_workers "
                                    "in the config")
        fewest, most = parse_worker_count(count, source) if isinstance(count, str) else (count, count)
        return cls(most, args.use_gpu, args.cpus_per_worker, args.placement_strategy,
                   min_workers=fewest if fewest != most else None,
                   memory_per_worker=args.memory_per_worker, count_source=source)

    @property
    def fewest(self) -> int:
        """The fewest workers the run trains on (`num_workers` unless elastic)."""
        return self.num_workers if self.min_workers is None else self.min_workers

    @property
    def elastic(self) -> bool:
        """MIN < MAX: Ray sizes the worker group to the cluster, and resizes it."""
        return self.fewest != self.num_workers

    @property
    def count_text(self) -> str:
        """The worker count as `--num-workers` spells it: `N` or `MIN-MAX`."""
        return f"{self.fewest}-{self.num_workers}" if self.min_workers is not None else str(self.num_workers)

    def scaling(self) -> int | tuple[int, int]:
        """`ScalingConfig(num_workers=...)`: the count, or (min, max) for an elastic run."""
        return (self.fewest, self.num_workers) if self.elastic else self.num_workers

    def check_config(self, cfg: Config) -> None:
        """ArgumentError when the config contradicts the flags: `--use-gpu` on
        `train.device = 'cpu'`; an elastic run whose global batch (`global_batch`, kept at
        every size) does not split evenly over every worker count MIN..MAX."""
        if self.use_gpu and cfg.train.device == "cpu":
            raise ArgumentError("--use-gpu with train.device = 'cpu': set train.device to 'auto' or 'cuda'")
        counts = range(self.fewest, self.num_workers + 1)
        uneven = [n for n in counts if self.global_batch(cfg) % n]
        if uneven:
            need = math.lcm(*counts)
            raise ArgumentError(
                f"--num-workers {self.count_text} with train.batch_size {cfg.train.batch_size}: the global "
                f"batch of {self.global_batch(cfg)} images does not split evenly over "
                f"{', '.join(map(str, uneven))} worker(s); use a train.batch_size that is a multiple "
                f"of {need // math.gcd(need, self.num_workers)}")

    def global_batch(self, cfg: Config) -> int:
        """Images per iteration, all workers together: `train.batch_size` x `num_workers` (for
        an elastic run the batch of each worker at full size; fewer workers take more each)."""
        return cfg.train.batch_size * self.num_workers

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for a worker holding `cpus_per_worker` logical CPUs (at least 1)."""
        return max(1, math.floor(self.cpus_per_worker))

    def resources(self) -> dict[str, float]:
        """Ray resources of one worker (`memory` in bytes)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {}),
                **({"memory": self.memory_per_worker * 2**30} if self.memory_per_worker else {})}


def parse_worker_count(text: str, source: str = "--num-workers") -> tuple[int, int]:
    """A worker count as `--num-workers` or `train.num_workers` (`source`, named in errors)
    spells it -> (fewest, most): `N` -> (N, N), `MIN-MAX` -> (MIN, MAX). ArgumentError for
    anything else; the bounds are checked by `Workers`."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if match is None:
        raise ArgumentError(f"{source} must be N or MIN-MAX (whole numbers), got {text!r}")
    fewest = int(match[1])
    return fewest, int(match[2]) if match[2] is not None else fewest


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """A copy of `cfg` whose non-empty data/model paths are absolute (relative to `base`,
    default the current directory)."""
    base = (base or Path.cwd()).resolve()
    raw = cfg.to_dict()
    for key in _PATH_KEYS:
        section, name = key.split(".")
        value = raw[section][name]
        if value and "://" not in value:  # URIs (data.train_parquet on an object store) stay
            raw[section][name] = str((base / value).resolve()) if not Path(value).is_absolute() else value
    return config_from_dict(raw, source="resolved config")


def default_name() -> str:
    """A fresh run name: `vfnet-<UTC time>-<pid>`."""
    return f"vfnet-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `orchestration.train` and `orchestration.tune` share."""
    parser.add_argument("--config", type=Path, default=None,
                        help="a TOML config file, or the name of a shipped config (default: shapes_tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.02 (repeatable)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="logical CPUs Ray reserves per training worker (default 0.5); also "
                             "torch's thread count, rounded down, at least 1")
    parser.add_argument("--memory-per-worker", type=float, default=0.0, metavar="GIB",
                        help="memory (GiB) Ray reserves per training worker (default 0: none); "
                             "with `ray start --memory` it also caps the workers per node")
    parser.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES,
                        help="how workers are placed on nodes (default PACK: as few nodes as "
                             "possible; SPREAD / STRICT_SPREAD: across nodes)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE,
                        help="run storage every node can reach: a directory (shared disk) or a "
                             "pyarrow.fs URI such as s3://bucket/prefix or gs://bucket/prefix "
                             f"(default {DEFAULT_STORAGE})")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--mlflow-uri", default=None, metavar="URI",
                        help="log to MLflow at this tracking URI (http://..., sqlite:///..., "
                             "file:///...); credentials from MLflow's environment variables")
    parser.add_argument("--mlflow-experiment", default="vfnet", metavar="NAME",
                        help="MLflow experiment (default vfnet; created when missing)")


def mlflow_target(args: argparse.Namespace) -> MlflowTarget | None:
    """The MLflow target of the command line, None without --mlflow-uri."""
    return MlflowTarget(args.mlflow_uri, args.mlflow_experiment) if args.mlflow_uri else None


# ---------------------------------------------------------------------------------------------
# Running on Ray


def connect(address: str | None) -> bool:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), else start a local one with
    its dashboard on 127.0.0.1. Returns True when this call started or joined Ray (the caller
    then shuts it down), False when Ray was already initialised in this process."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", dashboard_host="127.0.0.1")
    return True


def connect_or_raise(address: str | None) -> bool:
    """`connect`; EnvError when the cluster cannot be reached (wrong address, no or wrong auth
    token, ...), with the first line of Ray's reason."""
    try:
        return connect(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises several unrelated types here
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnvError(f"cannot connect to Ray ({address or os.environ.get('RAY_ADDRESS')}): "
                       f"{message}") from exc


def run_on_ray(address: str | None, work: Callable[[], object]) -> int:
    """Connect to (or start) Ray (EnvError when unreachable), run `work()` and return 0; a Ray
    started here is shut down afterwards. Errors propagate to `run_main`."""
    started = connect_or_raise(address)
    try:
        work()
    finally:
        if started:
            import ray

            ray.shutdown()
    return 0


def command_main(argv: Sequence[str] | None, *, prog: str, description: str,
                 add_arguments: Callable[[argparse.ArgumentParser], None],
                 plan: Callable[[argparse.Namespace, Config, Workers], Plan],
                 run: Callable[[Plan], object]) -> int:
    """An entry point: parse the shared flags (`add_common_arguments`) and the command's own
    (`add_arguments`), then `run_command` with `plan(args, config, workers)` (the config of
    `--config` and `--set`, the workers of the flags) and `run`. Returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_common_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    def planned() -> Plan:
        cfg = load_config(args.config, args.overrides)
        return plan(args, cfg, Workers.from_args(args, cfg))

    return run_command(args.address, planned, run)


def run_command(address: str | None, plan: Callable[[], Plan], run: Callable[[Plan], object]) -> int:
    """An entry point's body under `run_main`: `plan()` loads and checks the config and the
    flags without Ray (so bad input is reported before Ray is touched), then `run(planned)` on
    Ray (`run_on_ray`). Returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> int:
        planned = plan()
        return run_on_ray(address, lambda: run(planned))

    return run_main(body)


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first `UserError` in a Ray failure: the exception itself, its causes, a Ray Train
    `WorkerGroupError`'s per-rank failures or a `RayTaskError`'s cause; None if there is none."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None),
                     *getattr(e, "worker_failures", {}).values()])
    return None


def fit_trainer(trainer: Any) -> Any:
    """`trainer.fit()`; the `Result`. A failure caused by a `UserError` in a worker (a corrupt
    image, a non-finite loss) raises that error, any other failure `TrainingFailed`."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        user = find_user_error(exc)
        if user is not None:
            raise type(user)(one_line(user)) from exc
        raise TrainingFailed(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from exc
    if result.error is not None:
        user = find_user_error(result.error)
        if user is not None:
            raise type(user)(one_line(user)) from result.error
        raise TrainingFailed(str(result.error)) from result.error
    return result


# ---------------------------------------------------------------------------------------------
# Worker side: the engine's checkpoints to and from Ray


class RayReporter:
    """`Observers.report` for Ray: forwards the engine's metrics, and rank 0's checkpoint file
    as a one-file `ray.train.Checkpoint`, to `report_fn` (`ray.train.report` or
    `ray.tune.report`); the engine calls it on every rank equally often, as Ray requires.
    `upload`: a `checkpoint_upload_fn` for `ray.train.report` (`storage.checkpoint_uploader`:
    the upload retried after transient storage errors); None leaves the upload to Ray.
    `extra`: metrics added to every report (the worker group's `world_size`)."""

    def __init__(self, report_fn: Callable[..., None], upload: Callable[[Any, str], Any] | None = None,
                 extra: dict[str, float] | None = None) -> None:
        self.report_fn = report_fn
        self.upload = upload
        self.extra = dict(extra or {})

    def __call__(self, metrics: dict[str, float], checkpoint_file: Path | None) -> None:
        from ray.train import Checkpoint

        metrics = {**metrics, **self.extra}
        if checkpoint_file is None:
            self.report_fn(metrics)
            return
        extra = {} if self.upload is None else {"checkpoint_upload_fn": self.upload}
        with tempfile.TemporaryDirectory(prefix="vfnet-ckpt-") as tmp:
            shutil.copyfile(checkpoint_file, Path(tmp) / CHECKPOINT_NAME)
            self.report_fn(metrics, checkpoint=Checkpoint.from_directory(tmp), **extra)  # copied to storage


class Restored(NamedTuple):
    """The engine checkpoint file a worker resumes from, and the Ray checkpoint it came from."""

    file: Path
    source: str  # the Ray checkpoint directory (storage path)
    iteration: int  # the training iterations the checkpoint holds


def restore_checkpoint(checkpoint: Any, dest_dir: Path) -> Restored | None:
    """The newest registered Ray checkpoint that verifies, its engine file copied into
    `dest_dir` (None for no checkpoint). `checkpoint` is the one Ray hands the worker, the
    latest registered; when its file is missing, incomplete or corrupt (content hash), the older
    checkpoints of the same run (the `checkpoint_*` directories beside it, whose names sort by
    age) are tried newest first, and each one skipped is logged. CheckpointError naming them all
    when none verifies."""
    if checkpoint is None:
        return None
    reasons = []
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as src:
                source = Path(src) / CHECKPOINT_NAME
                if not source.is_file():
                    raise CheckpointError(f"{candidate.path}: no {CHECKPOINT_NAME} in this Ray checkpoint")
                dest = dest_dir / CHECKPOINT_NAME
                shutil.copyfile(source, dest)
            state = load_checkpoint(dest)  # verifies the content hash
        except CheckpointError as exc:
            log.warning("skipping Ray checkpoint %s: %s", candidate.path, exc)
            reasons.append(f"{candidate.path}: {exc}")
            continue
        if reasons:
            log.warning("resuming from Ray checkpoint %s, the newest that verifies (skipped %d newer)",
                        candidate.path, len(reasons))
        return Restored(dest, candidate.path, int(state["iteration"]))
    raise CheckpointError(f"no registered checkpoint verifies: {'; '.join(reasons)}")


def _older_checkpoints(checkpoint: Any) -> list[Any]:
    """The `checkpoint_*` directories beside `checkpoint` whose names sort before its own,
    newest first, as Ray checkpoints on the same file system."""
    import posixpath

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent, own = posixpath.split(checkpoint.path.rstrip("/"))
    try:
        infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        return []
    names = sorted((posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory),
                   reverse=True)
    return [Checkpoint(posixpath.join(parent, n), filesystem=checkpoint.filesystem)
            for n in names if n.startswith("checkpoint_") and n < own]
