"""What every benchmark script shares: the command line, timing, the device's measured
ceilings, the results (CSV rows, chart, log) and the torchvision star-conv baseline.

- Command line: `add_size_args` (`--small` / `--full`), `add_timing_args` (`--warmup`, `--reps`),
  `add_output_args` (`--out-dir`, `--no-ceiling`).
- Results: `Results` appends every row to `<out-dir>/<script>.csv` as soon as it is measured (a
  run stopped part-way keeps the rows it measured), then draws `<out-dir>/<script>.png` and logs
  both paths. Rows follow the CSV schema of docs/design.md §7: `benchmark, provider, mode, dtype,
  shape, metric, unit, p50, p20, p80, device, commit, timestamp`.
- Timing: `time_ms` runs `warmup` untimed calls, then times `reps` calls one by one (CUDA events
  with the L2 cache flushed before each call; wall clock on the CPU) and returns quantiles;
  `rate_quantiles` turns them into the quantiles of a rate (GB/s, TFLOP/s, img/s), whose p20 and
  p80 come from the time's p80 and p20.
- `torchvision_star_pair`: the star-conv pair as the reference implementation computes it
  (offsets, then `torchvision.ops.deform_conv2d`), the baseline of the micro and the detector
  benchmarks.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import io
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vfnet.core.atomic import atomic_write

if TYPE_CHECKING:  # importing kernels here would load them before a script sets TRITON_INTERPRET
    from kernels.ops import StarPairOp

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the kernel benchmarks' input dtypes
# (warmup, reps) defaults of `time_ms` on CUDA: single kernels (0.01-10 ms) and whole steps
KERNEL_TIMING = (10, 100)
STEP_TIMING = (3, 10)
L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 cache of current GPUs (H100/H200: 50 MB)


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


def kernel_device() -> torch.device:
    """The device of a kernel benchmark: CUDA when there is one, else the CPU, where the Triton
    kernels run only through the interpreter: `TRITON_INTERPRET=1` is set (unless the caller set
    it), which works only before the kernel modules are imported."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """`torch.cuda.get_device_name()` for CUDA devices, else "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.cache
def git_commit() -> str:
    """`VFNET_COMMIT` when set (a copied tree without .git, e.g. on the GPU machine), else the
    short commit hash of the working tree, or "unknown" (no git, or not a repository)."""
    if os.environ.get("VFNET_COMMIT", "").strip():
        return os.environ["VFNET_COMMIT"].strip()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
            reps: int = 10) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of `fn()` in milliseconds over `reps` calls, after
    `warmup` untimed ones.

    CUDA: each call between two CUDA events, after a write of L2_FLUSH_BYTES so that no call
    finds the previous one's data in the L2 cache; the calls are queued back to back and the
    events read after one synchronize. CPU: wall clock around each call.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return quantiles(samples)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return quantiles([start.elapsed_time(end) for start, end in events])


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of `samples` (one sample: that value three times)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: 10%, 20%, ... 90%
    return statistics.median(samples), cuts[1], cuts[7]


