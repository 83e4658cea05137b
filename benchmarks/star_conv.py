"""Star deformable convolution benchmark: `python -m benchmarks.star_conv`.

What the VFNet head runs per FPN level: two 3x3 star convolutions (classification and regression
tower outputs, Cin = Cout = 256, no bias) over the same star points. Providers:
- `triton`: `kernels.star_deform_conv2d_pair` (sampling computed once for both);
- `triton_single`: `kernels.star_deform_conv2d` called twice;
- `torchvision`: the reference head's path, `benchmarks.harness.torchvision_star_pair` (offsets
  built in PyTorch, then `torchvision.ops.deform_conv2d` twice; bf16 computed in fp32 as
  torchvision's autocast rule does; skipped with a warning when torchvision does not load);
- `eager`: `kernels.reference.star_deform_conv2d_pair_reference` (gather + einsum in PyTorch).
Modes: `fwd` (inputs not requiring grad) and `fwd_bwd` (forward, then gradients of x_cls, x_reg,
both weights and bbox_pred for a fixed upstream gradient). Metrics: ms, TFLOP/s (2*B*H*W*Cout*Cin*9
per conv, two convs, fwd_bwd counts 3x the forward: input and weight gradients), peak_mem_mb (CUDA).
The device's copy bandwidth and bf16 matmul rate are `ceiling` rows; speed-ups, the totals over
the levels and the share of the matmul ceiling are logged.

Shapes: the five FPN levels of a 2-image 1333x800 batch (padded to 1344x800): P3 100x168, P4 50x84,
P5 25x42, P6 13x21, P7 7x11 at strides 8..128, boxes with each distance uniform in
[0.5, 6] strides. `--small` (the default without CUDA) uses tiny shapes so the script runs in
seconds; on the CPU the Triton kernels run through the interpreter and the numbers only show that
the script works (not to be committed). Rows go to <out-dir>/star_conv.csv as they are measured,
the chart to <out-dir>/star_conv.png (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from benchmarks import harness

if TYPE_CHECKING:  # kernels are imported once main has set TRITON_INTERPRET (see main)
    from kernels.ops import StarPairOp

log = logging.getLogger("benchmarks.star_conv")

SCRIPT = "star_conv"
PROVIDERS = ("triton", "triton_single", "torchvision", "eager")
MODES = ("fwd", "fwd_bwd")
# (name, stride, H, W) of a 2-image 1333x800 batch padded to 1344x800
LEVELS = (("P3", 8, 100, 168), ("P4", 16, 50, 84), ("P5", 32, 25, 42), ("P6", 64, 13, 21),
          ("P7", 128, 7, 11))
SMALL_LEVELS = (("P3", 8, 4, 6), ("P4", 16, 2, 3))
BATCH, CHANNELS = 2, 256
SMALL_BATCH, SMALL_CHANNELS = 1, 16
GRADIENT_MUL = 0.1


def make_inputs(batch: int, channels: int, height: int, width: int, stride: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """x_cls, x_reg [B, C, H, W] ~ relu(N(0, 1)) (tower outputs), bbox_pred [B, 4, H, W] fp32 with
    each distance uniform in [0.5, 6] * stride, w_cls, w_reg [C, C, 3, 3] ~ N(0, 0.01)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    box = (0.5 + 5.5 * torch.rand(batch, 4, height, width, generator=gen, device=device)) * stride
    return {
        "x_cls": randn(batch, channels, height, width).relu().to(dtype),
        "x_reg": randn(batch, channels, height, width).relu().to(dtype),
        "bbox_pred": box,
        "w_cls": (0.01 * randn(channels, channels, 3, 3)).to(dtype),
        "w_reg": (0.01 * randn(channels, channels, 3, 3)).to(dtype),
    }


def build_providers(names: list[str]) -> dict[str, StarPairOp]:
    """name -> function (x_cls, x_reg, bbox_pred, w_cls, w_reg, stride, *, gradient_mul) ->
    (out_cls, out_reg); torchvision is dropped with a warning when it does not load."""
    from kernels import reference, star_deform_conv2d, star_deform_conv2d_pair

    def single_twice(x_cls, x_reg, bbox_pred, w_cls, w_reg, stride, *, gradient_mul):
        return (star_deform_conv2d(x_cls, bbox_pred, w_cls, stride, gradient_mul=gradient_mul),
                star_deform_conv2d(x_reg, bbox_pred, w_reg, stride, gradient_mul=gradient_mul))

    table: dict[str, StarPairOp | None] = {
        "triton": star_deform_conv2d_pair,
        "triton_single": single_twice,
        "torchvision": harness.torchvision_star_pair() if "torchvision" in names else None,
        "eager": reference.star_deform_conv2d_pair_reference,
    }
    providers = {}
    for name in names:
        if table[name] is None:
            log.warning("skipping torchvision: torchvision does not load here")
            continue
        providers[name] = table[name]
    return providers


