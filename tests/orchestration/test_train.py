"""orchestration.train: the Ray Train driver and worker hooks, run on the session's local Ray."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from corrupt import flip_tensor_bit

from orchestration import common
from orchestration import train as otrain
from orchestration.tracking import RUN_DIR_TAG, MlflowTarget
from vfnet.core.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from vfnet.core.errors import CheckpointError
from vfnet.data.synth import CLASSES

pytestmark = pytest.mark.ray


def test_absolute_paths(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(**{"data.val_images": "rel/val", "model.pretrained": ""})
    resolved = common.absolute_paths(cfg, base=tmp_path)
    assert resolved.data.val_images == str(tmp_path.resolve() / "rel" / "val")
    assert resolved.data.train_ann == cfg.data.train_ann  # already absolute
    assert resolved.model.pretrained == "" and resolved.data.train_parquet == ""


def test_reporter_forwards_metrics_and_checkpoint_file(tmp_path: Path) -> None:
    calls = []

    def report(metrics, checkpoint=None):
        content = None
        if checkpoint is not None:  # the temporary directory only lives during the call
            content = (Path(checkpoint.path) / common.CHECKPOINT_NAME).read_bytes()
        calls.append((metrics, content))

    engine_file = tmp_path / "last.pt"
    engine_file.write_bytes(b"weights")
    reporter = common.RayReporter(report)
    reporter({"iteration": 2.0}, engine_file)
    reporter({"iteration": 3.0, "bbox_mAP": 0.5}, None)
    assert calls == [({"iteration": 2.0}, b"weights"), ({"iteration": 3.0, "bbox_mAP": 0.5}, None)]


def test_reporter_never_reports_a_partly_copied_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A worker dying while its checkpoint is copied for Ray (here: the copy fails half way)
    reports nothing, so Ray has nothing partial to upload or register."""
    calls = []
    engine_file = tmp_path / "last.pt"
    engine_file.write_bytes(b"weights" * 100)

    def half_copy(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:300])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common.shutil, "copyfile", half_copy)
    with pytest.raises(OSError):
        common.RayReporter(lambda *a, **k: calls.append(a))({"iteration": 2.0}, engine_file)
    assert calls == []


def test_restore_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path: Path, caplog) -> None:
    """Registered checkpoints a (iteration 1), b (2, corrupt), c (3, no engine file): a worker
    handed c resumes from a, saying it skipped c and b."""
    from ray.train import Checkpoint
    from torch import nn

    from vfnet.core.config import Config

    assert common.restore_checkpoint(None, tmp_path) is None
    run = tmp_path / "run"
    for name, iteration in (("checkpoint_a", 1), ("checkpoint_b", 2)):
        path = save_checkpoint(run / name, model=nn.Linear(2, 2), optimizer=None, iteration=iteration,
                               epoch=0, config=Config())
        path.rename(run / name / common.CHECKPOINT_NAME)
    flip_tensor_bit(run / "checkpoint_b" / common.CHECKPOINT_NAME)
    (run / "checkpoint_c").mkdir()
    (run / "checkpoint_z_partial_upload").mkdir()  # sorts after c: newer than the registered one, ignored
    dest = tmp_path / "dest"
    dest.mkdir()
    restored = common.restore_checkpoint(Checkpoint.from_directory(run / "checkpoint_c"), dest)
    assert restored.file == dest / common.CHECKPOINT_NAME and restored.source.endswith("checkpoint_a")
    assert load_checkpoint(restored.file)["iteration"] == 1
    assert "skipping Ray checkpoint" in caplog.text and "checkpoint_b" in caplog.text
    shutil.rmtree(run / "checkpoint_a")
    with pytest.raises(CheckpointError, match="no registered checkpoint verifies.*checkpoint_c.*checkpoint_b"):
        common.restore_checkpoint(Checkpoint.from_directory(run / "checkpoint_c"), dest)


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "1", "--set", "model.depth=7"], "model.depth"),
    (["--num-workers", "1", "--set", "train.nope=1"], "train.nope"),
    (["--num-workers", "1", "--config", "missing.toml"], "missing.toml"),
    (["--num-workers", "0"], "--num-workers"),
    (["--num-workers", "3-2"], "--num-workers MIN-MAX needs MIN <= MAX, got 3-2"),
    (["--num-workers", "0-2"], "--num-workers must be >= 1, got 0-2"),
    (["--num-workers", "a-b"], "--num-workers must be N or MIN-MAX (whole numbers), got 'a-b'"),
    (["--num-workers", "2-4", "--set", "train.batch_size=2"],
     "global batch of 8 images does not split evenly over 3 worker(s); use a train.batch_size that is a multiple of 3"),
    (["--num-workers", "2-3", "--resize-interval", "0"], "--resize-interval must be > 0"),
    (["--num-workers", "1", "--memory-per-worker", "-1"], "--memory-per-worker"),
    (["--num-workers", "1", "--cpus-per-worker", "0"], "--cpus-per-worker"),
    (["--num-workers", "1", "--use-gpu", "--set", "train.device=cpu"], "--use-gpu"),
    ([], "how many workers? give --num-workers N|MIN-MAX or set train.num_workers in the config"),
    (["--set", 'train.num_workers="two"'], "train.num_workers must be N or MIN-MAX (whole numbers), got 'two'"),
    (["--set", 'train.num_workers="3-2"'], "train.num_workers MIN-MAX needs MIN <= MAX, got 3-2"),
])
def test_bad_input_exits_2_without_starting_ray(argv, message, capsys, monkeypatch) -> None:
    def no_connect(address):
        raise AssertionError("bad input must be reported before connecting to Ray")

    monkeypatch.setattr(common, "connect", no_connect)
    assert otrain.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vfnet: error:") and message in err[0]


