"""Fused varifocal loss benchmark: `python -m benchmarks.vfl`.

Providers: `triton` (kernels.varifocal_loss, sparse targets), `eager` (the expression the reference
VFNet head evaluates: a dense target from labels times scores, sigmoid, focal weight,
BCE-with-logits times weight, sum) and `torch_compile` (torch.compile of that same function; skipped
with a warning where it does not compile). Modes: `fwd` (loss only, logits not requiring grad) and
`fwd_bwd` (loss and the gradient w.r.t. the logits). Metrics: median ms and achieved GB/s, counting
the bytes the op must move: logits read once, the gradient written once (fwd_bwd), labels (int64)
and scores (float32) read once. The device's copy bandwidth and matmul rate are recorded as
`ceiling` rows; speed-ups against eager / torch_compile and the fraction of the copy ceiling are
logged.

Shapes: on a GPU, the points of a 16-image batch at 1333x800 (padded to 1344x800) over P3-P7
(358,400 points) x 80 (COCO) and 1203 (LVIS) classes; with `--small` (the default without CUDA)
tiny shapes so the script runs in seconds (on the CPU the Triton kernel runs through the
interpreter: those numbers only show the script works and are not meant to be committed).
Rows are appended to <out-dir>/vfl.csv as they are measured and drawn in <out-dir>/vfl.png (default
benchmarks/results).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks import harness

log = logging.getLogger("benchmarks.vfl")

SCRIPT = "vfl"
PROVIDERS = ("triton", "eager", "torch_compile")
MODES = ("fwd", "fwd_bwd")
STRIDES = (8, 16, 32, 64, 128)
POSITIVE_FRACTION = 0.01  # share of points with a foreground label (ATSS gives well under 1%)


def points_per_image(height: int, width: int, strides: tuple[int, ...] = STRIDES) -> int:
    """Feature-map points over the pyramid levels of a padded `height` x `width` input: each level
    halves the previous one rounding up (stride-2 3x3 convs with padding 1)."""
    total, h, w = 0, height, width
    for k, stride in enumerate(strides):
        if k == 0:
            h, w = -(-height // stride), -(-width // stride)
        else:
            h, w = -(-h // 2), -(-w // 2)
        total += h * w
    return total


COCO_POINTS = 16 * points_per_image(800, 1344)  # 358,400


def eager_vfl(logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
              alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """The reference head's varifocal loss in plain PyTorch, summed.

    logits [N, C]; labels [N] in [0, C] (C = background); scores [N] IoU targets.
    """
    num_classes = logits.shape[1]
    one_hot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    targets = one_hot * scores[:, None].to(logits.dtype)
    prob = logits.sigmoid()
    weight = torch.where(targets > 0, targets, alpha * (prob - targets).abs().pow(gamma))
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight
    return loss.sum()


def make_inputs(points: int, classes: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ~ N(0, 4) [points, classes]; labels [points] int64, background (= classes) except
    POSITIVE_FRACTION of them; scores [points] float32 in [0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(points, classes, generator=gen, device=device, dtype=dtype) * 2
    positive = torch.rand(points, generator=gen, device=device) < POSITIVE_FRACTION
    labels = torch.randint(0, classes, (points,), generator=gen, device=device)
    labels = torch.where(positive, labels, torch.full_like(labels, classes))
    scores = torch.rand(points, generator=gen, device=device)
    return logits, labels, scores


def moved_bytes(points: int, classes: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes the op must move: logits read once (+ gradient written once), labels and scores."""
    element = torch.empty((), dtype=dtype).element_size()
    passes = 2 if mode == "fwd_bwd" else 1
    return passes * points * classes * element + points * (8 + 4)


def build_providers(names: list[str]) -> dict[str, Callable]:
    """name -> loss function (logits, labels, scores) -> scalar; torch_compile is compiled lazily
    and dropped (with a warning) by `measure` if compiling fails."""
    from kernels import varifocal_loss

    table = {
        "triton": lambda x, y, s: varifocal_loss(x, y, s, reduction="sum"),
        "eager": eager_vfl,
        "torch_compile": torch.compile(eager_vfl) if "torch_compile" in names else None,
    }
    return {name: table[name] for name in names}


