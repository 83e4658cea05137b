"""The training loop: used alone (`vfnet train`) and inside each Ray Train worker.

A run writes into its work dir (rank 0 only): `config.toml` (the resolved config),
`metrics.jsonl` (one JSON object per log interval and per evaluation), `tensorboard/` (the same
records as TensorBoard scalars, `vfnet.train.tracking`; `train.tensorboard = false` turns it off),
`checkpoints/last.pt` plus `checkpoints/epoch_N.pt` (the newest `train.keep_checkpoints`), and
`eval.json` (the final COCO metrics). Iterations count optimiser steps; `iter` in the records is
the number of steps done.

Checkpoints are written after every `train.checkpoint_interval` iterations, at the end of every
epoch (also kept as `epoch_N.pt`) and at the end of training. Re-running on a work dir that holds
`checkpoints/last.pt` resumes from it: model, optimiser, iteration, RNG states; the lr is a pure
function of the iteration and the data order of (seed, epoch, batch), so the resumed run continues
as the uninterrupted one would have. The step itself is `vfnet.train.step.train_step`.

The engine never imports Ray: a caller plugs in a data source (`TrainData`: its batches, their
number per epoch and the class names) in place of `build_train_loader`, `Observers` of the run
(`report` after each checkpoint and evaluation, `record` for each metrics record) and
`resume_from`, a checkpoint outside the work dir.
"""
from __future__ import annotations

import copy
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from vfnet.core.checkpoint import (
    checkpoint_candidates,
    checkpoint_config,
    load_checkpoint,
    load_newest_valid,
    restore_into,
    save_checkpoint,
)
from vfnet.core.config import Config, save_config
from vfnet.core.device import resolve_device
from vfnet.core.errors import NonFiniteLossError
from vfnet.data import Batch, build_train_loader, build_val_loader
from vfnet.data.loader import train_dataset
from vfnet.evaluate import STAT_NAMES, evaluate, write_json
from vfnet.model import VFNet
from vfnet.train.metrics_log import MetricsLog
from vfnet.train.optim import LrSchedule, build_optimizer
from vfnet.train.step import LOSS_NAMES, train_step
from vfnet.train.tracking import TensorBoardRecorder
from vfnet.train.transfer import init_from

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """A training data source in place of `build_train_loader` (e.g. a Ray worker's share of the packed shards).

    batches(epoch, start_batch): this rank's batches of `epoch` (0-based) from batch
    `start_batch` on (a resumed epoch), at least `iters_per_epoch - start_batch` of them.
    class_names: the names of labels 0..C-1; they fill `model.class_names` of the run's config
    (stored with every checkpoint) when the config has none. Empty: the checkpoints carry no
    names (predictions then name classes `class_i`).
    """

    batches: Callable[[int, int], Iterable[Batch]]
    iters_per_epoch: int
    class_names: Sequence[str]

    def __post_init__(self) -> None:
        if self.iters_per_epoch < 1:
            raise ValueError(f"TrainData.iters_per_epoch must be >= 1, got {self.iters_per_epoch}")


@dataclass(frozen=True)
class Observers:
    """Callbacks that watch a run (a Ray reporter, an experiment tracker); none changes it.

    report(metrics, checkpoint): on EVERY rank after each checkpoint save and evaluation, equally
    often on all; `checkpoint` is, on rank 0, a checkpoint file that exists and holds the
    reported iteration (None on other ranks and after an evaluation without a save).
    record(record): on rank 0 only, with every metrics.jsonl record.
    """

    report: Callable[[dict[str, float], Path | None], None] | None = None
    record: Callable[[dict[str, Any]], None] | None = None


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{s}.{k}" for s in da for k in da[s] if da[s][k] != db[s].get(k)]


