r"""Fused varifocal loss (VFL): one Triton pass computes the loss and its gradient.

Kernel, autograd.Function and functional API live together here; `kernels/reference.py` holds the
PyTorch oracle with the same contract (docs/design.md §2).

Definition. For a logit x, target q in [0, 1] and p = sigmoid(x)::

    BCE(x, q) = softplus(x) - q * x = max(x, 0) - q * x + log(1 + e^-|x|)
    q > 0:   L = w * BCE(x, q),          w = q if iou_weighted else 1
    q = 0:   L = alpha * p^gamma * softplus(x)      (BCE(x, 0) = softplus(x), |p - q| = p)

Gradient (exact: the focal weight p^gamma is differentiated, as in the reference head).
Using dp/dx = p (1 - p) and d softplus(x)/dx = p::

    q > 0:   dL/dx = w * (p - q)
    q = 0:   dL/dx = alpha * [gamma * p^(gamma-1) * p (1 - p) * softplus(x) + p^gamma * p]
                   = alpha * p^gamma * [gamma * (1 - p) * softplus(x) + p]

Stable evaluation for |x| up to 1e4 (no exp of a positive number, no 1 - p cancellation):
with e = exp(-|x|) in (0, 1],

    u = 1 + e (rounded), r = 1 / u
    log1p(e)      = log(u) + (e - (u - 1)) * r    (first-order correction for the rounding of u:
                                                  exactly e when u rounds to 1)
    softplus(x)   = max(x, 0) + log1p(e)
    log p         = min(x, 0) - log1p(e)          (p^gamma = exp(gamma * log p); p * p if gamma = 2)
    p, 1 - p      = r, e * r   for x >= 0, swapped for x < 0
    BCE(x, q)     = (max(x, 0) - q * x) + log1p(e),   p - q = (1 - q) - (1 - p) for x >= 0
                    (both exact for q = 1 and large x, where BCE and p - q are ~e).
That is 4 transcendental/reciprocal operations per element (3 when gamma = 2): the kernel stays
bound by memory bandwidth.

Passes. A reduced loss ("sum", "mean") has a scalar upstream gradient, so the forward kernel writes
dL/dx * (1 / denominator) while it reads the logits, and backward only rescales it by grad_output
(one elementwise pass on the device: backward never reads grad_output on the host). Reduction
"none" has an [N, C] upstream gradient: the forward kernel writes only the loss and a backward
launch of the same kernel recomputes dL/dx and multiplies it by grad_output. Per-program partial
sums of the loss are reduced by a deterministic `torch.sum` (no atomics).

Targets. The sparse form reads one label and one score per row (q = score at column label, 0
elsewhere; a label outside [0, C) gives an all-negative row) and never builds [N, C] targets. The
dense form reads an [N, C] target tensor.

Precision. Math runs in float32 for float16/bfloat16/float32 logits and in float64 for float64
logits (so `torch.autograd.gradcheck` works under the interpreter); `alpha` and `gamma` are passed
as float32 scalars. Loss and gradient are returned in the logits' dtype. Offsets are int64.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from kernels import checks, dispatch, tuning
from kernels.reference import varifocal_loss_dense_reference, varifocal_loss_reference

_REDUCTIONS = ("none", "sum", "mean")
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@triton.jit
def _vfl_kernel(
    logits_ptr,  # [N, C] contiguous
    labels_ptr,  # [N] int32/int64 (sparse form)
    scores_ptr,  # [N] float (sparse form)
    targets_ptr,  # [N, C] contiguous float (dense form)
    grad_out_ptr,  # [N, C] contiguous (GRAD_OUT)
    denom_ptr,  # 0-dim, compute dtype: gradient scaled by 1 / denom (STORE_GRAD, not GRAD_OUT)
    loss_ptr,  # [N, C] out (STORE_LOSS)
    grad_ptr,  # [N, C] out (STORE_GRAD)
    partial_ptr,  # [num_programs] out, compute dtype (REDUCE)
    n_rows,
    n_cols,
    alpha,
    gamma,
    DENSE: tl.constexpr,
    GAMMA_IS_TWO: tl.constexpr,
    IOU_WEIGHTED: tl.constexpr,
    STORE_LOSS: tl.constexpr,
    REDUCE: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    GRAD_OUT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    row_start = rows * n_cols
    if not DENSE:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        scores = tl.load(scores_ptr + rows, mask=row_mask, other=0).to(COMPUTE)
    if STORE_GRAD and not GRAD_OUT:
        scale = 1.0 / tl.load(denom_ptr).to(COMPUTE)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = row_start[:, None] + cols[None, :]
        x = tl.load(logits_ptr + offs, mask=mask, other=0).to(COMPUTE)
        if DENSE:
            q = tl.load(targets_ptr + offs, mask=mask, other=0).to(COMPUTE)
        else:
            q = tl.where(cols[None, :] == labels[:, None], scores[:, None], 0.0).to(COMPUTE)

        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        r = 1.0 / u
        log1p_e = tl.log(u) + (e - (u - 1.0)) * r
        softplus = tl.maximum(x, 0.0) + log1p_e
        nonneg = x >= 0.0
        p = tl.where(nonneg, r, e * r)
        one_minus_p = tl.where(nonneg, e * r, r)
        if GAMMA_IS_TWO:
            focal = alpha * p * p
        else:
            focal = alpha * tl.exp(gamma * (tl.minimum(x, 0.0) - log1p_e))  # alpha * p^gamma

        positive = q > 0.0
        bce = (tl.maximum(x, 0.0) - q * x) + log1p_e  # exact 0 + log1p(e) for q = 1, x >= 0
        if IOU_WEIGHTED:
            loss = tl.where(positive, q * bce, focal * softplus)
        else:
            loss = tl.where(positive, bce, focal * softplus)

        if STORE_LOSS:
            tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            acc += tl.where(mask, loss, 0.0)
        if STORE_GRAD:
            neg_grad = focal * (gamma * one_minus_p * softplus + p)
            p_minus_q = tl.where(nonneg, (1.0 - q) - one_minus_p, p - q)  # no 1 - p cancellation
            if IOU_WEIGHTED:
                dloss = tl.where(positive, q * p_minus_q, neg_grad)
            else:
                dloss = tl.where(positive, p_minus_q, neg_grad)
            if GRAD_OUT:
                dloss = dloss * tl.load(grad_out_ptr + offs, mask=mask, other=0).to(COMPUTE)
            else:
                dloss = dloss * scale
            tl.store(grad_ptr + offs, dloss.to(grad_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(partial_ptr + pid, tl.sum(acc))


# The JIT kernel by name (the ahead-of-time check, kernels.aot); its launch config is
# `kernels.tuning.vfl_launch_config`.
KERNELS = {"vfl": _vfl_kernel}


def launch_kernel(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    scores: torch.Tensor | None,
    targets: torch.Tensor | None,
    *,
    alpha: float,
    gamma: float,
    iou_weighted: bool,
    store_loss: bool = False,
    reduce: bool = False,
    store_grad: bool = False,
    grad_out: torch.Tensor | None = None,
    denom: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run `_vfl_kernel` once (no checks, no autograd: the autograd wrapper's launch, and what
    `benchmarks.vfl_parts` times part by part); returns (loss [N, C] | None, grad [N, C] | None,
    partials | None).

    All tensors must be contiguous and validated. The gradient is scaled by 1 / denom, or
    multiplied elementwise by grad_out when given.
    """
    n, c = logits.shape
    compute = checks.compute_dtype(logits.dtype)
    loss = torch.empty_like(logits) if store_loss else None
    grad = torch.empty_like(logits) if store_grad else None
    block_n, block_c, num_warps = tuning.vfl_launch_config(c, compute)
    programs = triton.cdiv(n, block_n) if n * c else 0
    partials = torch.zeros(programs, dtype=compute, device=logits.device) if reduce else None
    if programs == 0:
        if grad is not None:
            grad.zero_()
        return loss, grad, partials
    dense = targets is not None
    _vfl_kernel[(programs,)](
        logits,
        logits if dense else labels,
        logits if dense else scores,
        targets if dense else logits,
        grad_out if grad_out is not None else logits,
        denom if denom is not None else logits,
        loss if loss is not None else logits,
        grad if grad is not None else logits,
        partials if partials is not None else logits,
        n,
        c,
        float(alpha),
        float(gamma),
        DENSE=dense,
        GAMMA_IS_TWO=float(gamma) == 2.0,
        IOU_WEIGHTED=bool(iou_weighted),
        STORE_LOSS=store_loss,
        REDUCE=reduce,
        STORE_GRAD=store_grad,
        GRAD_OUT=grad_out is not None,
        COMPUTE=tl.float64 if compute == torch.float64 else tl.float32,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return loss, grad, partials


class _VarifocalLoss(torch.autograd.Function):
    """Autograd wrapper: sparse (labels, scores) or dense (targets) targets, one reduction.

    Gradients flow to the logits only; labels, scores and targets are constants.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        scores: torch.Tensor | None,
        targets: torch.Tensor | None,
        denom: torch.Tensor,
        alpha: float,
        gamma: float,
        iou_weighted: bool,
        reduction: str,
    ) -> torch.Tensor:
        args = dict(alpha=alpha, gamma=gamma, iou_weighted=iou_weighted)
        if reduction == "none":
            loss, _, _ = launch_kernel(logits, labels, scores, targets, store_loss=True, **args)
            ctx.save_for_backward(logits, labels, scores, targets)
            ctx.args = args
            ctx.reduction = reduction
            return loss
        _, grad, partials = launch_kernel(logits, labels, scores, targets, reduce=True,
                                    store_grad=ctx.needs_input_grad[0], denom=denom, **args)
        ctx.grad = grad
        ctx.reduction = reduction
        total = partials.sum()
        if reduction == "mean":
            total = total / denom
        return total.to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.reduction == "none":
            logits, labels, scores, targets = ctx.saved_tensors
            _, grad, _ = launch_kernel(logits, labels, scores, targets, store_grad=True,
                                 grad_out=grad_output.contiguous(), **ctx.args)
        else:
            # always one pass over [N, C]: skipping it when grad_output == 1 would need the host
            # to read grad_output, a sync of the GPU stream in the middle of backward
            grad = ctx.grad * grad_output
        return grad, None, None, None, None, None, None, None, None


def varifocal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "sum",
    avg_factor: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Varifocal loss with sparse targets.

    logits: [N, C] raw scores (float16/bfloat16/float32/float64). labels: [N] integer class of each
    row (outside [0, C) = background: all C targets are 0). scores: [N] float, the IoU target
    q in [0, 1] at column labels[i]. alpha, gamma: focal parameters (>= 0). iou_weighted: weight
    positives by q. reduction: "none" -> [N, C]; "sum" -> scalar; "mean" -> sum / (N*C) (0 when
    empty), or sum / avg_factor when given (a positive float or a one-element tensor on the
    logits' device; only with "mean"). Returns the loss in the logits' dtype; gradients flow to
    the logits only.
    """
    _check_common(logits, alpha, gamma, iou_weighted, reduction, avg_factor)
    labels = checks.check_tensor("labels", labels)
    scores = checks.check_tensor("scores", scores)
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    checks.check_float("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    n = logits.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} rows but logits has {n}")
    if scores.shape[0] != n:
        raise ValueError(f"scores has {scores.shape[0]} rows but logits has {n}")
    _check_devices_and_targets(logits, avg_factor, labels=labels, scores=scores)
    if dispatch.value_checks_enabled(logits):
        _check_values(logits, "scores", scores, avg_factor)
    options = dict(alpha=alpha, gamma=gamma, iou_weighted=iou_weighted, reduction=reduction,
                   avg_factor=avg_factor)
    if not dispatch.use_triton(logits):
        return varifocal_loss_reference(logits, labels, scores, **options)
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.long()
    return _apply(logits, labels.contiguous(), scores.contiguous(), None, **options)


def varifocal_loss_dense(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "sum",
    avg_factor: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Varifocal loss with dense targets.

    logits: [N, C] raw scores; targets: [N, C] float IoU targets q in [0, 1] (0 = negative).
    Other arguments and the result as in `varifocal_loss`.
    """
    _check_common(logits, alpha, gamma, iou_weighted, reduction, avg_factor)
    targets = checks.check_tensor("targets", targets)
    checks.check_float("targets", targets)
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    _check_devices_and_targets(logits, avg_factor, targets=targets)
    if dispatch.value_checks_enabled(logits):
        _check_values(logits, "targets", targets, avg_factor)
    options = dict(alpha=alpha, gamma=gamma, iou_weighted=iou_weighted, reduction=reduction,
                   avg_factor=avg_factor)
    if not dispatch.use_triton(logits):
        return varifocal_loss_dense_reference(logits, targets, **options)
    return _apply(logits, None, None, targets.contiguous(), **options)


def _apply(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    scores: torch.Tensor | None,
    targets: torch.Tensor | None,
    *,
    alpha: float,
    gamma: float,
    iou_weighted: bool,
    reduction: str,
    avg_factor: float | torch.Tensor | None,
) -> torch.Tensor:
    """Build the reduction's denominator on the logits' device (no host sync) and run the op."""
    n, c = logits.shape
    compute = checks.compute_dtype(logits.dtype)
    if isinstance(avg_factor, torch.Tensor):
        denom = avg_factor.detach().to(compute).reshape(())
    else:
        value = 1.0
        if reduction == "mean":
            value = float(avg_factor) if avg_factor is not None else float(max(n * c, 1))
        denom = torch.full((), value, dtype=compute, device=logits.device)
    return _VarifocalLoss.apply(logits.contiguous(), labels, scores, targets, denom, float(alpha),
                                float(gamma), bool(iou_weighted), reduction)


def _check_common(
    logits: object,
    alpha: object,
    gamma: object,
    iou_weighted: object,
    reduction: object,
    avg_factor: object,
) -> None:
    logits = checks.check_tensor("logits", logits)
    checks.check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    for name, value in (("alpha", alpha), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if not isinstance(iou_weighted, bool):
        raise TypeError(f"iou_weighted must be a bool, got {type(iou_weighted).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if avg_factor is None:
        return
    if reduction != "mean":
        raise ValueError(f"avg_factor is only allowed with reduction='mean', got {reduction!r}")
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1 or avg_factor.dtype == torch.bool or avg_factor.is_complex():
            raise ValueError(
                f"avg_factor tensor must hold one real number, got shape {tuple(avg_factor.shape)} "
                f"and dtype {avg_factor.dtype}"
            )
    elif isinstance(avg_factor, bool) or not isinstance(avg_factor, numbers.Real):
        raise TypeError(f"avg_factor must be a number or a tensor, got {type(avg_factor).__name__}")
    elif not math.isfinite(avg_factor) or avg_factor <= 0:
        raise ValueError(f"avg_factor must be finite and > 0, got {avg_factor}")


def _check_devices_and_targets(
    logits: torch.Tensor, avg_factor: object, **targets: torch.Tensor
) -> None:
    """Same device for every tensor; targets are constants (no gradient flows to them)."""
    factor = avg_factor if isinstance(avg_factor, torch.Tensor) else None
    checks.check_same_device(logits=logits, **targets, avg_factor=factor)
    for name, tensor in targets.items():
        if tensor.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} must not require grad (targets are constants): detach it")


def _check_values(
    logits: torch.Tensor, target_name: str, target: torch.Tensor, avg_factor: object
) -> None:
    """Checks that read values (they would synchronise a GPU): run on CPU or with VFNET_DEBUG=1."""
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite")
    if target.numel() and not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError(f"{target_name} must lie in [0, 1]")
    if isinstance(avg_factor, torch.Tensor):
        value = float(avg_factor.detach().reshape(()))
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"avg_factor must be finite and > 0, got {value}")
