"""The main job's training step and inference on the CPU, this tree against an earlier revision,
side by side: `python -m benchmarks.cpu_step [--baseline REV]`.

The main job is `vfnet train` on the embedded default (`shapes_tiny`: a half-width ResNet-18,
32-channel FPN and head, 8 images of 192x192 a step). Its model is built from the config (random
weights, seed 0) and timed on a synthetic batch of the config's size (3 boxes per image; the data
pipeline and the evaluation are not in these figures): one training step
(`vfnet.train.step.train_step`, the config's optimiser with lr 0 so every step does the same
work) and one `predict` of the batch in eval mode.

Side by side: the baseline revision (default `HEAD~1`) is checked out into a temporary git
worktree, and each round runs one worker process per tree, alternating which goes first, so
both trees see the same machine state; the ratio of the medians is the result, not either
absolute time. A worker is this file run with the tree under test first on `PYTHONPATH`: it
imports that tree's `vfnet` and needs only `load_config`, `VFNet.from_config`, `Batch`,
`build_optimizer` and `train_step` there (every revision since the `vfnet/` areas landed has them).
Run it on an idle machine: the two trees share the cores, one at a time.

Rows (benchmark `cpu_step`, provider `current` or `baseline <rev>`, modes `train_step` and
`infer`): `ms` per batch and `img_per_s`, into <out-dir>/cpu_step.csv (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.cpu_step")

SCRIPT = "cpu_step"
BOXES_PER_IMAGE = 3  # the shapes data set averages about 3 objects per image
REPO = Path(__file__).resolve().parents[1]


def _worker(spec: dict) -> dict:
    """Time `spec["steps"]` training steps and predictions (after `spec["warmup"]` untimed ones)
    with the `vfnet` found first on sys.path; returns {"train_ms": [...], "infer_ms": [...]}."""
    import torch

    from vfnet.core.config import load_config
    from vfnet.data import Batch
    from vfnet.model import VFNet
    from vfnet.train.optim import build_optimizer
    from vfnet.train.step import train_step

    torch.set_num_threads(spec["threads"])
    cfg = load_config(spec["config"])
    cfg.model.pretrained = cfg.model.init_from = ""
    torch.manual_seed(0)
    model = VFNet.from_config(cfg)
    batch_size = cfg.train.batch_size
    h, w = cfg.data.img_scale[1], cfg.data.img_scale[0]
    gen = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for _ in range(batch_size):
        corner = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * torch.tensor([w, h]) * 0.6
        side = 16 + torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * torch.tensor([w, h]) * 0.3
        boxes.append(torch.cat([corner, corner + side], dim=1))
        labels.append(torch.randint(0, cfg.model.num_classes, (BOXES_PER_IMAGE,), generator=gen))
    sizes = torch.tensor([[h, w]] * batch_size)
    batch = Batch(images=torch.randn(batch_size, 3, h, w, generator=gen), boxes=boxes, labels=labels,
                  image_sizes=sizes, scales=torch.ones(batch_size, 2), orig_sizes=sizes.clone(),
                  image_ids=list(range(batch_size)), padded_sizes=[(h, w)] * batch_size)
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    for group in optimizer.param_groups:
        group["lr"] = 0.0

    def train() -> None:
        train_step(model, batch, optimizer, amp=False, grad_clip=cfg.train.grad_clip)

    def infer() -> None:
        with torch.no_grad():
            model.predict(batch.images, batch.image_sizes, batch.scales)

    result = {}
    for name, fn, mode in (("train_ms", train, model.train), ("infer_ms", infer, model.eval)):
        mode()
        for _ in range(spec["warmup"]):
            fn()
        times = []
        for _ in range(spec["steps"]):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        result[name] = times
    result["batch"] = batch_size
    return result


def run_worker(tree: Path, spec: dict) -> dict:
    """One worker process over `tree`'s code; its JSON result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the main job's CPU path: the references, not the interpreter
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"cpu_step: the worker over {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def compare(baseline: str, spec: dict, rounds: int) -> tuple[dict[str, dict[str, list[float]]], int]:
    """({"current": samples, "baseline <rev>": samples}, images per batch); samples =
    {"train_ms": [...], "infer_ms": [...]} over all rounds, the two trees alternating."""
    try:
        rev = _git("rev-parse", "--short", baseline)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cpu_step: cannot resolve --baseline {baseline!r} with git: {exc}") from None
    label = f"baseline {rev}"
    samples: dict[str, dict[str, list[float]]] = {"current": {}, label: {}}
    batch = 0
    with tempfile.TemporaryDirectory(prefix="vfnet-cpu-step-") as tmp:
        tree = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", str(tree), rev)
        try:
            trees = {"current": REPO, label: tree}
            for r in range(rounds):
                order = ["current", label] if r % 2 else [label, "current"]
                for name in order:
                    result = run_worker(trees[name], spec)
                    batch = result["batch"]
                    for key in ("train_ms", "infer_ms"):
                        samples[name].setdefault(key, []).extend(result[key])
                    log.info("round %d %-16s train %7.1f ms  infer %7.1f ms", r + 1, name,
                             statistics.median(result["train_ms"]), statistics.median(result["infer_ms"]))
        finally:
            _git("worktree", "remove", "--force", str(tree))
    return samples, batch


def main(argv: list[str] | None = None) -> list:
    """Compare, append the rows to <out-dir>/cpu_step.csv and log the ratios; return the rows."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="HEAD~1", help="the revision to compare with (default HEAD~1)")
    parser.add_argument("--config", default="shapes_tiny", help="the job's config (default shapes_tiny)")
    parser.add_argument("--rounds", type=int, default=3, help="worker pairs, alternating (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per worker (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                        help="torch intra-op threads (default $OMP_NUM_THREADS or 2)")
    parser.add_argument("--out-dir", type=Path, help="where cpu_step.csv goes (default benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return []
    if min(args.rounds, args.steps, args.threads) < 1 or args.warmup < 0:
        parser.error("--rounds, --steps and --threads must be >= 1, --warmup >= 0")
    import torch

    from benchmarks import harness

    spec = dict(config=args.config, steps=args.steps, warmup=args.warmup, threads=args.threads)
    samples, batch = compare(args.baseline, spec, args.rounds)
    results = harness.Results(SCRIPT, torch.device("cpu"), args.out_dir)
    shape = f"{args.config} B{batch}"
    medians = {}
    for name, by_mode in samples.items():
        for key, mode in (("train_ms", "train_step"), ("infer_ms", "infer")):
            ms = harness.quantiles(by_mode[key])
            medians[name, mode] = ms[0]
            results.add([harness.Row(SCRIPT, name, mode, "fp32", shape, "ms", "ms", *ms),
                         harness.Row(SCRIPT, name, mode, "fp32", shape, "img_per_s", "images/s",
                                     *harness.rate_quantiles(batch, ms))])
    base = next(name for name in samples if name != "current")
    for mode in ("train_step", "infer"):
        log.info("%s: current %.1f ms vs %s %.1f ms: %.2fx the baseline's images/s", mode,
                 medians["current", mode], base, medians[base, mode],
                 medians[base, mode] / medians["current", mode])
    return results.finish("img_per_s", f"main job ({args.config}) on the CPU, images/s")


if __name__ == "__main__":
    main()
