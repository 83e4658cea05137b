"""Ahead-of-time compilation of every launch variant of the kernels for a GPU architecture, with
no GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90 or 80, ...))` and the ptxas
that ships with Triton. Reports registers, spilled bytes and shared memory per variant.

A variant is (kernel, autotune config, dtype, shape class, arch). The configs are those of
`kernels.tuning` (the star and deform convs' lists per dot width and arch, pruned by the
shared-memory estimate; the VFL kernel's launch config). The signature of each one is what the
launchers of `kernels.star_conv`, `kernels.deform_conv` and `kernels.varifocal` pass: pointer
dtypes from the op's dtype, 16-byte aligned pointers (torch allocations are), and the integer
specialisation Triton's JIT applies (`tt.divisibility` 16 for ints divisible by 16, a constant
for ints equal to 1).

    python -m kernels.aot [--arch 90 80] [--dtype bf16 fp32 ...] [--jobs N]

prints one line per variant and exits 1 when one fails to compile, exceeds the arch's shared
memory or spills registers (the CI test `tests/kernels/test_aot_compile.py` runs the same check).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

# Shared memory a block may use (opt-in maximum), bytes: sm_90 227 KB, sm_80 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}
WARP_SIZE = 32

# the op's input dtype; "tf32": float32 inputs with TF32 dots (torch.set_float32_matmul_precision
# "high"/"medium"), "fp32": IEEE float32 dots (the default "highest")
DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp64")
_TORCH_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "tf32": "float32", "fp64": "float64"}


@dataclass(frozen=True)
class ShapeClass:
    """What of a call's shape a compiled kernel is specialised on: which integer arguments are
    divisible by 16 (the rest are not) and the op's flags."""

    name: str
    ints: dict[str, int] = field(hash=False)  # representative values of the integer arguments
    flags: dict[str, object] = field(hash=False)  # constexpr flags of the op


# Star conv: the head's pair and a single conv with bias, both at 256 channels (P3 of a 2-image
# 1333x800 batch: 100x168 cells). Only Cin and Cout are specialised (M, H, W are not), so the
# pair class covers every level of the head. Channel counts that are not multiples of 16 are not
# a class: the gathers cannot be vectorised there and configs spill (all bf16 forward ones; at the
# tests' Cin = 24, Cout = 40 two fp32 forward and one weight-gradient tile: benchmarks/NOTES.md §4).
STAR_CLASSES = (
    ShapeClass("pair_256", dict(M=2 * 100 * 168, H=100, W=168, CIN=256, COUT=256, M_LOG2=15),
               dict(PAIR=True, HAS_BIAS=False)),
    ShapeClass("single_256", dict(M=2 * 100 * 168, H=100, W=168, CIN=256, COUT=256, M_LOG2=15),
               dict(PAIR=False, HAS_BIAS=True)),
)
# Deform conv (DCNv2, `kernels.deform_conv`): the ResNet-50 DCN stages' 3x3 convs with a mask at
# 1333x800 batch 2 (c3 128, c4 256, c5 512 channels; groups 1, one deform group, no bias as in
# mmdetection's DCN backbones). Channel counts specialise; map sizes, strides, paddings and
# dilations do not (`deform_conv._NOT_SPECIALISED`), so one class covers the strided first blocks
# too. DG = 1 is specialised to a constant by the JIT and so here. CI compiles dcn_256.
def _dcn_class(name: str, channels: int, h: int, w: int, groups: int = 1) -> ShapeClass:
    return ShapeClass(name, dict(M=2 * h * w, H=h, W=w, HO=h, WO=w, CIN=channels, COUT=channels,
                                 CIN_G=channels // groups, COUT_G=channels // groups, SEG=channels // groups,
                                 CDG=channels, DG=1, T=9, KW=3, M_LOG2=(2 * h * w - 1).bit_length(),
                                 SH=1, SW=1, PH=1, PW=1, DH=1, DW=1),
                      dict(HAS_MASK=True, HAS_BIAS=False))


