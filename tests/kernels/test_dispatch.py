"""kernels.dispatch: which implementation a call runs under each value of VFNET_KERNELS."""
from __future__ import annotations

import pytest
import torch

from kernels import dispatch, star_deform_conv2d, varifocal_loss


def _interpret(monkeypatch, on: bool) -> None:
    # read per call by dispatch; the kernels themselves were decorated at import (tests/conftest.py)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if on else "0")


@pytest.mark.parametrize("value", ["", "auto", " Auto "])
def test_auto_runs_triton_where_it_can(monkeypatch, value):
    monkeypatch.setenv("VFNET_KERNELS", value)
    cpu = torch.zeros(1)
    _interpret(monkeypatch, False)
    assert not dispatch.use_triton(cpu)
    _interpret(monkeypatch, True)
    assert dispatch.use_triton(cpu)
    assert not dispatch.use_triton(torch.zeros(1, device="meta"))


def test_torch_forces_the_reference(monkeypatch):
    monkeypatch.setenv("VFNET_KERNELS", "torch")
    _interpret(monkeypatch, True)
    assert not dispatch.use_triton(torch.zeros(1))


def test_triton_forces_the_kernels_or_fails_loudly(monkeypatch):
    """VFNET_KERNELS=triton never falls back to the reference: CPU tensors without the
    interpreter (and devices Triton does not run on) raise, naming the variable and the way out."""
    monkeypatch.setenv("VFNET_KERNELS", "triton")
    _interpret(monkeypatch, False)
    with pytest.raises(RuntimeError, match=r"VFNET_KERNELS=triton .* cpu .*TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.zeros(1))
    x, box, weight = torch.randn(1, 3, 4, 4), torch.rand(1, 4, 4, 4), torch.randn(2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="VFNET_KERNELS=triton"):
        star_deform_conv2d(x, box, weight, 8)
    with pytest.raises(RuntimeError, match="VFNET_KERNELS=triton"):
        varifocal_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.rand(4))
    _interpret(monkeypatch, True)
    assert dispatch.use_triton(torch.zeros(1))
    with pytest.raises(RuntimeError, match="VFNET_KERNELS=triton .* meta"):
        dispatch.use_triton(torch.zeros(1, device="meta"))


@pytest.mark.interpret
def test_triton_runs_the_kernel_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("VFNET_KERNELS", "triton")
    logits = torch.randn(5, 3, requires_grad=True)
    loss = varifocal_loss(logits, torch.tensor([0, 1, 3, 2, 3]), torch.rand(5))
    assert loss.grad_fn.name() == "_VarifocalLossBackward"


def test_other_values_are_refused(monkeypatch):
    monkeypatch.setenv("VFNET_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VFNET_KERNELS must be 'torch', 'triton' or 'auto', got 'cuda'"):
        dispatch.use_triton(torch.zeros(1))
