"""Distributed training on Ray Train: `python -m orchestration.train` (the `ray job submit` entry).

    python -m orchestration.train [--config FILE] [--set key=value ...] [--num-workers N|MIN-MAX]
        [--use-gpu] [--cpus-per-worker C] [--memory-per-worker GIB] [--placement-strategy S]
        [--resize-interval SECONDS] [--storage DIR|URI] [--name NAME] [--address ADDR]

A `TorchTrainer` runs `vfnet.train.engine.train` in every worker (DDP over gloo on CPU, nccl on GPU;
Ray sets up the process group, the engine wraps the model). Each worker reads its share of every
iteration's images from the packed Parquet shards (`orchestration.data`: the same images per
iteration at any worker count); the engine's report hook
forwards metrics and rank 0's checkpoints to `ray.train.report`, and a restarted worker group
resumes from `ray.train.get_checkpoint()`. The worker count is `--num-workers`, else the
config's `train.num_workers` (one of them is needed). With `MIN-MAX` the run is elastic (Ray
Train's elastic scaling policy): it trains on as many workers as the cluster holds, between MIN
and MAX, shrinks when a worker is lost and grows when room appears (checked every
`--resize-interval` seconds), each time restarting the worker group from the latest registered
checkpoint. The global batch (`train.batch_size` x MAX images) is kept at every size, each worker
taking its share, so an iteration, the lr schedule and the epochs mean the same images throughout
(docs/ray.md, Elastic training). The run lives in `<storage>/<name>/`:

- `checkpoint_*/checkpoint.pt`: the checkpoints Ray has registered (the last
  `train.keep_checkpoints` are kept);
- `workdir/`: the engine's work dir on rank 0 (`config.toml`, `metrics.jsonl`, `eval.json`, ...);
- `workers/rank<R>-<pid>-<time>.json`: one file per worker per worker-group start (rank,
  world size, batch per worker, pid, node id and IP, the checkpoint it resumed from and its
  iteration);
- `workdir/tensorboard/ray/`: the TensorBoard scalar `ray/world_size` at the iteration each
  worker group started from;
- `result.json`: written by the driver at the end: the final metrics by name (`bbox_mAP`, ...),
  `iterations`, `restarts`, `world_sizes`, `num_workers` and `min_workers` (the flag's MAX and
  MIN) and `checkpoint` (the last registered checkpoint file).

`restarts` counts worker-group starts of this invocation beyond the first (after a failure or a
resize), `world_sizes` lists their sizes in order, both from the rank-0 files in `workers/`
(every group start writes one before training); re-running a finished or interrupted run under
the same name resumes it and is not counted as a restart.

`<storage>` is a path every node can read and write (a shared file system on a real cluster)
or a `pyarrow.fs` URI (`s3://bucket/prefix`, `gs://...`; `orchestration.storage`): then the
packed shards, worker records, checkpoints and `result.json` live there, and rank 0 writes its
work dir locally and copies it to `<run>/workdir` before every report (and fetches it back when
it restarts). Exit status (`vfnet.core.errors.run_main`): 0 on success; 2 with one line
`vfnet: error: ...` on stderr for what the user can fix (bad arguments, configs, data files or
checkpoints, also when a worker raised it; an unreachable cluster); 1 with a traceback otherwise
(training failed for good, or a bug).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration import common
from orchestration.common import CHECKPOINT_NAME, Workers
from orchestration.data import RowGroup, Shards
from orchestration.storage import RunStorage, WorkdirSync, attempt_workdir, checkpoint_uploader
from orchestration.tracking import MlflowRecorder, MlflowTarget, end_train_run, start_train_run
from vfnet.core.config import Config, config_from_dict, config_name
from vfnet.core.errors import ArgumentError
from vfnet.core.optional import require

log = logging.getLogger(__name__)

RESULT_NAME = "result.json"
WORKERS_DIR = "workers"
WORKDIR_NAME = "workdir"
DEFAULT_RESIZE_INTERVAL = 60.0  # seconds; Ray's default elastic_resize_monitor_interval_s
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT = 30.0  # seconds (`_elastic_start_timeout`)


@dataclass(frozen=True)
class WorkerSpec:
    """What every Ray Train worker needs (sent once, pickled): the resolved config and where
    the run lives."""

    config: dict[str, Any]  # Config.to_dict() with absolute data paths
    storage: RunStorage
    name: str  # the run lives in storage.path(name)
    shards: Shards  # the packed training shards ...
    row_groups: list[RowGroup]  # ... and their row groups, listed once by the driver
    global_batch: int  # images per iteration, all workers together, at every worker-group size
    cat_ids: list[int]  # contiguous label -> COCO category id of the training shards
    class_names: list[str]  # contiguous label -> class name of the training shards
    torch_threads: int  # intra-op threads per worker
    mlflow: tuple[str, str] | None = None  # (tracking URI, run id): rank 0 logs the engine's records


# ---------------------------------------------------------------------------------------------
# Worker side (runs inside Ray worker processes)


def write_worker_record(storage: RunStorage, name: str, restored: common.Restored | None,
                        batch_per_worker: int) -> str:
    """Record this worker process's start in `<run>/workers/` (see the module docstring)."""
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
        "started": time.time(),  # seconds since the epoch
        "resumed_from": storage.display(restored.source) if restored is not None else None,
        "iteration": restored.iteration if restored is not None else 0,  # where this group starts
        "batch_per_worker": batch_per_worker,
    }
    path = storage.path(name, WORKERS_DIR, f"rank{rank}-{os.getpid()}-{time.time_ns()}.json")
    if storage.is_local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(path, record)
    return path


