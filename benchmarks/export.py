"""Exported detector on the CPU: `python -m benchmarks.export`.

onnxruntime (CPU execution provider) running the ONNX model of `vfnet export`, against PyTorch
running the same weights on the CPU (eval mode, `torch.no_grad`): `VFNet.predict` with the
reference star conv, which is what a CPU runs. Same input (a batch of BCCD-sized 320x240 float
images already normalised for PyTorch, the 0-255 pixels for the ONNX model, which normalises
inside), same thread count (`--threads`, default 2) for both. Includes post-processing (top-k,
NMS) in both. Rows (benchmark `export`, mode `infer`, fp32): `img_per_s` and `ms` per batch for
providers `pytorch` and `onnxruntime`.

Model: the shipped `bccd_r18` config's detector (ResNet-18, 64-channel FPN and head, 3 classes) with
random weights, or `--checkpoint FILE`. With random weights `workload.raise_class_scores` makes
one class pass the score threshold everywhere, so NMS has work (an upper bound on its load).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks import harness, workload
from vfnet.api import load_model
from vfnet.core.config import CONFIG_DIR, load_config
from vfnet.interop.export import export_onnx, require_onnx
from vfnet.model import VFNet

log = logging.getLogger("benchmarks.export")

SCRIPT = "export"
CONFIG = CONFIG_DIR / "bccd_r18.toml"


def build_model(checkpoint: str | None) -> VFNet:
    """The checkpoint's model, else the BCCD R-18 detector with random weights (NMS loaded)."""
    if checkpoint:
        return load_model(checkpoint, device=torch.device("cpu")).model
    cfg = load_config(CONFIG, ["model.kernels='torch'"])
    torch.manual_seed(0)
    model = VFNet.from_config(cfg).eval()
    workload.raise_class_scores(model, 1)
    return model


def measure(model: VFNet, onnx_file: Path, batch: int, size: tuple[int, int], threads: int,
            warmup: int, reps: int) -> Iterator[harness.Row]:
    """img/s and ms per batch of PyTorch and onnxruntime on the same `batch` x 3 x h x w input,
    yielded as measured."""
    import onnxruntime

    cpu = torch.device("cpu")
    width, height = size
    pixels = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    cfg = model.cfg
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    d = cfg.data.size_divisor
    normalised = torch.nn.functional.pad((pixels - mean) / std, (0, -width % d, 0, -height % d))
    sizes = torch.tensor([[height, width]] * batch)
    scales = torch.ones(batch, 2)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    feed = {"images": pixels.numpy()}

    def run_torch() -> object:
        with torch.no_grad():
            return model.predict(normalised, sizes, scales)

    shape = f"r{cfg.model.depth}_{width}x{height}_b{batch}"
    for provider, fn in (("pytorch", run_torch), ("onnxruntime", lambda: session.run(None, feed))):
        ms = harness.time_ms(fn, cpu, warmup=warmup, reps=reps)
        rate = harness.rate_quantiles(batch, ms)
        log.info("%-11s %s, %d threads: %8.1f ms/batch %7.2f img/s (p20-p80 %.2f-%.2f)", provider, shape,
                 threads, ms[0], rate[0], min(rate[1], rate[2]), max(rate[1], rate[2]))
        yield harness.Row(SCRIPT, provider, "infer", "fp32", shape, "ms", "ms", *ms)
        yield harness.Row(SCRIPT, provider, "infer", "fp32", shape, "img_per_s", "images/s", *rate)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/export.csv, draw the PNG; return the rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a vfnet checkpoint (default: BCCD R-18, random weights)")
    parser.add_argument("--size", type=harness.positive_int, nargs=2, default=[320, 240], metavar=("W", "H"))
    parser.add_argument("--batches", type=harness.positive_int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=harness.positive_int, default=2, help="intra-op threads of both runtimes")
    harness.add_timing_args(parser, default=(3, 20), quick=(3, 20))
    harness.add_output_args(parser, SCRIPT, ceilings=False)
    args = parser.parse_args(argv)
    require_onnx()
    cpu = torch.device("cpu")
    warmup, reps = harness.timing(args, True, cpu)
    torch.set_num_threads(args.threads)
    model = build_model(args.checkpoint)
    results = harness.start(SCRIPT, args, cpu)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = export_onnx(model, Path(tmp) / "model.onnx")
        for batch in args.batches:
            results.add(measure(model, onnx_file, batch, tuple(args.size), args.threads, warmup, reps))
    return results.finish("img_per_s", "VFNet CPU inference: PyTorch vs onnxruntime, images/s")


if __name__ == "__main__":
    main()
