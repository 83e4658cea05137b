"""CPU smoke runs of the detector benchmarks (tiny shapes, into a tmp dir) and checks of their
shared workload and of the profile grouping."""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks import dataloader, harness, inference, profile_step, train_throughput, workload
from kernels import reference
from vfnet.train import step as vfnet_step
from vfnet.train.step import train_step

COMMITTED = ["train_throughput", "inference", "dataloader"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def results_untouched():
    """benchmarks/results is not written by the smoke runs."""
    paths = [harness.RESULTS_DIR / f"{name}.{ext}" for name in COMMITTED for ext in ("csv", "png")]
    paths.append(harness.RESULTS_DIR / "profile_step_cpu.txt")
    before = [p.stat().st_mtime_ns if p.exists() else None for p in paths]
    yield
    assert [p.stat().st_mtime_ns if p.exists() else None for p in paths] == before


def read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


TINY = ["--small", "--size", "64", "64", "--warmup", "1", "--reps", "2", "--no-ceiling"]


# ---------------------------------------------------------------------------------------------
# Workload


def test_models_share_weights_and_the_step_keeps_them(monkeypatch):
    cfg = workload.bench_config(small=True)
    cfg.train.grad_clip = 10.0
    models = workload.build_models(cfg, ["triton", "torch"], torch.device("cpu"))
    a, b = models["triton"].state_dict(), models["torch"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert models["triton"].kernels == "triton" and models["torch"].kernels == "torch"
    data = workload.synthetic_batch(1, (64, 64), cfg.model.num_classes, torch.device("cpu"))
    before = {k: v.clone() for k, v in models["torch"].state_dict().items()}
    calls = []  # the benchmarks time the engine's step, with the model's training config

    def engine_step(*args, **kwargs):
        calls.append(kwargs)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(vfnet_step, "train_step", engine_step)
    workload.train_step(models["torch"], data)()
    assert calls == [{"amp": True, "grad_clip": 10.0}]
    after = models["torch"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0: same work, same weights
    grads = [p.grad for p in models["torch"].parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_synthetic_batch_boxes_lie_inside_the_image():
    data = workload.synthetic_batch(3, (96, 160), 5, torch.device("cpu"), boxes_per_image=50)
    assert data.images.shape == (3, 3, 96, 160)
    assert data.image_sizes.tolist() == [[96, 160]] * 3
    for boxes, labels in zip(data.boxes, data.labels):
        assert boxes.shape == (50, 4) and labels.shape == (50,)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 96).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 16 - 1e-4).all()
        assert ((labels >= 0) & (labels < 5)).all()
    with pytest.raises(ValueError, match="batch"):
        workload.synthetic_batch(0, (64, 64), 3, torch.device("cpu"))


def test_unknown_provider_is_rejected():
    with pytest.raises(ValueError, match="providers"):
        workload.build_models(workload.bench_config(True), ["cuda"], torch.device("cpu"))


def test_torchvision_star_pair_matches_the_reference():
    pytest.importorskip("torchvision.ops")
    pair = harness.torchvision_star_pair()
    if pair is None:
        pytest.skip("torchvision's compiled ops do not load here")
    gen = torch.Generator().manual_seed(0)
    x_cls, x_reg = torch.randn(2, 1, 4, 7, 6, generator=gen, dtype=torch.float64)
    box = torch.rand(1, 4, 7, 6, generator=gen, dtype=torch.float64) * 24
    w_cls, w_reg = torch.randn(2, 5, 4, 3, 3, generator=gen, dtype=torch.float64)
    got = pair(x_cls, x_reg, box, w_cls, w_reg, 8, gradient_mul=0.1)
    want = reference.star_deform_conv2d_pair_reference(x_cls, x_reg, box, w_cls, w_reg, 8, gradient_mul=0.1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_missing_torchvision_falls_back_to_the_reference(monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ModuleNotFoundError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    assert harness.torchvision_star_pair() is None
    with caplog.at_level(logging.WARNING, logger="benchmarks.workload"):
        model = workload.build_models(workload.bench_config(True), ["torch"], torch.device("cpu"))["torch"]
    assert "PyTorch reference" in caplog.text
    assert model.head.star_pair is reference.star_deform_conv2d_pair_reference


def test_raise_class_scores_sends_candidates_to_nms():
    cfg = workload.bench_config(small=True)
    model = workload.build_models(cfg, ["torch"], torch.device("cpu"))["torch"].eval()
    data = workload.synthetic_batch(1, (64, 64), cfg.model.num_classes, torch.device("cpu"))
    assert len(model.predict(data.images, data.image_sizes, data.scales)[0]["scores"]) == 0
    workload.raise_class_scores(model, 1)
    found = model.predict(data.images, data.image_sizes, data.scales)[0]
    assert len(found["scores"]) > 0 and (found["labels"] == 0).all()
    with pytest.raises(ValueError, match="classes"):
        workload.raise_class_scores(model, cfg.model.num_classes + 1)


# ---------------------------------------------------------------------------------------------
# Scripts


def test_train_throughput_rows_and_chart(tmp_path, results_untouched):
    # triton runs through the interpreter here (seconds per step): one batch size, one timed step
    rows = train_throughput.main([*TINY, "--batches", "1", "--providers", "triton", "--warmup", "0",
                                  "--reps", "1", "--out-dir", str(tmp_path)])
    rows += train_throughput.main([*TINY, "--batches", "1", "2", "--providers", "torch",
                                   "--out-dir", str(tmp_path)])
    written = read_csv(tmp_path / "train_throughput.csv")
    assert len(written) == len(rows) == 3 * 2  # (provider, batch) x (ms, img_per_s)
    assert {(r["provider"], r["shape"], r["metric"]) for r in written} == {
        (p, f"R18 B{b} 64x64", m) for p, b in (("triton", 1), ("torch", 1), ("torch", 2))
        for m in ("ms", "img_per_s")}
    for r in written:
        assert r["mode"] == "train_step" and r["dtype"] == "fp32" and r["device"] == "cpu"
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) or r["metric"] == "img_per_s"
    by_key = {(r.provider, r.shape, r.metric): r.p50 for r in rows}
    for (provider, shape, metric), value in by_key.items():
        if metric == "ms":
            batch = int(shape.split()[1][1:])
            assert by_key[(provider, shape, "img_per_s")] == pytest.approx(batch * 1e3 / value)
    assert (tmp_path / "train_throughput.png").stat().st_size > 0


def test_inference_rows_and_reference_figure(tmp_path, caplog, results_untouched):
    with caplog.at_level(logging.INFO, logger="benchmarks.inference"):
        rows = inference.main([*TINY, "--batches", "1", "--providers", "torch",
                               "--out-dir", str(tmp_path)])
    assert {(r.provider, r.mode, r.metric) for r in rows} == {
        ("torch", "infer", "ms"), ("torch", "infer", "img_per_s")}
    assert len(read_csv(tmp_path / "inference.csv")) == 2
    assert "19.4 img/s" in caplog.text and "detections per image" in caplog.text
    assert (tmp_path / "inference.png").stat().st_size > 0


def test_dataloader_rows_and_training_comparison(tmp_path, caplog, results_untouched):
    harness.write_rows("train_throughput", [
        harness.Row("train_throughput", "torch", "train_step", "fp32", "R18 B2 64x64", "img_per_s",
                    "images/s", 1e6, 1e6, 1e6)], torch.device("cpu"), out_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="benchmarks.dataloader"):
        rows = dataloader.main(["--small", "--synth", "16", "--workers", "0", "1", "--batches", "3",
                                "--reps", "1", "--img-scale", "96", "64", "--out-dir", str(tmp_path)])
    assert {(r.provider, r.mode, r.metric) for r in rows} == {
        (f"workers_{n}", mode, metric) for n in (0, 1)
        for mode, metric in (("load", "img_per_s"), ("startup", "ms"))}
    assert all(r.p50 > 0 and r.shape == "B2 96x64" for r in rows)
    assert "does NOT reach the training step's 1000000.0 img/s (torch R18 B2 64x64)" in caplog.text
    assert len(read_csv(tmp_path / "dataloader.csv")) == 4
    assert (tmp_path / "dataloader.png").stat().st_size > 0


def test_dataloader_without_bccd_uses_synthetic_images_and_rejects_a_short_epoch(
        tmp_path, monkeypatch, caplog):
    config = tmp_path / "bccd_elsewhere.toml"  # the default data comes from this config
    config.write_text(f'[data]\ntrain_ann = "{tmp_path / "missing.json"}"\n'
                      f'train_images = "{tmp_path}"\n')
    monkeypatch.setattr(dataloader, "BCCD_CONFIG", config)
    monkeypatch.setattr(dataloader, "DEFAULT_SYNTH", 4)
    with caplog.at_level(logging.INFO, logger="benchmarks.dataloader"), \
            pytest.raises(ValueError, match="an epoch has 2 batches; need 6"):
        dataloader.main(["--small", "--workers", "0", "--batches", "5", "--reps", "1",
                         "--img-scale", "96", "64", "--out-dir", str(tmp_path)])
    assert f"no BCCD data at {tmp_path / 'missing.json'} (bccd_elsewhere.toml)" in caplog.text
    assert "using 4 synthetic images" in caplog.text


def test_dataloader_default_data_is_the_bccd_configs_relative_to_the_checkout():
    ann, images = dataloader.bccd_train_data()
    assert ann == Path("../shared/data/bccd/annotations/trainval.json")
    assert images == Path("../shared/data/bccd/images")


def test_profile_step_groups_the_step(tmp_path, results_untouched):
    prof = profile_step.main(["--small", "--batch", "1", "--provider", "torch", "--warmup", "1",
                              "--steps", "1", "--out-dir", str(tmp_path)])
    text = (tmp_path / "profile_step_cpu.txt").read_text()
    for part in ("backbone", "FPN", "head convs", "star conv", "ATSS assignment", "losses",
                 "optimiser", "gaps (outside operators)", "largest single gap", "aten::"):
        assert part in text
    for part in ("backbone", "FPN", "head convs", "star conv", "losses"):
        assert prof.busy[(part, "fwd")] > 0 and prof.busy[(part, "bwd")] > 0, part
    assert prof.busy[("ATSS assignment", "fwd")] > 0 and prof.busy[("optimiser", "step")] > 0
    assert sum(prof.busy.values()) + prof.idle_ms == pytest.approx(prof.step_ms, rel=1e-6)
    assert 0 <= prof.largest_gap_ms <= prof.idle_ms


# ---------------------------------------------------------------------------------------------
# The profile grouping on a hand-built CUDA trace


def _event(name, start, end, *, eid=0, thread=1, seq=-1, fwd_thread=0, device=DeviceType.CPU,
           link=0, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), id=eid,
                           thread=thread, sequence_nr=seq, fwd_thread=fwd_thread, device_type=device,
                           linked_correlation_id=link, is_user_annotation=annotation, is_async=False,
                           cpu_parent=None)


def test_summarise_charges_kernels_through_their_launching_ops():
    """Forward kernels by range, a backward kernel through its node's sequence number (on the
    autograd thread), the optimiser's, and the device's idle time; annotation spans ignored."""
    cuda = DeviceType.CUDA
    events = [
        _event("vfnet.step", 0, 100, eid=1, annotation=True),
        _event("vfnet.backbone", 1, 20, eid=2, annotation=True),
        _event("aten::conv2d", 2, 5, eid=3, seq=7),
        _event("vfnet.head", 21, 40, eid=4, annotation=True),
        _event("vfnet.star_conv", 22, 30, eid=5, annotation=True),
        _event("StarConvFunction", 23, 29, eid=6, seq=9),
        _event("aten::conv2d", 31, 33, eid=7, seq=10),
        _event("vfnet.optimizer", 60, 70, eid=8, annotation=True),
        _event("aten::_foreach_add_", 61, 62, eid=9),
        # backward on the autograd thread (2): the star conv's node, then the backbone's
        _event(profile_step.BACKWARD_NODE + "StarConvFunctionBackward", 41, 45, eid=10, thread=2,
               seq=9, fwd_thread=1),
        _event("aten::mm", 42, 44, eid=11, thread=2),
        _event(profile_step.BACKWARD_NODE + "ConvolutionBackward0", 46, 50, eid=12, thread=2,
               seq=7, fwd_thread=1),
        _event("aten::convolution_backward", 47, 49, eid=13, thread=2),
        # device side: kernels (start, end) linked to the launching op ids
        _event("conv_kernel", 10, 20, eid=101, device=cuda, link=3),
        _event("star_kernel", 25, 35, eid=102, device=cuda, link=6),
        _event("head_kernel", 35, 40, eid=103, device=cuda, link=7),
        _event("star_bwd_kernel", 50, 60, eid=104, device=cuda, link=11),
        _event("conv_bwd_kernel", 60, 75, eid=105, device=cuda, link=13),
        _event("sgd_kernel", 80, 90, eid=106, device=cuda, link=9),
        _event("vfnet.backbone", 10, 20, device=cuda, annotation=True),  # gpu_user_annotation
    ]
    ops = {e.id: e for e in events if e.device_type == DeviceType.CPU}
    launches = {e.id: (ops[e.linked_correlation_id].thread, ops[e.linked_correlation_id].time_range.start)
                for e in events if e.device_type == cuda and e.linked_correlation_id}
    prof = profile_step.summarise(events, launches)
    assert prof.step_ms == pytest.approx(0.1)
    assert prof.busy == pytest.approx({
        ("backbone", "fwd"): 0.010, ("star conv", "fwd"): 0.010, ("head convs", "fwd"): 0.005,
        ("star conv", "bwd"): 0.010, ("backbone", "bwd"): 0.015, ("optimiser", "step"): 0.010})
    # device busy 10-20, 25-40, 50-75, 80-90: idle 10 + 5 + 10 + 5 + 10 (90-100) = 40 us
    assert prof.idle_ms == pytest.approx(0.040)
    assert prof.largest_gap_ms == pytest.approx(0.010)
    text = profile_step.format_profile(prof)
    assert "host gaps (device idle)" in text and "40.0%" in text


def _raw(corr, link, device, thread=1, start_ns=0):
    """A raw Kineto event as `prof.profiler.kineto_results.events()` yields them."""
    return SimpleNamespace(correlation_id=lambda: corr, linked_correlation_id=lambda: link,
                           device_type=lambda: device, start_thread_id=lambda: thread,
                           start_ns=lambda: start_ns)


def test_device_launches_links_kernels_to_operators_not_runtime_calls():
    """A kernel (CUDA correlation id 2) is charged to the operator it is linked to (5), not to the
    operator whose own id happens to be 2 nor to the cudaLaunchKernel call; unlinked: absent."""
    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    raw = [_raw(5, 0, cpu, thread=7, start_ns=4000), _raw(2, 0, cpu, thread=8, start_ns=2000),
           _raw(2, 5, cpu, thread=7, start_ns=4500),  # cudaLaunchKernel, linked to op 5
           _raw(2, 5, cuda, start_ns=9000), _raw(3, 99, cuda, start_ns=9500)]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(
        trace_start_ns=lambda: 1000, events=lambda: raw)))
    assert profile_step.device_launches(prof) == {2: (7, 3.0)}


def test_device_launches_reads_this_torchs_profiler():
    with torch.profiler.profile() as prof:
        torch.ones(4).add_(1)
    assert profile_step.device_launches(prof) == {}  # no device events on the CPU
