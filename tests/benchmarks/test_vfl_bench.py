"""CPU smoke test of `python -m benchmarks.vfl` with tiny shapes, writing into a tmp dir."""
from __future__ import annotations

import csv
import logging

import torch

from benchmarks import harness, vfl
from kernels.reference import varifocal_loss_reference


def test_coco_point_count():
    # P3-P7 of a 1344x800 padded input: 100x168 + 50x84 + 25x42 + 13x21 + 7x11 points.
    assert vfl.points_per_image(800, 1344) == 16800 + 4200 + 1050 + 273 + 77
    assert vfl.COCO_POINTS == 16 * 22400


def test_eager_provider_computes_the_reference_loss():
    logits, labels, scores = vfl.make_inputs(300, 7, torch.float64, torch.device("cpu"))
    assert (labels == 7).any() and (labels < 7).any()
    torch.testing.assert_close(vfl.eager_vfl(logits, labels, scores),
                               varifocal_loss_reference(logits, labels, scores.double()))


def test_script_writes_rows_and_chart_to_out_dir(tmp_path):
    committed = [harness.RESULTS_DIR / name for name in ("vfl.csv", "vfl.png")]
    before = [(p.stat().st_mtime_ns if p.exists() else None) for p in committed]
    rows = vfl.main(["--small", "--points", "64", "--classes", "3", "--dtypes", "fp32", "bf16",
                     "--providers", "triton", "eager", "--out-dir", str(tmp_path)])
    with (tmp_path / "vfl.csv").open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(rows)
    assert (tmp_path / "vfl.png").stat().st_size > 0
    measured = {(r["provider"], r["mode"], r["dtype"], r["metric"]) for r in written
                if r["provider"] != "ceiling"}
    assert measured == {(p, m, d, k) for p in ("triton", "eager") for m in ("fwd", "fwd_bwd")
                        for d in ("fp32", "bf16") for k in ("ms", "gbps")}
    assert {r["mode"] for r in written if r["provider"] == "ceiling"} == {"copy", "matmul"}
    assert all(float(r["p50"]) > 0 and r["device"] == "cpu" and r["shape"] for r in written)
    after = [(p.stat().st_mtime_ns if p.exists() else None) for p in committed]
    assert after == before  # benchmarks/results untouched


def test_failing_torch_compile_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    def broken_compile(fn):
        def run(*args):
            raise RuntimeError("no compiler on this machine")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="benchmarks.vfl"):
        rows = vfl.main(["--small", "--points", "16", "--classes", "3", "--dtypes", "fp32",
                         "--modes", "fwd", "--providers", "eager", "torch_compile",
                         "--no-ceiling", "--out-dir", str(tmp_path)])
    assert "skipping torch_compile" in caplog.text
    assert {r.provider for r in rows} == {"eager"}