class _Meter:
    """Sums of the step statistics over one log interval, kept on the device: the host reads them
    (one copy, `read`) only at log, checkpoint and evaluation times, so the training step never
    waits for the device. Also keeps the first non-finite step's statistics and iteration."""

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # [1 + k]: iteration (0 = none), then stats
        self.reset()

    def reset(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.data_time = 0.0
        self.step_time = 0.0

    def add(self, names: tuple[str, ...], stats: torch.Tensor, it: int, data_time: float,
            step_time: float) -> None:
        """stats: [k] float32 on the device, named by `names`; `it` the 1-based iteration."""
        self.names = names
        self.sums = stats.clone() if self.sums is None else self.sums + stats
        record = torch.cat([stats.new_full((1,), float(it)), stats])
        if self.first_bad is None:
            self.first_bad = torch.zeros_like(record)
        newly_bad = ~torch.isfinite(stats[0]) & (self.first_bad[0] == 0)
        self.first_bad = torch.where(newly_bad, record, self.first_bad)
        self.count += 1
        self.data_time += data_time
        self.step_time += step_time

    def read(self) -> dict[str, float]:
        """Means over the interval (one device-to-host copy); NonFiniteLossError when any step
        since the start had a non-finite loss."""
        if self.sums is None or self.first_bad is None:
            return {}
        values = torch.cat([self.first_bad, self.sums]).tolist()
        k = len(self.names)
        bad, sums = values[:k + 1], values[k + 1:]
        if bad[0]:
            detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, bad[1:]) if n in LOSS_NAMES)
            raise NonFiniteLossError(f"non-finite loss at iteration {int(bad[0])} ({detail}); "
                                     "the last good checkpoint is kept")
        n = max(self.count, 1)
        out = {name: v / n for name, v in zip(self.names, sums)}
        out["time_per_iter"] = (self.data_time + self.step_time) / n
        out["data_time"] = self.data_time / n
        return out


@dataclass
class _Run:
    """Everything the loop needs, built once."""

    cfg: Config
    workdir: Path
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped under torch.distributed
    core: VFNet
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    iters_per_epoch: int
    total_iters: int
    data: TrainData | None
    observers: Observers
    recorders: list[Callable[[dict[str, Any]], None]]  # rank 0 only: metrics.jsonl, TensorBoard, observers.record

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / "checkpoints"

    def record(self, record: dict[str, Any]) -> None:
        """Hand one metrics record to every recorder (none on ranks > 0)."""
        for recorder in self.recorders:
            recorder(record)


def train(
    cfg: Config, workdir: str | Path, *, resume: bool = True, data: TrainData | None = None,
    observers: Observers | None = None, resume_from: str | Path | None = None,
) -> dict[str, float]:
    """Train `cfg` in `workdir`; return the final COCO metrics by name plus `iterations`.

    resume: continue from `resume_from` (a checkpoint file anywhere, which must verify) or the
    newest checkpoint of `workdir/checkpoints` that verifies; False starts over (old files are
    replaced as new ones are written). data: the training batches (default the loader of
    `cfg.data`). Under an initialised torch.distributed group the model is wrapped in DDP, data
    is sharded by rank, and only rank 0 writes files and evaluates (its metrics are broadcast so
    every rank returns them). Raises NonFiniteLossError (the last good checkpoint is kept) when
    the loss is NaN/inf.
    """
    observers = observers or Observers()
    workdir = Path(workdir)
    rank, world_size = _dist_info()
    device = resolve_device(cfg.train.device)

    if cfg.data.synth and data is None:
        _prepare_synth(cfg, rank, world_size)

    if not cfg.model.class_names:
        names = list(data.class_names) if data is not None else train_dataset(cfg.data).class_names
        if len(names) == cfg.model.num_classes:  # stored with the config in every checkpoint
            cfg = copy.deepcopy(cfg)
            cfg.model.class_names = list(names)

    state, source = _find_checkpoint(workdir, resume, resume_from, device)
    _seed_everything(cfg.train.seed)
    core = VFNet.from_config(cfg).to(device)
    if state is None and cfg.model.init_from:
        init_from(core, cfg.model.init_from)
    optimizer = build_optimizer(core, cfg.train, world_size)
    start_iter = 0
    if state is not None:
        diff = _config_diff(checkpoint_config(state, source), cfg)
        if diff:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(diff))
        restore_into(source, state, core, optimizer, rng=True)
        start_iter = state["iteration"]
        log.info("resumed from %s at iteration %d", source, start_iter)
    model: torch.nn.Module = core
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)

    ipe = data.iters_per_epoch if data is not None else len(
        build_train_loader(cfg, 0, rank=rank, world_size=world_size))
    total = cfg.train.max_iters if cfg.train.max_iters > 0 else cfg.train.epochs * ipe
    schedule = LrSchedule.from_config(cfg.train, iters_per_epoch=ipe, total_iters=total,
                                      world_size=world_size)
    recorders: list[Callable[[dict[str, Any]], None]] = []
    tensorboard = None
    if rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, workdir / "config.toml")
        resume_iter = start_iter if state else None
        recorders.append(MetricsLog(workdir / "metrics.jsonl", resume_iter=resume_iter).write)
        if cfg.train.tensorboard:
            tensorboard = TensorBoardRecorder(workdir / "tensorboard", cfg.train.batch_size * world_size,
                                              resume_iter=resume_iter)
            recorders.append(tensorboard)
        if observers.record is not None:
            recorders.append(observers.record)
    run = _Run(cfg, workdir, rank, world_size, device, model, core, optimizer, schedule, ipe, total,
               data, observers, recorders)
    log.info("training %d iterations (%d per epoch, global batch %d) on %s", total, ipe,
             cfg.train.batch_size * world_size, device)
    try:
        return _loop(run, start_iter, source if rank == 0 else None)
    finally:
        if tensorboard is not None:
            tensorboard.close()


