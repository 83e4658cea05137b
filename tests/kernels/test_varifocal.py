"""kernels.varifocal: the Triton kernel (run through the interpreter on CPU) against the float64
PyTorch reference, the dispatch rules and argument validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.varifocal as vfl_module
from kernels import varifocal_loss, varifocal_loss_dense
from kernels.reference import (
    dense_targets,
    varifocal_loss_dense_reference,
    varifocal_loss_reference,
)

# CPU tests run the kernel through Triton's interpreter (tests/conftest.py); `gpu` ones compiled
pytestmark = pytest.mark.interpret

REDUCTIONS = ("none", "sum", "mean")

# Tolerances against the float64 oracle evaluated on the *same* (already rounded) inputs, so the
# only errors are the kernel's float32 math (~1e-7 relative, ~1e-6 after summing 1e6 terms) and the
# final rounding of loss/gradient to the logits' dtype: float16 2^-11 (round to nearest); bfloat16
# 2^-8 on the GPU, but Triton's interpreter truncates float32 -> bfloat16 (one ulp, 2^-7 = 7.8e-3).
# atol covers elements whose value is ~0 (e.g. exp(-|x|) terms) and float16 subnormals.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def make_inputs(n: int, c: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 3.0):
    """Logits ~ N(0, scale^2) in `dtype`, labels in [-2, c + 2) (so some are background),
    scores in (0, 1]."""
    logits = (torch.randn(n, c, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(-2, c + 2, (n,), generator=gen)
    scores = torch.rand(n, generator=gen, dtype=torch.float64).clamp_min(1e-3).to(torch.float32)
    return logits, labels, scores


def oracle(logits, labels, scores, grad_out, **kwargs):
    """float64 reference loss and gradient of <loss, grad_out> w.r.t. the logits."""
    x = logits.detach().double().requires_grad_()
    loss = varifocal_loss_reference(x, labels, scores.double(), **kwargs)
    (grad,) = torch.autograd.grad(loss, x, grad_out.double())
    return loss.detach(), grad


def run_kernel(fn, logits, *targets, grad_out, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, *targets, **kwargs)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), x.grad


def upstream(loss_shape, gen, dtype=torch.float64):
    """A non-trivial upstream gradient, representable in `dtype` (the loss's dtype, which autograd
    hands to backward), as float64: random [N, C] for "none", 0.7 for a scalar loss."""
    if len(loss_shape):
        grad = torch.rand(loss_shape, generator=gen, dtype=torch.float64) + 0.5
    else:
        grad = torch.tensor(0.7, dtype=torch.float64)
    return grad.to(dtype).double()


def assert_matches(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


CASES = (
    [(n, c, torch.float32, r) for n, c in [(0, 80), (1, 1), (1, 1203), (37, 3), (37, 80),
                                            (1000, 80)] for r in REDUCTIONS]
    + [(1000, 1203, torch.float32, "sum")]
    + [(37, 80, dt, r) for dt in (torch.bfloat16, torch.float16) for r in REDUCTIONS]
    # (a float16 sum over 80k elements of ~0.8 overflows, as the reference's does)
    + [(1000, 80, dt, r) for dt in (torch.bfloat16, torch.float16) for r in ("none", "mean")]
    + [(37, 1203, torch.bfloat16, "mean")]
)


@pytest.mark.parametrize("n,c,dtype,reduction", CASES)
def test_matches_float64_reference(n, c, dtype, reduction, seeded):
    logits, labels, scores = make_inputs(n, c, dtype, seeded)
    grad_out = upstream((n, c) if reduction == "none" else (), seeded, dtype)
    loss, grad = run_kernel(varifocal_loss, logits, labels, scores, grad_out=grad_out,
                            reduction=reduction)
    ref_loss, ref_grad = oracle(logits, labels, scores, grad_out, reduction=reduction)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert loss.shape == ref_loss.shape and grad.shape == logits.shape
    assert_matches(loss, ref_loss, dtype)
    assert_matches(grad, ref_grad, dtype)


def test_empty_input_gives_zero_loss_and_empty_grad():
    for reduction in REDUCTIONS:
        logits = torch.zeros(0, 80, requires_grad=True)
        loss = varifocal_loss(logits, torch.zeros(0, dtype=torch.long), torch.zeros(0),
                              reduction=reduction)
        assert loss.shape == ((0, 80) if reduction == "none" else ())
        loss.sum().backward()
        assert logits.grad.shape == (0, 80) and loss.sum().item() == 0.0


@pytest.mark.parametrize("make_factor", [lambda v: v, lambda v: torch.tensor(v)],
                         ids=["float", "tensor"])
def test_avg_factor(make_factor, seeded):
    logits, labels, scores = make_inputs(37, 80, torch.float32, seeded)
    grad_out = torch.tensor(1.3, dtype=torch.float64)
    loss, grad = run_kernel(varifocal_loss, logits, labels, scores, grad_out=grad_out,
                            reduction="mean", avg_factor=make_factor(12.5))
    ref_loss, ref_grad = oracle(logits, labels, scores, grad_out, reduction="mean",
                                avg_factor=12.5)
    assert_matches(loss, ref_loss, torch.float32)
    assert_matches(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_iou_weighted_off(reduction, seeded):
    logits, labels, scores = make_inputs(37, 80, torch.float32, seeded)
    grad_out = upstream((37, 80) if reduction == "none" else (), seeded)
    loss, grad = run_kernel(varifocal_loss, logits, labels, scores, grad_out=grad_out,
                            reduction=reduction, iou_weighted=False)
    ref_loss, ref_grad = oracle(logits, labels, scores, grad_out, reduction=reduction,
                                iou_weighted=False)
    assert_matches(loss, ref_loss, torch.float32)
    assert_matches(grad, ref_grad, torch.float32)
    # iou_weighted changes the positives' weight, so the two losses must differ.
    weighted = varifocal_loss(logits, labels, scores, reduction="sum")
    assert not torch.allclose(weighted, varifocal_loss(logits, labels, scores, iou_weighted=False))


@pytest.mark.parametrize("gamma,alpha", [(1.5, 0.75), (0.5, 0.25), (0.0, 1.0), (2.5, 0.0)])
def test_other_gamma_and_alpha_float64(gamma, alpha, seeded):
    # float32-exact values: alpha and gamma reach the kernel as float32 scalars.
    logits, labels, scores = make_inputs(37, 80, torch.float64, seeded)
    grad_out = upstream((), seeded)
    loss, grad = run_kernel(varifocal_loss, logits, labels, scores.double(), grad_out=grad_out,
                            gamma=gamma, alpha=alpha)
    ref_loss, ref_grad = oracle(logits, labels, scores, grad_out, gamma=gamma, alpha=alpha)
    assert_matches(loss, ref_loss, torch.float64)
    assert_matches(grad, ref_grad, torch.float64)


def test_background_labels_give_all_negative_rows(seeded):
    logits, _, scores = make_inputs(6, 5, torch.float32, seeded)
    labels = torch.tensor([-1, 5, 6, -100, 1000, 5])
    loss = varifocal_loss(logits, labels, scores, reduction="none")
    expected = varifocal_loss_dense_reference(logits.double(), torch.zeros(6, 5,
                                              dtype=torch.float64), reduction="none")
    assert_matches(loss, expected, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sparse_equals_dense(reduction, seeded):
    logits, labels, scores = make_inputs(50, 80, torch.float32, seeded)
    grad_out = upstream((50, 80) if reduction == "none" else (), seeded)
    sparse = run_kernel(varifocal_loss, logits, labels, scores, grad_out=grad_out,
                        reduction=reduction)
    dense = run_kernel(varifocal_loss_dense, logits, dense_targets(labels, scores, 80),
                       grad_out=grad_out, reduction=reduction)
    assert torch.equal(sparse[0], dense[0]) and torch.equal(sparse[1], dense[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_targets_with_several_positives_per_row(dtype, seeded):
    logits = (torch.randn(37, 80, generator=seeded) * 3).to(dtype)
    targets = torch.rand(37, 80, generator=seeded)
    targets[targets < 0.6] = 0.0  # ~40% positives, several per row
    grad_out = upstream((), seeded, dtype)
    loss, grad = run_kernel(varifocal_loss_dense, logits, targets, grad_out=grad_out,
                            reduction="mean")
    x = logits.detach().double().requires_grad_()
    ref = varifocal_loss_dense_reference(x, targets.double(), reduction="mean")
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    assert_matches(loss, ref.detach(), dtype)
    assert_matches(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_logits_are_finite_and_exact(dtype, seeded):
    n, c = 40, 3
    sign = torch.where(torch.rand(n, c, generator=seeded) < 0.5, -1.0, 1.0)
    logits = (sign * 1e4).to(dtype)
    logits[::4] = torch.randn(10, c, generator=seeded).to(dtype)  # mixed magnitudes
    labels = torch.randint(-1, c, (n,), generator=seeded)
    scores = torch.rand(n, generator=seeded).clamp_min(0.01)
    for reduction in ("none", "mean"):  # a float16 *sum* of ~1e4-sized terms overflows (as the
        # reference's does): the loss is returned in the logits' dtype
        grad_out = upstream((n, c) if reduction == "none" else (), seeded, dtype)
        loss, grad = run_kernel(varifocal_loss, logits, labels, scores, grad_out=grad_out,
                                reduction=reduction)
        ref_loss, ref_grad = oracle(logits, labels, scores, grad_out, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert_matches(loss, ref_loss, dtype)
        assert_matches(grad, ref_grad, dtype)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_elementwise_relative_accuracy_float32(gamma):
    """Every element is float32-accurate, tiny ones included (|x| up to 20: exp(-|x|) terms,
    positives with q = 1 where BCE and p - q are ~e^-x). The oracle is a float64 formula built
    from softplus / logsigmoid (torch's BCE-with-logits loses relative accuracy on tiny values),
    differentiated by autograd."""
    x = torch.linspace(-20, 20, 2001, dtype=torch.float64)[:, None].repeat(1, 4)
    q = torch.tensor([0.0, 1.0, 0.5, 1e-3], dtype=torch.float64).repeat(2001, 1)
    xd = x.clone().requires_grad_()
    bce = F.softplus(xd) - q * xd
    negative = 0.75 * torch.exp(gamma * F.logsigmoid(xd)) * F.softplus(xd)
    ref = torch.where(q > 0, q * bce, negative)
    (ref_grad,) = torch.autograd.grad(ref.sum(), xd)
    xk = x.float().requires_grad_()
    loss = varifocal_loss_dense(xk, q.float(), gamma=gamma, reduction="none")
    loss.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-30)
    # atol: near p = q (q = 0.5, x ~ 0) the gradient q (p - q) is a float32 cancellation.
    torch.testing.assert_close(xk.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    # ... and for q in {0, 1} (no zero crossing) relative accuracy holds for the tiny tails too.
    tail = (ref_grad.abs() < 1e-7) & ((q == 0) | (q == 1))
    rel = ((xk.grad.double() - ref_grad).abs() / ref_grad.abs())[tail]
    assert tail.sum() > 100 and rel.max() < 1e-5


@pytest.mark.parametrize("reduction,avg_factor", [("none", None), ("sum", None), ("mean", None),
                                                  ("mean", "tensor")])
@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_gradcheck_float64(reduction, avg_factor, form, seeded):
    n, c = 6, 5
    logits = torch.randn(n, c, generator=seeded, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 5, -1, 2])
    scores = torch.rand(n, generator=seeded, dtype=torch.float64) * 0.9 + 0.05
    factor = torch.tensor(3.5, dtype=torch.float64) if avg_factor else None
    if form == "sparse":
        fn = lambda x: varifocal_loss(x, labels, scores, reduction=reduction,  # noqa: E731
                                      avg_factor=factor, gamma=1.5)
    else:
        targets = dense_targets(labels, scores, c)
        fn = lambda x: varifocal_loss_dense(x, targets, reduction=reduction,  # noqa: E731
                                            avg_factor=factor, gamma=1.5)
    assert fn(logits).grad_fn.name() == "_VarifocalLossBackward"
    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_backward_with_unit_grad_output_returns_the_fused_gradient(seeded):
    logits, labels, scores = make_inputs(37, 80, torch.float32, seeded)
    x = logits.clone().requires_grad_()
    varifocal_loss(x, labels, scores, reduction="mean").backward()
    _, ref_grad = oracle(logits, labels, scores, torch.tensor(1.0), reduction="mean")
    assert_matches(x.grad, ref_grad, torch.float32)


def test_no_grad_needed_and_noncontiguous_inputs(seeded):
    logits = (torch.randn(80, 37, generator=seeded) * 3).t()  # [37, 80], not contiguous
    labels = torch.randint(0, 80, (37,), generator=seeded, dtype=torch.int32)
    scores = torch.rand(2 * 37, generator=seeded)[::2]  # strided
    with torch.no_grad():
        loss = varifocal_loss(logits, labels, scores)
    expected = varifocal_loss_reference(logits.double(), labels, scores.double())
    assert_matches(loss, expected, torch.float32)
    grad_out = torch.tensor(1.0, dtype=torch.float64)
    _, grad = run_kernel(varifocal_loss, logits, labels.to(torch.uint8), scores,
                         grad_out=grad_out)
    _, ref_grad = oracle(logits, labels, scores, grad_out)
    assert_matches(grad, ref_grad, torch.float32)


def test_kernel_path_runs_under_the_interpreter(monkeypatch, seeded):
    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernel")

    monkeypatch.setattr(vfl_module, "varifocal_loss_reference", forbidden)
    monkeypatch.setattr(vfl_module, "varifocal_loss_dense_reference", forbidden)
    launches = []
    real_launch = vfl_module.launch_kernel
    monkeypatch.setattr(vfl_module, "launch_kernel",
                        lambda *a, **k: launches.append(1) or real_launch(*a, **k))
    logits, labels, scores = make_inputs(37, 80, torch.float32, seeded)
    x = logits.requires_grad_()
    loss = varifocal_loss(x, labels, scores)
    loss.backward()
    varifocal_loss_dense(logits, dense_targets(labels, scores, 80), reduction="none")
    assert len(launches) == 2 and loss.grad_fn.name() == "_VarifocalLossBackward"


def test_vfnet_kernels_torch_forces_the_reference(monkeypatch, seeded):
    calls = []

    def spy(real):
        return lambda *a, **k: calls.append(real.__name__) or real(*a, **k)

    monkeypatch.setenv("VFNET_KERNELS", "torch")
    monkeypatch.setattr(vfl_module, "varifocal_loss_reference", spy(varifocal_loss_reference))
    monkeypatch.setattr(vfl_module, "varifocal_loss_dense_reference",
                        spy(varifocal_loss_dense_reference))
    logits, labels, scores = make_inputs(37, 80, torch.float32, seeded)
    loss = varifocal_loss(logits, labels, scores, reduction="mean")
    dense = varifocal_loss_dense(logits, dense_targets(labels, scores, 80), reduction="mean")
    assert calls == ["varifocal_loss_reference", "varifocal_loss_dense_reference"]
    assert loss.grad_fn is None and torch.equal(loss, varifocal_loss_reference(
        logits, labels, scores, reduction="mean"))
    assert torch.allclose(loss, dense)


def _good(n=4, c=3):
    return torch.zeros(n, c), torch.zeros(n, dtype=torch.long), torch.full((n,), 0.5)


BAD_SPARSE = [
    (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
    (dict(logits=torch.zeros(4, 3, dtype=torch.long)), TypeError, "logits must be float"),
    (dict(logits=torch.zeros(12)), ValueError, "logits must be 2-D"),
    (dict(labels=[0, 0, 0, 0]), TypeError, "labels must be a torch.Tensor"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must have an integer dtype"),
    (dict(labels=torch.zeros(4, dtype=torch.bool)), TypeError, "labels must have an integer"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels must be 1-D"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels has 5 rows"),
    (dict(scores=torch.zeros(4, dtype=torch.long)), TypeError, "scores must be float"),
    (dict(scores=torch.zeros(4, 1)), ValueError, "scores must be 1-D"),
    (dict(scores=torch.zeros(3)), ValueError, "scores has 3 rows"),
    (dict(scores=torch.full((4,), 1.5)), ValueError, "scores must lie in"),
    (dict(scores=torch.full((4,), -0.1)), ValueError, "scores must lie in"),
    (dict(scores=torch.zeros(4, requires_grad=True)), ValueError, "scores must not require"),
    (dict(logits=torch.full((4, 3), float("nan"))), ValueError, "logits must be finite"),
    (dict(logits=torch.full((4, 3), float("inf"))), ValueError, "logits must be finite"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(avg_factor=2.0), ValueError, "avg_factor is only allowed with reduction='mean'"),
    (dict(avg_factor=2.0, reduction="none"), ValueError, "avg_factor is only allowed"),
    (dict(avg_factor=0.0, reduction="mean"), ValueError, "avg_factor must be finite and > 0"),
    (dict(avg_factor=-1.0, reduction="mean"), ValueError, "avg_factor must be finite and > 0"),
    (dict(avg_factor=torch.tensor(-1.0), reduction="mean"), ValueError, "avg_factor must be"),
    (dict(avg_factor=torch.ones(2), reduction="mean"), ValueError, "avg_factor tensor must"),
    (dict(avg_factor="2", reduction="mean"), TypeError, "avg_factor must be a number"),
    (dict(alpha=-0.1), ValueError, "alpha must be finite and >= 0"),
    (dict(gamma=-1.0), ValueError, "gamma must be finite and >= 0"),
    (dict(gamma=None), TypeError, "gamma must be a real number"),
    (dict(iou_weighted=1), TypeError, "iou_weighted must be a bool"),
    (dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
     "labels is on meta"),
    (dict(avg_factor=torch.tensor(2.0, device="meta"), reduction="mean"), ValueError,
     "avg_factor is on meta"),
]


@pytest.mark.parametrize("override,exc,match", BAD_SPARSE)
def test_bad_sparse_input_raises(override, exc, match):
    logits, labels, scores = _good()
    args = dict(logits=logits, labels=labels, scores=scores)
    kwargs = {k: v for k, v in override.items() if k not in args}
    args.update({k: v for k, v in override.items() if k in args})
    with pytest.raises(exc, match=match):
        varifocal_loss(args["logits"], args["labels"], args["scores"], **kwargs)


@pytest.mark.parametrize("targets,exc,match", [
    ([[0.0]], TypeError, "targets must be a torch.Tensor"),
    (torch.zeros(4, 3, dtype=torch.long), TypeError, "targets must be float"),
    (torch.zeros(4, 2), ValueError, "targets shape"),
    (torch.full((4, 3), 2.0), ValueError, "targets must lie in"),
    (torch.zeros(4, 3, device="meta"), ValueError, "targets is on meta"),
])
def test_bad_dense_input_raises(targets, exc, match):
    with pytest.raises(exc, match=match):
        varifocal_loss_dense(torch.zeros(4, 3), targets)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("c", [80, 1203])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_matches_reference(dtype, c, reduction):
    if dtype == torch.float16 and reduction == "sum":
        pytest.skip("a float16 sum over 3001 x C elements overflows (as the reference's does)")
    gen = torch.Generator().manual_seed(1)
    logits, labels, scores = make_inputs(3001, c, dtype, gen)
    grad_out = upstream((3001, c) if reduction == "none" else (), gen, dtype)
    # avg_factor = the number of rows: the mean stays inside float16's range (65504) for both C;
    # with 17 the C = 1203 mean is 1.8e5, inf in float16 (the first H200 run: a test bug)
    avg = 3001.0 if reduction == "mean" else None
    factor = torch.tensor(avg, device="cuda") if avg is not None else None
    loss, grad = run_kernel(varifocal_loss, logits.cuda(), labels.cuda(), scores.cuda(),
                            grad_out=grad_out.cuda(), reduction=reduction, avg_factor=factor)
    ref_loss, ref_grad = oracle(logits, labels, scores, grad_out, reduction=reduction,
                                avg_factor=avg)
    assert_matches(loss.cpu(), ref_loss, dtype)
    assert_matches(grad.cpu(), ref_grad, dtype)
    assert varifocal_loss(logits.cuda().requires_grad_(), labels.cuda(), scores.cuda()
                          ).grad_fn.name() == "_VarifocalLossBackward"


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_more_than_2_pow_31_elements():
    """int64 offsets: N * C > 2^31; constant logits and background labels make every element's
    loss and gradient the same known value."""
    c = 80
    n = 2**31 // c + 1000
    logits = torch.full((n, c), -1.0, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((n,), -1, device="cuda", dtype=torch.long)
    scores = torch.zeros(n, device="cuda")
    loss = varifocal_loss(logits, labels, scores)
    loss.backward()
    one = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    ref = varifocal_loss_dense_reference(one, torch.zeros(1, 1, dtype=torch.float64))
    (ref_grad,) = torch.autograd.grad(ref, one)
    torch.testing.assert_close(loss.double().cpu(), ref * n * c, rtol=1e-2, atol=0)
    for idx in ((0, 0), (n - 1, c - 1), (n // 2, 7)):
        torch.testing.assert_close(logits.grad[idx].double().cpu(), ref_grad[0, 0], rtol=8e-3,
                                   atol=0)
