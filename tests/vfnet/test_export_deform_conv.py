"""The exportable deformable convolution: eager values against the reference, an ONNX export of a
small DCNv2 block (mmcv's pack layout) run by onnxruntime, and the star conv's export, which shares
its corner gather.

Tolerances (float32): the export sums the four corners and the products in another order than the
reference (Gather + MatMul instead of chunked bmm), about 1e-6 relative; onnxruntime also computes
the block's offset convolution with its own kernels, which moves the sampling points by float32
rounding, so its outputs are held to 1e-4 of the largest value.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.reference import (
    conv_output_size,
    deform_conv2d_reference,
    modulated_offsets,
    pair,
    star_deform_conv2d_pair_reference,
)
from vfnet.interop.export.deform_conv import deform_conv2d_export
from vfnet.interop.export.star_conv import star_deform_conv2d_pair_export

CASES = {
    # b, cin, cout, h, w, kernel, stride, padding, dilation, groups, dg, mask
    "3x3_s1_p1": (2, 4, 3, 6, 7, 3, 1, 1, 1, 1, 1, True),
    "3x3_s2_g2_dg2_nomask": (2, 8, 6, 9, 8, 3, 2, 1, 1, 2, 2, False),
    "3x2_s21_p02_d21_g4_dg4": (1, 8, 4, 7, 6, (3, 2), (2, 1), (0, 2), (2, 1), 4, 4, True),
    "1x1_dg2": (3, 4, 5, 5, 4, 1, 1, 0, 1, 1, 2, True),
}


def _args(b, cin, cout, h, w, kernel, stride, padding, dilation, groups, dg, with_mask, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kh, kw = pair(kernel)
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    offset = (torch.rand(b, 2 * dg * kh * kw, ho, wo, generator=gen) * 2 - 1) * 3
    offset[:, ::4] = offset[:, ::4].round()  # whole numbers: samples on cells and on the border
    return (torch.randn(b, cin, h, w, generator=gen), offset, torch.randn(cout, cin // groups, kh, kw, generator=gen),
            torch.randn(cout, generator=gen), stride, padding, dilation,
            torch.rand(b, dg * kh * kw, ho, wo, generator=gen) if with_mask else None)


@pytest.mark.parametrize("name", list(CASES))
def test_export_form_matches_the_reference(name):
    *spec, groups, dg, with_mask = CASES[name]
    args = _args(*spec, groups, dg, with_mask)
    expected = deform_conv2d_reference(*(a.double() if isinstance(a, torch.Tensor) else a for a in args),
                                       groups=groups)
    got = deform_conv2d_export(*args, groups=groups)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_star_export_still_matches_the_star_reference():
    """The star conv's export reads its corners through the shared `sample_rows`."""
    gen = torch.Generator().manual_seed(1)
    x_cls, x_reg = torch.randn(2, 2, 4, 6, 7, generator=gen)
    box = torch.rand(2, 4, 6, 7, generator=gen) * 40
    w_cls, w_reg = torch.randn(2, 5, 4, 3, 3, generator=gen)
    expected = star_deform_conv2d_pair_reference(x_cls, x_reg, box, w_cls, w_reg, 8.0)
    for got, want in zip(star_deform_conv2d_pair_export(x_cls, x_reg, box, w_cls, w_reg, 8.0), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


class DCNv2Block(nn.Module):
    """mmcv's ModulatedDeformConv2dPack shape: a conv predicts [B, 3*dg*kh*kw, Ho, Wo], split by
    `modulated_offsets` into offset and mask for the deformable convolution."""

    def __init__(self, cin=8, cout=6, kernel=3, stride=2, padding=1, dilation=1, groups=2, dg=2):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_offset = nn.Conv2d(cin, 3 * dg * kernel * kernel, kernel, stride, padding, dilation)
        with torch.no_grad():
            self.conv_offset.weight.copy_(torch.randn(self.conv_offset.weight.shape, generator=gen) * 0.3)
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, kernel, kernel, generator=gen))
        self.bias = nn.Parameter(torch.randn(cout, generator=gen))
        self.conv = dict(stride=stride, padding=padding, dilation=dilation)
        self.groups = groups

    def offsets(self, x):
        return modulated_offsets(self.conv_offset(x))

    def forward(self, x):
        offset, mask = self.offsets(x)
        return deform_conv2d_export(x, offset, self.weight, self.bias, **self.conv, mask=mask, groups=self.groups)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    block = DCNv2Block().eval()
    example = torch.randn(2, 8, 11, 13)
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("height", min=4, max=512),
            3: torch.export.Dim("width", min=4, max=512)}
    with torch.no_grad():
        program = torch.export.export(block, (example,), dynamic_shapes=(dims,))
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=18, input_names=["x"],
                                     output_names=["y"], verbose=False)
    path = tmp_path / "dcn.onnx"
    path.write_bytes(onnx_program.model_proto.SerializeToString())
    ops = {(node.domain, node.op_type) for node in onnx.load(str(path)).graph.node}
    assert {("", "Gather"), ("", "MatMul"), ("", "Floor")} <= ops
    assert {domain for domain, _ in ops} <= {"", "ai.onnx"}, ops  # standard operators only
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 8, 11, 13), (1, 8, 20, 9), (3, 8, 6, 7)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            offset, mask = block.offsets(x)
            expected = deform_conv2d_reference(x, offset, block.weight, block.bias, **block.conv, mask=mask,
                                               groups=block.groups)
        assert offset.abs().max() > 1  # the samples do move by more than a cell
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0,
                                   atol=1e-4 * expected.abs().max().item(), msg=str(shape))
