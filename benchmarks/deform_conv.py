"""Modulated deformable convolution (DCNv2) benchmark: `python -m benchmarks.deform_conv`.

The 3x3 DCN layers of a DCN ResNet-50 VFNet at 1333x800 (padded 1344x800), batch 2: the c3-c5
stages' convs (Cin = Cout = 128 / 256 / 512 at 100x168 / 50x84 / 25x42, and the strided first
block of each stage, stride 2 from the previous stage's map) and the head's last tower conv with
DCN (256 channels over P3-P7), with a mask and one deform group, no bias. Providers:
- `triton`: `kernels.deform_conv2d` (the Triton kernels);
- `torchvision`: `torchvision.ops.deform_conv2d` (bf16 computed in fp32, as its autocast rule
  does; skipped with a warning when torchvision does not load);
- `conv2d`: a dense `torch.nn.functional.conv2d` of the same shape (cuDNN on the GPU): the speed a
  DCN layer would have without the deformation, the target's yardstick;
- `eager`: `kernels.reference.deform_conv2d_reference` (chunked gather + bmm in PyTorch).
Modes: `fwd` and `fwd_bwd` (gradients of input, offset, mask and weight; conv2d: input and
weight). Metrics: ms, TFLOP/s (2*B*Ho*Wo*Cout*Cin*9 per forward, fwd_bwd counts 3x), peak_mem_mb
(CUDA: the peak over the memory in use before the step, i.e. the op's extra memory). The device's
copy bandwidth and bf16 matmul rate are `ceiling` rows; triton's speed-ups over torchvision and
its time against conv2d are logged per shape.

`--small` (the default without CUDA) uses tiny shapes so the script runs in seconds; on the CPU
the Triton kernels run through the interpreter and the numbers only show that the script works
(not to be committed). Rows go to <out-dir>/deform_conv.csv, the chart to <out-dir>/deform_conv.png.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator

import torch

from benchmarks import harness

log = logging.getLogger("benchmarks.deform_conv")

SCRIPT = "deform_conv"
PROVIDERS = ("triton", "torchvision", "conv2d", "eager")
MODES = ("fwd", "fwd_bwd")
BATCH = 2
# (name, channels, output H, output W, stride): stride 2 reads a map twice the output's size
SHAPES = (
    ("c3", 128, 100, 168, 1), ("c3s2", 128, 100, 168, 2),
    ("c4", 256, 50, 84, 1), ("c4s2", 256, 50, 84, 2),
    ("c5", 512, 25, 42, 1), ("c5s2", 512, 25, 42, 2),
    ("head_P3", 256, 100, 168, 1), ("head_P4", 256, 50, 84, 1), ("head_P5", 256, 25, 42, 1),
    ("head_P6", 256, 13, 21, 1), ("head_P7", 256, 7, 11, 1),
)
SMALL_BATCH = 1
SMALL_SHAPES = (("c3", 16, 4, 6, 1), ("c3s2", 16, 3, 4, 2))
OFFSET_SCALE = 2.0  # offsets ~ N(0, 2) cells


Op = Callable[..., torch.Tensor]


def make_inputs(batch: int, channels: int, ho: int, wo: int, stride: int, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> dict[str, torch.Tensor | int]:
    """input [B, C, stride*Ho, stride*Wo] ~ relu(N(0, 1)); offset [B, 18, Ho, Wo] fp32 ~ N(0, 2)
    cells; mask = sigmoid(N(0, 1)) fp32; weight [C, C, 3, 3] ~ N(0, 0.01); stride, padding 1."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    return {
        "input": randn(batch, channels, stride * ho, stride * wo).relu().to(dtype),
        "offset": OFFSET_SCALE * randn(batch, 18, ho, wo),
        "mask": torch.sigmoid(randn(batch, 9, ho, wo)),
        "weight": (0.01 * randn(channels, channels, 3, 3)).to(dtype),
        "stride": stride,
    }


def build_providers(names: list[str]) -> dict[str, Op]:
    """name -> fn(input, offset, mask, weight, stride) -> out; torchvision is dropped with a warning
    when it does not load."""
    import torch.nn.functional as F

    from kernels import deform_conv2d, reference

    def triton_op(input, offset, mask, weight, stride):
        return deform_conv2d(input, offset, weight, None, stride, 1, 1, mask)

    def eager(input, offset, mask, weight, stride):
        return reference.deform_conv2d_reference(input, offset, weight, None, stride, 1, 1, mask)

    def dense(input, offset, mask, weight, stride):
        return F.conv2d(input, weight, None, stride, 1)

    table: dict[str, Op | None] = {"triton": triton_op, "torchvision": None, "conv2d": dense, "eager": eager}
    if "torchvision" in names:
        try:
            from torchvision.ops import deform_conv2d as tv_deform_conv2d
        except Exception as exc:  # noqa: BLE001 - missing package or unloadable compiled ops
            log.warning("torchvision unavailable (%s: %s)", type(exc).__name__, exc)
        else:
            def tv(input, offset, mask, weight, stride):
                dtype = input.dtype
                compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
                return tv_deform_conv2d(input.to(compute), offset.to(compute), weight.to(compute), None,
                                        stride, 1, 1, mask.to(compute)).to(dtype)

            table["torchvision"] = tv
    providers = {}
    for name in names:
        if table[name] is None:
            log.warning("skipping torchvision: torchvision does not load here")
            continue
        providers[name] = table[name]
    return providers


