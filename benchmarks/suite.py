"""The GPU suite: `python3 -m benchmarks.suite [--part 1|2] [--budget S] [--out DIR] [--work DIR]`.

Runs, most important first, the `gpu` tests and the benchmarks at their real shapes, each step a
subprocess under its own time cap inside one wall-clock budget counted from the start of the
process (imports and compilation included); a step that fails or times out never stops the next
one, and a step that no longer fits the budget is skipped (listed as such). Two parts, each a
separate call of at most ~4.5 minutes (benchmarks/NOTES.md has the exact device commands), so a
failure in the first can be fixed while the second still runs:

- `--part 1`: the kernel tests (and the harness's CUDA test), the VFL benchmark, the bf16 star conv;
- `--part 2`: the model's CUDA tests, the training step, its profile, inference, the input
  pipeline, the fp32 star conv.

Without `--part` both run in one call (budget 510 s). Each part starts with a parallel
pre-compilation (`--jobs` worker processes, bounded in time; the run carries on without it on
any failure) of the kernel binaries its steps will ask for into the shared `TRITON_CACHE_DIR`:
every star-conv autotune config of the part's calls (STAR_CASES) and the VFL kernel's variants
(VFL_CASES), so the autotuners only load binaries and benchmark. `TRITON_CACHE_AUTOTUNING=1`
keeps each tuning result for the later steps and `TRITON_PRINT_AUTOTUNING=1` logs each tuning's
time (the summary counts them per step: seconds per tuning show whether the binaries were
there). Benchmark steps run with torch.compile's recompile limit raised to RECOMPILE_LIMIT and
made an error (no silent fallback to eager under the `torch_compile` label); the process prints
its compile counters at the end.

Output in --out (default `$OUT`, else `suite_out/`): `summary.md` (one page: environment, one
line per step with its status, seconds, autotune times and last result line, and the p50 (p20-p80)
of every benchmark row) and `suite.tar.gz` (results/, logs/, junit/, env.txt, summary.md of the
working folder), both replaced atomically before the pre-compilation, when each step starts
(marked RUNNING) and after it ends: a run cut short keeps everything measured so far. The
benchmark scripts append their CSV rows under results/ as they measure them (in the working
folder, `--work`, default a new temporary one; the Triton cache lives there too).

Exit status: 0 when every step that ran passed (a step skipped, or cut short by the budget rather
than by its own cap, is listed but does not fail the run), 1 otherwise, 2 without CUDA.

Needs torch with CUDA, triton, torchvision, numpy, pyarrow, pytest, matplotlib, tqdm, pillow;
not git, Ray, pycocotools, tomli_w or pytest-timeout (`benchmarks.suite_plugin` limits each
test). Run it from the repository root; the project need not be installed (PYTHONPATH is set).

`--check` (no GPU needed; CI runs it, also with `--part`): collects the `gpu` tests once and checks
that each test step selects some and that every `gpu` test is in a step, parses every benchmark
step's arguments with the script's own parser, and builds each part's pre-compilation plan;
runs nothing.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import queue
import re
import runpy
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vfnet.core.atomic import atomic_write, write_text

ROOT = Path(__file__).resolve().parents[1]
PARTS = (1, 2)
FULL_BUDGET_S = 510  # both parts in one call, inside a 540 s window
PART_BUDGET_S = 250  # one part, inside the ~270 s of its device command (benchmarks/NOTES.md)
SAVE_RESERVE_S = 10  # kept free at the end of the budget for the last save
MIN_STEP_S = 25  # a step with less time than this left is skipped
PRECOMPILE_CAP_S = 60  # the pre-compilation's own limit
TEST_TIMEOUT_S = 120  # per test
RECOMPILE_LIMIT = 32  # torch.compile graphs per function in a benchmark step (torch's default: 8)
_STARTED = time.monotonic()  # fallback origin of process_age


def process_age() -> float:
    """Seconds since this process started: from /proc on Linux (the interpreter's start and the
    imports count), else since this module was imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _STARTED


