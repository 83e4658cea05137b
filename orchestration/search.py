"""The search algorithm and scheduler of a sweep: `tune.search` = random | tpe | pbt.

- `random` (default): Tune's random sampling of `tune.space`, ASHA stops lagging trials.
- `tpe`: Optuna's TPE sampler through Ray Tune's `OptunaSearch` (seeded with `train.seed`): each
  new trial's values are proposed from the finished and running trials' results; ASHA as for
  random.
- `pbt`: population-based training. The `--num-samples` trials start from random draws of
  `tune.space`; every `tune.perturbation_interval` evaluations a trial in the bottom quarter of
  `tune.metric` continues from the checkpoint of one in the top quarter (exploit) with its values
  of `train.lr` and the `loss.*_weight` keys of `tune.space` perturbed (x0.8 / x1.2, or redrawn
  from the space with probability 0.25: explore); the other keys of the space keep the values
  copied from the trial it exploited. PBT replaces ASHA; trials checkpoint at every evaluation
  (`train.checkpoint_interval` is set to `train.eval_interval`), Tune keeps all their
  checkpoints (`train.keep_checkpoints` is not applied), and it needs `--num-workers` 1.

Ray is imported only inside the functions.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from vfnet.core.config import Config
from vfnet.core.errors import ArgumentError, ConfigError
from vfnet.core.optional import require

log = logging.getLogger(__name__)

SEARCHES = ("random", "tpe", "pbt")


def pbt_keys(space: dict[str, dict[str, Any]]) -> list[str]:
    """The keys of `tune.space` that PBT perturbs: `train.lr` and the `loss.*_weight` keys."""
    return [k for k in space if k == "train.lr" or (k.startswith("loss.") and k.endswith("_weight"))]


def check_search(cfg: Config, num_workers: int) -> None:
    """Reject a search set-up that cannot run (ConfigError / ArgumentError naming the key or
    flag, MissingPackageError without optuna for tpe) before anything starts."""
    search = cfg.tune.search
    if search == "tpe":
        require("optuna", "tune.search = 'tpe'")
    if search != "pbt":
        return
    if not pbt_keys(cfg.tune.space):
        raise ConfigError("tune.search = 'pbt' perturbs train.lr and the loss.*_weight keys: "
                          "tune.space has none of them")
    if cfg.train.eval_interval <= 0:
        raise ConfigError("tune.search = 'pbt' needs train.eval_interval > 0 (it compares trials "
                          "at evaluations)")
    if num_workers != 1:
        raise ArgumentError(f"tune.search = 'pbt' runs the engine inside each trial: --num-workers "
                            f"must be 1, got {num_workers}")


def trial_base(cfg: Config) -> Config:
    """The base config of the trials: under PBT a checkpoint at every evaluation (a trial can
    only be continued from a checkpoint)."""
    if cfg.tune.search != "pbt" or cfg.train.checkpoint_interval == cfg.train.eval_interval:
        return cfg
    log.info("tune.search = 'pbt': train.checkpoint_interval set to train.eval_interval = %d",
             cfg.train.eval_interval)
    cfg = copy.deepcopy(cfg)
    cfg.train.checkpoint_interval = cfg.train.eval_interval
    return cfg


def keep_checkpoints(cfg: Config) -> int | None:
    """Checkpoints Tune keeps per trial: `train.keep_checkpoints`, but all under PBT (an exploit
    continues from the source trial's checkpoint of that moment, which may no longer be its
    newest by the time the target restores it)."""
    return None if cfg.tune.search == "pbt" else cfg.train.keep_checkpoints


def build_search(cfg: Config, space: dict[str, Any], unit: int) -> tuple[Any, Any]:
    """(search algorithm or None for random sampling, scheduler) for `tune.search`; `space` is
    the Tune search space of `tune.space`, `unit` the iterations per evaluation."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if cfg.tune.search == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="iteration",
            perturbation_interval=cfg.tune.perturbation_interval * unit,
            hyperparam_mutations={k: space[k] for k in pbt_keys(cfg.tune.space)},
            require_attrs=False,  # checkpoint-only reports before the first evaluation lack the metric
            synch=cfg.tune.pbt_synch,
        )
        return None, scheduler
    scheduler = ASHAScheduler(time_attr="iteration", grace_period=cfg.tune.grace_period * unit,
                              reduction_factor=cfg.tune.reduction_factor,
                              max_t=max(cfg.tune.grace_period * unit + 1, 1 << 30))
    if cfg.tune.search == "tpe":
        from orchestration.optuna_search import MetricOnlyOptunaSearch

        return MetricOnlyOptunaSearch(seed=cfg.train.seed), scheduler
    return None, scheduler