def step_fn(fn: Op, inputs: dict, mode: str, provider: str = "") -> Callable[[], object]:
    """A closure running one forward (or forward + the gradients of every differentiable input;
    conv2d has no offset or mask)."""
    stride = inputs["stride"]
    tensors = {k: v for k, v in inputs.items() if k != "stride"}
    if mode == "fwd":
        return lambda: fn(**tensors, stride=stride)
    leaves = {k: v.detach().requires_grad_() for k, v in tensors.items()}
    wanted = [leaves[k] for k in (("input", "weight") if provider == "conv2d" else leaves)]
    grad = None

    def run() -> object:
        nonlocal grad
        out = fn(**leaves, stride=stride)
        if grad is None:
            gen = torch.Generator(device=out.device).manual_seed(1)
            grad = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
        return torch.autograd.grad(out, wanted, grad)

    return run


def conv_flops(batch: int, channels: int, ho: int, wo: int, mode: str) -> float:
    """2*B*Ho*Wo*Cout*Cin*9 per forward; fwd_bwd counts 3x (input and weight gradients)."""
    forward = 2 * batch * ho * wo * channels * channels * 9
    return forward * (3 if mode == "fwd_bwd" else 1)


def measure(providers: dict[str, Op], shapes: tuple, batch: int, dtypes: list[str], modes: list[str],
            device: torch.device, warmup: int, reps: int) -> Iterator[harness.Row]:
    """Time every provider x shape x dtype x mode: ms, tflops and peak_mem_mb rows."""
    for dtype_name in dtypes:
        for name, channels, ho, wo, stride in shapes:
            inputs = make_inputs(batch, channels, ho, wo, stride, harness.DTYPES[dtype_name], device)
            shape = f"{name} {batch}x{channels}x{ho}x{wo} s{stride}"
            for mode in modes:
                flops = conv_flops(batch, channels, ho, wo, mode)
                for provider, fn in providers.items():
                    step = step_fn(fn, inputs, mode, provider)
                    step()
                    ms = harness.time_ms(step, device, warmup=warmup, reps=reps)
                    tflops = harness.rate_quantiles(flops / 1e12, ms)
                    mem = harness.peak_memory_mb(step, device)
                    log.info("%-11s %-7s %s %-26s %9.3f ms %7.2f TFLOP/s %9.1f MB", provider, mode, dtype_name,
                             shape, ms[0], tflops[0], mem)
                    yield harness.Row(SCRIPT, provider, mode, dtype_name, shape, "ms", "ms", *ms)
                    yield harness.Row(SCRIPT, provider, mode, dtype_name, shape, "tflops", "TFLOP/s", *tflops)
                    yield harness.Row(SCRIPT, provider, mode, dtype_name, shape, "peak_mem_mb", "MB", mem, mem, mem)


def log_ratios(rows: list[harness.Row]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Log, per (mode, dtype, shape), triton's speed-up over torchvision (target >= 3x) and its time
    over conv2d's (target <= 2x). Returns the p50 ms per provider."""
    table: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        if r.metric == "ms" and r.provider != "ceiling":
            table.setdefault((r.mode, r.dtype, r.shape), {})[r.provider] = r.p50
    for (mode, dtype, shape), per in table.items():
        if "triton" not in per:
            continue
        parts = [f"triton {per['triton']:.3f} ms"]
        if "torchvision" in per:
            parts.append(f"{per['torchvision'] / per['triton']:.2f}x faster than torchvision (target >= 3)")
        if "conv2d" in per:
            parts.append(f"{per['triton'] / per['conv2d']:.2f}x conv2d's time (target <= 2)")
        log.info("%s %s %s: %s", mode, dtype, shape, "; ".join(parts))
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deform_conv", description=__doc__.split("\n")[0])
    harness.add_size_args(parser, small="tiny shapes", full="the DCN layers of a R-50 VFNet at 1333x800, batch 2")
    parser.add_argument("--shapes", nargs="+", help="only these shapes (c3, c3s2, ..., head_P7)")
    harness.add_kernel_args(parser, modes=MODES, providers=PROVIDERS, quick=(1, 2))
    harness.add_output_args(parser, SCRIPT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/deform_conv.csv, draw <out-dir>/deform_conv.png;
    return the rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    device = harness.kernel_device()  # before build_providers imports the kernels
    small = harness.is_small(args, device)
    shapes = SMALL_SHAPES if small else SHAPES
    if args.shapes:
        shapes = tuple(s for s in shapes if s[0] in args.shapes)
    batch = SMALL_BATCH if small else BATCH
    warmup, reps = harness.timing(args, small, device)
    providers = build_providers(args.providers)
    results = harness.start(SCRIPT, args, device)
    results.add(measure(providers, shapes, batch, args.dtypes, args.modes, device, warmup, reps))
    log_ratios(results.rows)
    return results.finish("ms", "Modulated deformable conv (DCNv2), time per shape")


if __name__ == "__main__":
    main()
