"""Hyper-parameter sweeps on Ray Tune: `python -m orchestration.tune`.

    python -m orchestration.tune [--config FILE] [--set key=value ...] --num-samples N
        [--max-concurrent K] [--num-workers N] [--use-gpu] [--cpus-per-worker C]
        [--placement-strategy S] [--storage DIR|URI] [--name NAME] [--address ADDR] --out DIR

The search space is the config's `[tune.space]` table: a dotted config key -> {type = "uniform" |
"loguniform", low, high} or {type = "choice", values = [...]}; each sampled value is set with
`vfnet.core.config.set_value`. Every trial is one training run of the engine: with `--num-workers` 1
the engine runs inside the trial itself (its own data loader), with more a `TorchTrainer`
(`orchestration.train.build_trainer`, the packed shards) whose reports reach Tune through
`TuneReportCallback`. ASHA (`tune.grace_period`, `tune.reduction_factor`) stops trials whose
`tune.metric` (maximised) lags behind at a rung; its time axis is the training iteration, and a
rung is `grace_period * reduction_factor^k` evaluations of `train.eval_interval` iterations
(set `train.eval_interval` > 0, or ASHA only sees the final evaluation).

Writes into `--out`: `results.parquet` (one row a trial: trial_id, the sampled parameters by
dotted key, `final_<metric>`, `best_<metric>`, `iterations`, `status` = completed | stopped |
error), `best.toml` (the base config with the parameters of the trial with the highest final
metric; `vfnet train --config best.toml` accepts it) and `<metric>_vs_params.png` (the final
metric against each searched parameter, e.g. loss.alpha and loss.gamma).
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration import common
from orchestration.common import Workers
from orchestration.data import Shards
from orchestration.search import build_search, check_search, keep_checkpoints, trial_base
from orchestration.storage import RunStorage, WorkdirSync, attempt_workdir
from orchestration.tracking import MlflowTarget, tune_callback
from orchestration.train import WORKDIR_NAME, build_trainer
from vfnet.core.atomic import atomic_write
from vfnet.core.config import Config, config_from_dict, set_value, validate
from vfnet.core.errors import ArgumentError, ConfigError

log = logging.getLogger(__name__)

FINISHED = "finished"  # set in the last report of a trial that trained to the end
_DISTRIBUTIONS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "choice": ("values",)}


# ---------------------------------------------------------------------------------------------
# Search space


def build_search_space(space: dict[str, dict[str, Any]], base: Config) -> dict[str, Any]:
    """Tune distributions for `tune.space` (see the module docstring). Each key must name a
    config field that accepts the distribution's values. Raises ConfigError naming the key."""
    from ray import tune

    if not space:
        raise ConfigError("tune.space is empty: nothing to sweep")
    params: dict[str, Any] = {}
    for key, spec in space.items():
        where = f"tune.space.{key}"
        if not isinstance(spec, dict) or spec.get("type") not in _DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected a table with type = one of {sorted(_DISTRIBUTIONS)}")
        fields = _DISTRIBUTIONS[spec["type"]]
        extra = set(spec) - {"type", *fields}
        if extra or any(f not in spec for f in fields):
            raise ConfigError(f"{where}: a {spec['type']} distribution takes exactly {', '.join(fields)}")
        if spec["type"] == "choice":
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: values must be a non-empty list")
            samples = values
            params[key] = tune.choice(values)
        else:
            low, high = spec["low"], spec["high"]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            if not numbers or not low < high or (spec["type"] == "loguniform" and low <= 0):
                raise ConfigError(f"{where}: need numbers low < high (low > 0 for loguniform), "
                                  f"got low={low!r}, high={high!r}")
            samples = [float(low), float(high)]
            params[key] = (tune.uniform if spec["type"] == "uniform" else tune.loguniform)(low, high)
        for value in samples:  # the key exists and takes values of this type
            apply_params(base, {key: value}, where)
    return params


