"""Input pipeline throughput: `python -m benchmarks.dataloader`.

Images per second that `vfnet.data.build_train_loader` delivers (JPEG/PNG decode, keep-ratio
resize, flip, normalise, pad and collate; pinned when CUDA is present, exactly as training reads
them) with N worker processes, for each N in `--workers`. Each repetition is one epoch's loader
(a fresh shuffle): the time to its first batch is recorded as mode `startup` (`ms`: worker start-up
and the first batch), then the first N batches are skipped (the workers' first batches finish
together, which would inflate the rate) and the rate over the following batches is the
`img_per_s` row (mode `load`). Quantiles are over the repetitions.

Data: the BCCD training images of the shipped `bccd_r18` config (640x480 JPEGs, like COCO's; its
paths are relative to the current directory, `../shared/data/bccd` from the repository root) by
default, any COCO json + image folder with `--ann`/`--images`, or `--synth N` (the synthetic
shapes set, 640 px PNGs, written to a temporary folder; 512 of them when BCCD is absent and
nothing is given).
When <out-dir>/train_throughput.csv holds training-step rows of this device, each rate is compared
with the fastest step's consumption (images/s): the pipeline must deliver more than that per GPU.

Full (default with CUDA): 1333x800, batch 2 (the reference per-GPU batch), N = 0 1 2 4 8 16.
`--small` (default without CUDA): 320x240, batch 2, N = 0 1 2, few batches. Rows go to
<out-dir>/dataloader.csv, the chart (img/s) to <out-dir>/dataloader.png.
"""
from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness
from vfnet.core.config import CONFIG_DIR, Config, load_config
from vfnet.data import build_train_loader
from vfnet.data.synth import synthesize

log = logging.getLogger("benchmarks.dataloader")

SCRIPT = "dataloader"
BCCD_CONFIG = CONFIG_DIR / "bccd_r18.toml"  # its [data] train_ann / train_images are the default
DEFAULT_SYNTH = 512  # synthetic images when BCCD is absent


def bccd_train_data() -> tuple[Path, Path]:
    """(annotation file, image folder) of the BCCD config's training split."""
    data = load_config(BCCD_CONFIG).data
    return Path(data.train_ann), Path(data.train_images)


def loader_config(ann: Path, images: Path, img_scale: list[int], batch_size: int, workers: int) -> Config:
    """The training data config of the reference recipe (flip 0.5, ImageNet mean/std, pad to 32)
    over the given COCO json and images."""
    cfg = Config()
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(images)
    cfg.data.img_scale = list(img_scale)
    cfg.data.num_workers = workers
    cfg.train.batch_size = batch_size
    return cfg


def measure_workers(cfg: Config, skip: int, batches: int, reps: int) -> tuple[list[float], list[float]]:
    """Per repetition (epoch `rep`): ms to the first batch, and images/s over `batches` batches
    after the first `skip` + 1."""
    startup, rates = [], []
    for rep in range(reps):
        begin = time.perf_counter()
        loader = build_train_loader(cfg, epoch=rep)
        if len(loader) < skip + 1 + batches:
            raise ValueError(f"an epoch has {len(loader)} batches; need {skip + 1 + batches} "
                             f"(lower --batches, or use a larger data set)")
        stream = iter(loader)
        next(stream)
        startup.append((time.perf_counter() - begin) * 1e3)
        for _ in range(skip):
            next(stream)
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += len(next(stream).image_ids)
        rates.append(images / (time.perf_counter() - start))
        del stream, loader
    return startup, rates


