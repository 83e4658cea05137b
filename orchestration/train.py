"""Distributed training on Ray Train: `python -m orchestration.train` (the `ray job submit` entry).

    python -m orchestration.train [--config FILE] [--set key=value ...] --num-workers N
        [--use-gpu] [--cpus-per-worker C] [--placement-strategy S] [--storage DIR] [--name NAME]
        [--address ADDR]

A `TorchTrainer` runs `vfnet.engine.train` in every worker (DDP over gloo on CPU, nccl on GPU;
Ray sets up the process group, the engine wraps the model). Each worker trains on its share of
the Ray Data stream of the packed Parquet shards (`orchestration.data`); the engine's report hook
forwards metrics and rank 0's checkpoints to `ray.train.report`, and a restarted worker group
resumes from `ray.train.get_checkpoint()`. The run lives in `<storage>/<name>/`:

- `checkpoint_*/checkpoint.pt`: the checkpoints Ray has registered (the last
  `train.keep_checkpoints` are kept);
- `workdir/`: the engine's work dir on rank 0 (`config.toml`, `metrics.jsonl`, `eval.json`, ...);
- `workers/rank<R>-<pid>-<time>.json`: one file per worker per worker-group start (rank, pid,
  node id and IP, the checkpoint it resumed from);
- `result.json`: written by the driver at the end: the final metrics by name (`bbox_mAP`, ...),
  `iterations`, `restarts` and `checkpoint` (the last registered checkpoint file).

`restarts` counts worker-group starts of this invocation beyond the first, from the rank-0 files
in `workers/` (every group start writes one before training); re-running a finished or
interrupted run under the same name resumes it and is not counted as a restart.

`<storage>` must be a path every node can read and write (a shared file system on a real
cluster). Exit status (`vfnet.errors.run_main`): 0 on success; 2 with one line
`vfnet: error: ...` on stderr for what the user can fix (bad arguments, configs, data files or
checkpoints, also when a worker raised it; an unreachable cluster); 1 with a traceback otherwise
(training failed for good, or a bug).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.tracking import MlflowRecorder, MlflowTarget, end_train_run, start_train_run
from vfnet.atomic import write_json
from vfnet.config import Config, config_from_dict, load_config
from vfnet.errors import ArgumentError, CheckpointError, EnvError, UserError, one_line, run_main

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # the engine's checkpoint file inside a Ray checkpoint dir
RESULT_NAME = "result.json"
WORKERS_DIR = "workers"
WORKDIR_NAME = "workdir"
PACKED_DIR = "packed"  # under the storage path: the content-keyed cache of packed shards
DATASET_NAME = "train"
DEFAULT_STORAGE = "work_dirs/ray"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# Paths in the config that workers open; made absolute on the driver, since a Ray worker's
# current directory is not the driver's (Tune trials even change into their trial dir).
_PATH_KEYS = ("data.train_ann", "data.train_images", "data.val_ann", "data.val_images",
              "data.train_parquet", "data.synth_dir", "model.pretrained")


@dataclass(frozen=True)
class WorkerSpec:
    """What every Ray Train worker needs (sent once, pickled): the resolved config and where
    the run lives."""

    config: dict[str, Any]  # Config.to_dict() with absolute data paths
    run_dir: str  # <storage>/<name>
    iters_per_epoch: int
    cat_ids: list[int]  # contiguous label -> COCO category id of the training shards
    torch_threads: int  # intra-op threads per worker
    mlflow: tuple[str, str] | None = None  # (tracking URI, run id): rank 0 logs the engine's records


# ---------------------------------------------------------------------------------------------
# Worker side (runs inside Ray worker processes)


class RayReporter:
    """`TrainHooks.report` for Ray: forwards the engine's metrics, and rank 0's checkpoint file
    as a one-file `ray.train.Checkpoint`, to `report_fn` (`ray.train.report` or
    `ray.tune.report`); the engine calls it on every rank equally often, as Ray requires."""

    def __init__(self, report_fn: Callable[..., None]) -> None:
        self.report_fn = report_fn

    def __call__(self, metrics: dict[str, float], checkpoint_file: Path | None) -> None:
        from ray.train import Checkpoint

        if checkpoint_file is None:
            self.report_fn(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="vfnet-ckpt-") as tmp:
            shutil.copyfile(checkpoint_file, Path(tmp) / CHECKPOINT_NAME)
            self.report_fn(metrics, checkpoint=Checkpoint.from_directory(tmp))  # copied to storage


def restore_checkpoint(checkpoint: Any, dest_dir: Path) -> Path | None:
    """Copy the engine file out of a Ray checkpoint (None -> None) into `dest_dir`; its path."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as src:
        source = Path(src) / CHECKPOINT_NAME
        if not source.is_file():
            raise CheckpointError(f"{checkpoint.path}: no {CHECKPOINT_NAME} in this Ray checkpoint")
        dest = dest_dir / CHECKPOINT_NAME
        shutil.copyfile(source, dest)
    return dest


