"""Where the fused varifocal loss's forward+backward time goes, part by part, on CUDA:
`python -m benchmarks.vfl_parts`.

The H200's first run (benchmarks/NOTES.md section 5) measured the forward alone at 1,448 GB/s but
forward+backward at 578 GB/s (358,400 x 80, fp32). This times, side by side in one process, with
`triton.testing.do_bench` (median ms; each part's bytes over its time = GB/s):

- `copy`: one read + one write of the [N, C] logits (the ceiling of a pass);
- `fwd`: the kernel with the reduction only (loss value; reads the logits once);
- `fwd_grad`: the kernel storing the gradient too (reads once, writes once): the autograd forward;
- `bwd_scale`: `grad * grad_output`, the autograd backward (reads once, writes once);
- `autograd`: `torch.autograd.grad(varifocal_loss(...), logits)`, the whole op.

If autograd is close to fwd_grad + bwd_scale, the gap is the extra pass; if it is much larger,
the time goes to launches, allocation or synchronisation between them.
"""
from __future__ import annotations

import argparse

import torch


def measure(points: int, classes: int) -> list[tuple[str, float, float]]:
    """(part, ms, GB/s) of each part at [points, classes] float32."""
    import triton.testing

    from benchmarks.vfl import make_inputs
    from kernels import varifocal
    from kernels.varifocal import varifocal_loss

    device = torch.device("cuda")
    logits, labels, scores = make_inputs(points, classes, torch.float32, device)
    nc_bytes = logits.numel() * logits.element_size()
    args = dict(alpha=0.75, gamma=2.0, iou_weighted=True)
    grad = torch.empty_like(logits)
    upstream = torch.ones((), device=device)
    leaf = logits.detach().requires_grad_()
    parts = {
        "copy": (lambda: grad.copy_(logits), 2 * nc_bytes),
        "fwd": (lambda: varifocal.launch_kernel(logits, labels, scores, None, reduce=True, **args), nc_bytes),
        "fwd_grad": (lambda: varifocal.launch_kernel(logits, labels, scores, None, reduce=True, store_grad=True,
                                               **args), 2 * nc_bytes),
        "bwd_scale": (lambda: grad * upstream, 2 * nc_bytes),
        "autograd": (lambda: torch.autograd.grad(varifocal_loss(leaf, labels, scores), leaf), 4 * nc_bytes),
    }
    rows = []
    for name, (fn, nbytes) in parts.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows.append((name, ms, nbytes / (ms * 1e-3) / 1e9))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vfl_parts", description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=358_400)
    parser.add_argument("--classes", type=int, nargs="+", default=[80, 1203])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("vfl_parts: needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}; bytes counted per part: see the docstring")
    for classes in args.classes:
        for name, ms, gbps in measure(args.points, classes):
            print(f"{args.points}x{classes} {name:10s} {ms:8.4f} ms {gbps:8.1f} GB/s")


if __name__ == "__main__":
    main()
