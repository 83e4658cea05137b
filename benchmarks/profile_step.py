"""Where one training step's time goes: `python -m benchmarks.profile_step`.

Runs the engine's training step (`vfnet.train.step.train_step` through benchmarks.workload:
forward, ATSS assignment, loss, backward, optimiser step; bf16 autocast on CUDA) under
`torch.profiler` and groups the time by the model's `record_function` ranges: backbone
(`vfnet.backbone`), FPN (`vfnet.fpn`), head convs (`vfnet.head` outside the star conv), star
conv (`vfnet.star_conv`), ATSS assignment (`vfnet.model.assign`), losses (`vfnet.loss`) and
optimiser (`vfnet.optimizer`, with gradient clipping when on), forward and backward
separately: a backward op is charged to the part whose forward op has its autograd sequence
number. The rest is "other" (e.g. gradient accumulation, the loss sum).

On CUDA the time counted is the device's (kernels, copies and memsets, each charged through the
CPU op that launched it); "host gaps" is the step's time with the device idle: the step window
(from the step's first Python op to the end of its last kernel, a synchronize closes each step)
minus the union of device activity, with the largest single gap reported too (issue #6's
target: no gap above 5% of the step). On the CPU the counted time is that of the top-level
operators and the gaps are the step's time outside any operator (Python and dispatch overhead).

Writes <out-dir>/profile_step_<device>.txt (device e.g. `cpu`, `nvidia_h100_80gb_hbm3`): the
grouped table, then torch's own operator table; `--trace` also writes a Chrome trace next to it.
Full (default with CUDA): VFNet R-50, 1333x800, batch 8, provider triton. `--small` (default
without CUDA): ResNet-18 with 32 channels, 128x128, batch 2, provider torch (triton runs only
under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import bisect
import datetime as _dt
import logging
import re
import shlex
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import harness, workload
from vfnet.core.atomic import write_text
from vfnet.train.step import BACKWARD_RANGE, OPTIMIZER_RANGE

log = logging.getLogger("benchmarks.profile_step")

STEP = "vfnet.step"
PARTS = {  # record_function range -> part; the order of the table
    "vfnet.backbone": "backbone",
    "vfnet.fpn": "FPN",
    "vfnet.head": "head convs",
    "vfnet.star_conv": "star conv",
    "vfnet.model.assign": "ATSS assignment",
    "vfnet.loss": "losses",
    OPTIMIZER_RANGE: "optimiser",
}
BACKWARD = BACKWARD_RANGE
OPTIMIZER = OPTIMIZER_RANGE
OTHER = "other"
BACKWARD_NODE = "autograd::engine::evaluate_function: "


@dataclass
class Profile:
    """A step's time by part, in ms per step. `busy[(part, phase)]` with phase "fwd", "bwd" or
    "step" (the optimiser);
    `step_ms` the step's duration; `idle_ms` the time nothing was running; `largest_gap_ms` the
    longest such stretch."""

    steps: int
    step_ms: float
    busy: dict[tuple[str, str], float] = field(default_factory=dict)
    idle_ms: float = 0.0
    largest_gap_ms: float = 0.0
    on_device: bool = False


class _Ranges:
    """The `record_function` ranges and backward nodes of the CPU threads, for lookups by time."""

    def __init__(self, cpu_events: list) -> None:
        self.ranges: dict[int, list] = defaultdict(list)  # thread -> part ranges
        self.nodes: dict[int, list] = defaultdict(list)  # thread -> backward nodes by start
        for e in cpu_events:
            if e.name in PARTS or e.name == BACKWARD:
                self.ranges[e.thread].append(e)
            elif e.name.startswith(BACKWARD_NODE):
                self.nodes[e.thread].append(e)
        for nodes in self.nodes.values():
            nodes.sort(key=lambda e: e.time_range.start)
        self.node_starts = {t: [e.time_range.start for e in n] for t, n in self.nodes.items()}
        # The sequence numbers of the forward ops inside each range: a backward node belongs to
        # the innermost range whose span holds its forward op's sequence number.
        self.seq_span: dict[int, tuple[int, int]] = {}
        for e in cpu_events:
            if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_NODE) and e.name not in PARTS:
                r = self.range_at(e.thread, e.time_range.start)
                if r is not None and r.name in PARTS:
                    lo, hi = self.seq_span.get(r.id, (e.sequence_nr, e.sequence_nr))
                    self.seq_span[r.id] = (min(lo, e.sequence_nr), max(hi, e.sequence_nr))

    def range_at(self, thread: int, t: float):
        """The innermost part range (or the backward range) on `thread` containing time t."""
        best = None
        for r in self.ranges.get(thread, ()):
            if r.time_range.start <= t <= r.time_range.end and (
                    best is None or r.time_range.start >= best.time_range.start):
                best = r
        return best

    def node_at(self, thread: int, t: float):
        """The backward node running on `thread` at time t, if any."""
        starts = self.node_starts.get(thread)
        if not starts:
            return None
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and self.nodes[thread][i].time_range.end >= t:
            return self.nodes[thread][i]
        return None

    def backward_part(self, node) -> str:
        best = None
        for r in self.ranges.get(node.fwd_thread, ()):
            span = self.seq_span.get(r.id)
            if span and span[0] <= node.sequence_nr <= span[1] and (
                    best is None or r.time_range.start >= best.time_range.start):
                best = r
        return PARTS[best.name] if best is not None else OTHER

    def classify(self, thread: int, t: float) -> tuple[str, str]:
        """(part, phase) of work issued on `thread` at time t."""
        node = self.node_at(thread, t)
        if node is not None:
            return self.backward_part(node), "bwd"
        r = self.range_at(thread, t)
        if r is None:
            return OTHER, "fwd"
        if r.name == BACKWARD:
            return OTHER, "bwd"
        return PARTS[r.name], "step" if r.name == OPTIMIZER else "fwd"


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _annotation(event) -> bool:
    """A `record_function` range (ours by name; any by the profiler's flag where it has one)."""
    return event.name.startswith("vfnet.") or getattr(event, "is_user_annotation", False)


def device_launches(prof) -> dict[int, tuple[int, float]]:
    """For each device event of a finished `torch.profiler.profile`, by its id (`FunctionEvent.id`,
    the CUDA correlation id): (thread, start in us) of the CPU operator that launched it.

    Read from the profiler's raw Kineto events, whose `linked_correlation_id()` every torch 2.x
    has (`FunctionEvent.linked_correlation_id` is recent: torch 2.11 lacks it). Operators are the
    CPU events not linked to another (runtime calls such as cudaLaunchKernel are linked).
    """
    results = prof.profiler.kineto_results
    origin = results.trace_start_ns()
    raw = list(results.events())
    ops = {e.correlation_id(): e for e in raw
           if e.device_type() == DeviceType.CPU and e.linked_correlation_id() == 0}
    launches = {}
    for e in raw:
        op = ops.get(e.linked_correlation_id()) if e.device_type() == DeviceType.CUDA else None
        if op is not None:
            launches[e.correlation_id()] = (op.start_thread_id(), (op.start_ns() - origin) / 1e3)
    return launches


def summarise(events: list, launches: dict[int, tuple[int, float]] | None = None) -> Profile:
    """Group profiler events (`prof.events()`) of the `vfnet.step` ranges into a Profile.

    launches (`device_launches`, with a device): work items are the device events, each charged
    to the part and phase of its launching CPU operator. Without: the top-level CPU operators
    (parent None or a `record_function` range).
    """
    on_device = launches is not None
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    steps = [e for e in cpu if e.name == STEP]
    if not steps:
        raise ValueError(f"no {STEP!r} range in the profile")
    ranges = _Ranges(cpu)
    work: list[tuple[float, float, str, str]] = []  # (start, end, part, phase), microseconds
    if on_device:
        for e in events:
            # (record_function ranges also appear as device-side "gpu_user_annotation" spans)
            if e.device_type != DeviceType.CUDA or _annotation(e):
                continue
            site = launches.get(e.id)
            part, phase = ranges.classify(*site) if site else (OTHER, "fwd")
            work.append((e.time_range.start, e.time_range.end, part, phase))
    else:
        for e in cpu:
            if _annotation(e) or not (e.cpu_parent is None or _annotation(e.cpu_parent)):
                continue
            part, phase = ranges.classify(e.thread, e.time_range.start)
            work.append((e.time_range.start, e.time_range.end, part, phase))

    busy: dict[tuple[str, str], float] = defaultdict(float)
    total_us = idle_us = largest_us = 0.0
    for step in steps:
        begin = step.time_range.start
        inside = [w for w in work if w[0] >= begin and w[0] <= step.time_range.end]
        end = max([step.time_range.end] + [w[1] for w in inside])
        for start, stop, part, phase in inside:
            busy[(part, phase)] += stop - start
        cursor = begin
        for start, stop in _merge([(max(w[0], begin), min(w[1], end)) for w in inside]):
            gap = start - cursor
            idle_us += max(gap, 0.0)
            largest_us = max(largest_us, gap)
            cursor = max(cursor, stop)
        idle_us += end - cursor
        largest_us = max(largest_us, end - cursor)
        total_us += end - begin
    n = len(steps)
    return Profile(
        steps=n,
        step_ms=total_us / n / 1e3,
        busy={k: v / n / 1e3 for k, v in busy.items()},
        idle_ms=idle_us / n / 1e3,
        largest_gap_ms=largest_us / 1e3,
        on_device=on_device,
    )


def format_profile(p: Profile) -> str:
    """The grouped table: per part forward / backward / total ms per step and share of the step."""
    what = "device time" if p.on_device else "CPU operator time"
    lines = [f"{'part':<18}{'forward ms':>12}{'backward ms':>13}{'total ms':>11}{'share':>8}"]
    for part in [*PARTS.values(), OTHER]:
        fwd, bwd = p.busy.get((part, "fwd"), 0.0), p.busy.get((part, "bwd"), 0.0)
        total = fwd + bwd + p.busy.get((part, "step"), 0.0)
        columns = f"{'':>25}" if part == PARTS[OPTIMIZER] else f"{fwd:>12.2f}{bwd:>13.2f}"
        lines.append(f"{part:<18}{columns}{total:>11.2f}{100 * total / p.step_ms:>7.1f}%")
    busy = sum(p.busy.values())
    lines.append(f"{'sum (' + what + ')':<43}{busy:>11.2f}{100 * busy / p.step_ms:>7.1f}%")
    gaps = "host gaps (device idle)" if p.on_device else "gaps (outside operators)"
    lines.append(f"{gaps:<43}{p.idle_ms:>11.2f}{100 * p.idle_ms / p.step_ms:>7.1f}%")
    lines.append(f"{'largest single gap':<43}{p.largest_gap_ms:>11.2f}"
                 f"{100 * p.largest_gap_ms / p.step_ms:>7.1f}%")
    lines.append(f"{'step':<43}{p.step_ms:>11.2f}{100.0:>7.1f}%")
    return "\n".join(lines)


def run_profile(step: Callable[[], None], device: torch.device, *, warmup: int, steps: int,
                trace: Path | None = None) -> tuple[Profile, str]:
    """Warm up, profile `steps` steps (each a `vfnet.step` range closed by a synchronize); return
    the grouped Profile and torch's operator table."""
    for _ in range(warmup):
        step()
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    if on_device:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
                if on_device:
                    torch.cuda.synchronize(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
    return summarise(list(prof.events()), device_launches(prof) if on_device else None), table


def device_slug(device: torch.device) -> str:
    """`cpu`, or the CUDA device name in lower case with runs of other characters as `_`."""
    return re.sub(r"[^a-z0-9]+", "_", harness.device_name(device).lower()).strip("_")


def main(argv: list[str] | None = None) -> Profile:
    """Profile the step; write <out-dir>/profile_step_<device>.txt; return the Profile."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                     description=__doc__.split("\n")[0])
    harness.add_size_args(parser, small="ResNet-18, 32 channels, 128x128", full="VFNet R-50, 1333x800")
    parser.add_argument("--batch", type=int, help="images per step (default 8, small 2)")
    parser.add_argument("--provider", choices=workload.PROVIDERS,
                        help="default triton on CUDA or under TRITON_INTERPRET=1, else torch")
    parser.add_argument("--config", action="append", metavar="NAME",
                        help="a shipped config or TOML path to profile instead of the reference R-50 "
                             "(random weights; e.g. shapes_tiny, the main job)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size, a multiple of 32 (default 800 1344, or 128 128 small)")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last = true")
    parser.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (default 2)")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace (.json)")
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR,
                        help="where the text goes (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = harness.is_small(args, device)
    batch = args.batch or (2 if small else 8)
    provider = args.provider or workload.default_providers(device)[0]
    if batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1, --warmup >= 0")
    size = tuple(args.size) if args.size else (workload.SMALL_SIZE if small else workload.FULL_SIZE)
    if size[0] % 32 or size[1] % 32 or min(size) < 32:
        parser.error(f"--size must be multiples of 32, got {size}")
    if args.config and len(args.config) > 1:
        parser.error("--config: one config per profile")
    (label, cfg), = workload.bench_configs(args, small)
    model, = workload.build_models(cfg, [provider], device, layouts=(args.channels_last,)).values()
    data = workload.synthetic_batch(batch, size, cfg.model.num_classes, device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "_".join(["profile_step", device_slug(device), *([label] if label else []),
                     *(["channels_last"] if args.channels_last else [])])
    trace = out_dir / f"{name}.json" if args.trace else None
    profile_, table = run_profile(workload.train_step(model, data), device,
                                  warmup=args.warmup, steps=args.steps, trace=trace)
    dtype = "bf16 autocast" if workload.use_amp(device) else "fp32"
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.profile_step", *map(shlex.quote, given)])
    header = (f"VFNet training step profile: {workload.shape_label(cfg, batch, size, label)}, {dtype}, "
              f"provider {workload.model_label(provider, args.channels_last)}\n"
              f"device {harness.device_name(device)}, commit {harness.git_commit()}, {stamp}\n"
              f"command: {command}\n"
              f"{profile_.steps} profiled step(s) after {args.warmup} warm-up step(s); ms per step\n")
    path = out_dir / f"{name}.txt"
    write_text(path, f"{header}\n{format_profile(profile_)}\n\ntorch.profiler operator table\n{table}\n")
    log.info("\n%s", format_profile(profile_))
    log.info("wrote %s", path)
    return profile_


if __name__ == "__main__":
    main()
