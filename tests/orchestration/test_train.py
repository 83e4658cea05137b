"""orchestration.train: the Ray Train driver and worker hooks, run on the session's local Ray."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from corrupt import flip_tensor_bit
from pyarrow.fs import FileSelector, FileType
from ray_cluster import load_run_checkpoint, metrics_records, worker_records

from orchestration import common
from orchestration import train as otrain
from orchestration.storage import RunStorage
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


def test_two_workers_train_and_resume(tiny_config, s3_storage: str, tmp_path: Path, ray_session) -> None:
    """A 2-worker run stored on the S3 server (packed shards, checkpoints, worker records, work
    dir, result.json; MLflow beside it), then the same name again with a longer schedule: it
    resumes from the registered checkpoint (the work dir fetched back from the store), which is
    not a restart after a failure."""
    storage = RunStorage.parse(s3_storage)
    run = storage.child("pair")
    mlflow = MlflowTarget((tmp_path / "mlruns").as_uri(), "pairs")
    summary = otrain.run_training(tiny_config(), num_workers=2, storage=s3_storage, name="pair", mlflow=mlflow)
    assert run.read_json(run.path(otrain.RESULT_NAME)) == summary
    assert summary["run_dir"] == f"{s3_storage}/pair"
    assert summary["checkpoint"].startswith(f"{s3_storage}/pair/checkpoint_")
    assert summary["iterations"] == 4 and summary["restarts"] == 0 and summary["num_workers"] == 2
    assert 0.0 <= summary["bbox_mAP"] <= 1.0 and "bbox_mAP_50" in summary
    state = _checkpoint(storage, summary["checkpoint"])
    assert int(state["iteration"]) == 4
    assert checkpoint_config(state).model.class_names == list(CLASSES)  # from the shards (issue #19, defect 2)
    records = worker_records(run)
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert all(r["world_size"] == 2 and r["resumed_from"] is None for r in records)
    assert len({r["pid"] for r in records}) == 2
    (key,) = [i.base_name for i in storage.fs.get_file_info(FileSelector(storage.path(common.PACKED_DIR)))]
    assert storage.exists(storage.path(common.PACKED_DIR, key, "_COMPLETE"))
    assert run.exists(run.path(otrain.WORKDIR_NAME, "eval.json"))
    assert [r["iter"] for r in metrics_records(run) if r["mode"] == "train"] == [1, 2, 3, 4]
    # rank 0 alone writes TensorBoard events (every rank has the same work dir path)
    events = run.list(run.path(otrain.WORKDIR_NAME, "tensorboard"))
    assert len([name for name in events if name.startswith("events.out.tfevents.")]) == 1
    # The same name again, with a longer schedule
    more = otrain.run_training(tiny_config(**{"train.max_iters": 6}), num_workers=2,
                               storage=s3_storage, name="pair", mlflow=mlflow)
    assert more["iterations"] == 6 and more["restarts"] == 0
    assert int(_checkpoint(storage, more["checkpoint"])["iteration"]) == 6
    assert sum(r["resumed_from"] is not None for r in worker_records(run)) == 2
    # train.keep_checkpoints = 2 registered checkpoints are kept
    entries = storage.fs.get_file_info(FileSelector(run.path()))
    assert len([i for i in entries if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")]) == 2
    # one MLflow run for both invocations: the first config's parameters, rank 0's records
    train_records = [r for r in metrics_records(run) if r["mode"] == "train"]
    check_mlflow_run(mlflow, more["run_dir"], train_records, more["bbox_mAP"])


def _checkpoint(storage: RunStorage, uri: str) -> dict:
    """The engine checkpoint result.json names (`<ray checkpoint dir>/checkpoint.pt` on the store)."""
    checkpoint_dir, name = uri.rsplit("/", 1)
    assert name == common.CHECKPOINT_NAME
    return load_run_checkpoint(storage, checkpoint_dir)


def check_mlflow_run(target: MlflowTarget, run_dir: str, train_records: list[dict], final_map: float) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=target.uri)
    experiment = client.get_experiment_by_name(target.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.rsplit("/", 1)[-1]
    assert run.data.tags[RUN_DIR_TAG] == run_dir
    assert run.data.params["train.max_iters"] == "4" and run.data.params["model.depth"] == "18"
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert loss == [(r["iter"], pytest.approx(r["loss"])) for r in train_records]  # steps 1..6, once each
    assert len(client.get_metric_history(run.info.run_id, "train/images_per_s")) == 6
    assert run.data.metrics["eval/bbox_mAP"] == pytest.approx(final_map)
