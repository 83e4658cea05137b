"""What every benchmark script shares: timing, the device's measured ceilings, CSV rows, charts.

Rows follow DESIGN.md §7: `benchmark, provider, mode, dtype, shape, metric, unit, p50, p20, p80,
device, commit, timestamp`, appended to `benchmarks/results/<script>.csv`; each script also draws
`benchmarks/results/<script>.png`.

Timing: on CUDA `triton.testing.do_bench` (warm-up, then quantiles of many runs, in ms); on the CPU
a plain wall-clock loop with the same quantiles.
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from vfnet.atomic import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Row:
    """One measurement, as a CSV row."""

    benchmark: str
    provider: str  # triton, eager, torch_compile, torchvision, torch, ceiling
    mode: str  # fwd, bwd, fwd_bwd, train_step, infer, copy, matmul
    dtype: str
    shape: str
    metric: str  # ms, gbps, tflops, img_per_s, peak_mem_mb
    unit: str
    p50: float
    p20: float
    p80: float
    device: str = ""
    commit: str = ""
    timestamp: str = ""


def device_name(device: torch.device) -> str:
    """`torch.cuda.get_device_name()` for CUDA devices, else "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def git_commit() -> str:
    """The short commit hash of the working tree, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
            reps: int = 10) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of `fn()` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
        return float(p50), float(p20), float(p80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return quantiles(samples)


def time_calls_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
                  reps: int = 10) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of `fn()` in milliseconds, each call timed on its own
    (CUDA events around it, then a synchronize; wall clock on the CPU).

    For long calls (a training step, a detector forward): `time_ms` on CUDA sizes its repetitions
    for sub-millisecond kernels and would time such a call only once or twice.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return quantiles(samples)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of `samples` (one sample: that value three times)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: 10%, 20%, ... 90%
    return statistics.median(samples), cuts[1], cuts[7]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory allocated while running `fn()` once, in MB (CUDA only; NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def ceiling_rows(benchmark: str, device: torch.device) -> list[Row]:
    """The device's measured limits: device-to-device copy GB/s and bf16 matmul TFLOP/s.

    Copy: a 1 GiB buffer (larger than L2) copied; bytes = read + write. Matmul: 8192^3 bf16.
    On the CPU the sizes are small: the rows only show the script works.
    """
    cuda = device.type == "cuda"
    numel = (2**30 // 4) if cuda else 2**22
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device)
    gbps = [2 * src.numel() * 4 / (ms * 1e-3) / 1e9 for ms in copy]
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_ms(lambda: a @ b, device)
    tflops = [2 * n**3 / (ms * 1e-3) / 1e12 for ms in mm]
    return [
        Row(benchmark, "ceiling", "copy", "fp32", str(numel), "gbps", "GB/s", *gbps),
        Row(benchmark, "ceiling", "matmul", str(dtype).removeprefix("torch."), f"{n}x{n}x{n}",
            "tflops", "TFLOP/s", *tflops),
    ]


def write_rows(script: str, rows: list[Row], device: torch.device, *,
               out_dir: Path | None = None) -> Path:
    """Stamp rows with device, commit and time; append them to <out_dir>/<script>.csv (the file
    is replaced atomically)
    (out_dir defaults to benchmarks/results)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{script}.csv"
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    name, commit = device_name(device), git_commit()
    old = path.read_text() if path.exists() else ""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[f.name for f in fields(Row)])
    if not old:
        writer.writeheader()
    for row in rows:
        row.device, row.commit, row.timestamp = name, commit, stamp
        writer.writerow(asdict(row))
    with atomic_write(path, "w") as fh:  # the old rows plus the new ones, never a torn row
        fh.write(old + text.getvalue())
    return path


def plot_rows(script: str, rows: list[Row], metric: str, title: str, *,
              out_dir: Path | None = None) -> Path:
    """A grouped bar chart of `metric` (p50, with p20-p80 whiskers) per shape/mode/dtype and
    provider; saved as <out_dir>/<script>.png (out_dir defaults to benchmarks/results)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.metric == metric and r.provider != "ceiling"]
    groups = sorted({(r.shape, r.mode, r.dtype) for r in chosen})
    providers = sorted({r.provider for r in chosen})
    width = 0.8 / max(len(providers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    for k, provider in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for g, group in enumerate(groups):
            match = [r for r in chosen if (r.shape, r.mode, r.dtype) == group and r.provider == provider]
            if match:
                r = match[-1]
                xs.append(g + k * width)
                ys.append(r.p50)
                lo.append(max(r.p50 - min(r.p20, r.p80), 0))
                hi.append(max(max(r.p20, r.p80) - r.p50, 0))
        ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=7)
    unit = chosen[0].unit if chosen else metric
    ax.set_ylabel(unit)
    ax.set_title(f"{title} ({rows[0].device if rows else ''})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{script}.png"
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path
