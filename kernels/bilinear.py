"""Device functions shared by the star conv (`kernels.star_conv`) and the modulated deformable conv
(`kernels.deform_conv`): the one bilinear gather and the one corner scatter of both.

Both ops are implicit GEMMs whose A operand is the bilinear sample of a channels-last input at one
point per (output location, tap): the star conv derives the point from the boxes, the deform conv
from its offset tensor (times its mask). Per K step a kernel computes the points of its BLOCK_M
locations ([BLOCK_M] vectors), then:
- `corners`: the 4 corners' channels-last element offsets, read masks (torchvision's boundary
  rule: a point with y <= -1, y >= H, x <= -1 or x >= W reads 0, else each corner outside the map
  reads 0; `axis`) and the fractional parts ly, lx;
- `sample`: the [BLOCK_M, BLOCK_K] samples sum_corner w_corner * scale * v_corner, with
  w00 = (1-ly)(1-lx), w01 = (1-ly) lx, w10 = ly (1-lx), w11 = ly lx and `scale` the deform conv's
  mask (1.0 for the star conv);
- backward: `sample_grad` (gs = grad_out @ W_tap^T, d loss / d scaled sample), `scatter_corners`
  (d loss / d v_corner += gs * scale * w_corner, relaxed atomics) and `coordinate_grads`
  (sum_c gs * d sample / d y, d x and sum_c gs * sample).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["axis", "coordinate_grads", "corners", "k_step", "load_corner", "sample", "sample_grad",
           "scatter_corners"]


@triton.jit
def k_step(i, num_kc, CIN, BLOCK_K: tl.constexpr):
    """Step i of the flattened K loop over (tap, channel chunk), num_kc = cdiv(CIN, BLOCK_K)
    chunks per tap: the tap (0..8), the chunk's BLOCK_K channel offsets and their mask."""
    tap = i // num_kc
    offs_c = (i - tap * num_kc) * BLOCK_K + tl.arange(0, BLOCK_K)
    return tap, offs_c, offs_c < CIN


@triton.jit
def axis(coord, size):
    """Along one axis: clamped floor/ceil indices, fractional part, and whether each of the two
    neighbours may be read (torchvision: point in (-1, size), neighbour in [0, size - 1])."""
    low = tl.floor(coord)
    frac = coord - low
    inside = (coord > -1) & (coord < size)
    low_ok = inside & (low >= 0)
    high_ok = inside & (low + 1 <= size - 1)
    last = size - 1
    low_idx = tl.minimum(tl.maximum(low, 0.0), last).to(tl.int64)
    high_idx = tl.minimum(tl.maximum(low + 1, 0.0), last).to(tl.int64)
    return low_idx, high_idx, frac, low_ok, high_ok


@triton.jit
def corners(yc, xc, row_base, mask_m, H, W, CIN):
    """Channels-last element offsets of the 4 bilinear corners of points (yc, xc) [BLOCK_M]
    (00, 01, 10, 11 = (low y, low x), (low y, high x), ...), their read masks, and the
    fractional parts ly, lx."""
    y0, y1, ly, y0_ok, y1_ok = axis(yc, H)
    x0, x1, lx, x0_ok, x1_ok = axis(xc, W)
    r0 = (row_base + y0 * W) * CIN
    r1 = (row_base + y1 * W) * CIN
    o00 = r0 + x0 * CIN
    o01 = r0 + x1 * CIN
    o10 = r1 + x0 * CIN
    o11 = r1 + x1 * CIN
    m00 = mask_m & y0_ok & x0_ok
    m01 = mask_m & y0_ok & x1_ok
    m10 = mask_m & y1_ok & x0_ok
    m11 = mask_m & y1_ok & x1_ok
    return o00, o01, o10, o11, m00, m01, m10, m11, ly, lx


@triton.jit
def load_corner(x_ptr, offs, mask_row, offs_c, mask_c, ct):
    """One corner's values [BLOCK_M, BLOCK_K] at channels offs_c, 0 where it may not be read."""
    ptrs = x_ptr + offs[:, None] + offs_c[None, :]
    return tl.load(ptrs, mask=mask_row[:, None] & mask_c[None, :], other=0.0).to(ct)


@triton.jit
def sample(x_ptr, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, scale, offs_c, mask_c):
    """Bilinear samples [BLOCK_M, BLOCK_K] (compute dtype) of one tap at channels offs_c, times
    `scale` (the deform conv's mask [BLOCK_M], folded into the 4 corner weights; the star conv
    passes 1.0, which the compiler folds away), accumulated corner by corner (one corner tile live
    at a time). Shared by the star conv and `kernels.deform_conv`: the one gather."""
    hy = 1 - ly
    hx = 1 - lx
    ct = ly.dtype
    s = (hy * hx * scale)[:, None] * load_corner(x_ptr, o00, m00, offs_c, mask_c, ct)
    s += (hy * lx * scale)[:, None] * load_corner(x_ptr, o01, m01, offs_c, mask_c, ct)
    s += (ly * hx * scale)[:, None] * load_corner(x_ptr, o10, m10, offs_c, mask_c, ct)
    s += (ly * lx * scale)[:, None] * load_corner(x_ptr, o11, m11, offs_c, mask_c, ct)
    return s


