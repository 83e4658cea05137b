"""Pure-PyTorch versions of every op in `kernels`: the CPU path and the tests' oracle.

They take already-validated inputs (the public functions in `kernels` check arguments) and are
written for clarity, with autograd providing the gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

# ---------------------------------------------------------------------------------------------
# Varifocal loss


def varifocal_loss_dense_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "sum",
    avg_factor: float | None = None,
) -> torch.Tensor:
    """Varifocal loss with dense targets.

    logits: [N, C] raw scores; targets: [N, C] IoU targets q in [0, 1] (0 = negative).
    Elementwise, p = sigmoid(x):  q > 0: BCE(x, q) * (q if iou_weighted else 1);
                                  q <= 0: BCE(x, q) * alpha * |p - q|^gamma.
    The focal weight is not detached. Computed in the logits' dtype (float32 for half types).
    reduction "none" -> [N, C]; "sum" -> scalar; "mean" -> sum / (N*C) (0 when N*C == 0), or
    sum / avg_factor when given.
    """
    out_dtype = logits.dtype
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute)
    q = targets.to(compute)
    p = torch.sigmoid(x)
    positive = q > 0
    pos_weight = q if iou_weighted else torch.ones_like(q)
    neg_weight = alpha * (p - q).abs().pow(gamma)
    weight = torch.where(positive, pos_weight, neg_weight)
    loss = F.binary_cross_entropy_with_logits(x, q, reduction="none") * weight
    return _reduce(loss, reduction, avg_factor).to(out_dtype)


def varifocal_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "sum",
    avg_factor: float | None = None,
) -> torch.Tensor:
    """Varifocal loss with sparse targets: labels [N] int (outside [0, C) = background) and
    scores [N] (the IoU target of that point's class). Same value as the dense form with
    targets[i, labels[i]] = scores[i] and 0 elsewhere."""
    return varifocal_loss_dense_reference(
        logits,
        dense_targets(labels, scores, logits.shape[1]),
        alpha=alpha,
        gamma=gamma,
        iou_weighted=iou_weighted,
        reduction=reduction,
        avg_factor=avg_factor,
    )


def dense_targets(labels: torch.Tensor, scores: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C] targets from sparse labels [N] and scores [N]; background labels give a zero row."""
    n = labels.shape[0]
    targets = torch.zeros(n, num_classes, dtype=scores.dtype, device=scores.device)
    valid = (labels >= 0) & (labels < num_classes)
    rows = torch.arange(n, device=labels.device)[valid]
    targets[rows, labels[valid].long()] = scores[valid]
    return targets


def _reduce(loss: torch.Tensor, reduction: str, avg_factor: float | None) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if avg_factor is not None:
        return total / avg_factor
    return total / loss.numel() if loss.numel() else total


# ---------------------------------------------------------------------------------------------
# Star deformable convolution


def star_coordinates(
    bbox_pred: torch.Tensor, stride: float, gradient_mul: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 sampling rows and 3 sampling columns of every location, in feature-map cells.

    bbox_pred: [B, 4, H, W] (l, t, r, b) distances in input-image pixels. Returns rows [B, 3, H, W]
    = (y - t, y, y + b) / stride-scaled and cols [B, 3, H, W] = (x - l, x, x + r), in the compute
    dtype (float64 for float64, else float32). The gradient reaching bbox_pred through them is
    scaled by `gradient_mul` (`(1 - g) * b.detach() + g * b`). Negative distances are used as
    given: the sample lands on the other side of the location.
    """
    compute = torch.float64 if bbox_pred.dtype == torch.float64 else torch.float32
    box = bbox_pred.to(compute)
    box = (1.0 - gradient_mul) * box.detach() + gradient_mul * box
    box = box / stride
    _, _, h, w = box.shape
    y = torch.arange(h, dtype=compute, device=box.device).view(1, h, 1)
    x = torch.arange(w, dtype=compute, device=box.device).view(1, 1, w)
    left, top, right, bottom = box.unbind(1)
    rows = torch.stack([y - top, y.expand_as(top), y + bottom], dim=1)
    cols = torch.stack([x - left, x.expand_as(left), x + right], dim=1)
    return rows, cols


def star_offsets(bbox_pred: torch.Tensor, stride: float, gradient_mul: float = 0.1) -> torch.Tensor:
    """torchvision `deform_conv2d` offsets [B, 18, H, W] of the star points (for padding=1).

    Channel 2k / 2k+1 hold the (dy, dx) displacement of tap k = 3 * ky + kx from its regular
    3x3 position (y + ky - 1, x + kx - 1), so that
    `torchvision.ops.deform_conv2d(x, star_offsets(b, s), weight, padding=1)` samples the same
    points as `star_deform_conv2d(x, b, weight, s)`.
    """
    rows, cols = star_coordinates(bbox_pred, stride, gradient_mul)
    _, _, h, w = rows.shape
    y = torch.arange(h, dtype=rows.dtype, device=rows.device).view(1, h, 1)
    x = torch.arange(w, dtype=rows.dtype, device=rows.device).view(1, 1, w)
    pairs = []
    for ky in range(3):
        for kx in range(3):
            pairs.append(rows[:, ky] - (y + ky - 1))
            pairs.append(cols[:, kx] - (x + kx - 1))
    return torch.stack(pairs, dim=1).to(bbox_pred.dtype)


def bilinear_corners(
    py: torch.Tensor, px: torch.Tensor, height: int, width: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 4 bilinear corners of points (py, px) as 4 (index, weight) pairs, each of py's shape:
    `bilinear_corner_stack`'s last dimension unbound (same values)."""
    index, weight = bilinear_corner_stack(py, px, height, width)
    return list(zip(index.unbind(-1), weight.unbind(-1)))


def bilinear_corner_stack(
    py: torch.Tensor, px: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 bilinear corners of points (py, px) (any equal shapes, cells) on an H x W map.

    Returns (index, weight), both [*py.shape, 4] with the corners in the order (y0, x0),
    (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1): index = row * W + col of the corner (int64,
    exact for any map size; 0 where the corner does not count, so it is always a valid position
    to read), weight its bilinear weight (1 - ly or ly) * (1 - lx or lx), with ly = py - floor(py)
    and lx likewise, set to 0 by torchvision's boundary rule: for the whole point when py <= -1,
    py >= H, px <= -1 or px >= W (or a coordinate is NaN), else for each corner outside
    [0, H-1] x [0, W-1]. The sample is the sum over the last dimension of value[index] * weight.
    The weights are differentiable w.r.t. py and px (floor and the rule's masks are constants),
    so a point outside the map gets exactly zero gradient. Only Floor, comparisons, Where and
    Cast, once for all 4 corners: usable in exported graphs (`vfnet.interop.export`), where one
    op per corner would quadruple the graph.
    """
    inside = (py > -1) & (py < height) & (px > -1) & (px < width)
    y0 = torch.floor(py.detach())
    x0 = torch.floor(px.detach())
    ly, lx = py - y0, px - x0
    cy = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    cx = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    wy = torch.stack([1 - ly, 1 - ly, ly, ly], dim=-1)
    wx = torch.stack([1 - lx, lx, 1 - lx, lx], dim=-1)
    valid = inside.unsqueeze(-1) & (cy >= 0) & (cy <= height - 1) & (cx >= 0) & (cx <= width - 1)
    zero = torch.zeros_like(cy)
    index = torch.where(valid, cy, zero).long() * width + torch.where(valid, cx, zero).long()
    weight = torch.where(valid, wy * wx, torch.zeros_like(wy))
    return index, weight


def star_corners(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bilinear corners of the 9 star samples of every location, as rows of a channels-last
    table: rows, cols [B, 3, H, W] (`star_coordinates`) -> (index [B*9*H*W, 4] int64 into a
    [B*H*W, C] table, weight [B*9*H*W, 4]); sample s = (b, tap 3*ky+kx, y, x) in that order.
    One set serves both convolutions of the pair."""
    b, _, h, w = rows.shape
    py = rows.unsqueeze(2).expand(b, 3, 3, h, w).reshape(b, 9 * h * w)
    px = cols.unsqueeze(1).expand(b, 3, 3, h, w).reshape(b, 9 * h * w)
    index, weight = bilinear_corner_stack(py, px, h, w)  # [B, 9HW, 4]
    index = index + (torch.arange(b, device=rows.device) * (h * w)).view(b, 1, 1)
    return index.reshape(-1, 4), weight.reshape(-1, 4)


def _star_conv(
    x: torch.Tensor, corners: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor,
    bias: torch.Tensor | None, compute: torch.dtype,
) -> torch.Tensor:
    """x [B, Cin, H, W] sampled at `corners` (`star_corners`) and convolved with weight
    [Cout, Cin, 3, 3] (+ bias [Cout]) -> [B, Cout, H, W] in x's dtype.

    Each corner is one `index_select` of whole rows (Cin contiguous values) from a channels-last
    table of x, so gathering (and its backward, a row scatter-add) moves contiguous memory; the
    weighted corners add up to the columns [B*H*W, 9*Cin] (column tap*Cin + channel), and one
    matmul with the weight as [9*Cin, Cout] gives the output.
    """
    b, cin, h, w = x.shape
    cout = weight.shape[0]
    table = x.to(compute).permute(0, 2, 3, 1).reshape(b * h * w, cin)
    index, corner_weight = corners
    samples = table.index_select(0, index[:, 0]) * corner_weight[:, :1]
    for k in range(1, 4):
        samples = samples + table.index_select(0, index[:, k]) * corner_weight[:, k:k + 1]
    columns = samples.view(b, 9, h * w, cin).transpose(1, 2).reshape(b * h * w, 9 * cin)
    matrix = weight.to(compute).reshape(cout, cin, 9).permute(2, 1, 0).reshape(9 * cin, cout)
    out = columns @ matrix
    if bias is not None:
        out = out + bias.to(compute)
    return out.view(b, h, w, cout).permute(0, 3, 1, 2).contiguous().to(x.dtype)


def star_deform_conv2d_reference(
    x: torch.Tensor,
    bbox_pred: torch.Tensor,
    weight: torch.Tensor,
    stride: float,
    *,
    bias: torch.Tensor | None = None,
    gradient_mul: float = 0.1,
) -> torch.Tensor:
    """Star deformable 3x3 convolution (docs/design.md §2), out [B, Cout, H, W] in x's dtype.

    x [B, Cin, H, W]; bbox_pred [B, 4, H, W] (l, t, r, b) in input pixels; weight
    [Cout, Cin, 3, 3]; bias [Cout] or None; stride in input pixels per cell. Tap (ky, kx) samples
    (y + (-t, 0, b)[ky] / stride, x + (-l, 0, r)[kx] / stride) bilinearly (torchvision's
    boundary rule). Computed in float32 (float64 for float64 inputs) with explicit
    [B*H*W, 9*Cin] columns gathered row by row from a channels-last table (`_star_conv`).
    """
    rows, cols = star_coordinates(bbox_pred, stride, gradient_mul)
    return _star_conv(x, star_corners(rows, cols), weight, bias, rows.dtype)


def star_deform_conv2d_pair_reference(
    x_cls: torch.Tensor,
    x_reg: torch.Tensor,
    bbox_pred: torch.Tensor,
    w_cls: torch.Tensor,
    w_reg: torch.Tensor,
    stride: float,
    *,
    gradient_mul: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's two star convolutions (no bias) sharing one set of sampling coordinates:
    (star_deform_conv2d_reference(x_cls, bbox_pred, w_cls, stride),
     star_deform_conv2d_reference(x_reg, bbox_pred, w_reg, stride))."""
    rows, cols = star_coordinates(bbox_pred, stride, gradient_mul)
    corners = star_corners(rows, cols)
    return (_star_conv(x_cls, corners, w_cls, None, rows.dtype),
            _star_conv(x_reg, corners, w_reg, None, rows.dtype))


# ---------------------------------------------------------------------------------------------
# Modulated deformable convolution (DCNv2), torchvision's `deform_conv2d` contract

DEFORM_CHUNK_BYTES = 64 * 2**20
"""Default budget of `deform_conv2d_reference`: the sampled columns of one chunk of output
positions ([positions, kh*kw*Cin] in the compute dtype) stay at or below this many bytes."""


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or an (h, w) pair as an (h, w) tuple of ints."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length along one axis, as conv2d: (size + 2*padding - dilation*(kernel - 1) - 1)
    // stride + 1 (the last kernel window must fit inside the padded input)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def modulated_offsets(conv_offset_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv's `ModulatedDeformConv2dPack` layout: its `conv_offset` output -> (offset, mask).

    conv_offset_out: [B, 3*dg*kh*kw, Ho, Wo]. mmcv splits it into three equal chunks along the
    channels, concatenates the first two as the offset and takes the sigmoid of the third as the
    mask; concatenating the first two thirds is the first two thirds unchanged, so here
    offset = conv_offset_out[:, :2*dg*kh*kw] ([B, 2*dg*kh*kw, Ho, Wo]) and
    mask = sigmoid(conv_offset_out[:, 2*dg*kh*kw:]) ([B, dg*kh*kw, Ho, Wo]). mmcv's CUDA im2col
    reads that offset with the channel layout of `deform_conv2d_reference` (docs/design.md §2.4),
    so with `offset, mask = modulated_offsets(out)`,
    `deform_conv2d_reference(x, offset, weight, bias, stride, padding, dilation, mask)` is mmcv's
    modulated deformable convolution.
    """
    if conv_offset_out.dim() != 4 or conv_offset_out.shape[1] % 3:
        raise ValueError("conv_offset_out must be [B, 3*dg*kh*kw, Ho, Wo], got shape "
                         f"{tuple(conv_offset_out.shape)}")
    split = 2 * conv_offset_out.shape[1] // 3
    return conv_offset_out[:, :split], torch.sigmoid(conv_offset_out[:, split:])


def deform_conv2d_reference(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
    *,
    groups: int = 1,
    chunk_bytes: int = DEFORM_CHUNK_BYTES,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2; DCNv1 when mask is None), docs/design.md §2.4.

    Shapes: input [B, Cin, H, W]; weight [Cout, Cin/groups, kh, kw]; bias [Cout] or None;
    offset [B, 2*dg*kh*kw, Ho, Wo] and mask [B, dg*kh*kw, Ho, Wo] (dg deform groups, inferred
    from the offset's channels), Ho/Wo = `conv_output_size` of H/W. Returns [B, Cout, Ho, Wo] in
    input's dtype (channels-last memory), `torchvision.ops.deform_conv2d`'s value.

    Output (n, o, y, x) = bias[o] + sum over taps k = i*kw + j and the input channels c of o's
    conv group: weight[o, c, i, j] * m * bilinear(input[n, c], py, px), where, with g = the
    deform group of c (c // (Cin/dg)) and q = g*kh*kw + k,
        py = y*stride_h - pad_h + i*dil_h + offset[n, 2q, y, x]      (row, input cells)
        px = x*stride_w - pad_w + j*dil_w + offset[n, 2q + 1, y, x]  (column)
        m  = mask[n, q, y, x] (1 without a mask)
    and bilinear follows torchvision's boundary rule (`bilinear_corners`).

    Computed as: a channels-last table of the input with one row per (image, cell, deform
    group), then per chunk of output positions (flattened over B, Ho, Wo) the 4 corner rows of
    every (position, group, tap) are gathered, weighted (bilinear weight x mask) and summed into
    columns [positions, kh*kw*Cin], and one batched matmul per conv group applies the weight.
    A chunk holds as many positions as keep its columns at or below `chunk_bytes` (at least
    one); the transient peak is about 3 times that (the running sum, one gathered corner and its
    product). When autograd records, chunks after the first are checkpointed
    (`torch.utils.checkpoint`, recomputed in backward), so the graph keeps the inputs and one
    [positions, Cout] output per chunk instead of every chunk's gathered corners. Math in
    float64 for float64 input, else float32 (fp16/bf16 are cast to float32 and the result
    back); autograd gives every gradient (input, offset, mask, weight, bias).
    """
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    b, cin, h, w = input.shape
    cout, _, kh, kw = weight.shape
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[2:]
    positions = b * ho * wo
    device = input.device
    # one row per (image, cell, deform group): row ((n*H + row)*W + col)*dg + g
    table = input.to(compute).permute(0, 2, 3, 1).reshape(b * h * w * dg, cin // dg)
    # per position p = (n*Ho + y)*Wo + x: offsets [P, dg, taps, (dy, dx)] and mask [P, dg, taps]
    offsets = offset.to(compute).reshape(b, dg, taps, 2, ho * wo).permute(0, 4, 1, 2, 3)
    offsets = offsets.reshape(positions, dg, taps, 2)
    modulation = None
    if mask is not None:
        modulation = mask.to(compute).reshape(b, dg, taps, ho * wo).permute(0, 3, 1, 2)
        modulation = modulation.reshape(positions, dg, taps)
    # weight as [groups, taps * Cin/groups, Cout/groups]: row = tap * (Cin/groups) + channel
    matrix = weight.to(compute).reshape(groups, cout // groups, -1, taps).permute(0, 3, 2, 1)
    matrix = matrix.reshape(groups, -1, cout // groups)
    geometry = _DeformGeometry(h, w, ho, wo, dg, sh, sw, ph, pw, dh, dw, kh, kw, device, compute)

    per_chunk = max(1, chunk_bytes // (taps * cin * torch.finfo(compute).bits // 8))
    starts = range(0, max(positions, 1), per_chunk)  # one (empty) chunk for an empty batch
    recorded = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, offset, mask, weight))
    outputs = []
    for number, start in enumerate(starts):
        stop = min(start + per_chunk, positions)
        args = (start, table, offsets[start:stop], None if modulation is None else modulation[start:stop], matrix)
        if recorded and number > 0:
            outputs.append(torch.utils.checkpoint.checkpoint(
                geometry.chunk, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            outputs.append(geometry.chunk(*args))
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if bias is not None:
        out = out + bias.to(compute)
    return out.reshape(b, ho, wo, cout).permute(0, 3, 1, 2).to(input.dtype)


class _DeformGeometry:
    """The fixed sizes of one `deform_conv2d_reference` call and its per-chunk computation."""

    def __init__(self, h: int, w: int, ho: int, wo: int, dg: int, sh: int, sw: int,
                 ph: int, pw: int, dh: int, dw: int, kh: int, kw: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.h, self.w, self.ho, self.wo = h, w, ho, wo
        self.sh, self.sw, self.ph, self.pw = sh, sw, ph, pw
        # regular position of tap k = i*kw + j relative to the window's corner: (i*dil_h, j*dil_w)
        self.tap_rows = (torch.arange(kh, device=device, dtype=dtype) * dh).repeat_interleave(kw)
        self.tap_cols = (torch.arange(kw, device=device, dtype=dtype) * dw).repeat(kh)
        self.group_ids = torch.arange(dg, device=device).view(1, dg, 1)

    def chunk(self, start: int, table: torch.Tensor, offsets: torch.Tensor,
              modulation: torch.Tensor | None, matrix: torch.Tensor) -> torch.Tensor:
        """Output rows [n, Cout] of positions start .. start + n - 1 (n = offsets.shape[0])."""
        n, dg, taps, _ = offsets.shape
        p = torch.arange(start, start + n, device=offsets.device)
        image, cell = p // (self.ho * self.wo), p % (self.ho * self.wo)
        window_row = (cell // self.wo) * self.sh - self.ph
        window_col = (cell % self.wo) * self.sw - self.pw
        py = window_row.to(offsets.dtype).view(n, 1, 1) + self.tap_rows + offsets[..., 0]  # [n, dg, taps]
        px = window_col.to(offsets.dtype).view(n, 1, 1) + self.tap_cols + offsets[..., 1]
        base = image.view(n, 1, 1) * (self.h * self.w)
        columns = None
        for index, weight in bilinear_corners(py, px, self.h, self.w):
            if modulation is not None:
                weight = weight * modulation
            rows = (base + index) * dg + self.group_ids  # [n, dg, taps]
            term = table[rows] * weight.unsqueeze(-1)  # [n, dg, taps, Cin/dg]
            columns = term if columns is None else columns + term
        # [n, dg, taps, Cin/dg] -> [n, taps, Cin] -> [groups, n, taps * Cin/groups]
        groups, rows_per_group, cout_g = matrix.shape
        columns = columns.transpose(1, 2).reshape(n, taps, groups, rows_per_group // taps).permute(2, 0, 1, 3)
        out = torch.bmm(columns.reshape(groups, n, rows_per_group), matrix)  # [groups, n, Cout/groups]
        return out.permute(1, 0, 2).reshape(n, groups * cout_g)
