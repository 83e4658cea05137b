"""Ray Train scaling and overhead: `python -m benchmarks.ray_train`.

Trains the same small fixed config (the shipped shapes_tiny config's model on 128 px shapes images,
batch 4 per worker, `--iters` iterations, log every iteration) with the plain engine
(`vfnet.train.engine.train` in this process: provider `engine`) and with Ray Train
(`orchestration.train.run_training` on a local Ray: provider `ray`) on 1, 2, ... workers, each
worker (and the plain run) holding `--cpus-per-worker` CPUs (torch threads) or one GPU
(`--use-gpu`). Throughput is read from the rank-0 `metrics.jsonl`: images/s of one step =
batch * workers / time_per_iter (data wait + step), quantiles over the iterations after the
first `--skip` (warm-up); the first step of each epoch, which reads its first row groups,
is part of the sample. Rows (mode `train_step`, metric `img_per_s`) go to
<out-dir>/ray_train.csv and the chart to <out-dir>/ray_train.png (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness
from orchestration.common import Workers
from orchestration.train import WORKDIR_NAME, run_training
from vfnet.core.config import CONFIG_DIR, Config, load_config

log = logging.getLogger("benchmarks.ray_train")

SCRIPT = "ray_train"


def bench_config(data_dir: Path, iters: int, use_gpu: bool) -> Config:
    """shapes_tiny's model, 128 px shapes (256 training images) in `data_dir`, batch 4, no
    evaluation before the end, a checkpoint per epoch, every iteration logged."""
    return load_config(CONFIG_DIR / "shapes_tiny.toml", [
        f"data.synth_dir={json.dumps(str(data_dir))}", "data.synth_images=256", "data.synth_size=128",
        f"data.train_ann={json.dumps(str(data_dir / 'annotations' / 'train.json'))}",
        f"data.train_images={json.dumps(str(data_dir / 'images' / 'train'))}",
        f"data.val_ann={json.dumps(str(data_dir / 'annotations' / 'val.json'))}",
        f"data.val_images={json.dumps(str(data_dir / 'images' / 'val'))}",
        "data.img_scale=[128, 128]", "data.num_workers=1", "train.batch_size=4",
        f"train.max_iters={iters}", "train.log_interval=1", "train.warmup_iters=5",
        f"train.device={'cuda' if use_gpu else 'cpu'}",
    ])


def step_rates(workdir: Path, images_per_step: int, skip: int) -> list[float]:
    """Images/s of each logged training step after the first `skip`."""
    rates = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("mode") == "train" and record["iter"] > skip:
            rates.append(images_per_step / record["time_per_iter"])
    if not rates:
        raise RuntimeError(f"{workdir}/metrics.jsonl: no training steps after the first {skip}")
    return rates


def _row(provider: str, workers: int, cfg: Config, rates: list[float], device: str) -> harness.Row:
    shape = f"{workers}w x b{cfg.train.batch_size} {cfg.data.img_scale[0]}px"
    dtype = "bf16" if device == "cuda" and cfg.train.amp else "fp32"
    return harness.Row(SCRIPT, provider, "train_step", dtype, shape, "img_per_s", "images/s",
                       *harness.quantiles(rates))


def main(argv: list[str] | None = None) -> list[harness.Row]:
    """Run the measurements; append rows to <out-dir>/ray_train.csv, draw the PNG; return rows."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts")
    parser.add_argument("--iters", type=int, default=30, help="iterations per run")
    parser.add_argument("--skip", type=int, default=5, help="warm-up iterations left out")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker and for the plain run")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-engine run")
    harness.add_output_args(parser, SCRIPT, ceilings=False)
    args = parser.parse_args(argv)
    import ray

    from vfnet.data.synth import ensure_synth
    from vfnet.train.engine import train

    device = "cuda" if args.use_gpu else "cpu"
    results = harness.start(SCRIPT, args, torch.device(device))
    with tempfile.TemporaryDirectory(prefix="vfnet-ray-bench-") as tmp:
        root = Path(tmp)
        cfg = bench_config(root / "shapes", args.iters, args.use_gpu)
        ensure_synth(cfg.data)
        if not args.no_plain:
            torch.set_num_threads(Workers(cpus_per_worker=args.cpus_per_worker).torch_threads)
            tic = time.perf_counter()
            train(cfg, root / "plain", resume=False)
            rates = step_rates(root / "plain", cfg.train.batch_size, args.skip)
            results.add([_row("engine", 1, cfg, rates, device)])
            log.info("plain engine: %.1f s wall, %.2f img/s (p50)", time.perf_counter() - tic,
                     results.rows[-1].p50)
        # 2 more logical CPUs than the workers hold (the driver's and Ray's own tasks)
        ray.init(address="local", num_cpus=int(max(args.workers) * args.cpus_per_worker) + 2,
                 include_dashboard=False, log_to_driver=False)
        try:
            for workers in args.workers:
                tic = time.perf_counter()
                summary = run_training(cfg, num_workers=workers, use_gpu=args.use_gpu,
                                       cpus_per_worker=args.cpus_per_worker, storage=root / "ray",
                                       name=f"w{workers}")
                rates = step_rates(Path(summary["run_dir"]) / WORKDIR_NAME,
                                   cfg.train.batch_size * workers, args.skip)
                results.add([_row("ray", workers, cfg, rates, device)])
                log.info("ray, %d worker(s): %.1f s wall, %.2f img/s (p50)", workers,
                         time.perf_counter() - tic, results.rows[-1].p50)
        finally:
            ray.shutdown()
    return results.finish("img_per_s", "VFNet training, plain engine vs Ray Train, images/s")


if __name__ == "__main__":
    main()