def apply_params(base: Config, params: dict[str, Any], source: str = "tune trial") -> Config:
    """A validated copy of `base` with each dotted key of `params` set."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        try:
            set_value(cfg, key, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    validate(cfg, source)
    return cfg


def asha_milestone(cfg: Config) -> int:
    """Iterations per ASHA time unit: one evaluation interval, or the whole run when only the
    final evaluation happens (then `max_iters`, or a large bound when the run is in epochs)."""
    if cfg.train.eval_interval > 0:
        return cfg.train.eval_interval
    return cfg.train.max_iters if cfg.train.max_iters > 0 else 1 << 30


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (pickled once with the trainable)."""

    base: dict[str, Any]  # the base Config.to_dict(), absolute paths
    workers: Workers  # per trial
    shards: Shards | None  # packed training shards (TorchTrainer trials only)
    storage: RunStorage  # the sweep's run storage


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: the engine with `params` applied, reporting to Tune; ends with a report of
    the final metrics flagged `finished`."""
    import ray.tune

    cfg = apply_params(config_from_dict(setup.base, source="tune base config"), params)
    context = ray.tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    if setup.workers.num_workers > 1:
        from ray.tune.integration.ray_train import TuneReportCallback

        assert setup.shards is not None
        # the trial's TorchTrainer run: <trial dir>/train, in the sweep's storage
        storage, name = RunStorage.parse(trial_dir), "train"
        if not setup.storage.is_local:
            storage, name = setup.storage, f"{context.get_experiment_name()}/{trial_dir.name}/train"
        trainer = build_trainer(cfg, setup.workers, storage=storage, name=name, shards=setup.shards,
                                callbacks=[TuneReportCallback()])
        final = common.fit_trainer(trainer).return_value
    else:
        import torch

        from vfnet.train.engine import Observers, train

        torch.set_num_threads(setup.workers.torch_threads)
        # the engine's work dir is node-local; all but its checkpoints/ is kept in the trial dir
        trial = RunStorage.parse(trial_dir)
        with (attempt_workdir(f"{context.get_experiment_name()}/{trial_dir.name}") as workdir,
              tempfile.TemporaryDirectory(prefix="vfnet-resume-") as tmp):
            sync = WorkdirSync(trial, trial.path(WORKDIR_NAME), workdir)
            sync.pull()
            restored = common.restore_checkpoint(ray.tune.get_checkpoint(), Path(tmp))
            resume_from = restored.file if restored is not None else None
            observers = Observers(report=sync.pushing(common.RayReporter(ray.tune.report)))
            final = train(cfg, workdir, resume=resume_from is not None, observers=observers, resume_from=resume_from)
            sync.push()
    ray.tune.report({**final, "iteration": final["iterations"], FINISHED: 1.0})


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep, ready for Ray: the base config (absolute paths), its Tune search space,
    the trials' workers and where the results go."""

    cfg: Config
    space: dict[str, Any]  # build_search_space(cfg.tune.space, cfg)
    workers: Workers
    num_samples: int
    max_concurrent: int  # 0: as many as resources allow
    out: Path
    storage: RunStorage
    name: str
    mlflow: MlflowTarget | None = None  # one MLflow run per trial


def plan_sweep(cfg: Config, workers: Workers, *, num_samples: int, out: str | Path,
               max_concurrent: int = 0, storage: str | Path = common.DEFAULT_STORAGE,
               name: str | None = None, mlflow: MlflowTarget | None = None) -> SweepPlan:
    """Check the sweep's flags, `cfg` against them and its search space (no Ray cluster needed);
    ArgumentError / ConfigError naming the flag or key."""
    if num_samples < 1:
        raise ArgumentError(f"--num-samples must be >= 1, got {num_samples}")
    if max_concurrent < 0:
        raise ArgumentError(f"--max-concurrent must be >= 0, got {max_concurrent}")
    workers.check_config(cfg)
    check_search(cfg, workers.num_workers)
    cfg = trial_base(common.absolute_paths(cfg))
    return SweepPlan(cfg, build_search_space(cfg.tune.space, cfg), workers, num_samples, max_concurrent,
                     Path(out), RunStorage.parse(storage),
                     name or common.default_name().replace("vfnet-", "vfnet-tune-", 1), mlflow)


def execute_sweep(plan: SweepPlan) -> list[dict[str, Any]]:
    """Run the sweep on the connected Ray cluster and write `--out`'s files; returns the rows
    of results.parquet."""
    from ray import tune

    from orchestration.data import prepare_train_shards
    from vfnet.data.synth import ensure_synth

    cfg, workers = plan.cfg, plan.workers
    if cfg.data.synth:
        ensure_synth(cfg.data)
    shards = None
    if workers.num_workers > 1:
        shards = prepare_train_shards(cfg.data, plan.storage.child(common.PACKED_DIR))
    setup = TrialSetup(base=cfg.to_dict(), workers=workers, shards=shards, storage=plan.storage)
    # A trial driving a TorchTrainer only waits for it; a trial that trains holds a worker's share.
    resources = {"CPU": 0.1} if workers.num_workers > 1 else workers.resources()
    search_alg, scheduler = build_search(cfg, plan.space, asha_milestone(cfg))
    # Checkpoint-only reports come before the first evaluation and lack the metric: the
    # schedulers and searchers skip them, and Tune's strict check (which would fail the trial)
    # is turned off for them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
    tuner = tune.Tuner(
        trainable,
        param_space=plan.space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode="max", scheduler=scheduler,
                                    search_alg=search_alg, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent or None),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage.root,
            storage_filesystem=None if plan.storage.is_local else plan.storage.fs,
            # the engine's files in the trial dir (metrics.jsonl, TensorBoard, ...) go to storage
            sync_config=tune.SyncConfig(sync_artifacts=not plan.storage.is_local),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints(cfg)),
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[tune_callback(plan.mlflow)] if plan.mlflow else None,
        ),
    )
    grid = tuner.fit()
    keys = list(plan.space)
    rows = [trial_row(result, keys, cfg.tune.metric) for result in grid]
    plan.out.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, cfg, keys, cfg.tune.metric, plan.out)
    return rows