@pytest.mark.parametrize("flag, configured, expected", [
    (None, "2-3", (2, 3)), (None, "4", (4, 4)), ("1", "2-3", (1, 1)), ("2-4", "", (2, 4))])
def test_worker_count_from_the_flag_else_the_config(flag, configured, expected, tiny_config) -> None:
    import argparse

    args = argparse.Namespace(num_workers=flag, use_gpu=False, cpus_per_worker=0.5, placement_strategy="PACK",
                              memory_per_worker=0.0)
    workers = common.Workers.from_args(args, tiny_config(**{"train.num_workers": configured}))
    assert (workers.fewest, workers.num_workers) == expected and workers.elastic == (expected[0] < expected[1])


def test_unreachable_cluster_is_one_line(capsys, monkeypatch) -> None:
    def refuse(address):
        raise ConnectionError("Could not find any running Ray instance.\nmore detail")

    monkeypatch.setattr(common, "connect", refuse)
    assert otrain.main(["--num-workers", "1", "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vfnet: error: cannot connect to Ray (127.0.0.1:1): Could not find any running Ray instance."]


def test_two_workers_train_and_resume(tiny_config, tmp_path: Path, ray_session) -> None:
    storage = tmp_path / "runs"
    mlflow = MlflowTarget((tmp_path / "mlruns").as_uri(), "pairs")
    summary = otrain.run_training(tiny_config(), num_workers=2, storage=storage, name="pair", mlflow=mlflow)
    run_dir = storage / "pair"
    assert json.loads((run_dir / otrain.RESULT_NAME).read_text()) == summary
    assert summary["iterations"] == 4 and summary["restarts"] == 0 and summary["num_workers"] == 2
    assert 0.0 <= summary["bbox_mAP"] <= 1.0 and "bbox_mAP_50" in summary
    state = load_checkpoint(Path(summary["checkpoint"]))
    assert int(state["iteration"]) == 4
    assert checkpoint_config(state).model.class_names == list(CLASSES)  # from the shards (issue #19, defect 2)
    records = [json.loads(p.read_text()) for p in (run_dir / otrain.WORKERS_DIR).iterdir()]
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert all(r["world_size"] == 2 and r["resumed_from"] is None for r in records)
    assert len({r["pid"] for r in records}) == 2
    assert (run_dir / otrain.WORKDIR_NAME / "eval.json").is_file()
    # rank 0 alone writes TensorBoard events (every rank has the same work dir path)
    assert len(list((run_dir / otrain.WORKDIR_NAME / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # The same name again, with a longer schedule: resumes from the registered checkpoint,
    # which is not a restart after a failure.
    more = otrain.run_training(tiny_config(**{"train.max_iters": 6}), num_workers=2,
                               storage=storage, name="pair", mlflow=mlflow)
    assert more["iterations"] == 6 and more["restarts"] == 0
    assert int(load_checkpoint(Path(more["checkpoint"]))["iteration"]) == 6
    resumed = [json.loads(p.read_text()) for p in (run_dir / otrain.WORKERS_DIR).iterdir()]
    assert sum(r["resumed_from"] is not None for r in resumed) == 2
    # train.keep_checkpoints = 2 registered checkpoints are kept
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2
    # one MLflow run for both invocations: the first config's parameters, rank 0's records
    check_mlflow_run(mlflow, run_dir, [r for r in _records(run_dir) if r["mode"] == "train"], more["bbox_mAP"])


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / otrain.WORKDIR_NAME / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_mlflow_run(target: MlflowTarget, run_dir: Path, train_records: list[dict], final_map: float) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=target.uri)
    experiment = client.get_experiment_by_name(target.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.tags[RUN_DIR_TAG] == str(run_dir)
    assert run.data.params["train.max_iters"] == "4" and run.data.params["model.depth"] == "18"
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert loss == [(r["iter"], pytest.approx(r["loss"])) for r in train_records]  # steps 1..6, once each
    assert len(client.get_metric_history(run.info.run_id, "train/images_per_s")) == 6
    assert run.data.metrics["eval/bbox_mAP"] == pytest.approx(final_map)
