"""orchestration.tune: search space, output files, and real sweeps on the session's local Ray."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestration import common
from orchestration import tune as otune
from orchestration.common import Workers
from orchestration.search import build_search, pbt_keys
from orchestration.tracking import MlflowTarget
from vfnet.cli import main
from vfnet.core.config import Config, load_config
from vfnet.core.errors import ArgumentError, ConfigError

pytestmark = pytest.mark.ray

SPACE = {"loss.alpha": {"type": "uniform", "low": 0.25, "high": 1.0},
         "loss.gamma": {"type": "uniform", "low": 1.0, "high": 3.0}}


def test_default_space_builds() -> None:
    from ray.tune.search.sample import Categorical, Float

    cfg = Config()
    space = otune.build_search_space(cfg.tune.space, cfg)
    assert set(space) == {"loss.alpha", "loss.gamma", "loss.init_weight", "loss.refine_weight", "train.lr"}
    assert all(isinstance(d, Float) for d in space.values())
    assert (space["loss.alpha"].lower, space["loss.alpha"].upper) == (0.25, 1.0)
    assert (space["train.lr"].lower, space["train.lr"].upper) == (0.0025, 0.04)
    choice = otune.build_search_space({"model.depth": {"type": "choice", "values": [18, 34]}}, cfg)
    assert isinstance(choice["model.depth"], Categorical)


@pytest.mark.parametrize("space, message", [
    ({}, "empty"),
    ({"loss.alfa": {"type": "uniform", "low": 0.1, "high": 1.0}}, "loss.alfa"),
    ({"loss.alpha": {"type": "normal", "low": 0.1, "high": 1.0}}, "type"),
    ({"loss.alpha": {"type": "uniform", "low": 1.0, "high": 0.5}}, "low < high"),
    ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}}, "low > 0"),
    ({"loss.alpha": {"type": "uniform", "low": 0.1}}, "exactly low, high"),
    ({"model.depth": {"type": "choice", "values": []}}, "non-empty"),
    ({"model.depth": {"type": "choice", "values": ["deep"]}}, "model.depth"),
    ({"model.depth": {"type": "choice", "values": [18, 19]}}, "model.depth"),  # 19 fails validation
])
def test_bad_space_names_the_key(space, message) -> None:
    with pytest.raises(ConfigError, match=message):
        otune.build_search_space(space, Config())


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "0"], "--num-samples"),
    (["--num-samples", "2", "--max-concurrent", "-1"], "--max-concurrent"),
    (["--num-samples", "2", "--num-workers", "0"], "--num-workers"),
    (["--num-samples", "2", "--set", 'tune.space={"loss.beta" = {type = "uniform", low = 0, high = 1}}'],
     "loss.beta"),
])
def test_bad_input_exits_2_without_starting_ray(argv, message, tmp_path, capsys, monkeypatch) -> None:
    def no_connect(address):
        raise AssertionError("bad input must be reported before connecting to Ray")

    monkeypatch.setattr(common, "connect_or_raise", no_connect)  # what run_on_ray connects with
    assert otune.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vfnet: error:") and message in err[0]


def test_write_outputs(tmp_path: Path) -> None:
    base = Config()
    rows = [
        {"trial_id": "a", "loss.alpha": 0.3, "loss.gamma": 1.5, "final_bbox_mAP": 0.2,
         "best_bbox_mAP": 0.25, "iterations": 8, "status": "completed"},
        {"trial_id": "b", "loss.alpha": 0.9, "loss.gamma": 2.5, "final_bbox_mAP": 0.4,
         "best_bbox_mAP": 0.4, "iterations": 8, "status": "completed"},
        {"trial_id": "c", "loss.alpha": 0.5, "loss.gamma": 2.0, "final_bbox_mAP": 0.1,
         "best_bbox_mAP": 0.1, "iterations": 4, "status": "stopped"},
        {"trial_id": "d", "loss.alpha": 0.6, "loss.gamma": 1.2, "final_bbox_mAP": math.nan,
         "best_bbox_mAP": math.nan, "iterations": 0, "status": "error"},
    ]
    otune.write_outputs(rows, base, ["loss.alpha", "loss.gamma"], "bbox_mAP", tmp_path)
    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [r["trial_id"] for r in table] == ["a", "b", "c", "d"]
    assert table[1] == rows[1]
    best = load_config(tmp_path / "best.toml")
    assert (best.loss.alpha, best.loss.gamma) == (0.9, 2.5)
    assert best.loss.init_weight == base.loss.init_weight
    assert (tmp_path / "bbox_mAP_vs_params.png").stat().st_size > 1000


def _sweep_config(tiny_config) -> Config:
    cfg = tiny_config(**{"train.eval_interval": 2})
    cfg.tune.space = SPACE
    return cfg


def _check_sweep(rows: list[dict], out: Path, num_samples: int) -> None:
    assert len(rows) == num_samples
    for row in rows:
        assert row["status"] == "completed" and row["iterations"] == 4
        assert 0.25 <= row["loss.alpha"] <= 1.0 and 1.0 <= row["loss.gamma"] <= 3.0
        assert row["best_bbox_mAP"] >= row["final_bbox_mAP"] >= 0.0
    assert pq.read_table(out / "results.parquet").num_rows == num_samples
    best = load_config(out / "best.toml")
    top = max(rows, key=lambda r: r["final_bbox_mAP"])
    assert (best.loss.alpha, best.loss.gamma) == (top["loss.alpha"], top["loss.gamma"])
    assert (out / "bbox_mAP_vs_params.png").is_file()


def test_sweep_engine_in_trial(tiny_config, tmp_path: Path, ray_session) -> None:
    out = tmp_path / "out"
    mlflow = MlflowTarget((tmp_path / "mlruns").as_uri(), "sweeps")
    rows = otune.run_sweep(_sweep_config(tiny_config), num_samples=2, out=out, max_concurrent=2,
                           storage=tmp_path / "runs", name="sweep1", mlflow=mlflow)
    _check_sweep(rows, out, 2)
    # each trial's work dir reached the sweep's storage, without the engine's checkpoints/
    workdirs = sorted((tmp_path / "runs" / "sweep1").glob("*/workdir"))
    assert len(workdirs) == 2
    for workdir in workdirs:
        assert (workdir / "metrics.jsonl").is_file() and not (workdir / "checkpoints").exists()
    # Ray's MLflow callback: one MLflow run per trial, its sampled values and reported metrics
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    by_alpha = {float(run.data.params["loss.alpha"]): run for run in runs}
    assert sorted(by_alpha) == sorted(row["loss.alpha"] for row in rows)
    for row in rows:
        run = by_alpha[row["loss.alpha"]]
        assert float(run.data.params["loss.gamma"]) == row["loss.gamma"]
        assert run.data.metrics["bbox_mAP"] == pytest.approx(row["final_bbox_mAP"])
        assert run.data.metrics["iteration"] == 4 and run.info.status == "FINISHED"


def test_sweep_torch_trainer_per_trial(tiny_config, tmp_path: Path, ray_session) -> None:
    out = tmp_path / "out"
    rows = otune.run_sweep(_sweep_config(tiny_config), num_samples=1, out=out, num_workers=2,
                           storage=tmp_path / "runs", name="sweep2")
    _check_sweep(rows, out, 1)
    # the trial drove a 2-worker TorchTrainer whose run lives in the trial directory
    records = list((tmp_path / "runs" / "sweep2").glob("*/train/workers/rank*.json"))
    assert len(records) == 2


def test_asha_milestone(tiny_config) -> None:
    assert otune.asha_milestone(tiny_config(**{"train.eval_interval": 3})) == 3
    assert otune.asha_milestone(tiny_config(**{"train.eval_interval": 0, "train.max_iters": 7})) == 7


class _FakeResult:
    """The parts of a Tune `Result` that trial_row reads."""

    def __init__(self, reports: list[dict], config: dict, error: Exception | None = None) -> None:
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame(reports) if reports else None
        self.metrics = reports[-1] if reports else {}
        self.config = config
        self.error = error
        self.path = "/runs/sweep/run_trial_abc_00007"


def test_trial_row_status_and_metrics() -> None:
    config = {"loss.alpha": 0.5, "loss.gamma": 2.0}
    early = [{"iteration": 2, "trial_id": "t1"},  # a checkpoint report before any evaluation
             {"iteration": 4, "bbox_mAP": 0.3, "trial_id": "t1"},
             {"iteration": 6, "bbox_mAP": 0.2, "trial_id": "t1"}]
    row = otune.trial_row(_FakeResult(early, config), ["loss.alpha", "loss.gamma"], "bbox_mAP")
    assert row == {"trial_id": "t1", "loss.alpha": 0.5, "loss.gamma": 2.0, "final_bbox_mAP": 0.2,
                   "best_bbox_mAP": 0.3, "iterations": 6, "status": "stopped"}
    done = early + [{"iteration": 8, "bbox_mAP": 0.35, otune.FINISHED: 1.0, "trial_id": "t1"}]
    row = otune.trial_row(_FakeResult(done, config), ["loss.alpha"], "bbox_mAP")
    assert (row["status"], row["final_bbox_mAP"], row["best_bbox_mAP"]) == ("completed", 0.35, 0.35)
    row = otune.trial_row(_FakeResult([], config, RuntimeError("boom")), ["loss.alpha"], "bbox_mAP")
    assert row["status"] == "error" and math.isnan(row["final_bbox_mAP"])
    assert row["trial_id"] == "run_trial_abc_00007" and row["iterations"] == 0


@pytest.mark.parametrize("overrides, num_workers, error, message", [
    ({"tune.search": "grid"}, 1, ConfigError, "tune.search = 'grid' is invalid"),
    ({"tune.search": "pbt", "train.eval_interval": 2, "tune.space": SPACE}, 1, ConfigError,
     "tune.space has none of them"),
    ({"tune.search": "pbt", "train.eval_interval": 0}, 1, ConfigError, "train.eval_interval > 0"),
    ({"tune.search": "pbt", "train.eval_interval": 2}, 2, ArgumentError, "--num-workers must be 1"),
])
def test_search_set_up_checked_before_starting(tiny_config, tmp_path, overrides, num_workers, error,
                                               message) -> None:
    with pytest.raises(error, match=message):
        cfg = tiny_config(**overrides)
        otune.plan_sweep(cfg, Workers(num_workers), num_samples=2, out=tmp_path)


def test_pbt_perturbs_lr_and_loss_weights_only(tiny_config) -> None:
    from ray.tune.schedulers import PopulationBasedTraining

    cfg = otune.trial_base(tiny_config(**{"tune.search": "pbt", "train.eval_interval": 2}))
    assert cfg.train.checkpoint_interval == 2  # a checkpoint at every evaluation
    assert pbt_keys(cfg.tune.space) == ["loss.init_weight", "loss.refine_weight", "train.lr"]
    searcher, scheduler = build_search(cfg, otune.build_search_space(cfg.tune.space, cfg), 2)
    assert searcher is None and isinstance(scheduler, PopulationBasedTraining)
    assert sorted(scheduler._hyperparam_mutations) == ["loss.init_weight", "loss.refine_weight", "train.lr"]
    assert scheduler._perturbation_interval == 4  # tune.perturbation_interval (2) evaluations of 2 iterations


def test_tpe_sweep_through_vfnet_tune(tiny_config_toml, tmp_path: Path, ray_session) -> None:
    """`vfnet tune` on the session's Ray (connect() finds it initialised): Optuna's TPE proposes
    the trials, exit status 0."""
    config = tiny_config_toml(tmp_path / "tpe.toml", **{"train.eval_interval": 2, "tune.search": "tpe",
                                                         "tune.space": SPACE})
    out = tmp_path / "out"
    assert main(["tune", "--config", str(config), "--num-samples", "2", "--max-concurrent", "1",
                 "--storage", str(tmp_path / "runs"), "--name", "tpe", "--out", str(out)]) == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    _check_sweep(rows, out, 2)
    searcher_state = list((tmp_path / "runs" / "tpe").glob("searcher-state-*.pkl"))
    assert searcher_state, "Tune saved no searcher state: no search algorithm ran"


def test_pbt_sweep_exploits_and_explores(tiny_config, tmp_path: Path, ray_session) -> None:
    """Synchronous PBT, so that the trials are compared whatever their timing (asynchronous PBT
    compared nothing on a loaded machine: one trial had finished before the other reported)."""
    cfg = tiny_config(**{"train.eval_interval": 1, "train.max_iters": 4, "tune.search": "pbt",
                         "tune.perturbation_interval": 2, "tune.pbt_synch": True})
    cfg.tune.space = {"train.lr": {"type": "loguniform", "low": 0.005, "high": 0.04},
                      "loss.alpha": SPACE["loss.alpha"]}
    out = tmp_path / "out"
    rows = otune.run_sweep(cfg, num_samples=2, out=out, max_concurrent=2, storage=tmp_path / "runs", name="pbt")
    assert len(rows) == 2 and all(r["status"] == "completed" and r["iterations"] == 4 for r in rows)
    # every perturbation is logged: (target trial, source trial, iterations, ..., old config, new config)
    lines = (tmp_path / "runs" / "pbt" / "pbt_global.txt").read_text().splitlines()
    assert lines
    for line in lines:
        old, new = json.loads(line)[-2:]
        assert new["loss.alpha"] == old["loss.alpha"]  # copied from the exploited trial, not perturbed
        assert 0.005 * 0.8 - 1e-12 <= new["train.lr"] <= 0.04 * 1.2 + 1e-12
    assert (out / "best.toml").is_file()