def run_sweep(cfg: Config, *, num_samples: int, out: str | Path, max_concurrent: int = 0,
              num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: float = 0.5,
              placement_strategy: str = "PACK", storage: str | Path = common.DEFAULT_STORAGE,
              name: str | None = None, mlflow: MlflowTarget | None = None) -> list[dict[str, Any]]:
    """Python entry: plan and execute a sweep on the connected Ray cluster (see `execute_sweep`)."""
    workers = Workers(num_workers, use_gpu, cpus_per_worker, placement_strategy)
    return execute_sweep(plan_sweep(cfg, workers, num_samples=num_samples, out=out,
                                    max_concurrent=max_concurrent, storage=storage, name=name,
                                    mlflow=mlflow))


def trial_row(result: Any, keys: list[str], metric: str) -> dict[str, Any]:
    """One results.parquet row from a Tune `Result`."""
    frame = result.metrics_dataframe
    values = frame[metric].dropna() if frame is not None and metric in frame else []
    last = result.metrics or {}
    row: dict[str, Any] = {"trial_id": last.get("trial_id", result.path.rsplit("/", 1)[-1])}
    row.update({key: result.config.get(key) for key in keys})
    row[f"final_{metric}"] = float(values.iloc[-1]) if len(values) else math.nan
    row[f"best_{metric}"] = float(values.max()) if len(values) else math.nan
    row["iterations"] = int(last.get("iteration", 0))
    if result.error is not None:
        row["status"] = "error"
    else:
        row["status"] = "completed" if last.get(FINISHED) else "stopped"
    return row


def write_outputs(rows: list[dict[str, Any]], base: Config, keys: list[str], metric: str,
                  out: Path) -> None:
    """results.parquet, best.toml and the plot (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vfnet.core.config import save_config

    with atomic_write(out / "results.parquet") as fh:
        pq.write_table(pa.Table.from_pylist(rows), fh)
    scored = [r for r in rows if not math.isnan(r[f"final_{metric}"])]
    if scored:
        best = max(scored, key=lambda r: r[f"final_{metric}"])
        save_config(apply_params(base, {k: best[k] for k in keys}, "best trial"), out / "best.toml")
        log.info("best trial %s: %s = %.4f with %s", best["trial_id"], metric,
                 best[f"final_{metric}"], {k: best[k] for k in keys})
    else:
        log.warning("no trial reported %s: best.toml not written", metric)
    plot_sweep(rows, keys, metric, out / f"{metric}_vs_params.png")


def plot_sweep(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> None:
    """One panel per searched parameter: the final metric of every trial, marked by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in keys if all(isinstance(r[k], (int, float)) for r in rows)]
    keys = sorted(numeric, key=lambda k: (k not in ("loss.alpha", "loss.gamma"), k)) or keys[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False,
                             sharey=True)
    styles = {"completed": ("o", "C0"), "stopped": ("x", "C1"), "error": ("s", "C3")}
    for ax, key in zip(axes[0], keys):
        for status, (marker, colour) in styles.items():
            points = [(r[key], r[f"final_{metric}"]) for r in rows if r["status"] == status]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, marker=marker, color=colour, label=status)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final {metric}")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"Ray Tune sweep: {len(rows)} trials")
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `orchestration.tune` besides `common.add_common_arguments`."""
    parser.add_argument("--num-samples", type=int, required=True, help="trials")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials running at once (default 0: as many as resources allow)")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="training workers per trial (> 1: a TorchTrainer per trial)")
    parser.add_argument("--name", default=None, help="experiment name (default: vfnet-tune-<time>-<pid>)")
    parser.add_argument("--out", type=Path, required=True, help="directory for results.parquet, "
                        "best.toml and the plot")


def main(argv: Sequence[str] | None = None, prog: str = "python -m orchestration.tune") -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 1 sweep failed or a bug)."""
    return common.command_main(
        argv, prog=prog, description="Sweep VFNet loss hyper-parameters on Ray Tune.", add_arguments=add_arguments,
        plan=lambda args, cfg, workers: plan_sweep(
            cfg, workers, num_samples=args.num_samples, out=args.out, max_concurrent=args.max_concurrent,
            storage=args.storage, name=args.name, mlflow=common.mlflow_target(args)),
        run=execute_sweep,
    )


if __name__ == "__main__":
    sys.exit(main())
