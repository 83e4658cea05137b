"""Export a trained VFNet: ONNX (standard operators, onnxruntime) and `torch.export` programs.

    export_onnx(model, "model.onnx")    # needs the `export` extra: pip install -e ".[export]"
    export_torch(model, "model.pt2")    # torch.export + torch.export.save

Both trace `ExportableVFNet` (see `vfnet.interop.export.model` for the inputs and outputs) with a dynamic
batch, height and width. `torch.export` programs need every side to be at least
`MIN_SIDE` pixels (with fewer, P7 has one cell and torch.export's shape guards differ); the ONNX
graph has no such limit. A saved `torch.export` program holds the `vfnet::non_max_suppression`
operator: `import vfnet.interop.export` before `torch.export.load`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from vfnet.core.atomic import atomic_write
from vfnet.core.errors import MissingPackageError
from vfnet.interop.export.model import ExportableVFNet
from vfnet.interop.export.nms import onnx_translation
from vfnet.model import VFNet

__all__ = [
    "MIN_SIDE",
    "ExportableVFNet",
    "export_onnx",
    "export_program",
    "export_torch",
    "require_onnx",
]

log = logging.getLogger(__name__)

MIN_SIDE = 129  # px: P7 (stride 128) has at least two cells
MAX_SIDE = 8192
MAX_BATCH = 1024
EXAMPLE_SHAPE = (2, 3, 224, 288)  # traced input: every level has >= 2 cells per side
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]
HEAD_OUTPUT_NAMES = ["cls_logits", "bbox_init", "bbox_refine"]
SKIPPED_REWRITE_RULES = ("SlicesSplit",)  # onnxscript rules the ONNX export leaves out (`_without_rewrite_rules`)


def require_onnx() -> None:
    """Raise MissingPackageError (a one-line user error) unless onnx, onnxruntime and onnxscript
    are installed."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackageError(
            f"ONNX export needs the packages {', '.join(missing)}: pip install -e '.[export]'")


def export_program(model: VFNet, *, with_head: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.export` of `ExportableVFNet(model, with_head)`, dynamic batch (1-1024) and
    height and width (MIN_SIDE-8192 px).

    The trace runs with the fake-tensor cache off: with three symbolic dimensions, rebuilding each
    cached output's symbolic sizes and strides costs more than computing them again (torch 2.13,
    tiny test model on one thread: 25.6 s with the cache, 15.0 s without; same graph)."""
    wrapper = ExportableVFNet(model, with_head=with_head).cpu()
    dims = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH),
            2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)}
    example = torch.rand(EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        return torch.export.export(wrapper, (example,), dynamic_shapes=(dims,))


def export_torch(model: VFNet, path: str | Path, *, program: torch.export.ExportedProgram | None = None
                 ) -> Path:
    """Save the `torch.export` program of `model` (or the given `program`) to `path` (.pt2),
    atomically. Load with `import vfnet.interop.export; torch.export.load(path).module()`."""
    program = program if program is not None else export_program(model)
    with atomic_write(path) as fh:
        torch.export.save(program, fh)
    log.info("wrote %s", path)
    return Path(path)


def export_onnx(model: VFNet, path: str | Path, *, program: torch.export.ExportedProgram | None = None
                ) -> Path:
    """Write the ONNX model of `model` (opset 18; or of the given `program`) to `path`, atomically.
    Run it with onnxruntime: `InferenceSession(path).run(None, {"images": batch})`."""
    require_onnx()
    program = program if program is not None else export_program(model)
    names = OUTPUT_NAMES + (HEAD_OUTPUT_NAMES if len(program.graph_signature.user_outputs) > 4 else [])
    # _quiet: onnxscript's INFO lists every rewrite (thousands of lines)
    with _quiet("onnxscript", "onnx_ir"), _without_rewrite_rules(SKIPPED_REWRITE_RULES):
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=ONNX_OPSET, custom_translation_table=onnx_translation(),
            input_names=INPUT_NAMES, output_names=names, verbose=False)
    with atomic_write(path) as fh:
        fh.write(onnx_program.model_proto.SerializeToString())
    log.info("wrote %s", path)
    return Path(path)


@contextlib.contextmanager
def _without_rewrite_rules(names: tuple[str, ...]) -> Iterator[None]:
    """onnxscript's default rewrite rules (those `torch.onnx.export` applies when it optimises
    the graph) less the rules called `names`, for the block.

    Why SKIPPED_REWRITE_RULES: SlicesSplit (two Slices of one tensor -> one Split) is the one
    default rule whose pattern has two output nodes, and onnxscript 0.7 matches such a pattern by
    listing the whole graph for every node it tries, so its cost grows with the square of the
    graph. It rewrites nothing in our graphs (the DCN test model's ONNX file is the same, byte
    for byte, without it), and it was half of the ONNX export of the R-50 DCN zoo model (4,162
    nodes, one thread: 151.8 s with it, 76.5 s without; docs/export.md)."""
    from onnxscript import rewriter

    rules = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in rules if rule.name not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the block (their warnings concern the exporter itself)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
