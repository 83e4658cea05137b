"""Launch tuning of the kernels, in one place (retune here).

Star convolution (`kernels.star_conv`): the autotune tables (`CONFIGS`, `INTERPRETER_CONFIGS`),
the shared-memory model that prunes them (`shared_estimate`), the per-architecture and per-device
choice (`gpu_configs`, `gpu_prune`, `autotune`) and the dtype and precision of the `tl.dot`
operands (`dot_dtype`, `dot_precision`). Varifocal loss (`kernels.varifocal`): its launch
config (`vfl_launch_config`, `vfl_gpu_config`).

Users: `kernels.star_conv` and `kernels.varifocal` (launches), `kernels.aot` (the ahead-of-time
compile check of every config, no GPU) and `benchmarks.suite` (the parallel pre-compilation).
Nothing here launches a kernel.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import triton

from kernels.dispatch import interpreter_enabled

__all__ = [
    "CONFIGS", "DCN_KERNELS", "INTERPRETER_CONFIGS", "NOT_SPECIALISED", "PROGRAMS_PER_SM", "STAR_KERNELS", "autotune",
    "capability", "dot_dtype", "dot_precision", "gpu_configs", "gpu_prune", "m_log2", "shared_estimate",
    "shared_memory_limit", "sm_count", "vfl_gpu_config", "vfl_launch_config", "weight_split",
]

STAR_KERNELS = ("star_fwd", "star_bwd_data", "star_bwd_weight")

# ---------------------------------------------------------------------------------------------
# Star convolution: autotune tables

# Under the interpreter (~4 ms per program whatever the tile) one small config that still covers
# several channel chunks and Cout tiles on the tests' shapes, and one wide config.
INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),  # channels <= 64
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=4),  # wider
]


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


# GPU: autotuned per (Cin, Cout, log2 M, dtypes) among the configs of the dot operands' width
# (bytes: 2 = bf16/fp16 on tensor cores, 4 = fp32, IEEE or TF32, 8 = fp64) and the architecture
# (Hopper, compute capability >= 9, or older), minus those whose shared-memory estimate exceeds the
# device's limit (pruned before anything is compiled). Every config compiles for sm_90 and sm_80
# without register spills at channel counts that are multiples of 16, on triton 3.9 and 3.6
# (`python -m kernels.aot`, no GPU needed; CI checks bf16, fp32 and fp64 on the head's shapes in
# tests/kernels/test_aot_compile.py; benchmarks/NOTES.md §4 has the full matrix). Other channel
# counts (the tests' Cin = 24, Cout = 40) cannot vectorise the channel gathers and some configs
# spill there (correct, slower; not the model's).
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_FP32_TILES = {  # the fp32 and fp64 lists serve both architectures
    "star_fwd": {4: [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2), (32, 64, 16, 4, 3)],
                 8: [(16, 64, 16, 4, 2)]},  # the one fp64 tile clean on every arch and class
    # fp32: (16, 64, 32, 4, 2) was dropped: with TF32 dots it spills 16 B on triton 3.6 for sm_90
    # (16x64x16 spills there too, 64x64x16 on sm_80 with IEEE dots; benchmarks/NOTES.md §4)
    "star_bwd_data": {4: [(32, 64, 16, 8, 2), (32, 64, 16, 4, 2)],
                      8: [(32, 64, 16, 8, 2), (16, 64, 16, 4, 2)]},
    "star_bwd_weight": {4: [(32, 64, 32, 8, 2), (32, 64, 16, 4, 2), (16, 128, 32, 4, 2)],
                        8: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2), (16, 64, 32, 4, 2)]},
}
# kernel -> (dot width in bytes, hopper) -> configs
CONFIGS: dict[str, dict[tuple[int, bool], list[triton.Config]]] = {
    "star_fwd": {
        (2, True): _configs([(128, 128, 32, 8, 3), (64, 256, 32, 8, 3), (64, 128, 32, 4, 3),
                             (128, 128, 32, 8, 2), (64, 64, 32, 4, 2)]),
        (2, False): _configs([(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 2)]),
    },
    # BLOCK_N >= Cout keeps the grad_out tile in registers for the whole K loop (GO_RESIDENT)
    "star_bwd_data": {
        (2, True): _configs([(64, 256, 32, 8, 3), (128, 256, 32, 8, 3), (128, 256, 32, 8, 2),
                             (128, 64, 32, 8, 3), (64, 64, 32, 4, 3)]),
        (2, False): _configs([(32, 256, 32, 8, 2), (32, 128, 32, 8, 2), (32, 64, 32, 8, 2)]),
    },
    "star_bwd_weight": {
        (2, True): _configs([(64, 128, 64, 4, 3), (64, 128, 128, 8, 3), (32, 128, 64, 4, 4),
                             (64, 64, 64, 4, 3), (64, 256, 64, 8, 3)]),
        (2, False): _configs([(64, 128, 64, 8, 3), (32, 128, 64, 4, 4), (64, 64, 64, 4, 3),
                              (32, 64, 32, 4, 2)]),
    },
}
for _kernel, _lists in _FP32_TILES.items():
    for _width, _tiles in _lists.items():
        CONFIGS[_kernel][_width, True] = CONFIGS[_kernel][_width, False] = _configs(_tiles)

# Modulated deformable convolution (`kernels.deform_conv`): the star conv's kernels with a single
# input, offsets and mask read per (tap, deform group) and a grid axis over conv groups. The tables
# start from the star conv's (same loop and tiles) minus the tiles that spill here (`python -m
# kernels.aot --kernel dcn_fwd dcn_bwd_data dcn_bwd_weight`, triton 3.9, 2026-12-04, Cin = Cout =
# 256 and 512): fp32 forward 32x64x32 and 64x64x32 (sm_90, 24-28 B); bf16 Hopper data gradient
# 128x64x32 and 64x64x32 (80-144 B) and 128x256x32 with 2 stages (576 B at Cout 512). Left in:
# the Ampere bf16 data gradient 32x256x32 spills 8 B at Cout = 512 (clean at 256); fp64 (the
# tests' dtype) spills 16-64 B on sm_90 with every tile tried (16x32x16 and 16x64x16 forward,
# 32x64x16, 16x64x16 and 16x32x16 data gradient; all clean on sm_80). Not tuned on a GPU yet.
DCN_KERNELS = ("dcn_fwd", "dcn_bwd_data", "dcn_bwd_weight")
CONFIGS["dcn_fwd"] = {
    (2, True): CONFIGS["star_fwd"][2, True], (2, False): CONFIGS["star_fwd"][2, False],
    (4, True): _configs([(32, 64, 16, 4, 3)]), (4, False): _configs([(32, 64, 16, 4, 3)]),
    (8, True): _configs([(16, 64, 16, 4, 2)]), (8, False): _configs([(16, 32, 16, 4, 2)]),
}
CONFIGS["dcn_bwd_data"] = {
    (2, True): _configs([(64, 256, 32, 8, 3), (128, 256, 32, 8, 3)]),
    (2, False): CONFIGS["star_bwd_data"][2, False],
    (4, True): CONFIGS["star_bwd_data"][4, True], (4, False): CONFIGS["star_bwd_data"][4, False],
    (8, True): _configs([(32, 64, 16, 8, 2)]), (8, False): _configs([(32, 64, 16, 8, 2), (16, 64, 16, 4, 2)]),
}
CONFIGS["dcn_bwd_weight"] = dict(CONFIGS["star_bwd_weight"])

PROGRAMS_PER_SM = 4  # split-M target of the weight gradient's grid

# Integer arguments that only size the grid or index memory: not specialised (divisibility by 16
# or == 1 would multiply the compiled variants per config by the shapes of P3-P7).
NOT_SPECIALISED = ["M", "H", "W", "M_LOG2"]


def m_log2(m: int) -> int:
    """Autotuning bucket of the number of locations."""
    return max(m - 1, 1).bit_length()


def weight_split(m_tiles: int, tiles: int, device: torch.device) -> int:
    """How many slices of the locations the weight-gradient grid uses: enough programs to fill the
    GPU (PROGRAMS_PER_SM per SM); 2 under the interpreter so tests cover the split path."""
    if device.type == "cuda":
        wanted = -(-PROGRAMS_PER_SM * sm_count(device) // tiles)
    else:
        wanted = 2
    return max(1, min(m_tiles, wanted))


def every_config(kernel: str) -> list[triton.Config]:
    """Every GPU config of `kernel` over all widths and architectures, each once (the list the
    autotuner is built with; the early prune picks from it per call)."""
    return list({id(c): c for configs in CONFIGS[kernel].values() for c in configs}.values())


# ---------------------------------------------------------------------------------------------
# Star convolution: per-device choice


def gpu_configs(kernel: str, dot_dtype: torch.dtype, shared_limit: int, cout: int,
                capability: int = 90) -> list[triton.Config]:
    """The GPU autotune configs of `kernel` (STAR_KERNELS, DCN_KERNELS) for
    dot operands of `dot_dtype`, `cout` output channels and a device of compute capability
    `capability` (90 = 9.0) whose shared-memory estimate fits `shared_limit` bytes."""
    width = dot_dtype.itemsize
    configs = CONFIGS[kernel][width, capability >= 90]
    return [c for c in configs if shared_estimate(kernel, c, width, cout) <= shared_limit]


def shared_estimate(kernel: str, config: triton.Config, width: int, cout: int) -> int:
    """Bytes of shared memory the compiled kernel uses with dot operands of `width` bytes: an
    upper bound (exact for most bf16 configs on sm_90), checked against the compiler for every
    config by tests/kernels/test_aot_compile.py. Triton keeps num_stages buffers of the tiles a
    loop iteration loads for `tl.dot` and num_stages - 1 of the gathered corners (4 per input),
    plus one operand staged for the dot. The deform conv's kernels (`dcn_*`, `cout`: channels per
    conv group) add num_stages - 1 buffers of the per-location offsets and mask (3 [BLOCK_M]
    vectors in the compute dtype); their forward has one input."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    s = config.num_stages
    if kernel.startswith("dcn_"):
        points = (s - 1) * 3 * bm * (8 if width == 8 else 4)
        if kernel == "dcn_fwd":
            return ((s - 1) * 4 * bm * bk + s * bk * bn + bm * bk) * width + points
        return shared_estimate(kernel.replace("dcn_", "star_"), config, width, cout) + points
    if kernel == "star_fwd":  # the pair (two inputs): the worst case
        return ((s - 1) * 2 * 4 * bm * bk + s * 2 * bk * bn + bm * bk) * width
    if kernel == "star_bwd_data":
        if bn >= cout:  # GO_RESIDENT: grad_out's tile stays, the weight tile streams
            return (s * bk * bn + bm * bn + 2 * bm * bk) * width
        return s * (bk * bn + bm * bn) * width
    box = (s - 1) * 4 * bm * (8 if width == 8 else 4)  # the locations' boxes, compute dtype
    return (s * bm * bn + (s - 1) * 4 * bm * bk + bm * bk) * width + box


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """Shared memory one block may use on `device` (opt-in maximum), bytes."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


@functools.cache
def capability(device: torch.device) -> int:
    """Compute capability of `device` as major * 10 + minor (sm_90 -> 90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def gpu_prune(kernel: str, dot_arg: str, cout_arg: str = "COUT") -> Callable:
    """early_config_prune of `kernel`: the configs of the dot dtype (that of argument `dot_arg`)
    and the device's architecture that fit its shared memory (estimated at the output channels
    of argument `cout_arg`), before the autotuner compiles anything; RuntimeError when none does."""
    def prune(configs: list[triton.Config], named_args: dict, **_: object) -> list[triton.Config]:
        tensor = named_args[dot_arg]
        limit = shared_memory_limit(tensor.device)
        wanted = {id(c) for c in gpu_configs(kernel, tensor.dtype, limit, named_args[cout_arg],
                                             capability(tensor.device))}
        kept = [c for c in configs if id(c) in wanted]
        if not kept:
            raise RuntimeError(f"{kernel}: no launch config of {tensor.dtype} fits the {limit} B "
                               f"of shared memory of {tensor.device}")
        return kept
    return prune


def _interpreter_pick(configs: list[triton.Config], named_args: dict,
                      **_: object) -> list[triton.Config]:
    """Under the interpreter, the one config for these channel counts (no benchmarking): large
    tiles once channels pass 64, since the interpreter's cost is per program and per loop step."""
    return [configs[1] if max(named_args["CIN"], named_args["COUT"]) > 64 else configs[0]]


def autotune(kernel: str, dot_arg: str, cout_arg: str = "COUT", **kwargs: object) -> Callable:
    """`triton.autotune` of star-conv or deform-conv kernel `kernel` (`kwargs`: key, reset_to_zero,
    ...): over its GPU configs, pruned per call by `gpu_prune` (dot dtype of argument `dot_arg`,
    output channels `cout_arg`, device), or under the interpreter over INTERPRETER_CONFIGS, one
    picked by shape.

    The configs carry no pre_hook, so `TRITON_CACHE_AUTOTUNING=1` (read when the kernels are
    decorated, i.e. imported) keeps each tuning result in the Triton cache for later processes."""
    if interpreter_enabled():
        return triton.autotune(configs=INTERPRETER_CONFIGS,
                               prune_configs_by={"early_config_prune": _interpreter_pick}, **kwargs)
    return triton.autotune(configs=every_config(kernel),
                           prune_configs_by={"early_config_prune": gpu_prune(kernel, dot_arg, cout_arg)}, **kwargs)


# ---------------------------------------------------------------------------------------------
# Star convolution: dot operands


def dot_dtype(x_dtype: torch.dtype, interpreter: bool | None = None) -> torch.dtype:
    """dtype of the tl.dot operands for inputs of `x_dtype`: x's for bf16/fp16 on the GPU (tensor
    cores), else the compute dtype (fp32, fp64 for fp64; under the interpreter bf16 dots are
    unreliable, so fp32 there too). `interpreter`: whether the kernels run through the
    interpreter (default: as `TRITON_INTERPRET` says; False for plans made for a GPU)."""
    interpreter = interpreter_enabled() if interpreter is None else interpreter
    if x_dtype in (torch.bfloat16, torch.float16) and not interpreter:
        return x_dtype
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def dot_precision(dot_dtype: torch.dtype) -> str:
    """`input_precision` of the dots: "tf32" for fp32 dots on the GPU when torch's matmul
    precision setting allows TF32 (`torch.set_float32_matmul_precision("high")`), else "ieee"."""
    if (dot_dtype == torch.float32 and not interpreter_enabled()
            and torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------------------------
# Varifocal loss

# GPU: a tile of _VFL_TILE elements per loop iteration, BLOCK_C the power of two in
# [16, _VFL_MAX_BLOCK_C] that pads C least (80 -> 16 x 5 iterations, 1203 -> 64 x 19),
# BLOCK_N = tile // BLOCK_C rows per program. Interpreter: ~4 ms per program whatever the tile,
# so one BLOCK_C covers the whole row and tiles are large.
_VFL_TILE = 2048
_VFL_TILE_FP64 = 512  # float64 math: 2048 elements spill registers (kernels.aot)
_VFL_MAX_BLOCK_C = 256
_VFL_NUM_WARPS = 4
_VFL_INTERPRETER_TILE = 2**16


def vfl_gpu_config(n_cols: int, compute: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the compiled VFL kernel for C = n_cols classes and math in
    `compute` (float32 or float64)."""
    candidates = [16 << k for k in range(int(math.log2(_VFL_MAX_BLOCK_C // 16)) + 1)]
    block_c = min(candidates, key=lambda b: (triton.cdiv(n_cols, b) * b, -b))
    tile = _VFL_TILE_FP64 if compute == torch.float64 else _VFL_TILE
    return max(1, tile // block_c), block_c, _VFL_NUM_WARPS


def vfl_launch_config(n_cols: int, compute: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the VFL kernel as launched here: `vfl_gpu_config`, or under
    the interpreter one BLOCK_C over the whole row and large tiles."""
    if interpreter_enabled():
        block_c = triton.next_power_of_2(max(n_cols, 1))
        return max(1, _VFL_INTERPRETER_TILE // block_c), block_c, 4
    return vfl_gpu_config(n_cols, compute)
