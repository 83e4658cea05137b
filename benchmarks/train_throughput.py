"""Training throughput: `python -m benchmarks.train_throughput`.

One training step (the engine's `vfnet.train.step.train_step`) = forward (bf16 autocast on
CUDA) + ATSS assignment + loss + backward + optimiser step, on a synthetic batch already in device
memory (benchmarks.workload), for the providers `triton` (model.kernels = "triton") and
`torch` (PyTorch reference ops, torchvision's deform_conv2d for the star conv where it loads),
with the same weights and the same batch; `--channels-last both` adds channels-last models
(`model.channels_last`, rows `triton_cl`, `torch_cl`) side by side; `--config NAME` (repeatable)
measures shipped configs (e.g. a zoo model) instead of the reference R-50.
Rows (mode `train_step`): `ms` per step, `img_per_s`, and on CUDA `peak_mem_mb`; the device's
copy/matmul ceilings as `ceiling` rows. Each step is timed on its own after warm-up
(`benchmarks.harness.time_ms`).

Full (default with CUDA): VFNet R-50 + FPN, 80 classes, 1333x800 (padded 1344x800), batch 2, 4 and
8. `--small` (default without CUDA): ResNet-18 with 32 channels, 128x128, batch 2, provider `torch`
only unless TRITON_INTERPRET=1 (then the Triton kernels run through the interpreter: a smoke test,
not a measurement). Rows go to <out-dir>/train_throughput.csv as they are measured, the chart (img/s) to
<out-dir>/train_throughput.png (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator

import torch

from benchmarks import harness, workload
from vfnet.core.config import Config

log = logging.getLogger("benchmarks.train_throughput")

SCRIPT = "train_throughput"


def measure(cfg: Config, providers: list[str], batches: list[int], size: tuple[int, int],
            device: torch.device, warmup: int, reps: int, *,
            layouts: tuple[bool, ...] = (False,), label: str | None = None) -> Iterator[harness.Row]:
    """Time one training step per provider and batch size; yields ms, img_per_s (and on CUDA
    peak_mem_mb) rows as they are measured."""
    models = workload.build_models(cfg, providers, device, layouts=layouts)
    dtype = "bf16" if workload.use_amp(device) else "fp32"
    for batch in batches:
        data = workload.synthetic_batch(batch, size, cfg.model.num_classes, device)
        shape = workload.shape_label(cfg, batch, size, label)
        for provider, model in models.items():
            step = workload.train_step(model, data)
            yield from workload.batch_rows(SCRIPT, provider, "train_step", dtype, shape, batch, step,
                                           device, warmup, reps)
            del step
        del data


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/train_throughput.csv, draw the PNG; return
    the rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput",
                                     description=__doc__.split("\n")[0])
    workload.add_common_args(parser, SCRIPT, "2 4 8, or 2 small")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small, size, batches, providers, warmup, reps = workload.resolve_args(args, device, [2, 4, 8], [2])
    results = harness.start(SCRIPT, args, device)
    for label, cfg in workload.bench_configs(args, small):
        results.add(measure(cfg, providers, batches, size, device, warmup, reps,
                            layouts=workload.CHANNELS_LAST[args.channels_last], label=label))
    workload.log_speedups(results.rows)
    return results.finish("img_per_s", "VFNet training step, images/s")


if __name__ == "__main__":
    main()
