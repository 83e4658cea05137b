"""The GPU suite in one call: `python -m benchmarks.suite [--budget S] [--out DIR]`.

Runs, most important first, the `gpu` tests and the benchmarks at their real shapes, each step a
subprocess under its own time cap inside one global wall-clock budget (default 510 s = 8.5 min,
compilation included); a step that fails or times out never stops the next one, and a step that
no longer fits the budget is skipped (listed as such). First, a parallel pre-compilation of the
star-conv autotune configs (one process per config, into the shared `TRITON_CACHE_DIR`), so the
autotuner's sequential compile-and-benchmark loop finds every binary compiled (PRECOMPILE_CASES:
the star-conv calls of the tests and benchmarks).

Output in --out (default `suite_out/`): `summary.md` (one page: environment, one line per step
with its status, seconds and last result line, and the p50 of every benchmark row), rewritten
after each step, and `suite.tar.gz` (results/*.csv|png|txt, logs/*.log, junit/*.xml, env.txt),
refreshed after each step: a run cut short keeps everything measured so far. The benchmark
scripts append their CSV rows under results/ as they measure them (in a working folder, `--work`,
default a new temporary one; the Triton cache lives there too).

Needs torch with CUDA, triton, torchvision, numpy, pyarrow, pytest, matplotlib, tqdm, pillow;
not Ray, pycocotools, tomli_w or pytest-timeout (`benchmarks.suite_plugin` limits each test).
Run it from the repository root; the project need not be installed (PYTHONPATH is set).

`--check` (no GPU needed; CI runs it): collects the tests of every test step (each must collect
without error and select at least one test), parses every benchmark step's arguments with the
script's own parser, and builds the pre-compilation plan; runs nothing.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 510
MIN_STEP_S = 25  # a step with less time than this left is skipped
TEST_TIMEOUT_S = 120  # per test
HEAD_CHANNELS = 256  # the star convs' Cin = Cout in the R-50 head (the benchmarks' shapes)


@dataclass(frozen=True)
class Step:
    """One unit of the suite: `pytest` arguments (kind "test") or a benchmark module and its
    arguments (kind "bench"), under `cap` seconds."""

    name: str
    kind: str  # "test" or "bench"
    args: tuple[str, ...]
    cap: int
    what: str  # one line for the summary


def _test(name: str, cap: int, what: str, *args: str) -> Step:
    return Step(name, "test", ("-m", "gpu", *args), cap, what)


def _bench(name: str, cap: int, what: str, module: str, *args: str) -> Step:
    return Step(name, "bench", (module, *args), cap, what)


# Priority order: correctness of the kernels first, then the kernel figures of the targets, the
# training step, its profile, inference, the rest. Caps: expected time with compile, plus margin.
STEPS = (
    _test("t_kernels", 150, "gpu tests of the VFL and star-conv kernels (compiled)",
          "tests/kernels"),
    _bench("b_vfl", 90, "VFL fwd/fwd_bwd vs eager and torch.compile, GB/s vs copy bandwidth",
           "benchmarks.vfl"),
    _bench("b_star_bf16", 120, "star conv pair bf16 P3-P7 vs torchvision, TFLOP/s vs bf16 matmul",
           "benchmarks.star_conv", "--dtypes", "bf16", "--providers", "triton", "torchvision"),
    _test("t_step", 120, "no host sync in the engine step; CUDA model tests",
          "tests/vfnet/test_host_sync.py", "tests/vfnet/test_model.py"),
    _bench("b_train", 120, "R-50 1333x800 training step, batch 2 and 8, triton vs torch",
           "benchmarks.train_throughput", "--batches", "2", "8", "--warmup", "2", "--reps", "5"),
    _bench("b_profile", 75, "profile of one R-50 training step at batch 8",
           "benchmarks.profile_step", "--warmup", "2", "--steps", "2"),
    _bench("b_infer", 75, "inference latency and images/s, batch 1 and 8",
           "benchmarks.inference", "--warmup", "2", "--reps", "5", "--no-ceiling"),
    _bench("b_dataloader", 60, "input pipeline images/s with 0, 2, 8 workers",
           "benchmarks.dataloader", "--synth", "128", "--workers", "0", "2", "8", "--batches", "20",
           "--reps", "2"),
    _bench("b_star_fp32", 150, "star conv pair fp32 (all providers)",
           "benchmarks.star_conv", "--dtypes", "fp32", "--no-ceiling"),
)


# ---------------------------------------------------------------------------------------------
# Parallel pre-compilation of the star-conv autotune configs


# The star-conv calls of the suite's tests and benchmarks, most important first: (op, dtype, Cin,
# Cout, bias). A compiled kernel is specialised on these (and on the config), not on H, W or B.
PRECOMPILE_CASES = (
    ("pair", "bfloat16", 256, 256, False),  # benchmarks under bf16 autocast (R-50 head)
    ("pair", "float32", 256, 256, False),  # star_conv fp32 benchmark, gpu test
    ("single", "float32", 256, 256, False),  # star_conv fp32 benchmark, provider triton_single
    ("single", "bfloat16", 256, 256, False),
    ("pair", "bfloat16", 48, 80, False), ("pair", "float32", 48, 80, False),  # gpu tests
    ("single", "float64", 24, 40, True), ("single", "float32", 24, 40, True),
    ("pair", "bfloat16", 32, 32, False), ("pair", "float32", 32, 32, False),  # tiny models
)


def precompile_tasks(shared_limit: int, capability: int, cases: tuple = PRECOMPILE_CASES) -> list[tuple]:
    """(case, j): one task per position j of the longest config list of the three star-conv
    kernels for a case on a device with `shared_limit` bytes of shared memory. Task (case, j)
    compiles config j of each kernel (the last one where a list is shorter: a cache hit by then)."""
    import torch

    from kernels import star_conv

    tasks = []
    for case in cases:
        dot = star_conv._dot_dtype(getattr(torch, case[1]))
        longest = max(len(star_conv.gpu_configs(k, dot, shared_limit, case[3], capability))
                      for k in star_conv.KERNELS)
        tasks += [(case, j) for j in range(longest)]
    return tasks


def _precompile(task: tuple) -> tuple[tuple, float, str]:
    """In a fresh process: run the case's star conv forward and backward once, on a small map,
    with each kernel's autotuner reduced to config j: that compiles exactly the binaries the full
    autotuner will ask for (same specialisation) into the shared TRITON_CACHE_DIR."""
    start = time.perf_counter()
    try:
        import torch

        from kernels import star_conv

        (op, dtype, cin, cout, bias), j = task
        torch_dtype = getattr(torch, dtype)
        device = torch.device("cuda")
        limit, capability = star_conv.shared_memory_limit(device), star_conv.capability(device)
        for name, kernel in star_conv.KERNELS.items():
            configs = star_conv.gpu_configs(name, star_conv._dot_dtype(torch_dtype), limit, cout, capability)
            kernel.configs = [configs[min(j, len(configs) - 1)]]

        def leaf(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device="cuda", dtype=torch_dtype, requires_grad=True)

        box = (torch.rand(2, 4, 7, 11, device="cuda") * 64).requires_grad_()
        if op == "pair":
            outs = star_conv.star_deform_conv2d_pair(leaf(2, cin, 7, 11), leaf(2, cin, 7, 11), box,
                                                     leaf(cout, cin, 3, 3), leaf(cout, cin, 3, 3), 8)
        else:
            outs = (star_conv.star_deform_conv2d(leaf(2, cin, 7, 11), box, leaf(cout, cin, 3, 3), 8,
                                                 bias=leaf(cout) if bias else None),)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        torch.cuda.synchronize()
        return task, time.perf_counter() - start, ""
    except Exception as exc:  # reported in the log; the autotuner will meet it again
        return task, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"


def precompile(jobs: int, log: Callable[[str], None]) -> int:
    """Compile the star-conv configs of PRECOMPILE_CASES in `jobs` processes; returns the number
    of failed tasks."""
    import multiprocessing

    import torch

    from kernels import star_conv

    device = torch.device("cuda")
    tasks = precompile_tasks(star_conv.shared_memory_limit(device), star_conv.capability(device))
    failures = 0
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_precompile, t) for t in tasks]):
            task, seconds, error = future.result()
            failures += bool(error)
            log(f"precompile {task}: {seconds:.1f} s {error or 'ok'}")
    return failures


# ---------------------------------------------------------------------------------------------
# Running the steps


class Suite:
    """The state of one run: the output folder (only summary.md and suite.tar.gz go there: the
    device machine returns at most 8 files), the working folder, the budget clock, the summary."""

    def __init__(self, out: Path, budget: float, work: Path | None = None):
        self.out, self.budget, self.start = out, budget, time.monotonic()
        self.work = work or Path(tempfile.mkdtemp(prefix="vfnet-suite-"))
        self.out.mkdir(parents=True, exist_ok=True)
        for sub in ("results", "logs", "junit"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.env_lines: list[str] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", MPLBACKEND="Agg", TRITON_INTERPRET="0",
                   TRITON_CACHE_DIR=str(self.work / "triton-cache"),
                   VFNET_TEST_TIMEOUT=str(TEST_TIMEOUT_S), RAY_USAGE_STATS_ENABLED="0")
        return env

    def command(self, step: Step) -> list[str]:
        if step.kind == "test":
            return [sys.executable, "-m", "pytest", "-p", "benchmarks.suite_plugin", "-p", "no:cacheprovider",
                    "-q", "-rA", "-o", "faulthandler_timeout=300",
                    "--junitxml", str(self.work / "junit" / f"{step.name}.xml"), *step.args]
        module, *args = step.args
        return [sys.executable, "-m", module, *args, "--out-dir", str(self.work / "results")]

    def run(self, step: Step) -> None:
        left = self.left() - 5
        if left < MIN_STEP_S:
            self.note(f"| {step.name} | SKIPPED (budget: {left:.0f} s left) | | {step.what} |")
            return
        cap = min(step.cap, left)
        log_path = self.work / "logs" / f"{step.name}.log"
        command = self.command(step)
        begin = time.monotonic()
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            try:
                proc = subprocess.run(command, cwd=ROOT, env=self.env(), stdout=log,
                                      stderr=subprocess.STDOUT, timeout=cap)
                status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"TIMEOUT ({cap:.0f} s)"
        seconds = time.monotonic() - begin
        self.note(f"| {step.name} | {status} | {seconds:.0f} | {step.what}: {_last_result(log_path)} |")

    def note(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)
        self.save()

    def save(self) -> None:
        """summary.md and suite.tar.gz as they stand (each replaced atomically)."""
        summary = "\n".join([
            "# vfnet-triton GPU suite", "", *self.env_lines, "",
            f"Budget {self.budget:.0f} s, used {time.monotonic() - self.start:.0f} s.", "",
            "| step | status | s | what: last result line |", "|---|---|---:|---|", *self.lines, "",
            *_result_table(self.work / "results"),
        ])
        _atomic_write(self.out / "summary.md", summary.encode())
        (self.work / "summary.md").write_text(summary)
        tmp = self.out / "suite.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for sub in ("results", "logs", "junit", "env.txt", "summary.md"):
                if (self.work / sub).exists():
                    tar.add(self.work / sub, arcname=sub)
        os.replace(tmp, self.out / "suite.tar.gz")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_RESULT_LINE = re.compile(r"(\d+ (passed|failed|error|errors|skipped)|wrote |Error|error:)")


def _last_result(log_path: Path) -> str:
    """The pytest totals line, the last 'wrote ...' line or the last error of a step's log."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    hits = [ln for ln in lines if _RESULT_LINE.search(ln)]
    text = (hits or lines or ["(no output)"])[-1]
    return text.replace("|", "/")[:160]


