"""Inference throughput and latency: `python -m benchmarks.inference`.

`model.predict` (forward, top-k per level, score threshold, decode, class-wise NMS, rescale) on a
synthetic batch already in device memory, for the providers `triton` and `torch` (as in
benchmarks.train_throughput: same weights, same batch), in eval mode under `torch.no_grad`, with
bf16 autocast on CUDA. Rows (mode `infer`): `ms` per batch (the latency), `img_per_s`, and on CUDA
`peak_mem_mb`; ceilings as `ceiling` rows.

A randomly initialised head scores every point below the 0.05 threshold, which would leave NMS
nothing to do: `--nms-classes` (default 1) raises the prior of that many classes so that every
top-1000 point of every level of those classes reaches NMS (about 3,300 candidates per class and
image at 1333x800; a trained COCO model usually sends fewer), so the latency is an upper bound.

The published reference figure is 19.4 images/s for VFNet R-50 on one V100 (the paper's speed
figure); the issue's target is >= 60 images/s at batch 8 on an H100/H200.

Full (default with CUDA): VFNet R-50, 80 classes, 1333x800 (padded 1344x800), batch 1 and 8.
`--small` (default without CUDA): ResNet-18 with 32 channels, 128x128, batch 1 and 2. Rows go to
<out-dir>/inference.csv as they are measured, the chart (img/s) to <out-dir>/inference.png.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator

import torch

from benchmarks import harness, workload
from vfnet.core.config import Config

log = logging.getLogger("benchmarks.inference")

SCRIPT = "inference"
PUBLISHED_IMG_PER_S = 19.4  # VFNet R-50, one V100 (arXiv 2008.13367)
TARGET_IMG_PER_S = 60.0  # issue #6: R-50 1333x800, batch 8, H100/H200


def measure(cfg: Config, providers: list[str], batches: list[int], size: tuple[int, int],
            device: torch.device, warmup: int, reps: int, nms_classes: int, *,
            layouts: tuple[bool, ...] = (False,), label: str | None = None) -> Iterator[harness.Row]:
    """Time `predict` per provider and batch size; yields ms, img_per_s (and on CUDA
    peak_mem_mb) rows as they are measured."""
    models = workload.build_models(cfg, providers, device, layouts=layouts)
    for model in models.values():
        model.eval()
        workload.raise_class_scores(model, nms_classes)
    amp = workload.use_amp(device)
    dtype = "bf16" if amp else "fp32"
    for batch in batches:
        data = workload.synthetic_batch(batch, size, cfg.model.num_classes, device)
        shape = workload.shape_label(cfg, batch, size, label)
        for provider, model in models.items():
            def predict(model=model, data=data) -> list[dict[str, torch.Tensor]]:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    return model.predict(data.images, data.image_sizes, data.scales)

            detections = sum(len(d["scores"]) for d in predict()) / batch
            log.info("%-6s %s: %.0f detections per image", provider, shape, detections)
            yield from workload.batch_rows(SCRIPT, provider, "infer", dtype, shape, batch, predict, device,
                                           warmup, reps)


def log_reference(rows: list[harness.Row]) -> None:
    """Log each img/s figure against the published V100 figure and the issue's target."""
    for r in rows:
        if r.metric == "img_per_s":
            log.info("%s %s: %.1f img/s = %.2fx the published %.1f img/s (R-50, V100); "
                     "target %.0f img/s at batch 8", r.provider, r.shape, r.p50,
                     r.p50 / PUBLISHED_IMG_PER_S, PUBLISHED_IMG_PER_S, TARGET_IMG_PER_S)


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/inference.csv, draw the PNG; return rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference",
                                     description=__doc__.split("\n")[0])
    workload.add_common_args(parser, SCRIPT, "1 8, or 1 2 small")
    parser.add_argument("--nms-classes", type=int, default=1,
                        help="classes whose scores pass the threshold everywhere (default 1)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small, size, batches, providers, warmup, reps = workload.resolve_args(args, device, [1, 8], [1, 2])
    configs = workload.bench_configs(args, small)
    for _, cfg in configs:
        if not 0 <= args.nms_classes <= cfg.model.num_classes:
            parser.error(f"--nms-classes must be in [0, {cfg.model.num_classes}], got {args.nms_classes}")
    results = harness.start(SCRIPT, args, device)
    for label, cfg in configs:
        results.add(measure(cfg, providers, batches, size, device, warmup, reps, args.nms_classes,
                            layouts=workload.CHANNELS_LAST[args.channels_last], label=label))
    workload.log_speedups(results.rows)
    log_reference(results.rows)
    return results.finish("img_per_s", "VFNet inference (incl. NMS), images/s")


if __name__ == "__main__":
    main()