def step_fn(fn: StarPairOp, inputs: dict[str, torch.Tensor], stride: int,
            mode: str) -> Callable[[], object]:
    """A closure running one forward (or forward + all gradients) of the pair."""
    if mode == "fwd":
        return lambda: fn(**inputs, stride=stride, gradient_mul=GRADIENT_MUL)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    b, c, h, w = inputs["x_cls"].shape
    gen = torch.Generator(device=inputs["x_cls"].device).manual_seed(1)
    grads = [torch.randn(b, c, h, w, generator=gen, device=inputs["x_cls"].device)
             .to(inputs["x_cls"].dtype) for _ in range(2)]

    def run() -> object:
        outs = fn(**leaves, stride=stride, gradient_mul=GRADIENT_MUL)
        return torch.autograd.grad(outs, list(leaves.values()), grads)

    return run


def conv_flops(batch: int, channels: int, height: int, width: int, mode: str) -> float:
    """FLOPs of the two convs: 2*B*H*W*Cout*Cin*9 each; fwd_bwd counts 3x (input + weight grads)."""
    forward = 2 * (2 * batch * height * width * channels * channels * 9)
    return forward * (3 if mode == "fwd_bwd" else 1)


def measure(providers: dict[str, StarPairOp], levels: tuple, batch: int, channels: int,
            dtypes: list[str], modes: list[str], device: torch.device, warmup: int,
            reps: int) -> Iterator[harness.Row]:
    """Time every provider x level x dtype x mode: ms, tflops and peak_mem_mb rows, yielded as
    they are measured."""
    for dtype_name in dtypes:
        for name, stride, h, w in levels:
            inputs = make_inputs(batch, channels, h, w, stride, harness.DTYPES[dtype_name], device)
            shape = f"{name} {batch}x{channels}x{h}x{w}"
            for mode in modes:
                flops = conv_flops(batch, channels, h, w, mode)
                for provider, fn in providers.items():
                    step = step_fn(fn, inputs, stride, mode)
                    step()
                    ms = harness.time_ms(step, device, warmup=warmup, reps=reps)
                    tflops = harness.rate_quantiles(flops / 1e12, ms)
                    mem = harness.peak_memory_mb(step, device)
                    log.info("%-13s %-7s %s %-22s %9.3f ms %7.2f TFLOP/s %9.1f MB", provider, mode,
                             dtype_name, shape, ms[0], tflops[0], mem)
                    yield harness.Row(SCRIPT, provider, mode, dtype_name, shape, "ms", "ms", *ms)
                    yield harness.Row(SCRIPT, provider, mode, dtype_name, shape, "tflops", "TFLOP/s",
                                      *tflops)
                    yield harness.Row(SCRIPT, provider, mode, dtype_name, shape, "peak_mem_mb", "MB",
                                      mem, mem, mem)


def log_ratios(rows: list[harness.Row]) -> dict[tuple[str, str], dict[str, float]]:
    """Log, per mode and dtype, each provider's total ms over the levels and triton's speed-up
    over it; and triton's share of the matmul ceiling per level. Returns the totals."""
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r.metric == "ms" and r.provider != "ceiling":
            per = totals.setdefault((r.mode, r.dtype), {})
            per[r.provider] = per.get(r.provider, 0.0) + r.p50
    for (mode, dtype), per in sorted(totals.items()):
        if "triton" not in per:
            continue
        parts = [f"{p} {t:.3f} ms (triton {t / per['triton']:.2f}x faster)"
                 for p, t in sorted(per.items()) if p != "triton"]
        parts.insert(0, f"triton {per['triton']:.3f} ms")
        log.info("total over levels, %s %s: %s", mode, dtype, "; ".join(parts))
    ceiling = [r.p50 for r in rows if r.provider == "ceiling" and r.metric == "tflops"]
    if ceiling:
        for r in rows:
            if r.provider == "triton" and r.metric == "tflops":
                log.info("triton %s %s %s: %.0f%% of the matmul ceiling (%.1f TFLOP/s)", r.mode,
                         r.dtype, r.shape, 100 * r.p50 / ceiling[0], ceiling[0])
    return totals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.star_conv",
                                     description=__doc__.split("\n")[0])
    harness.add_size_args(parser, small="tiny shapes",
                          full="the five FPN levels of a 2-image 1333x800 batch")
    parser.add_argument("--levels", type=harness.positive_int,
                        help="only the first N levels (P3 first)")
    harness.add_kernel_args(parser, modes=MODES, providers=PROVIDERS, quick=(1, 2))
    harness.add_output_args(parser, SCRIPT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/star_conv.csv, draw <out-dir>/star_conv.png;
    return the rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    device = harness.kernel_device()  # before build_providers imports the kernels
    small = harness.is_small(args, device)
    levels = SMALL_LEVELS if small else LEVELS
    levels = levels[: args.levels] if args.levels else levels
    batch, channels = (SMALL_BATCH, SMALL_CHANNELS) if small else (BATCH, CHANNELS)
    warmup, reps = harness.timing(args, small, device)
    providers = build_providers(args.providers)
    results = harness.start(SCRIPT, args, device)
    results.add(measure(providers, levels, batch, channels, args.dtypes, args.modes, device, warmup,
                        reps))
    log_ratios(results.rows)
    return results.finish("ms", "Star deformable conv pair, time per level")


if __name__ == "__main__":
    main()