def training_consumption(out_dir: Path, device: torch.device) -> tuple[float, str] | None:
    """The fastest training step's images/s on this device in <out_dir>/train_throughput.csv
    (latest run per provider and shape), with its provider and shape; None without such rows."""
    path = Path(out_dir) / "train_throughput.csv"
    if not path.is_file():
        return None
    name = harness.device_name(device)
    latest: dict[tuple[str, str], float] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["device"] == name and row["metric"] == "img_per_s" and row["mode"] == "train_step":
                latest[(row["provider"], row["shape"])] = float(row["p50"])
    if not latest:
        return None
    (provider, shape), rate = max(latest.items(), key=lambda item: item[1])
    return rate, f"{provider} {shape}"


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the benchmark; append rows to <out-dir>/dataloader.csv, draw the PNG; return rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataloader",
                                     description=__doc__.split("\n")[0])
    harness.add_size_args(parser, small="320x240, N = 0 1 2, few batches", full="1333x800")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts N (>= 0)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch (default 2)")
    parser.add_argument("--batches", type=int, help="timed batches per repetition (default 100, small 4)")
    parser.add_argument("--reps", type=int, help="repetitions (epochs) per N (default 3, small 2)")
    parser.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="resize to fit (default 1333 800, small 320 240)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--ann", type=Path,
                      help="COCO json (default: the bccd_r18 config's training data if present)")
    data.add_argument("--synth", type=int, metavar="IMAGES",
                      help="use this many synthetic 640 px images instead")
    parser.add_argument("--images", type=Path, help="image folder of --ann")
    harness.add_output_args(parser, SCRIPT, ceilings=False)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = harness.is_small(args, device)
    workers = args.workers or ([0, 1, 2] if small else [0, 1, 2, 4, 8, 16])
    batches = args.batches or (4 if small else 100)
    reps = args.reps or (2 if small else 3)
    img_scale = args.img_scale or ([320, 240] if small else [1333, 800])
    if min(workers) < 0 or args.batch_size < 1 or batches < 1 or reps < 1:
        parser.error("--workers must be >= 0; --batch-size, --batches and --reps >= 1")
    if (args.ann is None) != (args.images is None) and args.synth is None:
        parser.error("--ann and --images go together")

    with tempfile.TemporaryDirectory(prefix="vfnet-dataloader-") as tmp:
        synth = args.synth
        bccd_ann, bccd_images = bccd_train_data()
        if synth is None and args.ann is None and not bccd_ann.is_file():
            synth = DEFAULT_SYNTH
            log.info("no BCCD data at %s (%s): using %d synthetic images", bccd_ann.resolve(),
                     BCCD_CONFIG.name, synth)
        if synth is not None:
            synthesize(tmp, images=synth, size=640, seed=0)
            ann, images = Path(tmp) / "annotations" / "train.json", Path(tmp) / "images" / "train"
        else:
            ann, images = args.ann or bccd_ann, args.images or bccd_images
        if not ann.is_file() or not images.is_dir():
            parser.error(f"no data at {ann} / {images}: pass --ann/--images or --synth N")
        log.info("data: %s (%s), %dx%d, batch %d", ann, images, *img_scale, args.batch_size)
        results = harness.start(SCRIPT, args, device)
        shape = f"B{args.batch_size} {img_scale[0]}x{img_scale[1]}"
        for n in workers:
            cfg = loader_config(ann, images, img_scale, args.batch_size, n)
            startup, rates = measure_workers(cfg, skip=n, batches=batches, reps=reps)
            rate_q, startup_q = harness.quantiles(rates), harness.quantiles(startup)
            log.info("%2d workers: %8.1f img/s (first batch after %.0f ms)", n, rate_q[0], startup_q[0])
            results.add([
                harness.Row(SCRIPT, f"workers_{n}", "load", "fp32", shape, "img_per_s", "images/s", *rate_q),
                harness.Row(SCRIPT, f"workers_{n}", "startup", "fp32", shape, "ms", "ms", *startup_q),
            ])
    consumption = training_consumption(args.out_dir, device)
    if consumption is not None:
        need, source = consumption
        for r in results.rows:
            if r.metric == "img_per_s":
                log.info("%s: %.1f img/s %s the training step's %.1f img/s (%s)", r.provider, r.p50,
                         "exceeds" if r.p50 > need else "does NOT reach", need, source)
    return results.finish("img_per_s", "Training input pipeline, images/s")


if __name__ == "__main__":
    main()
