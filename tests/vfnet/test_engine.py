import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from corrupt import flip_tensor_bit

from tiny_run import make_data, records, tiny_config, vfnet_command, write_config
from vfnet.core.checkpoint import checkpoint_config, load_checkpoint
from vfnet.core.config import load_config
from vfnet.data.loader import train_dataset
from vfnet.evaluate import AP_NAMES
from vfnet.model import VFNet
from vfnet.train.engine import NonFiniteLossError, Observers, TrainData, train
from vfnet.train.metrics_log import read_records
from vfnet.train.optim import LrSchedule


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 12-iteration run (3 epochs of 4 batches) to compare others against."""
    workdir = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(data, max_iters=12)
    metrics = train(cfg, workdir)
    return workdir, metrics


def test_smoke_run_writes_everything(data, tmp_path):
    cfg = tiny_config(data, max_iters=6, eval_interval=3, keep_checkpoints=1)
    reports = []
    metrics = train(cfg, tmp_path, observers=Observers(report=lambda m, c: reports.append((m, c))))
    assert metrics["iterations"] == 6
    assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1.0 for k in AP_NAMES)

    saved = load_config(tmp_path / "config.toml")
    assert saved.model.class_names == train_dataset(cfg.data).class_names  # filled from the data
    saved.model.class_names = []
    assert saved == cfg
    train_recs = records(tmp_path)
    assert [r["iter"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in train_recs] == [1, 1, 1, 1, 2, 2]  # 8 images / batch 2 = 4 per epoch
    for r in train_recs:
        assert {"lr", "loss", "loss_cls", "loss_bbox_init", "loss_bbox_refine", "num_pos",
                "time_per_iter"} <= r.keys()
        assert math.isclose(r["loss"], r["loss_cls"] + r["loss_bbox_init"] + r["loss_bbox_refine"],
                            rel_tol=1e-5)
    assert [r["iter"] for r in records(tmp_path, "eval")] == [3, 6]

    ckdir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch_1.pt", "last.pt"]  # keep 1 epoch file
    state = load_checkpoint(ckdir / "last.pt")
    assert state["iteration"] == 6 and state["epoch"] == 1
    assert checkpoint_config(state) == load_config(tmp_path / "config.toml")
    assert load_checkpoint(ckdir / "epoch_1.pt")["iteration"] == 4
    assert set(AP_NAMES) <= set(json.loads((tmp_path / "eval.json").read_text()))

    # reports after each checkpoint (2, 4, 6) and evaluation (3, 6), on this (rank 0) process
    assert [(int(m["iteration"]), c.name if c else None) for m, c in reports] == [
        (2, "last.pt"), (3, None), (4, "last.pt"), (6, "last.pt")]
    assert "bbox_mAP" in reports[1][0] and "loss" in reports[0][0]
    assert reports[-1][0]["bbox_mAP"] == metrics["bbox_mAP"]


def test_lr_follows_schedule_and_resume_is_exact(data, reference, tmp_path):
    ref_dir, ref_metrics = reference
    ref = records(ref_dir)
    cfg = tiny_config(data, max_iters=12)
    schedule = LrSchedule.from_config(cfg.train, iters_per_epoch=4, total_iters=12)
    assert [r["lr"] for r in ref] == pytest.approx([schedule.lr(i) for i in range(12)])

    # a run interrupted at iteration 7 (after the checkpoint at 6) and resumed
    calls = {"n": 0}
    original = VFNet.loss

    def crash_at_7(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VFNet, "loss", crash_at_7)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 6
    resumed = train(cfg, tmp_path)
    got = records(tmp_path)
    assert [r["iter"] for r in got] == list(range(1, 13))
    for a, b in zip(got, ref):  # same lr, same data order, same weights: same losses
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["iter"]
        assert a["num_pos"] == b["num_pos"]
    assert resumed["bbox_mAP"] == pytest.approx(ref_metrics["bbox_mAP"], abs=1e-3)
    ref_state = load_checkpoint(ref_dir / "checkpoints" / "last.pt")["model"]
    for name, value in load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"].items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_after_sigkill(data, reference, tmp_path):
    """A `vfnet train` subprocess killed after its first checkpoint continues where it stopped."""
    ref = records(reference[0])
    config = write_config(tmp_path / "tiny.toml", data, max_iters=12)
    workdir = tmp_path / "run"
    last = workdir / "checkpoints" / "last.pt"
    proc = subprocess.Popen([*vfnet_command(), "train", "--config", str(config), "--workdir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    killed_at = load_checkpoint(last)["iteration"]
    assert 2 <= killed_at < 12

    done = subprocess.run([*vfnet_command(), "train", "--config", str(config), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {last} at iteration {killed_at}" in done.stderr
    got = records(workdir)
    assert [r["iter"] for r in got] == list(range(1, 13))  # records past the checkpoint redone once
    for a, b in zip(got[killed_at:], ref[killed_at:]):
        assert a["lr"] == pytest.approx(b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["iter"]
    assert load_checkpoint(last)["iteration"] == 12


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    cfg = tiny_config(data, max_iters=6)
    calls = {"n": 0}
    original = VFNet.loss

    def nan_at_3(self, *args):
        losses = original(self, *args)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss_bbox_init"] = losses["loss_bbox_init"] * float("nan")
        return losses

    monkeypatch.setattr(VFNet, "loss", nan_at_3)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3\b.*loss_bbox_init=nan"):
        train(cfg, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["iter"] for r in records(tmp_path)] == [1, 2]
    assert not (tmp_path / "eval.json").exists()


def test_no_resume_keeps_old_files_until_replaced(data, tmp_path, monkeypatch):
    cfg = tiny_config(data, max_iters=2)
    train(cfg, tmp_path)
    old_ckpt = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    old_metrics = (tmp_path / "metrics.jsonl").read_text()

    def fail(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(VFNet, "loss", fail)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, resume=False)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == old_ckpt
    assert (tmp_path / "metrics.jsonl").read_text() == old_metrics
    monkeypatch.undo()
    train(tiny_config(data, max_iters=1), tmp_path, resume=False)  # starts over: replaces both
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 1
    assert [r["iter"] for r in records(tmp_path)] == [1]


def test_data_source_and_resume_from(data, reference, tmp_path):
    from vfnet.data import build_train_loader

    cfg = tiny_config(data, max_iters=5, checkpoint_interval=0)
    seen = []

    def batches(epoch, start):
        seen.append((epoch, start))
        return build_train_loader(cfg, epoch, start_batch=start)

    ref_ckpt = reference[0] / "checkpoints" / "epoch_1.pt"  # iteration 4 of the reference run
    names = ["w", "x", "y", "z"]  # not the data set's: they must come from the data source
    metrics = train(cfg, tmp_path, data=TrainData(batches, 4, names), resume_from=ref_ckpt)
    assert seen == [(1, 0)] and metrics["iterations"] == 5
    (rec,) = records(tmp_path)
    assert rec["iter"] == 5 and rec["loss"] == pytest.approx(records(reference[0])[4]["loss"], rel=1e-4)
    # the data source's class names are stored with the config in every checkpoint
    assert checkpoint_config(load_checkpoint(tmp_path / "checkpoints" / "last.pt")).model.class_names == names
    assert load_config(tmp_path / "config.toml").model.class_names == names

    with pytest.raises(ValueError, match="iters_per_epoch"):
        TrainData(batches, 0, names)
    short = TrainData(lambda e, s: list(build_train_loader(cfg, e))[:2], 4, names)
    with pytest.raises(RuntimeError, match="ran out after 2 of 4"):
        train(cfg, tmp_path / "short", data=short)


def test_resumed_finished_run_reports_a_checkpoint_that_exists(data, reference, tmp_path):
    """A finished run resumed from a checkpoint outside its work dir (a Ray trial restored at its
    last iteration into a fresh node-local work dir) evaluates again and reports the checkpoint it
    resumed from: its work dir has no checkpoints/ (issue #19, defect 1)."""
    ref_dir, ref_metrics = reference
    source = tmp_path / "restored" / "checkpoint.pt"
    source.parent.mkdir()
    shutil.copyfile(ref_dir / "checkpoints" / "last.pt", source)
    reports = []

    def report(metrics, checkpoint):
        assert checkpoint is not None and checkpoint.is_file(), checkpoint
        reports.append((metrics, checkpoint))

    workdir = tmp_path / "fresh"
    metrics = train(tiny_config(data, max_iters=12), workdir, observers=Observers(report=report),
                    resume_from=source)
    assert metrics["iterations"] == 12 and metrics["bbox_mAP"] == pytest.approx(ref_metrics["bbox_mAP"], abs=1e-3)
    assert [(int(m["iteration"]), c) for m, c in reports] == [(12, source)]
    assert not (workdir / "checkpoints").exists()


def test_metrics_log_skips_a_torn_last_line(data, reference, tmp_path):
    """metrics.jsonl is appended to, not replaced atomically (vfnet.core.atomic): a run killed
    mid-append leaves a torn last line, which read_records and the resumed run drop."""
    ref_dir, _ = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    for name in ("last.pt", "epoch_3.pt"):  # resume from epoch_2.pt (iteration 8)
        (tmp_path / "checkpoints" / name).unlink()
    lines = (ref_dir / "metrics.jsonl").read_text().splitlines()
    upto_9 = [line for line in lines if json.loads(line)["iter"] <= 9]
    torn = "".join(line + "\n" for line in upto_9) + lines[len(upto_9)][:17]
    (tmp_path / "metrics.jsonl").write_text(torn)
    assert [r["iter"] for r in read_records(tmp_path / "metrics.jsonl")] == [json.loads(x)["iter"] for x in upto_9]

    train(tiny_config(data, max_iters=12), tmp_path)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [json.loads(line) for line in text.splitlines()] == read_records(tmp_path / "metrics.jsonl")
    assert [r["iter"] for r in records(tmp_path)] == list(range(1, 13))


def scalar_events(logdir):
    """{tag: [(step, value), ...]} of the TensorBoard event files in `logdir`, as TensorBoard
    shows them (events of an earlier writer past a resumed run's purge step hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_match_metrics_and_resume(data, tmp_path):
    cfg = tiny_config(data, max_iters=6, checkpoint_interval=0, eval_interval=3)  # checkpoints at 4 and 6
    seen = []
    train(cfg, tmp_path, observers=Observers(record=seen.append))
    assert seen == [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # redo iterations 5 and 6 from the epoch-1 checkpoint: TensorBoard keeps one value per step
    train(cfg, tmp_path, resume_from=tmp_path / "checkpoints" / "epoch_1.pt")
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = scalar_events(tmp_path / "tensorboard")
    train_recs, eval_recs = records(tmp_path), records(tmp_path, "eval")
    assert [r["iter"] for r in train_recs] == [1, 2, 3, 4, 5, 6] and [r["iter"] for r in eval_recs] == [3, 6]
    for name in ("loss", "loss_cls", "loss_bbox_init", "loss_bbox_refine", "num_pos", "lr", "time_per_iter"):
        assert events[f"train/{name}"] == [(r["iter"], pytest.approx(r[name])) for r in train_recs]
    assert events["train/images_per_s"] == [(r["iter"], pytest.approx(2 / r["time_per_iter"])) for r in train_recs]
    for name in AP_NAMES:
        assert events[f"eval/{name}"] == [(r["iter"], pytest.approx(r[name])) for r in eval_recs]


def test_tensorboard_can_be_turned_off(data, tmp_path):
    cfg = tiny_config(data, max_iters=1, tensorboard=False)
    train(cfg, tmp_path)
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").is_file()


def test_resume_skips_corrupt_checkpoints(data, reference, tmp_path, caplog):
    """last.pt and epoch_3.pt damaged (one flipped bit each): the run resumes from epoch_2.pt, the
    newest that verifies, says which it skipped, and continues exactly as the reference did."""
    ref_dir, _ = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    flip_tensor_bit(tmp_path / "checkpoints" / "last.pt")
    flip_tensor_bit(tmp_path / "checkpoints" / "epoch_3.pt", fraction=0.25)
    with caplog.at_level("INFO"):
        train(tiny_config(data, max_iters=12), tmp_path)
    assert "skipping checkpoint" in caplog.text and "epoch_3.pt" in caplog.text
    assert f"resumed from {tmp_path / 'checkpoints' / 'epoch_2.pt'} at iteration 8" in caplog.text
    got, ref = records(tmp_path), records(ref_dir)
    assert [r["iter"] for r in got] == [9, 10, 11, 12]
    for a, b in zip(got, ref[8:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["iter"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 12