def _result_table(results: Path) -> list[str]:
    """p50 of every row of every CSV under results/, one line each (ceilings included)."""
    lines = []
    for path in sorted(results.glob("*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        lines += [f"## {path.stem}", "", "| provider | mode | dtype | shape | metric | p50 (p20-p80) |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['provider']} | {r['mode']} | {r['dtype']} | {r['shape']} | "
                         f"{r['metric']} ({r['unit']}) | {float(r['p50']):.4g} "
                         f"({float(r['p20']):.4g}-{float(r['p80']):.4g}) |")
        lines.append("")
    return lines


def environment() -> list[str]:
    """Versions and device, as lines (also written to env.txt)."""
    lines = [f"- date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
             f"- python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs"]
    for name in ("torch", "triton", "torchvision", "numpy", "pyarrow", "pytest", "matplotlib",
                 "ray", "pycocotools", "tomli_w"):
        try:
            version = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines.append(f"- commit {commit or 'unknown (no git here)'}")
    return lines


def run_suite(out: Path, budget: float, jobs: int, work: Path | None = None,
              steps: tuple[Step, ...] = STEPS) -> int:
    """Run everything; returns 0 when every step ran and passed."""
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.suite: no CUDA device (use --check without a GPU)", file=sys.stderr)
        return 2
    suite = Suite(out, budget, work)
    suite.env_lines = environment()
    (suite.work / "env.txt").write_text("\n".join(suite.env_lines) + "\n")
    os.environ.update(TRITON_CACHE_DIR=str(suite.work / "triton-cache"), TRITON_INTERPRET="0")
    begin = time.monotonic()
    log_path = suite.work / "logs" / "precompile.log"
    with open(log_path, "w") as log:
        def write(line: str) -> None:
            log.write(line + "\n")
            log.flush()

        failures = precompile(jobs, write)
    suite.note(f"| precompile | {'ok' if not failures else f'{failures} FAILED'} | "
               f"{time.monotonic() - begin:.0f} | star-conv configs in {jobs} processes |")
    for step in steps:
        suite.run(step)
    suite.save()
    return 0 if all("| ok |" in line for line in suite.lines) else 1


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


def collect_tests(step: Step) -> int:
    """Number of tests a test step selects (pytest --collect-only); raises on a collection error
    or an empty selection."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.suite_plugin", *step.args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", proc.stdout)
    if proc.returncode != 0 or not found or int(found.group(1)) == 0:
        raise RuntimeError(f"{step.name}: pytest collection failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return int(found.group(1))


def self_check(steps: tuple[Step, ...] = STEPS) -> list[str]:
    """One line per step (tests collected / arguments parsed) and the pre-compilation plan for an
    H100/H200 (227 KB of shared memory); raises on the first problem."""
    from kernels import aot

    lines = []
    for step in steps:
        if step.kind == "test":
            lines.append(f"{step.name}: {collect_tests(step)} gpu tests collected")
        else:
            parse_benchmark_args(step)
            lines.append(f"{step.name}: arguments of {step.args[0]} parse")
    tasks = precompile_tasks(aot.SHARED_LIMIT[90], 90)
    lines.append(f"precompile plan for sm_90: {len(tasks)} tasks over {len(PRECOMPILE_CASES)} star-conv cases")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall seconds for everything (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "suite_out")),
                        help="output folder (default $OUT, else suite_out)")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="pre-compilation processes (default min(16, CPUs))")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("--check", action="store_true", help="self-check without a GPU; runs nothing")
    args = parser.parse_args(argv)
    if args.check:
        for line in self_check():
            print(line)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return run_suite(args.out, args.budget, args.jobs, args.work)


if __name__ == "__main__":
    sys.exit(main())