@dataclass(frozen=True)
class Step:
    """One unit of the suite: `pytest` arguments (kind "test": "-m gpu" and test paths) or a
    benchmark module and its arguments (kind "bench"), under `cap` seconds, in `part`; a bench
    step's results go to results/`results` (default: results/ itself)."""

    name: str
    kind: str  # "test" or "bench"
    args: tuple[str, ...]
    cap: int
    what: str  # one line for the summary
    part: int = 1
    results: str = ""


def _test(name: str, part: int, cap: int, what: str, *paths: str) -> Step:
    return Step(name, "test", ("-m", "gpu", *paths), cap, what, part)


def _bench(name: str, part: int, cap: int, what: str, module: str, *args: str, results: str = "") -> Step:
    return Step(name, "bench", (module, *args), cap, what, part, results)


# Priority order within each part: correctness of the kernels first, then the kernel figures of
# the targets; the training step, its profile, inference, the rest. Caps: expected time with
# compile, plus margin; a part's caps may add up to more than its budget (later steps are then
# cut or skipped).
STEPS = (
    _test("t_kernels", 1, 120, "gpu tests of the VFL and star-conv kernels (compiled), harness timing",
          "tests/kernels", "tests/benchmarks/test_harness.py"),
    _bench("b_vfl", 1, 120, "VFL fwd/fwd_bwd vs eager and torch.compile, GB/s vs copy bandwidth",
           "benchmarks.vfl"),
    _bench("b_star_bf16", 1, 120, "star conv pair bf16 P3-P7 vs torchvision, TFLOP/s vs bf16 matmul",
           "benchmarks.star_conv", "--dtypes", "bf16", "--providers", "triton", "torchvision",
           results="star_bf16"),
    _bench("b_dcn", 1, 180, "DCNv2 deform_conv2d bf16/fp32, R-50 c3-c5 and head shapes vs torchvision and "
           "dense conv2d, TFLOP/s vs bf16 matmul", "benchmarks.deform_conv", "--providers", "triton", "torchvision",
           "conv2d"),
    _test("t_step", 2, 90, "no host sync in the engine step; CUDA model tests",
          "tests/vfnet/test_host_sync.py", "tests/vfnet/test_model.py"),
    _bench("b_train", 2, 120, "R-50 1333x800 training step, batch 2 and 8, triton vs torch",
           "benchmarks.train_throughput", "--batches", "2", "8", "--warmup", "2", "--reps", "5"),
    _bench("b_profile", 2, 75, "profile of one R-50 training step at batch 8",
           "benchmarks.profile_step", "--warmup", "2", "--steps", "2"),
    _bench("b_infer", 2, 75, "inference latency and images/s, batch 1 and 8",
           "benchmarks.inference", "--warmup", "2", "--reps", "5", "--no-ceiling"),
    _bench("b_dataloader", 2, 60, "input pipeline images/s with 0, 2, 8 workers",
           "benchmarks.dataloader", "--synth", "128", "--workers", "0", "2", "8", "--batches", "20",
           "--reps", "2"),
    _bench("b_star_fp32", 2, 120, "star conv pair fp32 (all providers)",
           "benchmarks.star_conv", "--dtypes", "fp32", "--no-ceiling", results="star_fp32"),
)


def steps_of(part: int | None) -> tuple[Step, ...]:
    """The steps of `part` (1 or 2), or all of them (None)."""
    return tuple(s for s in STEPS if part is None or s.part == part)


# ---------------------------------------------------------------------------------------------
# Parallel pre-compilation of the kernels


@dataclass(frozen=True)
class StarCase:
    """A star-conv call of the suite's steps: a compiled kernel is specialised on these (and on
    the config), not on B, H or W."""

    op: str  # "pair" or "single"
    dtype: str  # torch dtype name of x
    cin: int
    cout: int
    bias: bool
    parts: tuple[int, ...]


@dataclass(frozen=True)
class VflCase:
    """VFL calls of the suite's steps: compiled per dtype, class count (exact: it picks the
    tile), whether the row count is divisible by 16 (n_rows is a stand-in of the same class) and
    the flags; a task runs the op's four flag sets (loss; loss and gradient; "none" and its
    backward)."""

    dtype: str
    n_rows: int
    n_cols: int
    parts: tuple[int, ...]