def train_loop_per_worker(spec: WorkerSpec) -> dict[str, float]:
    """The `TorchTrainer` loop: the engine on this worker's data shard. Returns the engine's
    final metrics (Ray hands rank 0's to the driver as `Result.return_value`)."""
    import ray.train
    import torch

    from orchestration.data import ShardBatches
    from vfnet.train.engine import Observers, TrainData, train

    torch.set_num_threads(spec.torch_threads)
    storage = spec.storage
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # The global batch is kept at every size (docs/ray.md, Elastic training): the engine's lr
    # (scaled to batch_size x world size), iterations and epochs mean the same images throughout.
    batch_per_worker = spec.global_batch // world_size
    raw = spec.config
    cfg = config_from_dict({**raw, "train": {**raw["train"], "batch_size": batch_per_worker}},
                           source="ray worker config")
    report = common.RayReporter(ray.train.report, upload=checkpoint_uploader(storage.retry),
                                extra={"world_size": float(world_size)})
    sync = None
    with contextlib.ExitStack() as stack:
        if storage.is_local:
            workdir = Path(storage.path(spec.name, WORKDIR_NAME))
        else:  # rank 0 writes locally and copies its files to <run>/workdir before every report
            workdir = stack.enter_context(attempt_workdir(spec.name))
            if rank == 0:
                sync = WorkdirSync(storage, storage.path(spec.name, WORKDIR_NAME), workdir)
                sync.pull()
                report = sync.pushing(report)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vfnet-resume-")))
        restored = common.restore_checkpoint(ray.train.get_checkpoint(), tmp)
        previous = _group_sizes(storage, spec.name)[-1:] if rank == 0 else []  # before this group's
        write_worker_record(storage, spec.name, restored, batch_per_worker)
        if rank == 0:
            _record_group_size(cfg, workdir, previous, world_size, restored.iteration if restored else 0)
        resume_from = restored.file if restored is not None else None
        batches = ShardBatches(spec.shards, spec.row_groups, cfg, spec.cat_ids, rank=rank, world_size=world_size,
                               global_batch=spec.global_batch)
        data = TrainData(batches, batches.iters_per_epoch, spec.class_names)
        observers = Observers(
            report=report,
            record=(MlflowRecorder(*spec.mlflow, cfg.train.batch_size * context.get_world_size())
                    if spec.mlflow is not None and rank == 0 else None),
        )
        # Ray's registered checkpoint is the only resume source: a last.pt the failed attempt
        # wrote after it is not used (recovery is at-least-once from what Ray registered).
        final = train(cfg, workdir, resume=resume_from is not None, data=data, observers=observers,
                      resume_from=resume_from)
        if sync is not None:
            sync.push()
    return final


# ---------------------------------------------------------------------------------------------
# Driver side