DCN_CLASSES = (
    _dcn_class("dcn_256", 256, 50, 84),
    _dcn_class("dcn_128", 128, 100, 168),
    _dcn_class("dcn_512", 512, 25, 42),
)
STAR_KERNELS = ("star_fwd", "star_bwd_data", "star_bwd_weight")
DCN_KERNELS = ("dcn_fwd", "dcn_bwd_data", "dcn_bwd_weight")
# VFL: the training call (sparse targets, gamma 2, reduced, gradient stored) at C = 80 and 1203,
# and reduction "none" (loss, then the backward launch with grad_output) at C = 80.
VFL_CLASSES = (
    ShapeClass("train_c80", dict(n_rows=358400, n_cols=80),
               dict(DENSE=False, GAMMA_IS_TWO=True, IOU_WEIGHTED=True, STORE_LOSS=False,
                    REDUCE=True, STORE_GRAD=True, GRAD_OUT=False)),
    ShapeClass("train_c1203", dict(n_rows=358400, n_cols=1203),
               dict(DENSE=False, GAMMA_IS_TWO=True, IOU_WEIGHTED=True, STORE_LOSS=False,
                    REDUCE=True, STORE_GRAD=True, GRAD_OUT=False)),
    ShapeClass("none_fwd_c80", dict(n_rows=358400, n_cols=80),
               dict(DENSE=False, GAMMA_IS_TWO=True, IOU_WEIGHTED=True, STORE_LOSS=True,
                    REDUCE=False, STORE_GRAD=False, GRAD_OUT=False)),
    ShapeClass("none_bwd_c80", dict(n_rows=358400, n_cols=80),
               dict(DENSE=False, GAMMA_IS_TWO=True, IOU_WEIGHTED=True, STORE_LOSS=False,
                    REDUCE=False, STORE_GRAD=True, GRAD_OUT=True)),
)


@dataclass(frozen=True)
class Variant:
    kernel: str  # STAR_KERNELS, DCN_KERNELS or "vfl"
    dtype: str  # the op's input dtype: bf16, fp16, fp32, fp64
    shape: ShapeClass
    arch: int  # 90 or 80
    config: tuple[tuple[str, int], ...]  # BLOCK_* constexprs
    num_warps: int
    num_stages: int

    def label(self) -> str:
        blocks = "x".join(str(v) for _, v in self.config)
        return (f"{self.kernel:<15} sm_{self.arch} {self.dtype:<4} {self.shape.name:<12} "
                f"{blocks:<12} w{self.num_warps} s{self.num_stages}")


@dataclass
class Result:
    variant: Variant
    seconds: float
    registers: int = -1
    spill_bytes: int = -1  # spill stores + spill loads reported by ptxas
    shared: int = -1  # bytes of (dynamic) shared memory
    estimate: int = -1  # star conv: the shared-memory estimate the autotuner prunes with
    error: str = ""

    def problems(self) -> list[str]:
        """Why this variant cannot launch or runs badly: compile error, over the shared-memory
        limit, register spills."""
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        limit = SHARED_LIMIT[self.variant.arch]
        if self.shared > limit:
            out.append(f"shared memory {self.shared} B > {limit} B")
        if self.shared > self.estimate >= 0:
            out.append(f"shared memory {self.shared} B > its estimate {self.estimate} B")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        return out

    def line(self) -> str:
        status = "; ".join(self.problems()) or "ok"
        estimate = f"{self.estimate / 1024:6.1f}" if self.estimate >= 0 else "     -"
        return (f"{self.variant.label()}  regs {self.registers:>3}  smem {self.shared / 1024:6.1f} KB"
                f" (est {estimate})"
                f"  {self.seconds:5.1f} s  {status}")


def _jit_fn(kernel):
    """The JITFunction under autotune/heuristics wrappers."""
    while type(kernel).__name__ != "JITFunction":
        kernel = kernel.fn
    return kernel


def _kernel_and_configs(name: str, dtype: str, arch: int, cout: int = 0):
    """(the autotuned or plain kernel, [(blocks, num_warps, num_stages)]) of kernel `name` for
    inputs of `dtype` and `cout` output channels on sm_`arch`, as the launcher would use them
    (configs over the shared-memory limit pruned)."""
    import torch

    from kernels import deform_conv, star_conv, tuning, varifocal

    if name == "vfl":
        return varifocal.KERNELS["vfl"], None
    kernel = deform_conv.KERNELS[name] if name in DCN_KERNELS else star_conv.KERNELS[name]
    torch_dtype = getattr(torch, _TORCH_NAME[dtype])
    configs = tuning.gpu_configs(name, tuning.dot_dtype(torch_dtype, interpreter=False), SHARED_LIMIT[arch], cout,
                                 arch)
    return kernel, [(tuple((k, v) for k, v in c.kwargs.items()), c.num_warps, c.num_stages)
                    for c in configs]


