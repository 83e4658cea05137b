"""CPU smoke test of `python -m benchmarks.deform_conv` with tiny shapes, writing into a tmp dir."""
from __future__ import annotations

import csv

import torch

from benchmarks import deform_conv, harness


def test_shapes_are_the_r50_dcn_stages_and_the_head_at_1333x800():
    stages = {name: (c, h, w, s) for name, c, h, w, s in deform_conv.SHAPES}
    assert stages["c3"] == (128, 100, 168, 1) and stages["c4s2"] == (256, 50, 84, 2)
    assert stages["c5"] == (512, 25, 42, 1)
    head = [(h, w) for name, c, h, w, s in deform_conv.SHAPES if name.startswith("head_") and c == 256]
    assert head == [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


def test_conv_flops():
    assert deform_conv.conv_flops(2, 256, 50, 84, "fwd") == 2 * 2 * 50 * 84 * 256 * 256 * 9
    assert deform_conv.conv_flops(1, 4, 2, 3, "fwd_bwd") == 3 * deform_conv.conv_flops(1, 4, 2, 3, "fwd")


def test_strided_inputs_and_every_gradient():
    inputs = deform_conv.make_inputs(1, 4, 3, 5, 2, torch.float32, torch.device("cpu"))
    assert inputs["input"].shape == (1, 4, 6, 10) and inputs["offset"].shape == (1, 18, 3, 5)
    providers = deform_conv.build_providers(["eager", "conv2d"])
    grads = deform_conv.step_fn(providers["eager"], inputs, "fwd_bwd")()
    assert len(grads) == 4 and all(g.abs().sum() > 0 for g in grads)
    out = deform_conv.step_fn(providers["conv2d"], inputs, "fwd")()
    assert out.shape == (1, 4, 3, 5)
    assert len(deform_conv.step_fn(providers["conv2d"], inputs, "fwd_bwd", "conv2d")()) == 2


def test_script_writes_rows_and_chart_to_out_dir(tmp_path):
    committed = [harness.RESULTS_DIR / name for name in ("deform_conv.csv", "deform_conv.png")]
    before = [(p.stat().st_mtime_ns if p.exists() else None) for p in committed]
    rows = deform_conv.main(["--small", "--shapes", "c3s2", "--dtypes", "fp32", "--providers", "triton", "conv2d",
                             "--modes", "fwd", "--no-ceiling", "--out-dir", str(tmp_path)])
    with (tmp_path / "deform_conv.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(rows) == 2 * 3
    assert (tmp_path / "deform_conv.png").stat().st_size > 0
    assert {(r["provider"], r["metric"]) for r in written} == {
        (p, k) for p in ("triton", "conv2d") for k in ("ms", "tflops", "peak_mem_mb")}
    assert {r["shape"] for r in written} == {"c3s2 1x16x3x4 s2"}
    assert all(float(r["p50"]) > 0 for r in written if r["metric"] != "peak_mem_mb")
    after = [(p.stat().st_mtime_ns if p.exists() else None) for p in committed]
    assert after == before  # benchmarks/results untouched