def step_fn(fn: Callable, logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
            mode: str) -> Callable[[], object]:
    """A closure running one forward (or forward + gradient) of `fn`."""
    if mode == "fwd":
        return lambda: fn(logits, labels, scores)
    leaf = logits.detach().requires_grad_()
    return lambda: torch.autograd.grad(fn(leaf, labels, scores), leaf)


def measure(providers: dict[str, Callable], points: int, classes: list[int], dtypes: list[str],
            modes: list[str], device: torch.device, warmup: int, reps: int) -> Iterator[harness.Row]:
    """Time every provider x shape x dtype x mode; yields ms and gbps rows as they are measured."""
    broken: set[str] = set()
    for c in classes:
        for dtype_name in dtypes:
            dtype = harness.DTYPES[dtype_name]
            logits, labels, scores = make_inputs(points, c, dtype, device)
            shape = f"{points}x{c}"
            for mode in modes:
                nbytes = moved_bytes(points, c, dtype, mode)
                for name, fn in providers.items():
                    if name in broken:
                        continue
                    step = step_fn(fn, logits, labels, scores, mode)
                    try:
                        step()
                    except Exception as exc:  # noqa: BLE001 - torch.compile fails in many ways
                        if name != "torch_compile":
                            raise
                        log.warning("skipping torch_compile: it failed on this machine (%s: %s)",
                                    type(exc).__name__, str(exc).splitlines()[0][:200])
                        broken.add(name)
                        continue
                    ms = harness.time_ms(step, device, warmup=warmup, reps=reps)
                    gbps = harness.rate_quantiles(nbytes / 1e9, ms)
                    log.info("%-13s %-7s %s %-12s %9.3f ms %8.1f GB/s", name, mode, dtype_name,
                             shape, ms[0], gbps[0])
                    yield harness.Row(SCRIPT, name, mode, dtype_name, shape, "ms", "ms", *ms)
                    yield harness.Row(SCRIPT, name, mode, dtype_name, shape, "gbps", "GB/s", *gbps)


def log_ratios(rows: list[harness.Row]) -> None:
    """Log triton's speed-up over eager / torch_compile and its share of the copy ceiling."""
    ms = {(r.provider, r.mode, r.dtype, r.shape): r.p50 for r in rows if r.metric == "ms"}
    gbps = {(r.mode, r.dtype, r.shape): r.p50 for r in rows
            if r.metric == "gbps" and r.provider == "triton"}
    copy = [r.p50 for r in rows if r.provider == "ceiling" and r.metric == "gbps"]
    for (provider, mode, dtype, shape), t in sorted(ms.items()):
        if provider != "triton":
            continue
        parts = [f"{other} {ms[(other, mode, dtype, shape)] / t:.2f}x"
                 for other in ("eager", "torch_compile") if (other, mode, dtype, shape) in ms]
        if copy:
            parts.append(f"{100 * gbps[(mode, dtype, shape)] / copy[0]:.0f}% of copy bandwidth")
        log.info("triton %s %s %s: %s", mode, dtype, shape, ", ".join(parts) or "no comparison")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vfl", description=__doc__.split(
        "\n")[0])
    harness.add_size_args(parser, small="tiny shapes", full=f"the COCO/LVIS shapes: {COCO_POINTS} points")
    parser.add_argument("--points", type=harness.positive_int, help="override the number of points N")
    parser.add_argument("--classes", type=harness.positive_int, nargs="+",
                        help="class counts C (default 80 1203)")
    harness.add_kernel_args(parser, modes=MODES, providers=PROVIDERS, quick=(1, 3))
    harness.add_output_args(parser, SCRIPT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/vfl.csv, draw <out-dir>/vfl.png; return rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    device = harness.kernel_device()  # before build_providers imports the kernels
    small = harness.is_small(args, device)
    points = args.points or (1024 if small else COCO_POINTS)
    classes = args.classes or [80, 1203]
    warmup, reps = harness.timing(args, small, device)
    providers = build_providers(args.providers)
    results = harness.start(SCRIPT, args, device)
    results.add(measure(providers, points, classes, args.dtypes, args.modes, device, warmup, reps))
    log_ratios(results.rows)
    return results.finish("gbps", "Varifocal loss, achieved bandwidth")


if __name__ == "__main__":
    main()