def write_worker_record(run_dir: Path, resumed_from: str | None) -> Path:
    """Record this worker process's start in `run_dir/workers/` (see the module docstring)."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    record = {
        "rank": rank,
        "world_size": ctx.get_world_size(),
        "local_rank": ctx.get_local_rank(),
        "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
        "resumed_from": resumed_from,
    }
    path = run_dir / WORKERS_DIR / f"rank{rank}-{os.getpid()}-{time.time_ns()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, record)
    return path


def train_loop_per_worker(spec: WorkerSpec) -> dict[str, float]:
    """The `TorchTrainer` loop: the engine on this worker's data shard. Returns the engine's
    final metrics (Ray hands rank 0's to the driver as `Result.return_value`)."""
    import ray.train
    import torch

    from orchestration.data import ShardBatches
    from vfnet.engine import TrainHooks, train

    torch.set_num_threads(spec.torch_threads)
    cfg = config_from_dict(spec.config, source="ray worker config")
    run_dir = Path(spec.run_dir)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    write_worker_record(run_dir, checkpoint.path if checkpoint is not None else None)
    with tempfile.TemporaryDirectory(prefix="vfnet-resume-") as tmp:
        resume_from = restore_checkpoint(checkpoint, Path(tmp))
        hooks = TrainHooks(
            train_batches=ShardBatches(ray.train.get_dataset_shard(DATASET_NAME), cfg, spec.cat_ids, rank),
            iters_per_epoch=spec.iters_per_epoch,
            report=RayReporter(ray.train.report),
            resume_from=resume_from,
            record=(MlflowRecorder(*spec.mlflow, cfg.train.batch_size * context.get_world_size())
                    if spec.mlflow is not None and rank == 0 else None),
        )
        # Ray's registered checkpoint is the only resume source: a last.pt the failed attempt
        # wrote after it is not used (recovery is at-least-once from what Ray registered).
        return train(cfg, run_dir / WORKDIR_NAME, resume=resume_from is not None, hooks=hooks)


# ---------------------------------------------------------------------------------------------
# Driver side


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """A copy of `cfg` whose non-empty data/model paths are absolute (relative to `base`,
    default the current directory)."""
    base = (base or Path.cwd()).resolve()
    raw = cfg.to_dict()
    for key in _PATH_KEYS:
        section, name = key.split(".")
        value = raw[section][name]
        if value:
            raw[section][name] = str((base / value).resolve()) if not Path(value).is_absolute() else value
    return config_from_dict(raw, source="resolved config")


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


def build_trainer(cfg: Config, *, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                  storage: Path, name: str, parquet_dir: Path, placement_strategy: str = "PACK",
                  callbacks: Sequence[Any] = (), mlflow_run: tuple[str, str] | None = None) -> Any:
    """A `TorchTrainer` running `train_loop_per_worker` on `num_workers` workers over the shards
    in `parquet_dir`, its run in `storage/name`. `cfg` must have absolute paths.
    `placement_strategy` places the workers' resource bundles (Ray placement group strategies:
    PACK fills few nodes, SPREAD / STRICT_SPREAD put workers on different nodes). `mlflow_run`:
    (tracking URI, run id) that rank 0 logs into."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.data import count_rows, iters_per_epoch, read_train_dataset, shard_cat_ids

    check_flags(cfg, num_workers, use_gpu, cpus_per_worker, placement_strategy)
    spec = WorkerSpec(
        config=cfg.to_dict(),
        run_dir=str(storage / name),
        iters_per_epoch=iters_per_epoch(count_rows(parquet_dir), num_workers, cfg.train.batch_size),
        cat_ids=shard_cat_ids(parquet_dir),
        torch_threads=torch_threads(cpus_per_worker),
        mlflow=mlflow_run,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=_worker_resources(use_gpu, cpus_per_worker),
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks) or None,
        ),
        datasets={DATASET_NAME: read_train_dataset(parquet_dir)},
    )


def run_training(cfg: Config, *, num_workers: int, use_gpu: bool = False,
                 cpus_per_worker: float = 0.5, storage: str | Path = DEFAULT_STORAGE,
                 name: str | None = None, placement_strategy: str = "PACK",
                 mlflow: MlflowTarget | None = None) -> dict[str, Any]:
    """Train `cfg` on the connected Ray cluster and write `<storage>/<name>/result.json`;
    return its contents (logged to MLflow too with `mlflow`). Raises `TrainingFailed` when the
    run failed for good."""
    storage = Path(storage).resolve()
    cfg = absolute_paths(cfg)
    name = name or default_name()
    run_dir = storage / name
    from orchestration.data import prepare_train_shards
    from vfnet.data.synth import ensure_synth

    check_flags(cfg, num_workers, use_gpu, cpus_per_worker, placement_strategy)
    check_cpu_budget(num_workers, cpus_per_worker)
    if cfg.data.synth:
        ensure_synth(cfg.data)
    parquet_dir = prepare_train_shards(cfg.data, storage / PACKED_DIR)
    mlflow_run = (mlflow.uri, start_train_run(mlflow, name, str(run_dir), cfg)) if mlflow else None
    trainer = build_trainer(cfg, num_workers=num_workers, use_gpu=use_gpu,
                            cpus_per_worker=cpus_per_worker, storage=storage, name=name,
                            parquet_dir=parquet_dir, placement_strategy=placement_strategy,
                            mlflow_run=mlflow_run)
    starts_before = _rank0_starts(run_dir)
    log.info("training %s on %d worker(s) (%s) in %s", name, num_workers,
             "GPU" if use_gpu else "CPU", run_dir)
    try:
        result = fit_trainer(trainer)
    finally:
        if mlflow_run is not None:
            end_train_run(mlflow, mlflow_run[1], ok=sys.exc_info()[0] is None)
    restarts = max(0, _rank0_starts(run_dir) - starts_before - 1)
    if result.checkpoint is None or not isinstance(result.return_value, dict):
        raise TrainingFailed(f"run {name} finished without metrics or checkpoint")
    summary = dict(result.return_value)
    summary.update(
        restarts=restarts,
        checkpoint=str(Path(result.checkpoint.path) / CHECKPOINT_NAME),
        num_workers=num_workers,
        run_dir=str(run_dir),
    )
    _write_json(run_dir / RESULT_NAME, summary)
    log.info("run %s done: %s", name, json.dumps(summary))
    return summary


class TrainingFailed(RuntimeError):
    """The Ray Train run failed (after its allowed restarts) for a reason other than a user
    error (those are re-raised as themselves, see `fit_trainer`)."""


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


def check_cpu_budget(num_workers: int, cpus_per_worker: float) -> None:
    """ArgumentError when the workers would reserve all but less than one of the connected
    cluster's CPUs: Ray Data's read tasks need a whole CPU, and without one the run hangs."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    free = total - num_workers * cpus_per_worker
    if free < 1:
        raise ArgumentError(
            f"--num-workers {num_workers} x --cpus-per-worker {cpus_per_worker:g} leaves {free:g} "
            f"of the cluster's {total:g} CPUs to Ray Data, which needs at least 1 to read the "
            f"shards (the run would hang): lower --cpus-per-worker or add nodes")


def default_name() -> str:
    """A fresh run name: `vfnet-<UTC time>-<pid>`."""
    return f"vfnet-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"


def torch_threads(cpus_per_worker: float) -> int:
    """Intra-op threads for a worker holding `cpus_per_worker` logical CPUs (at least 1)."""
    return max(1, math.floor(cpus_per_worker))


def _worker_resources(use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return resources


def check_flags(cfg: Config, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                placement_strategy: str = "PACK") -> None:
    """Reject flag values (and a flag/config mismatch) with an ArgumentError naming the flag."""
    if use_gpu and cfg.train.device == "cpu":
        raise ArgumentError("--use-gpu with train.device = 'cpu': set train.device to 'auto' or 'cuda'")
    if num_workers < 1:
        raise ArgumentError(f"--num-workers must be >= 1, got {num_workers}")
    if not cpus_per_worker > 0:
        raise ArgumentError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ArgumentError(f"--placement-strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                         f"got {placement_strategy!r}")


def _rank0_starts(run_dir: Path) -> int:
    return len(list((run_dir / WORKERS_DIR).glob("rank0-*.json")))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json(path, data, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `orchestration.train` and `orchestration.tune` share."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config (default: configs/shapes_tiny.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=0.02 (repeatable)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="logical CPUs Ray reserves per training worker (default 0.5; "
                             "fractional leaves CPUs to Ray Data); also torch's thread count, "
                             "rounded down, at least 1")
    parser.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES,
                        help="how workers are placed on nodes (default PACK: as few nodes as "
                             "possible; SPREAD / STRICT_SPREAD: across nodes)")
    parser.add_argument("--storage", type=Path, default=Path(DEFAULT_STORAGE),
                        help=f"run storage every node can reach (default {DEFAULT_STORAGE})")
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


def parse_args(argv: Sequence[str] | None = None,
               prog: str = "python -m orchestration.train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Train VFNet on a Ray cluster (Ray Train).")
    add_common_arguments(parser)
    parser.add_argument("--num-workers", type=int, required=True, help="training workers (DDP ranks)")
    parser.add_argument("--name", default=None, help="run name (default: vfnet-<time>-<pid>); "
                        "re-using a name resumes that run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "python -m orchestration.train") -> int:
    """Entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, prog)

    def body() -> int:
        cfg = load_config(args.config, args.overrides)
        check_flags(cfg, args.num_workers, args.use_gpu, args.cpus_per_worker, args.placement_strategy)
        return run_on_ray(
            args.address,
            lambda: run_training(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                                 cpus_per_worker=args.cpus_per_worker, storage=args.storage,
                                 name=args.name, placement_strategy=args.placement_strategy,
                                 mlflow=mlflow_target(args)))

    return run_main(body)


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

if __name__ == "__main__":
    sys.exit(main())