def _prepare_synth(cfg: Config, rank: int, world_size: int) -> None:
    """Generate the synthetic data on rank 0 before any rank reads it."""
    from vfnet.data.synth import ensure_synth

    if rank == 0 and ensure_synth(cfg.data):
        log.info("generated the synthetic shapes data in %s", cfg.data.synth_dir)
    if world_size > 1:
        dist.barrier()


def _find_checkpoint(workdir: Path, resume: bool, resume_from: str | Path | None,
                     device: torch.device) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from: `resume_from` (must verify), else with `resume` the
    newest of `workdir/checkpoints` that verifies (newer corrupt ones are skipped, with a
    warning), else none."""
    if resume_from is not None:
        path = Path(resume_from)
        return load_checkpoint(path, map_location=device), path
    if not resume:
        return None, None
    found = load_newest_valid(checkpoint_candidates(workdir / "checkpoints"), map_location=device)
    return found if found is not None else (None, None)


def _batches(run: _Run, epoch: int, start_batch: int) -> Iterable[Batch]:
    if run.data is not None:
        return run.data.batches(epoch, start_batch)
    return build_train_loader(run.cfg, epoch, rank=run.rank, world_size=run.world_size,
                              start_batch=start_batch)


def _loop(run: _Run, start_iter: int, resumed_from: Path | None) -> dict[str, float]:
    """Train from iteration `start_iter` to the end. `resumed_from`: the checkpoint file the run
    resumed from (rank 0; None elsewhere or for a fresh run), the one a finished run reports."""
    cfg = run.cfg
    it = start_iter
    meter = _Meter()
    last_train: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    lr = run.schedule.lr(it)
    bar = tqdm(total=run.total_iters, initial=it, desc="train", dynamic_ncols=True,
               disable=not (run.is_main and sys.stderr.isatty()))
    run.model.train()
    try:
        while it < run.total_iters:
            epoch, start_batch = divmod(it, run.iters_per_epoch)
            expected = min(run.iters_per_epoch, run.total_iters - epoch * run.iters_per_epoch)
            tic = time.perf_counter()
            for batch in _batches(run, epoch, start_batch):
                data_time = time.perf_counter() - tic
                lr = run.schedule.apply(run.optimizer, it)
                names, stats = train_step(run.model, batch.to(run.device, non_blocking=True), run.optimizer,
                                          amp=cfg.train.amp, grad_clip=cfg.train.grad_clip)
                it += 1
                meter.add(names, stats, it, data_time, time.perf_counter() - tic - data_time)
                bar.update(1)
                due_log = it % cfg.train.log_interval == 0 or it == run.total_iters
                due_ckpt = (it % run.iters_per_epoch == 0 or it == run.total_iters
                            or (cfg.train.checkpoint_interval > 0
                                and it % cfg.train.checkpoint_interval == 0))
                due_eval = it == run.total_iters or (
                    cfg.train.eval_interval > 0 and it % cfg.train.eval_interval == 0)
                if due_log:
                    last_train = _log_train(run, it, lr, meter)
                    bar.set_postfix(loss=f"{last_train['loss']:.4f}", lr=f"{lr:.2e}")
                elif due_ckpt or due_eval:
                    meter.read()  # no checkpoint or evaluation after a non-finite loss
                if due_ckpt or due_eval:
                    ckpt = _save(run, it) if due_ckpt else None
                    if due_eval:
                        eval_metrics = _evaluate(run, it)
                    _report(run, it, lr, {**last_train, **eval_metrics}, ckpt)
                if it == run.total_iters or it % run.iters_per_epoch == 0:
                    break
                tic = time.perf_counter()
            done = it - epoch * run.iters_per_epoch
            if done < expected:
                raise RuntimeError(f"the training batches of epoch {epoch} ran out after {done} "
                                   f"of {expected} iterations (iters_per_epoch is wrong)")
    finally:
        bar.close()
    if not eval_metrics:  # resumed a finished run: evaluate again, report the checkpoint resumed from
        # (the work dir may have no checkpoints/: a run resumed from `resume_from`)
        eval_metrics = _evaluate(run, it)
        _report(run, it, lr, eval_metrics, resumed_from)
    return {**{k: eval_metrics[k] for k in STAT_NAMES}, "iterations": float(it)}


def _epoch_of(run: _Run, it: int) -> int:
    """The 1-based epoch that iteration `it` (1-based) belongs to."""
    return (it - 1) // run.iters_per_epoch + 1


def _log_train(run: _Run, it: int, lr: float, meter: _Meter) -> dict[str, float]:
    means = meter.read()
    meter.reset()
    record = {"mode": "train", "iter": it, "epoch": _epoch_of(run, it), "lr": lr, **means}
    run.record(record)
    if run.is_main:
        eta = means["time_per_iter"] * (run.total_iters - it)
        log.info("iter %d/%d epoch %d lr %.3g loss %.4f (cls %.4f init %.4f refine %.4f) "
                 "num_pos %.1f %.3fs/iter eta %s", it, run.total_iters, record["epoch"], lr,
                 means["loss"], means["loss_cls"], means["loss_bbox_init"],
                 means["loss_bbox_refine"], means["num_pos"], means["time_per_iter"],
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
    return {k: float(v) for k, v in record.items() if k != "mode"}


def _save(run: _Run, it: int) -> Path | None:
    """Checkpoint after `it` iterations (rank 0 writes; others get None)."""
    if not run.is_main:
        return None
    epoch_end = it % run.iters_per_epoch == 0
    path = save_checkpoint(
        run.checkpoint_dir, model=run.core, optimizer=run.optimizer, iteration=it,
        epoch=it // run.iters_per_epoch, config=run.cfg,
        epoch_file=it // run.iters_per_epoch if epoch_end else None,
        keep=run.cfg.train.keep_checkpoints,
    )
    log.debug("saved %s at iteration %d", path, it)
    return path


def _evaluate(run: _Run, it: int) -> dict[str, float]:
    """COCO metrics after `it` iterations: computed on rank 0, broadcast to every rank."""
    payload: list[Any] = [None]
    if run.is_main:
        loader, dataset = build_val_loader(run.cfg)
        metrics = evaluate(run.core, loader, dataset, run.device)
        run.record({"mode": "eval", "iter": it, "epoch": _epoch_of(run, it), **metrics})
        write_json(run.workdir / "eval.json", metrics)
        log.info("evaluation at iteration %d: bbox_mAP %.4f, bbox_mAP_50 %.4f", it,
                 metrics["bbox_mAP"], metrics["bbox_mAP_50"])
        payload = [metrics]
    if run.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _report(run: _Run, it: int, lr: float, metrics: dict[str, float], ckpt: Path | None) -> None:
    if run.observers.report is None:
        return
    run.observers.report({**metrics, "iteration": float(it), "lr": lr}, ckpt)