def build_trainer(cfg: Config, workers: Workers, *, storage: RunStorage, name: str, shards: Shards,
                  callbacks: Sequence[Any] = (), mlflow_run: tuple[str, str] | None = None,
                  resize_interval: float = DEFAULT_RESIZE_INTERVAL) -> Any:
    """A `TorchTrainer` running `train_loop_per_worker` on `workers` over `shards`, its run in
    `storage.path(name)`. `cfg` must have absolute paths. `mlflow_run`:
    (tracking URI, run id) that rank 0 logs into. `resize_interval`: seconds between Ray's
    checks for room to grow an elastic run (`ScalingConfig.elastic_resize_monitor_interval_s`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.data import iters_per_epoch, row_groups, shard_categories

    cat_ids, class_names = shard_categories(shards)
    groups = row_groups(shards)
    iters_per_epoch(sum(g.rows for g in groups), workers.num_workers, cfg.train.batch_size)  # DatasetError if < 1
    spec = WorkerSpec(
        config=cfg.to_dict(),
        storage=storage,
        name=name,
        shards=shards,
        row_groups=groups,
        global_batch=workers.global_batch(cfg),
        cat_ids=cat_ids,
        class_names=class_names,
        torch_threads=workers.torch_threads,
        mlflow=mlflow_run,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.scaling(), use_gpu=workers.use_gpu,
                                     resources_per_worker=workers.resources(),
                                     placement_strategy=workers.placement_strategy,
                                     elastic_resize_monitor_interval_s=resize_interval),
        run_config=RunConfig(
            name=name,
            storage_path=storage.root,
            storage_filesystem=None if storage.is_local else storage.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks) or None,
        ),
    )


@dataclass(frozen=True)
class TrainPlan:
    """A checked training run, ready for Ray: `cfg` with absolute paths, the workers, the
    run directory `storage/name` and where it is logged (MLflow, optional)."""

    cfg: Config
    workers: Workers
    storage: RunStorage
    name: str
    mlflow: MlflowTarget | None = None
    resize_interval: float = DEFAULT_RESIZE_INTERVAL  # seconds (`build_trainer`)


def plan_training(cfg: Config, workers: Workers, storage: str | Path | RunStorage = common.DEFAULT_STORAGE,
                  name: str | None = None, mlflow: MlflowTarget | None = None,
                  resize_interval: float = DEFAULT_RESIZE_INTERVAL) -> TrainPlan:
    """Check `cfg` against the flags and resolve its paths and the storage (no Ray needed)."""
    workers.check_config(cfg)
    if not resize_interval > 0:
        raise ArgumentError(f"--resize-interval must be > 0 seconds, got {resize_interval:g}")
    return TrainPlan(common.absolute_paths(cfg), workers, RunStorage.parse(storage),
                     name or common.default_name(), mlflow, resize_interval)


def execute_training(plan: TrainPlan) -> dict[str, Any]:
    """Train `plan` on the connected Ray cluster and write `<storage>/<name>/result.json`;
    return its contents (logged to MLflow too with `plan.mlflow`). Raises `TrainingFailed` when
    the run failed for good."""
    from orchestration.data import prepare_train_shards
    from vfnet.data.synth import ensure_synth

    cfg, workers, name, mlflow, storage = plan.cfg, plan.workers, plan.name, plan.mlflow, plan.storage
    run_dir = storage.display(storage.path(name))
    if cfg.data.synth:
        ensure_synth(cfg.data)
    shards = prepare_train_shards(cfg.data, storage.child(common.PACKED_DIR))
    mlflow_run = (mlflow.uri, start_train_run(mlflow, name, run_dir, cfg)) if mlflow else None
    trainer = build_trainer(cfg, workers, storage=storage, name=name, shards=shards, mlflow_run=mlflow_run,
                            resize_interval=plan.resize_interval)
    starts_before = len(_group_sizes(storage, name))
    log.info("training %s on %s worker(s) (%s%s) in %s", name, workers.count_text,
             "GPU" if workers.use_gpu else "CPU", ", elastic" if workers.elastic else "", run_dir)
    try:
        with _elastic_start_timeout(workers):
            result = common.fit_trainer(trainer)
    finally:
        if mlflow_run is not None:
            end_train_run(mlflow, mlflow_run[1], ok=sys.exc_info()[0] is None)
    sizes = _group_sizes(storage, name)[starts_before:]
    restarts = max(0, len(sizes) - 1)
    if result.checkpoint is None or not isinstance(result.return_value, dict):
        raise common.TrainingFailed(f"run {name} finished without metrics or checkpoint")
    summary = dict(result.return_value)
    summary.update(
        restarts=restarts,
        checkpoint=storage.display(f"{result.checkpoint.path}/{CHECKPOINT_NAME}"),
        num_workers=workers.num_workers,
        min_workers=workers.fewest,
        world_sizes=sizes,
        run_dir=run_dir,
    )
    storage.write_json(storage.path(name, RESULT_NAME), summary)
    log.info("run %s done: %s", name, json.dumps(summary))
    return summary


def run_training(cfg: Config, *, num_workers: int, use_gpu: bool = False,
                 cpus_per_worker: float = 0.5, storage: str | Path | RunStorage = common.DEFAULT_STORAGE,
                 name: str | None = None, placement_strategy: str = "PACK",
                 mlflow: MlflowTarget | None = None, min_workers: int | None = None,
                 resize_interval: float = DEFAULT_RESIZE_INTERVAL) -> dict[str, Any]:
    """Python entry: plan and execute a training run on the connected Ray cluster (see
    `execute_training`); `min_workers` (< `num_workers`) trains elastically."""
    workers = Workers(num_workers, use_gpu, cpus_per_worker, placement_strategy, min_workers=min_workers)
    return execute_training(plan_training(cfg, workers, storage, name, mlflow, resize_interval))


@contextlib.contextmanager
def _elastic_start_timeout(workers: Workers) -> Iterator[None]:
    """For an elastic run, Ray Train's wait for a new worker group's resources (the environment
    variable START_TIMEOUT_ENV, Ray's default 60 s) is `ELASTIC_START_TIMEOUT` unless set: after
    a node is lost, Ray's view of the cluster is up to 20 s old (its autoscaling coordinator's
    refresh), so the first restart asks for the old size and waits this long for it before it
    decides again on what is left. Restored afterwards; Ray hands it to its controller."""
    if not workers.elastic or START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = f"{ELASTIC_START_TIMEOUT:g}"
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


def _group_sizes(storage: RunStorage, name: str) -> list[int]:
    """The world size of every worker-group start of the run so far, oldest first (from the
    rank-0 records in `<run>/workers/`)."""
    records = [storage.read_json(storage.path(name, WORKERS_DIR, n))
               for n in storage.list(storage.path(name, WORKERS_DIR)) if n.startswith("rank0-")]
    return [r["world_size"] for r in sorted(records, key=lambda r: r["started"])]


def _record_group_size(cfg: Config, workdir: Path, previous: list[int], world_size: int, iteration: int) -> None:
    """Rank 0 at a worker-group start: log a resize (the group before had `previous[0]`
    workers), and write the size as the TensorBoard scalar `ray/world_size` at `iteration`
    (into `<workdir>/tensorboard/ray`, beside the engine's events; with train.tensorboard)."""
    if previous and previous[0] != world_size:
        log.warning("worker group resized: %d -> %d workers, resuming at iteration %d (global batch "
                    "%d images kept: %d per worker)", previous[0], world_size, iteration,
                    cfg.train.batch_size * world_size, cfg.train.batch_size)
    if cfg.train.tensorboard:
        require("tensorboard", "TensorBoard logging (train.tensorboard = false turns it off)")
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a writer of an earlier group hides its values past this iteration (redone)
        with SummaryWriter(log_dir=str(workdir / "tensorboard" / "ray"), purge_step=iteration) as writer:
            writer.add_scalar("ray/world_size", world_size, global_step=iteration)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `orchestration.train` besides `common.add_common_arguments`."""
    parser.add_argument("--num-workers", default=None, metavar="N|MIN-MAX",
                        help="training workers (DDP ranks); MIN-MAX trains elastically on as many as "
                             "the cluster holds, resized as nodes come and go (docs/ray.md); "
                             "default: the config's train.num_workers")
    parser.add_argument("--resize-interval", type=float, default=DEFAULT_RESIZE_INTERVAL, metavar="SECONDS",
                        help="with MIN-MAX: seconds between checks for room to grow "
                             f"(default {DEFAULT_RESIZE_INTERVAL:g})")
    parser.add_argument("--name", default=None, help="run name (default: the config file's stem); "
                        "re-using a name resumes that run")


def command_run_name(config: str | Path | None) -> str:
    """The run name of a command line without `--name`: the config's name (`config_name`:
    `shapes_tiny` without `--config`), as `vfnet train`'s default work dir, so that the same
    command run again (after a killed driver, say) resumes the run instead of starting a new one."""
    return config_name(config)


def main(argv: Sequence[str] | None = None, prog: str = "python -m orchestration.train") -> int:
    """Entry point; returns the exit status (see the module docstring)."""
    return common.command_main(
        argv, prog=prog, description="Train VFNet on a Ray cluster (Ray Train).", add_arguments=add_arguments,
        plan=lambda args, cfg, workers: plan_training(cfg, workers, args.storage,
                                                      args.name or command_run_name(args.config),
                                                      common.mlflow_target(args), args.resize_interval),
        run=execute_training,
    )


if __name__ == "__main__":
    sys.exit(main())