def variants(kernels: tuple[str, ...], dtypes: tuple[str, ...], archs: tuple[int, ...],
             star_classes: tuple[ShapeClass, ...] = STAR_CLASSES,
             vfl_classes: tuple[ShapeClass, ...] = VFL_CLASSES,
             dcn_classes: tuple[ShapeClass, ...] = DCN_CLASSES[:1]) -> list[Variant]:
    """Every launch variant of `kernels` for these dtypes and archs."""
    out = []
    for name in kernels:
        for arch in archs:
            for dtype in dtypes:
                if name == "vfl":
                    from kernels import tuning

                    for shape in vfl_classes if dtype != "tf32" else ():  # no dots
                        import torch

                        compute = torch.float64 if dtype == "fp64" else torch.float32
                        block_n, block_c, warps = tuning.vfl_gpu_config(shape.ints["n_cols"], compute)
                        out.append(Variant(name, dtype, shape, arch,
                                           (("BLOCK_N", block_n), ("BLOCK_C", block_c)), warps, 3))
                    continue
                for shape in dcn_classes if name in DCN_KERNELS else star_classes:
                    _, configs = _kernel_and_configs(name, dtype, arch, _cout(shape))
                    for blocks, warps, stages in configs:
                        out.append(Variant(name, dtype, shape, arch, blocks, warps, stages))
    return out


def _cout(shape: ShapeClass) -> int:
    """Output channels a config's shared-memory estimate is taken at (per conv group for DCN)."""
    return shape.ints.get("COUT_G", shape.ints["COUT"])


def _signature(variant: Variant, fn) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, as the launcher calls the kernel."""
    from kernels import tuning

    dt = "fp32" if variant.dtype == "tf32" else variant.dtype
    compute = "fp64" if dt == "fp64" else "fp32"
    if variant.kernel == "vfl":
        ptrs = dict(logits_ptr=dt, labels_ptr="i64", scores_ptr=compute, targets_ptr=dt,
                    grad_out_ptr=dt, denom_ptr=compute, loss_ptr=dt, grad_ptr=dt,
                    partial_ptr=compute)
        scalars = dict(alpha="fp32", gamma="fp32")
        import triton.language as tl

        constexprs = dict(variant.shape.flags, COMPUTE=tl.float64 if dt == "fp64" else tl.float32)
    else:
        import torch

        dot = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
               torch.float64: "fp64"}[tuning.dot_dtype(getattr(torch, _TORCH_NAME[dt]), interpreter=False)]
        precision = "tf32" if variant.dtype == "tf32" else "ieee"
        if variant.kernel == "star_fwd":
            ptrs = dict(x1_ptr=dt, x2_ptr=dt, w1_ptr=dot, w2_ptr=dot, bias_ptr=compute,
                        box_ptr=compute, out1_ptr=dt, out2_ptr=dt)
            scalars = dict(stride="fp32")
            constexprs = dict(variant.shape.flags, DOT_PRECISION=precision)
        elif variant.kernel == "dcn_fwd":
            ptrs = dict(x_ptr=dt, w_ptr=dot, bias_ptr=compute, off_ptr=compute, mod_ptr=compute, out_ptr=dt)
            scalars = {}
            constexprs = dict(variant.shape.flags, DOT_PRECISION=precision)
        elif variant.kernel == "dcn_bwd_data":
            ptrs = dict(go_ptr=dot, x_ptr=dt, w_ptr=dot, off_ptr=compute, mod_ptr=compute, gx_ptr=compute,
                        goff_ptr=compute, gmod_ptr=compute)
            scalars = {}
            constexprs = dict(HAS_MASK=variant.shape.flags["HAS_MASK"], NEED_X=True, NEED_OFFSET=True,
                              NEED_MASK=variant.shape.flags["HAS_MASK"], DOT_PRECISION=precision,
                              GO_RESIDENT=dict(variant.config)["BLOCK_N"] >= variant.shape.ints["COUT_G"])
        elif variant.kernel == "dcn_bwd_weight":
            ptrs = dict(go_ptr=dot, x_ptr=dt, off_ptr=compute, mod_ptr=compute, gw_ptr=compute)
            scalars = {}
            constexprs = dict(HAS_MASK=variant.shape.flags["HAS_MASK"], DOT_PRECISION=precision)
        elif variant.kernel == "star_bwd_data":
            ptrs = dict(go_ptr=dot, x_ptr=dt, w_ptr=dot, box_ptr=compute, gx_ptr=compute,
                        gbox_ptr=compute)
            scalars = dict(stride="fp32", gradient_mul="fp32")
            constexprs = dict(NEED_X=True, NEED_BOX=True, DOT_PRECISION=precision)
            block_n = dict(variant.config)["BLOCK_N"]
            constexprs["GO_RESIDENT"] = block_n >= variant.shape.ints["COUT"]
        else:
            ptrs = dict(go_ptr=dot, x_ptr=dt, box_ptr=compute, gw_ptr=compute)
            scalars = dict(stride="fp32")
            constexprs = dict(DOT_PRECISION=precision)
    constexprs.update(dict(variant.config))
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ptrs:
            signature[arg] = "*" + ptrs[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in scalars:
            signature[arg] = scalars[arg]
        else:
            value = variant.shape.ints[arg]
            specialised = not fn.params[i].do_not_specialize
            if value == 1 and specialised:  # the JIT passes an int equal to 1 as a constant
                signature[arg] = "constexpr"
                constexprs[arg] = 1
                continue
            signature[arg] = "i32"
            if value % 16 == 0 and specialised:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(variant: Variant) -> Result:
    """Compile one variant for its arch (fresh cache: ptxas runs and reports)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, _ = _kernel_and_configs(variant.kernel, variant.dtype, variant.arch)
    fn = _jit_fn(kernel)
    signature, constexprs, attrs = _signature(variant, fn)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with tempfile.TemporaryDirectory(prefix="vfnet-aot-") as cache, _knobs(cache), \
                contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", variant.arch, WARP_SIZE),
                options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
    except Exception as exc:  # a compile error is the result being reported
        message = " ".join(str(exc).split())
        return Result(variant, time.perf_counter() - start, error=message[-300:])
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = [int(m) for m in _PTXAS_REGS.findall(text)]
    spills = [int(a) + int(b) for a, b in _PTXAS_SPILLS.findall(text)]
    return Result(variant, seconds, registers=max(regs, default=-1), spill_bytes=sum(spills),
                  shared=int(compiled.metadata.shared), estimate=_estimate(variant))