def rate_quantiles(amount: float, ms: tuple[float, float, float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of the rate `amount` per second, from the time quantiles
    `ms` = (median, 20th, 80th percentile) in milliseconds: a rate falls as the time grows, so its
    20th percentile comes from the time's 80th and its 80th from the time's 20th."""
    p50, p20, p80 = ms
    return amount / (p50 * 1e-3), amount / (p80 * 1e-3), amount / (p20 * 1e-3)


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
    gbps = rate_quantiles(2 * src.numel() * 4 / 1e9, copy)
    n = 8192 if cuda else 512
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = time_ms(lambda: a @ b, device)
    tflops = rate_quantiles(2 * n**3 / 1e12, mm)
    return [
        Row(benchmark, "ceiling", "copy", "fp32", str(numel), "gbps", "GB/s", *gbps),
        Row(benchmark, "ceiling", "matmul", str(dtype).removeprefix("torch."), f"{n}x{n}x{n}",
            "tflops", "TFLOP/s", *tflops),
    ]


def write_rows(script: str, rows: list[Row], device: torch.device, *,
               out_dir: Path | None = None) -> Path:
    """Stamp rows with device, commit and time and append them to <out_dir>/<script>.csv
    (out_dir defaults to benchmarks/results); the file is replaced atomically, old rows first."""
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


class Results:
    """The rows of one benchmark run: each `add` appends to <out_dir>/<script>.csv at once;
    `finish` draws the chart and logs where both are."""

    def __init__(self, script: str, device: torch.device, out_dir: Path | None = None) -> None:
        self.script, self.device, self.out_dir = script, device, out_dir
        self.rows: list[Row] = []

    def add(self, rows: Iterable[Row]) -> None:
        """Append each row to the CSV as it comes (rows may be a generator that measures)."""
        for row in rows:
            write_rows(self.script, [row], self.device, out_dir=self.out_dir)
            self.rows.append(row)

    def finish(self, metric: str, title: str) -> list[Row]:
        """Draw `metric` per provider into <out_dir>/<script>.png; return the rows."""
        png = plot_rows(self.script, self.rows, metric, title, out_dir=self.out_dir)
        log.info("wrote %s and %s", (self.out_dir or RESULTS_DIR) / f"{self.script}.csv", png)
        return self.rows


def start(script: str, args: argparse.Namespace, device: torch.device) -> Results:
    """The `Results` of a script run with `add_output_args`: into `--out-dir`, beginning with
    the device's ceiling rows unless `--no-ceiling`."""
    results = Results(script, device, args.out_dir)
    if not args.no_ceiling:
        results.add(ceiling_rows(script, device))
    return results


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


# ---------------------------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_size_args(parser: argparse.ArgumentParser, *, small: str, full: str) -> None:
    """`--small` / `--full` (dest `small`: True, False, or None = by device, see `is_small`)."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", dest="small", action="store_true", default=None,
                      help=f"{small} (default without CUDA)")
    size.add_argument("--full", dest="small", action="store_false", help=f"{full} (default with CUDA)")


def is_small(args: argparse.Namespace, device: torch.device) -> bool:
    """`--small` / `--full` as given, else small exactly on the CPU."""
    return args.small if args.small is not None else device.type == "cpu"


def add_timing_args(parser: argparse.ArgumentParser, *, default: tuple[int, int],
                    quick: tuple[int, int]) -> None:
    """`--warmup` and `--reps` of `time_ms`; without them `timing` gives `default` =
    (warmup, reps), or `quick` for small shapes on the CPU."""
    parser.add_argument("--warmup", type=non_negative_int,
                        help=f"untimed calls first (default {default[0]}, CPU small {quick[0]})")
    parser.add_argument("--reps", type=positive_int,
                        help=f"timed calls (default {default[1]}, CPU small {quick[1]})")
    parser.set_defaults(timing_defaults=(default, quick))


def timing(args: argparse.Namespace, small: bool, device: torch.device) -> tuple[int, int]:
    """(warmup, reps): the flags, else the defaults given to `add_timing_args`."""
    default, quick = args.timing_defaults
    warmup, reps = quick if small and device.type == "cpu" else default
    return (args.warmup if args.warmup is not None else warmup), (args.reps or reps)


def add_kernel_args(parser: argparse.ArgumentParser, *, modes: tuple[str, ...], providers: tuple[str, ...],
                    quick: tuple[int, int]) -> None:
    """What the kernel benchmarks select (`--dtypes` of DTYPES, `--modes`, `--providers`, all by
    default) and their timing (`add_timing_args` with KERNEL_TIMING)."""
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=modes, default=list(modes))
    parser.add_argument("--providers", nargs="+", choices=providers, default=list(providers))
    add_timing_args(parser, default=KERNEL_TIMING, quick=quick)


def add_output_args(parser: argparse.ArgumentParser, script: str, *, ceilings: bool = True) -> None:
    """`--out-dir` (default benchmarks/results) and, for a script that measures `ceilings`,
    `--no-ceiling`."""
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help=f"where {script}.csv and {script}.png go (default benchmarks/results)")
    if ceilings:
        parser.add_argument("--no-ceiling", action="store_true", help="skip the ceiling rows")
    else:
        parser.set_defaults(no_ceiling=True)


# ---------------------------------------------------------------------------------------------
# Baseline op


def torchvision_star_pair() -> StarPairOp | None:
    """The star-conv pair computed the reference implementation's way (the contract of
    `kernels.ops.StarPairOp`): star offsets from the boxes (`kernels.reference.star_offsets`,
    gradient_mul included), then `torchvision.ops.deform_conv2d` per tower. float16/bfloat16
    inputs are computed in float32 (offsets included: low precision would round a 100-cell
    offset by up to half a cell) and the outputs cast back to the input dtype, as torchvision's
    autocast rule for deform_conv2d does; float32/float64 run as they are. None, with a warning,
    when torchvision or its compiled ops do not load."""
    try:
        from torchvision.ops import deform_conv2d
    except Exception as exc:  # noqa: BLE001 - missing package or unloadable compiled ops
        log.warning("torchvision unavailable (%s: %s)", type(exc).__name__, exc)
        return None
    from kernels.reference import star_offsets

    def star_pair(x_cls: torch.Tensor, x_reg: torch.Tensor, bbox_pred: torch.Tensor, w_cls: torch.Tensor,
                  w_reg: torch.Tensor, stride: float, *,
                  gradient_mul: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = x_cls.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        offsets = star_offsets(bbox_pred.to(compute), stride, gradient_mul)
        return (deform_conv2d(x_cls.to(compute), offsets, w_cls.to(compute), padding=1).to(dtype),
                deform_conv2d(x_reg.to(compute), offsets, w_reg.to(compute), padding=1).to(dtype))

    return star_pair
