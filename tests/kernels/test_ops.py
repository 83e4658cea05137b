import pytest

import kernels
from kernels import Ops, reference


def test_from_name_resolves_each_set_once():
    triton = Ops.from_name("triton")
    assert (triton.star_pair, triton.varifocal_loss) == (kernels.star_deform_conv2d_pair, kernels.varifocal_loss)
    torch_ops = Ops.from_name("torch")
    assert (torch_ops.star_pair, torch_ops.varifocal_loss) == (
        reference.star_deform_conv2d_pair_reference, reference.varifocal_loss_reference)
    assert (triton.name, torch_ops.name) == ("triton", "torch")


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match=r"kernels must be one of \('triton', 'torch'\), got 'cuda'"):
        Ops.from_name("cuda")
