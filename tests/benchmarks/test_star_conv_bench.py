"""CPU smoke test of `python -m benchmarks.star_conv` with tiny shapes, writing into a tmp dir."""
from __future__ import annotations

import csv
import logging

import torch

from benchmarks import harness, star_conv


def test_levels_are_the_fpn_of_a_1333x800_batch():
    # 1344x800 padded: 100x168 + 50x84 + 25x42 + 13x21 + 7x11 points per image
    assert [(s, h, w) for _, s, h, w in star_conv.LEVELS] == [
        (8, 100, 168), (16, 50, 84), (32, 25, 42), (64, 13, 21), (128, 7, 11)]
    assert sum(h * w for _, _, h, w in star_conv.LEVELS) == 22400


def test_conv_flops():
    # two convs of 2*B*H*W*Cout*Cin*9; fwd_bwd three times that
    assert star_conv.conv_flops(2, 256, 100, 168, "fwd") == 2 * 2 * 2 * 16800 * 256 * 256 * 9
    forward = star_conv.conv_flops(1, 4, 2, 3, "fwd")
    assert star_conv.conv_flops(1, 4, 2, 3, "fwd_bwd") == 3 * forward


def test_fwd_bwd_step_returns_every_gradient():
    inputs = star_conv.make_inputs(1, 4, 3, 5, 8, torch.float32, torch.device("cpu"))
    assert inputs["bbox_pred"].min() >= 0.5 * 8 and inputs["bbox_pred"].max() <= 6 * 8
    from kernels.reference import star_deform_conv2d_pair_reference

    grads = star_conv.step_fn(star_deform_conv2d_pair_reference, inputs, 8, "fwd_bwd")()
    assert len(grads) == 5 and all(g.abs().sum() > 0 for g in grads)


def test_script_writes_rows_and_chart_to_out_dir(tmp_path):
    committed = [harness.RESULTS_DIR / name for name in ("star_conv.csv", "star_conv.png")]
    before = [(p.stat().st_mtime_ns if p.exists() else None) for p in committed]
    rows = star_conv.main(["--small", "--levels", "1", "--dtypes", "fp32", "--providers", "triton",
                           "eager", "--out-dir", str(tmp_path)])
    with (tmp_path / "star_conv.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(rows)
    assert (tmp_path / "star_conv.png").stat().st_size > 0
    measured = {(r["provider"], r["mode"], r["dtype"], r["metric"]) for r in written
                if r["provider"] != "ceiling"}
    assert measured == {(p, m, "fp32", k) for p in ("triton", "eager") for m in ("fwd", "fwd_bwd")
                        for k in ("ms", "tflops", "peak_mem_mb")}
    assert {r["mode"] for r in written if r["provider"] == "ceiling"} == {"copy", "matmul"}
    assert all(float(r["p50"]) > 0 and r["device"] == "cpu" for r in written
               if r["metric"] != "peak_mem_mb")
    assert {r["shape"] for r in written if r["provider"] == "triton"} == {"P3 1x16x4x6"}
    after = [(p.stat().st_mtime_ns if p.exists() else None) for p in committed]
    assert after == before  # benchmarks/results untouched


def test_missing_torchvision_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(harness, "torchvision_star_pair", lambda: None)
    with caplog.at_level(logging.WARNING, logger="benchmarks.star_conv"):
        rows = star_conv.main(["--small", "--levels", "1", "--dtypes", "bf16", "--modes", "fwd",
                               "--providers", "torchvision", "eager", "--no-ceiling",
                               "--out-dir", str(tmp_path)])
    assert "skipping torchvision" in caplog.text
    assert {r.provider for r in rows} == {"eager"}