# Most important first (a task cut by the time limit costs least there).
STAR_CASES = (
    StarCase("pair", "bfloat16", 256, 256, False, (1, 2)),  # the R-50 head under bf16 autocast; gpu test
    StarCase("pair", "float32", 256, 256, False, (1, 2)),  # gpu test; the fp32 benchmark
    StarCase("pair", "bfloat16", 48, 80, False, (1,)), StarCase("pair", "float32", 48, 80, False, (1,)),  # gpu tests
    StarCase("single", "float64", 24, 40, True, (1,)), StarCase("single", "float32", 24, 40, True, (1,)),
    StarCase("single", "float32", 256, 256, False, (2,)),  # the fp32 benchmark's provider triton_single
    StarCase("pair", "bfloat16", 32, 32, False, (2,)), StarCase("pair", "float32", 32, 32, False, (2,)),  # tiny models
)
VFL_CASES = (
    # benchmarks.vfl: 358,400 points (divisible by 16) x 80 and 1203 classes
    *(VflCase(dt, 1024, c, (1,)) for dt in ("bfloat16", "float32") for c in (80, 1203)),
    # the gpu tests: 3001 rows (not divisible by 16), four dtypes
    *(VflCase(dt, 3001, c, (1,)) for dt in ("float32", "bfloat16", "float16", "float64") for c in (80, 1203)),
    # the model's loss (float32): the R-50's 80 classes and the tiny models' 3, both row classes
    *(VflCase("float32", n, c, (2,)) for c in (80, 3) for n in (1024, 1001)),
)


def precompile_tasks(shared_limit: int, capability: int, part: int | None = None) -> list[dict]:
    """The pre-compilation tasks of `part` (None: both) on a device with `shared_limit` bytes of
    shared memory and compute capability `capability`: per StarCase one task per position j of
    the longest config list of its three kernels (task j compiles config j of each kernel, the
    last one where a list is shorter: a cache hit by then), then one task per VflCase. JSON-able."""
    import torch

    from kernels import tuning

    star, vfl = [], []
    for case in STAR_CASES:
        if part is not None and part not in case.parts:
            continue
        dot = tuning.dot_dtype(getattr(torch, case.dtype), interpreter=False)
        longest = max(len(tuning.gpu_configs(k, dot, shared_limit, case.cout, capability))
                      for k in tuning.STAR_KERNELS)
        star += [{"kind": "star", "case": asdict(case), "j": j} for j in range(longest)]
    for vcase in VFL_CASES:
        if part is None or part in vcase.parts:
            vfl.append({"kind": "vfl", "case": asdict(vcase)})
    return star + vfl


