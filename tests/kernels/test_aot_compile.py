"""The kernels' launch configs, compiled ahead of time for sm_90 (H100/H200) and sm_80 (A100) with
Triton's own ptxas, no GPU needed (`kernels.aot`): every config the autotuner may try compiles,
fits the arch's shared memory (and its estimate, which prunes configs before compilation) and
spills no registers.

CI scope (65 variants; 4.5 minutes for 73 on the project's 2-core machine shared with other jobs):
both archs, every config of the three star-conv kernels for bf16 (the training path under
autocast; fp16 shares its configs and code path), fp32 (IEEE dots, torch's default) and fp64 (the
tests' dtype) on the head's shape class (the pair, 256 channels), and the VFL kernel at C = 80 and
1203 for bf16, fp32 and fp64. The rest of the matrix (fp16, TF32 dots, a single conv with bias,
VFL reduction "none") is `python -m kernels.aot` (benchmarks/NOTES.md §4 has its last result).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import aot, deform_conv, star_conv, tuning

ROOT = Path(__file__).resolve().parents[2]

WIDTHS = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8}


@pytest.mark.slow
def test_every_config_compiles_for_sm90_and_sm80_within_limits():
    command = [sys.executable, "-m", "kernels.aot", "--arch", "90", "80", "--dtype", "bf16", "fp32", "fp64",
               "--shape", "pair_256", "train_c80", "train_c1203", "--jobs", "2"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)  # the report: registers, shared memory and its estimate per variant
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, "\n".join([ln for ln in lines if not ln.endswith(" ok")] + [proc.stderr[-3000:]])
    compiled = [ln for ln in lines if ln.endswith(" ok")]
    # both archs, all four kernels
    for kernel in ("star_fwd", "star_bwd_data", "star_bwd_weight", "vfl"):
        for arch in ("sm_90", "sm_80"):
            assert any(ln.startswith(kernel) and arch in ln for ln in compiled), (kernel, arch)


@pytest.mark.slow
def test_every_deform_conv_config_compiles_for_sm90_and_sm80_within_limits():
    """The DCNv2 kernels' configs for bf16 (training under autocast) and fp32 (IEEE dots) at the
    ResNet-50 c4 shape (Cin = Cout = 256, one deform group, a mask): no compile error, within
    shared memory and its estimate, no spill. fp64 spills 16-64 B on sm_90 (kernels/tuning.py)."""
    command = [sys.executable, "-m", "kernels.aot", "--kernel", *aot.DCN_KERNELS, "--arch", "90", "80",
               "--dtype", "bf16", "fp32", "--shape", "dcn_256", "--jobs", "2"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, "\n".join([ln for ln in lines if not ln.endswith(" ok")] + [proc.stderr[-3000:]])
    compiled = [ln for ln in lines if ln.endswith(" ok")]
    for kernel in aot.DCN_KERNELS:
        for arch in ("sm_90", "sm_80"):
            assert any(ln.startswith(kernel) and arch in ln for ln in compiled), (kernel, arch)


@pytest.mark.parametrize("arch", sorted(aot.SHARED_LIMIT))
@pytest.mark.parametrize("dtype", list(WIDTHS))
@pytest.mark.parametrize("kernel", [*star_conv.KERNELS, *deform_conv.KERNELS])
def test_pruning_keeps_the_configs_of_the_dtype_that_fit(kernel, dtype, arch):
    """The autotuner's early prune: only configs of the dot dtype's width, only those whose
    estimate fits the device's shared memory, at least one; the rest are never compiled."""
    limit = aot.SHARED_LIMIT[arch]
    kept = tuning.gpu_configs(kernel, dtype, limit, 256, arch)
    assert kept, (kernel, dtype, arch)
    listed = tuning.CONFIGS[kernel][WIDTHS[dtype], arch >= 90]
    assert kept and all(c in listed for c in kept)
    assert [c for c in listed if c not in kept] == [
        c for c in listed if tuning.shared_estimate(kernel, c, WIDTHS[dtype], 256) > limit]


def test_prune_hook_reads_dtype_and_device_limit(monkeypatch):
    """The hook takes the list of the tensor's dtype and the device's architecture and drops the
    configs over the device's shared memory (an sm_86 GPU: Ampere lists, 99 KB)."""
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: 101376)
    monkeypatch.setattr(tuning, "capability", lambda device: 86)
    every = list({id(c): c for configs in tuning.CONFIGS["star_fwd"].values() for c in configs}.values())
    prune = tuning.gpu_prune("star_fwd", "w1_ptr")
    kept = prune(every, {"w1_ptr": torch.empty(1, dtype=torch.bfloat16), "COUT": 256})
    assert kept == tuning.gpu_configs("star_fwd", torch.bfloat16, 101376, 256, 86)
    ampere = tuning.CONFIGS["star_fwd"][2, False]
    assert kept and all(c in ampere for c in kept) and len(kept) < len(ampere)
    monkeypatch.setattr(tuning, "shared_memory_limit", lambda device: 1024)
    with pytest.raises(RuntimeError, match="no launch config of torch.float64 fits the 1024 B"):
        prune(every, {"w1_ptr": torch.empty(1, dtype=torch.float64), "COUT": 256})


def test_estimate_matches_the_compiler_on_a_measured_config():
    """bf16 forward 128x128x32, 8 warps, 3 stages: ptxas reported 184 KB on sm_90 (triton 3.6 and
    3.9); the estimate is exact there (so it does not over-prune the tiles that matter most)."""
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3)
    assert tuning.shared_estimate("star_fwd", config, 2, 256) == 184 * 1024