def _estimate(variant: Variant) -> int:
    """The star-conv shared-memory estimate of this variant (-1 for the VFL kernel)."""
    if variant.kernel == "vfl":
        return -1
    import triton

    from kernels import tuning

    config = triton.Config(dict(variant.config), num_warps=variant.num_warps, num_stages=variant.num_stages)
    width = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp64": 8}[variant.dtype]
    return tuning.shared_estimate(variant.kernel, config, width, _cout(variant.shape))


@contextlib.contextmanager
def _knobs(cache_dir: str):
    """Triton settings for one AOT compile: a private cache (so ptxas runs and prints its -v
    report, captured from stdout) and no GPU driver queries."""
    import triton

    knobs = triton.knobs
    saved = (knobs.cache.dir, knobs.nvidia.dump_ptxas_log)
    knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache_dir, True
    try:
        yield
    finally:
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved


def compile_all(variants_: list[Variant], jobs: int | None = None) -> Iterator[Result]:
    """Compile every variant, `jobs` processes in parallel (default: the CPU count); yields the
    results as they finish."""
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        yield from map(compile_variant, variants_)
        return
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from (f.result() for f in as_completed([pool.submit(compile_variant, v) for v in variants_]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0])
    kernel_names = [*STAR_KERNELS, *DCN_KERNELS, "vfl"]
    parser.add_argument("--kernel", nargs="+", default=kernel_names, choices=kernel_names)
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--shape", nargs="+", help="shape classes (default: all)",
                        choices=[c.name for c in STAR_CLASSES + VFL_CLASSES + DCN_CLASSES])
    parser.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    from kernels.dispatch import interpreter_enabled

    if interpreter_enabled():
        parser.error("TRITON_INTERPRET=1 replaces the kernels by the interpreter's: run with TRITON_INTERPRET=0")
    keep = (lambda c: c.name in args.shape) if args.shape else (lambda c: True)
    todo = variants(tuple(args.kernel), tuple(args.dtype), tuple(args.arch),
                    tuple(filter(keep, STAR_CLASSES)), tuple(filter(keep, VFL_CLASSES)),
                    tuple(filter(keep, DCN_CLASSES)))
    import triton

    print(f"triton {triton.__version__}: {len(todo)} variants", flush=True)
    start = time.perf_counter()
    results = []
    for r in compile_all(todo, args.jobs):
        results.append(r)
        print(r.line(), flush=True)
    bad = [r for r in results if r.problems()]
    print(f"{len(results)} variants in {time.perf_counter() - start:.0f} s wall "
          f"({sum(r.seconds for r in results):.0f} s of compile), {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