@triton.jit
def sample_grad(go_ptr, go_tile, w_ptr, offs_m, mask_m, w_rows, mask_c, GO_STRIDE, COUT, ct,
                 GO_RESIDENT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """d loss / d sample [BLOCK_M, BLOCK_K] of one tap = grad_out[m, :COUT] @ W[w_rows, :]^T
    (go_ptr: rows of GO_STRIDE elements, the first COUT of which multiply this weight; w_ptr:
    [rows, COUT], w_rows [BLOCK_K] the weight rows of the tap's channels). GO_RESIDENT: all of
    COUT fits one BLOCK_N and go_tile [BLOCK_M, BLOCK_N] was loaded once before the K loop.
    Shared by the star conv (GO_STRIDE = COUT) and `kernels.deform_conv` (one conv group's
    columns of grad_out)."""
    if GO_RESIDENT:
        offs_n = tl.arange(0, BLOCK_N)
        wt = tl.load(w_ptr + w_rows[None, :] * COUT + offs_n[:, None],
                     mask=mask_c[None, :] & (offs_n < COUT)[:, None], other=0.0)
        gs = tl.zeros((BLOCK_M, BLOCK_K), dtype=ct)
        gs = tl.dot(go_tile, wt, gs, input_precision=DOT_PRECISION, out_dtype=ct)
    else:
        gs = tl.zeros((BLOCK_M, BLOCK_K), dtype=ct)
        for n0 in range(0, COUT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < COUT
            go = tl.load(go_ptr + offs_m[:, None] * GO_STRIDE + offs_n[None, :],
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            wt = tl.load(w_ptr + w_rows[None, :] * COUT + offs_n[:, None],
                         mask=mask_c[None, :] & mask_n[:, None], other=0.0)
            gs = tl.dot(go, wt, gs, input_precision=DOT_PRECISION, out_dtype=ct)
    return gs


@triton.jit
def scatter_corners(gx_ptr, gs, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, scale, offs_c,
                     mask_c):
    """Add gs [BLOCK_M, BLOCK_K] times each corner's bilinear weight (times `scale` [BLOCK_M], the
    deform conv's mask, or 1.0) into x's gradient with relaxed atomics: d sample / d corner value
    = that corner's weight. Shared by the star conv and `kernels.deform_conv`: the one scatter."""
    c = offs_c[None, :]
    mc = mask_c[None, :]
    hy = 1 - ly
    hx = 1 - lx
    tl.atomic_add(gx_ptr + o00[:, None] + c, gs * (hy * hx * scale)[:, None],
                  mask=m00[:, None] & mc, sem="relaxed")
    tl.atomic_add(gx_ptr + o01[:, None] + c, gs * (hy * lx * scale)[:, None],
                  mask=m01[:, None] & mc, sem="relaxed")
    tl.atomic_add(gx_ptr + o10[:, None] + c, gs * (ly * hx * scale)[:, None],
                  mask=m10[:, None] & mc, sem="relaxed")
    tl.atomic_add(gx_ptr + o11[:, None] + c, gs * (ly * lx * scale)[:, None],
                  mask=m11[:, None] & mc, sem="relaxed")


@triton.jit
def coordinate_grads(x_ptr, gs, o00, o01, o10, o11, m00, m01, m10, m11, ly, lx, offs_c, mask_c):
    """sum over channels of gs * d sample / d y, of gs * d sample / d x and of gs * sample (the
    unscaled bilinear sample), each [BLOCK_M].

    With sample = (1-ly)(1-lx) v00 + (1-ly) lx v01 + ly (1-lx) v10 + ly lx v11 and the bilinear
    weights depending on the location only, per corner one row sum t = sum_c gs * v suffices:
    d/dy = (t10 - t00)(1 - lx) + (t11 - t01) lx (ly = y - floor(y), d ly / d y = 1; floor is
    constant, the one-sided derivative at whole numbers), likewise for x, and
    sum_c gs * sample = the same bilinear combination of the t's. The star conv uses the first
    two (the third is dead code there); `kernels.deform_conv` all three (its mask gradient)."""
    ct = gs.dtype
    t00 = tl.sum(gs * load_corner(x_ptr, o00, m00, offs_c, mask_c, ct), axis=1)
    t01 = tl.sum(gs * load_corner(x_ptr, o01, m01, offs_c, mask_c, ct), axis=1)
    t10 = tl.sum(gs * load_corner(x_ptr, o10, m10, offs_c, mask_c, ct), axis=1)
    t11 = tl.sum(gs * load_corner(x_ptr, o11, m11, offs_c, mask_c, ct), axis=1)
    hy = 1 - ly
    hx = 1 - lx
    d_y = (t10 - t00) * hx + (t11 - t01) * lx
    d_x = (t01 - t00) * hy + (t11 - t10) * ly
    value = (t00 * hx + t01 * lx) * hy + (t10 * hx + t11 * lx) * ly
    return d_y, d_x, value