def precompile_one(task: dict) -> str:
    """In a worker process: compile what `task` stands for by running the op once, forward and
    backward, on a small input on the GPU (the JIT specialises exactly as the steps' calls will),
    into the shared TRITON_CACHE_DIR. A star task reduces each kernel's autotuner to config j.
    (`task["device"]` = "cpu" runs the same calls on the CPU, for the tests.)"""
    import torch

    case = task["case"]
    dtype = getattr(torch, case["dtype"])
    device = torch.device(task.get("device", "cuda"))
    if task["kind"] == "vfl":
        from kernels import varifocal_loss

        n, c = case["n_rows"], case["n_cols"]
        logits = torch.randn(n, c, device=device, dtype=dtype)
        labels = torch.randint(0, c + 1, (n,), device=device)
        scores = torch.rand(n, device=device)
        varifocal_loss(logits, labels, scores)  # loss only
        x = logits.clone().requires_grad_()
        varifocal_loss(x, labels, scores).backward()  # loss and gradient
        x = logits.clone().requires_grad_()
        varifocal_loss(x, labels, scores, reduction="none").backward(torch.ones_like(x))
        label = f"vfl {case['dtype']} {n}x{c}"
    else:
        from kernels import star_conv, tuning

        j = task["j"]
        if device.type == "cuda":  # (under the interpreter the autotuners have their own configs)
            limit, capability = tuning.shared_memory_limit(device), tuning.capability(device)
            for name, kernel in star_conv.KERNELS.items():
                configs = tuning.gpu_configs(name, tuning.dot_dtype(dtype, interpreter=False), limit, case["cout"],
                                             capability)
                kernel.configs = [configs[min(j, len(configs) - 1)]]

        def leaf(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

        cin, cout = case["cin"], case["cout"]
        box = (torch.rand(2, 4, 7, 11, device=device) * 64).requires_grad_()
        if case["op"] == "pair":
            outs = star_conv.star_deform_conv2d_pair(leaf(2, cin, 7, 11), leaf(2, cin, 7, 11), box,
                                                     leaf(cout, cin, 3, 3), leaf(cout, cin, 3, 3), 8)
        else:
            outs = (star_conv.star_deform_conv2d(leaf(2, cin, 7, 11), box, leaf(cout, cin, 3, 3), 8,
                                                 bias=leaf(cout) if case["bias"] else None),)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        label = f"star {case['op']} {case['dtype']} {cin}->{cout} config {j}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return label


def precompile_worker(argv: list[str] | None = None) -> None:
    """A worker process: `python -c "..." TARGET TASKS_JSON`; runs TARGET ("module:function") on
    each task in order and prints one JSON line per task as it ends ({"index", "seconds",
    "error", "label"}). An exception fails its task only; a crash ends the process (the parent
    counts its remaining tasks as lost)."""
    target, payload = (sys.argv[1:] if argv is None else argv)[:2]
    module, function = target.split(":")
    run = getattr(importlib.import_module(module), function)
    for index, task in json.loads(payload):
        begin = time.perf_counter()
        try:
            label, error = run(task), ""
        except Exception as exc:  # reported; the step that needs it will meet it again
            label, error = "", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        result = {"index": index, "seconds": round(time.perf_counter() - begin, 2), "error": error, "label": label}
        print(f"\n{_MARK}{json.dumps(result)}", flush=True)  # own line, whatever a library printed


_WORKER_CODE = "from benchmarks.suite import precompile_worker; precompile_worker()"
_MARK = "@@vfnet-precompile@@"


@dataclass
class PrecompileReport:
    """What became of the pre-compilation's tasks."""

    tasks: int
    ok: int = 0
    failed: int = 0
    lost: int = 0  # in a worker that crashed
    cancelled: int = 0  # not finished when the time limit came
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def status(self) -> str:
        if self.ok == self.tasks:
            return "ok"
        parts = [f"{n} {what}" for n, what in ((self.failed, "failed"), (self.lost, "lost"),
                                               (self.cancelled, "cancelled")) if n]
        return f"PARTIAL ({self.ok}/{self.tasks} ok; {', '.join(parts)})"


def run_workers(tasks: list, jobs: int, timeout: float, log: Callable[[str], None], env: dict | None = None,
                target: str = "benchmarks.suite:precompile_one") -> PrecompileReport:
    """Run `target` on every task in at most `jobs` worker processes (tasks dealt round-robin in
    order, so the first ones run first), for at most `timeout` seconds: then every worker still
    running is killed. A worker that crashes (compiler crash, out of memory) loses only its own
    remaining tasks. Never raises for what happens in a worker; logs one line per task."""
    report = PrecompileReport(len(tasks))
    if not tasks:
        return report
    begin = time.monotonic()
    jobs = max(1, min(jobs, len(tasks)))
    lines: queue.Queue = queue.Queue()
    procs = []
    for w in range(jobs):
        mine = [(i, tasks[i]) for i in range(w, len(tasks), jobs)]
        proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, target, json.dumps(mine)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        procs.append((proc, {i for i, _ in mine}))

        def read(proc: subprocess.Popen = proc, w: int = w) -> None:
            for line in proc.stdout:
                lines.put((w, line))
            lines.put((w, None))

        threading.Thread(target=read, daemon=True).start()
    done: set[int] = set()
    open_workers = set(range(jobs))  # whose output has not ended
    deadline = begin + timeout
    try:
        while open_workers and time.monotonic() < deadline:
            try:
                w, line = lines.get(timeout=min(deadline - time.monotonic(), 1.0))
            except (queue.Empty, ValueError):  # ValueError: the deadline passed meanwhile
                continue
            if line is None:
                open_workers.discard(w)
            elif _MARK in line:
                result = json.loads(line[line.index(_MARK) + len(_MARK):])
                done.add(result["index"])
                report.failed += bool(result["error"])
                report.ok += not result["error"]
                log(f"precompile {result['label'] or tasks[result['index']]}: {result['seconds']:.1f} s "
                    f"{result['error'] or 'ok'}")
            elif line.strip():
                log(f"worker {w}: {line.rstrip()}")  # compiler or library output
    finally:  # the time limit, or the suite itself interrupted: no worker outlives this call
        for w, (proc, mine) in enumerate(procs):
            if w in open_workers and proc.poll() is None:
                proc.kill()
                report.notes.append(f"worker {w} killed at the time limit ({timeout:.0f} s)")
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            missing = len(mine - done)
            if missing and w in open_workers:  # still at work when the time was up
                report.cancelled += missing
            elif missing:  # its output ended early: it crashed
                report.lost += missing
                report.notes.append(f"worker {w} ended with exit status {proc.returncode}: {missing} tasks lost")
    report.seconds = time.monotonic() - begin
    for note in report.notes:
        log(note)
    return report


def precompile(part: int | None, jobs: int, timeout: float, log: Callable[[str], None],
               env: dict | None = None) -> PrecompileReport:
    """Compile the kernels of `part` for this process's GPU in `jobs` workers within `timeout`."""
    import torch

    from kernels import tuning

    device = torch.device("cuda")
    tasks = precompile_tasks(tuning.shared_memory_limit(device), tuning.capability(device), part)
    log(f"{len(tasks)} tasks in {jobs} workers, at most {timeout:.0f} s")
    return run_workers(tasks, jobs, timeout, log, env)


# ---------------------------------------------------------------------------------------------
# Benchmark steps' processes


def run_benchmark(argv: list[str] | None = None) -> None:
    """A benchmark step's process: `python -c "..." MODULE ARGS...` runs MODULE as `python -m
    MODULE ARGS` would, with torch.compile's recompile limit raised to RECOMPILE_LIMIT and made
    an error (a function over it raises instead of quietly running eager, so the benchmark drops
    its torch_compile provider with a warning rather than label eager times as compiled); prints
    the compile counters at the end."""
    module, *args = sys.argv[1:] if argv is None else argv
    import torch._dynamo

    config = torch._dynamo.config
    for names, value in ((("recompile_limit", "cache_size_limit"), RECOMPILE_LIMIT),  # the latter before torch 2.6
                         (("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True)):
        found = next((name for name in names if hasattr(config, name)), None)
        if found is None:  # a torch that renamed them again: say so instead of silently running eager
            print(f"WARNING: torch._dynamo.config has none of {names}: torch_compile rows may include "
                  f"eager fallbacks", flush=True)
        else:
            setattr(config, found, value)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        from torch._dynamo.utils import counters

        stats, breaks = dict(counters["stats"]), sum(counters["graph_break"].values())
        print(f"torch.compile: {stats.get('unique_graphs', 0)} graphs compiled, {breaks} graph breaks, "
              f"recompile limit {RECOMPILE_LIMIT} per function (an error when hit)", flush=True)


_BENCH_CODE = "import sys; from benchmarks.suite import run_benchmark; run_benchmark()"


# ---------------------------------------------------------------------------------------------
# Running the steps


class Suite:
    """The state of one run: the output folder (only summary.md and suite.tar.gz go there: the
    device machine returns at most 8 files), the working folder, the budget clock (from `start`,
    a time.monotonic() value, default now), the summary."""

    def __init__(self, out: Path, budget: float, work: Path | None = None, start: float | None = None):
        self.out, self.budget = out, budget
        self.start = time.monotonic() if start is None else start
        self.work = work or Path(tempfile.mkdtemp(prefix="vfnet-suite-"))
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in ("results", "logs", "junit"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.env_lines: list[str] = []
        self.running = ""  # the line of the step under way
        self.outcomes: list[tuple[str, str]] = []  # (step, "ok" | "failed" | "timeout" | "cut" | "skipped")

    def left(self) -> float:
        """Seconds a step may still take: the budget less the time used and SAVE_RESERVE_S."""
        return self.budget - (time.monotonic() - self.start) - SAVE_RESERVE_S

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TRITON_INTERPRET="0",
                   TRITON_CACHE_DIR=str(self.work / "triton-cache"),
                   TRITON_CACHE_AUTOTUNING="1", TRITON_PRINT_AUTOTUNING="1",
                   VFNET_TEST_TIMEOUT=str(TEST_TIMEOUT_S), RAY_USAGE_STATS_ENABLED="0")
        return env

    def command(self, step: Step) -> list[str]:
        if step.kind == "test":
            # the plugin's per-test limit, not pytest-timeout's (where the machine has it: the ini's 900 s)
            return [sys.executable, "-m", "pytest", "-p", "benchmarks.suite_plugin", "-p", "no:timeout",
                    "-p", "no:cacheprovider", "-q", "-rA", "-o", "faulthandler_timeout=300",
                    "--junitxml", str(self.work / "junit" / f"{step.name}.xml"), *step.args]
        module, *args = step.args
        out_dir = self.work / "results" / step.results if step.results else self.work / "results"
        return [sys.executable, "-c", _BENCH_CODE, module, *args, "--out-dir", str(out_dir)]

    def run(self, step: Step) -> None:
        left = self.left()
        if left < MIN_STEP_S:
            self.outcomes.append((step.name, "skipped"))
            self.note(f"| {step.name} | SKIPPED (budget: {left:.0f} s left) | | {step.what} |")
            return
        cap = min(step.cap, left)
        log_path = self.work / "logs" / f"{step.name}.log"
        command = self.command(step)
        self.running = f"| {step.name} | RUNNING (cap {cap:.0f} s) | | {step.what} |"
        self.save()
        begin = time.monotonic()
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            try:
                proc = subprocess.run(command, cwd=ROOT, env=self.env(), stdout=log,
                                      stderr=subprocess.STDOUT, timeout=cap)
                outcome = "ok" if proc.returncode == 0 else "failed"
                status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
            except subprocess.TimeoutExpired:
                outcome = "timeout" if cap >= step.cap else "cut"
                status = f"TIMEOUT ({cap:.0f} s)" if cap >= step.cap else f"CUT (budget: stopped at {cap:.0f} s)"
        seconds = time.monotonic() - begin
        self.running = ""
        self.outcomes.append((step.name, outcome))
        tuned = autotune_times(log_path)
        self.note(f"| {step.name} | {status} | {seconds:.0f} | {step.what}: {tuned}{_last_result(log_path)} |")

    def note(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)
        self.save()

    def exit_code(self) -> int:
        """0 when at least one step ran and none of those that ran failed or hit its own cap."""
        ran = [o for _, o in self.outcomes if o != "skipped"]
        return 0 if ran and not any(o in ("failed", "timeout") for o in ran) else 1

    def save(self) -> None:
        """summary.md and suite.tar.gz as they stand (each replaced atomically)."""
        summary = "\n".join([
            "# vfnet-triton GPU suite", "", *self.env_lines, "",
            f"Budget {self.budget:.0f} s from the process start, used {time.monotonic() - self.start:.0f} s.", "",
            "| step | status | s | what: last result line |", "|---|---|---:|---|", *self.lines,
            *([self.running] if self.running else []), "",
            *_result_table(self.work / "results"),
        ])
        write_text(self.out / "summary.md", summary)
        write_text(self.work / "summary.md", summary)
        with atomic_write(self.out / "suite.tar.gz") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            for sub in ("results", "logs", "junit", "env.txt", "summary.md"):
                if (self.work / sub).exists():
                    tar.add(self.work / sub, arcname=sub)


_RESULT_LINE = re.compile(r"(\d+ (passed|failed|error|errors|skipped)|wrote |Error|error:)")
_AUTOTUNE = re.compile(r"finished after ([0-9.]+)s")


def _last_result(log_path: Path) -> str:
    """The pytest totals line, the last 'wrote ...' line or the last error of a step's log."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if _RESULT_LINE.search(ln)]
    text = (hits or lines or ["(no output)"])[-1]
    return text.replace("|", "/")[:160]


def autotune_times(log_path: Path) -> str:
    """"autotune N x, S s (max M s); " from the TRITON_PRINT_AUTOTUNING lines of a step's log
    (tunings loaded from the autotune cache print nothing), or "" when there are none."""
    times = [float(t) for t in _AUTOTUNE.findall(log_path.read_text(errors="replace"))]
    if not times:
        return ""
    return f"autotune {len(times)} x, {sum(times):.1f} s (max {max(times):.1f} s); "


def _result_table(results: Path) -> list[str]:
    """p50 and the 20-80% range of every row of every CSV under results/, one line each
    (ceilings included). A rate derived from time quantiles (GB/s, img/s, TFLOP/s) has its
    p20 and p80 the other way round; the range is printed low-high either way."""
    lines = []
    for path in sorted(results.rglob("*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        lines += [f"## {path.relative_to(results).with_suffix('')}", "",
                  "| provider | mode | dtype | shape | metric | p50 (p20-p80) |", "|---|---|---|---|---|---|"]
        for r in rows:
            low, high = sorted((float(r["p20"]), float(r["p80"])))
            lines.append(f"| {r['provider']} | {r['mode']} | {r['dtype']} | {r['shape']} | "
                         f"{r['metric']} ({r['unit']}) | {float(r['p50']):.4g} ({low:.4g}-{high:.4g}) |")
        lines.append("")
    return lines


def environment() -> list[str]:
    """Versions, device and commit, as lines (also written to env.txt); needs no git."""
    from benchmarks.harness import git_commit

    lines = [f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- python {platform.python_version()} ({sys.executable}), {platform.machine()}, {os.cpu_count()} CPUs"]
    for name in ("torch", "triton", "torchvision", "numpy", "pyarrow", "pytest", "matplotlib",
                 "ray", "pycocotools", "tomli_w"):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        lines.append(f"- {name} {version}")
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- device {props.name}, sm_{props.major}{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append("- device: no CUDA")
    lines.append(f"- commit {git_commit()}")
    return lines


def run_suite(out: Path, budget: float, jobs: int, work: Path | None = None, part: int | None = None,
              start: float | None = None, steps: tuple[Step, ...] | None = None,
              precompile_fn: Callable[..., PrecompileReport] | None = None, require_cuda: bool = True) -> int:
    """Run the pre-compilation (`precompile_fn`, default `precompile`) and the steps (default:
    those of `part`, default all); returns the exit status (module docstring). `start`: the
    budget's origin (a time.monotonic() value; default: now)."""
    import torch

    if require_cuda and not torch.cuda.is_available():
        print("benchmarks.suite: no CUDA device (use --check without a GPU)", file=sys.stderr)
        return 2
    suite = Suite(out, budget, work, start)
    steps = steps_of(part) if steps is None else steps
    try:
        suite.env_lines = environment()
        write_text(suite.work / "env.txt", "\n".join(suite.env_lines) + "\n")
        timeout = min(PRECOMPILE_CAP_S, suite.left() - MIN_STEP_S)
        what = f"kernel binaries of part {part or '1+2'} in {jobs} processes"
        if timeout > 0:
            suite.running = f"| precompile | RUNNING (at most {timeout:.0f} s) | | {what} |"
            suite.save()  # before it starts
            with open(suite.work / "logs" / "precompile.log", "w") as log:
                def write(line: str) -> None:
                    log.write(line + "\n")
                    log.flush()

                try:
                    report = (precompile_fn or precompile)(part, jobs, timeout, write, suite.env())
                    status, seconds = report.status(), f"{report.seconds:.0f}"
                except Exception as exc:  # the steps compile what they need themselves
                    write(f"precompile failed: {type(exc).__name__}: {exc}")
                    status, seconds = f"FAILED ({type(exc).__name__}), carrying on", ""
            suite.running = ""
            suite.note(f"| precompile | {status} | {seconds} | {what} |")
        for step in steps:
            suite.run(step)
    finally:  # also when interrupted (SIGTERM from the outer `timeout`): the summary says where
        if suite.running:
            suite.lines.append(suite.running.replace("RUNNING", "INTERRUPTED", 1))
            suite.running = ""
        suite.save()
    return suite.exit_code()


# ---------------------------------------------------------------------------------------------
# Self-check without a GPU


class _Parsed(Exception):
    """Raised by the patched parse_args once the arguments parsed."""


def parse_benchmark_args(step: Step, out_dir: str = "suite_out/results") -> argparse.Namespace:
    """Parse a benchmark step's arguments with its script's own parser, running nothing: the
    script's `main` is called with ArgumentParser.parse_args patched to stop right after."""
    module_name, *args = step.args
    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, argv=None, namespace=None):
        raise _Parsed(original(self, argv, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        module.main([*args, "--out-dir", out_dir])
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{module_name}.main did not parse its arguments")


@functools.cache
def collect_gpu_tests() -> tuple[str, ...]:
    """Node ids of every `gpu` test under tests/ (pytest --collect-only, once per process);
    raises on a collection error or an empty selection."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.suite_plugin", "-m", "gpu", "tests"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ids = [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
    if proc.returncode != 0 or not ids:
        raise RuntimeError(f"pytest collection of the gpu tests failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return tuple(ids)


def selected(step: Step, ids: tuple[str, ...]) -> list[str]:
    """The node ids among `ids` that a test step's paths select."""
    paths = [a.rstrip("/") for a in step.args if not a.startswith("-") and a != "gpu"]
    return [i for i in ids if any(i == p or i.startswith(p + "::") or i.startswith(p + "/") for p in paths)]


def self_check(steps: tuple[Step, ...] = STEPS, part: int | None = None) -> list[str]:
    """One line per step (tests selected / arguments parsed), the gpu tests no step runs (an
    error), and the pre-compilation plan per part for an H100/H200 (227 KB of shared memory);
    raises on the first problem. `part` narrows the steps and the plan to that part."""
    from kernels import aot

    steps = tuple(s for s in steps if part is None or s.part == part)
    lines = []
    ids = collect_gpu_tests() if any(s.kind == "test" for s in steps) else ()
    covered: set[str] = set()
    for step in steps:
        if step.kind == "test":
            mine = selected(step, ids)
            if not mine:
                raise RuntimeError(f"{step.name}: selects no gpu test ({' '.join(step.args)})")
            covered.update(mine)
            lines.append(f"{step.name}: {len(mine)} gpu tests collected (part {step.part})")
        else:
            parse_benchmark_args(step)
            lines.append(f"{step.name}: arguments of {step.args[0]} parse (part {step.part})")
    if part is None:
        missing = sorted(set(ids) - covered)
        if missing:
            raise RuntimeError(f"gpu tests in no step: {missing}")
        lines.append(f"every one of the {len(ids)} gpu tests is in a step")
    plans = [f"part {p}: {len(precompile_tasks(aot.SHARED_LIMIT[90], 90, p))} tasks"
             for p in (PARTS if part is None else (part,))]
    lines.append(f"precompile plan for sm_90: {'; '.join(plans)} ({len(STAR_CASES)} star-conv and "
                 f"{len(VFL_CASES)} VFL cases in all)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--part", type=int, choices=PARTS, help="run only this part (default: both)")
    parser.add_argument("--budget", type=float,
                        help=f"wall seconds from the process start for everything (default {PART_BUDGET_S} "
                             f"for a part, {FULL_BUDGET_S} for both)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "suite_out")),
                        help="output folder (default $OUT, else suite_out)")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="pre-compilation processes (default min(16, CPUs))")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--check", action="store_true", help="self-check without a GPU; runs nothing")
    args = parser.parse_args(argv)
    if args.check:
        for line in self_check(part=args.part):
            print(line)
        return 0
    budget = args.budget or (PART_BUDGET_S if args.part else FULL_BUDGET_S)

    def stop(signum: int, frame: object) -> None:  # the outer `timeout`: save, then end
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return run_suite(args.out, budget, args.jobs, args.work, args.part, start=time.monotonic() - process_age())


if __name__ == "__main__":
    sys.exit(main())
