"""MLflow logging of Ray Train runs and Ray Tune sweeps (`--mlflow-uri`, `--mlflow-experiment`).

- Ray Train: the driver creates (or, for a run resumed by name, finds again by its tag
  `vfnet.run_dir`) one MLflow run named after the Ray run, with the resolved config as
  parameters (dotted keys); rank 0 logs the engine's records into it with MLflow's client (the
  scalars of `vfnet.train.tracking`: `train/loss`, `train/lr`, `train/images_per_s`, `eval/bbox_mAP`,
  ..., step = iteration); the driver marks it FINISHED or FAILED. Work redone after a worker
  failure is logged again at the same steps.
- Ray Tune: Ray's `MLflowLoggerCallback` on the driver, one MLflow run per trial with the trial's
  sampled values as parameters and every report (`loss`, `lr`, `bbox_mAP`, `iteration`, ...) as
  metrics.

Credentials and server options come from MLflow's own environment variables
(`MLFLOW_TRACKING_USERNAME` / `_PASSWORD` / `_TOKEN`, ...) and are never logged here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from vfnet.core.config import Config
from vfnet.core.optional import require
from vfnet.train.tracking import scalars

log = logging.getLogger(__name__)

RUN_DIR_TAG = "vfnet.run_dir"


@dataclass(frozen=True)
class MlflowTarget:
    """Where runs are logged: a tracking URI (`http://host:5000`, `sqlite:///mlflow.db`,
    `file:///path/mlruns`, ...) and an experiment name (created when missing)."""

    uri: str
    experiment: str = "vfnet"


def _client(uri: str) -> Any:
    mlflow = require("mlflow", "MLflow logging (--mlflow-uri)")
    return mlflow.MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def config_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow parameters: dotted key -> value as text."""
    return {f"{section}.{key}": str(value) for section, values in cfg.to_dict().items()
            for key, value in values.items()}


def start_train_run(target: MlflowTarget, name: str, run_dir: str, cfg: Config) -> str:
    """The id of the MLflow run of the Ray run `name` stored in `run_dir`: the existing one when
    the Ray run is resumed by name (its parameters stay those of the first start), else a new
    one with the config as parameters."""
    mlflow = require("mlflow", "MLflow logging (--mlflow-uri)")
    client = _client(target.uri)
    experiment_id = _experiment_id(client, target.experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: continuing run %s in experiment %r", run_id, target.experiment)
        return run_id
    run = client.create_run(experiment_id, run_name=name, tags={RUN_DIR_TAG: run_dir})
    params = [mlflow.entities.Param(k, v) for k, v in config_params(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    log.info("MLflow: run %s in experiment %r", run.info.run_id, target.experiment)
    return run.info.run_id


def end_train_run(target: MlflowTarget, run_id: str, ok: bool) -> None:
    """Mark the run FINISHED or FAILED."""
    _client(target.uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


class MlflowRecorder:
    """An `Observers.record` for rank 0: logs each engine record's scalars to the run `run_id`."""

    def __init__(self, uri: str, run_id: str, images_per_iter: int) -> None:
        self.uri, self.run_id, self.images_per_iter = uri, run_id, images_per_iter
        self._client = None

    def __call__(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if self._client is None:
            self._client = _client(self.uri)
        stamp = int(time.time() * 1000)
        metrics = [Metric(name, value, stamp, int(record["iter"]))
                   for name, value in scalars(record, self.images_per_iter).items()]
        self._client.log_batch(self.run_id, metrics=metrics)


def tune_callback(target: MlflowTarget) -> Any:
    """Ray's MLflow callback for a Tuner's RunConfig: one MLflow run per trial."""
    require("mlflow", "MLflow logging (--mlflow-uri)")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=target.uri, experiment_name=target.experiment,
                                save_artifact=False)
