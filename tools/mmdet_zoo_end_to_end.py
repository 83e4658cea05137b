"""Every zoo architecture end to end from a checkpoint built by mmdetection itself: convert,
fine-tune a few iterations, evaluate, export (not in CI: full-size models, minutes each).

Two steps, each in its own environment, run from the repository root:

    # 1. in the environment of tools/mmdet_vfnet_keys.py (mmdetection 3.3.0, mmcv-lite + the shim):
    #    one random-weight checkpoint per architecture, as mmdetection's model holds it; even
    #    rows written as mmdetection 3.x files, odd rows as 2.x files
    python tools/mmdet_zoo_end_to_end.py checkpoints --out work_dirs/zoo_ckpt
    # 2. in vfnet's environment: per checkpoint `vfnet convert mmdet`, `vfnet train` (the shipped
    #    zoo config, BCCD's 3 classes, model.init_from the converted file, 2 iterations of 2
    #    images at 320x240 with the multi-scale resize kept; its own final evaluation on 8 test
    #    images), `vfnet eval` of the result on BCCD's whole test split (72 images), `vfnet export`
    #    (torch.export, and ONNX unless --no-onnx) and the exported program's detections on 2 BCCD
    #    test images against the PyTorch model's
    python tools/mmdet_zoo_end_to_end.py run --checkpoints work_dirs/zoo_ckpt --work work_dirs/zoo_e2e
    # the last column again for models `run` left in --work
    python tools/mmdet_zoo_end_to_end.py compare --work work_dirs/zoo_e2e --names r101_dcn

`run` prints one line per model and step with its wall time and writes `summary.md` in --work.
The weights are random (BatchNorm statistics and all, `mmdet_zoo_parity.randomise`), so the AP is
~0: what is shown is that every step runs on each full-size architecture, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmdet_vfnet_keys import MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd"
COCO_CLASSES = 80
# key-list name -> the shipped vfnet config of the same architecture (the same names as
# mmdetection's, but R-50 ships as its ms-2x config only)
CONFIGS = {name: Path(config).stem for name, config in MODELS.items()} | {"r50": "vfnet_r50_fpn_ms-2x_coco"}


def write_checkpoints(out: Path, seed: int) -> None:
    """mmdetection-built random-weight checkpoints, `<name>.pth`, in out."""
    from mmdet_vfnet_keys import build, install_shim_if_needed
    from mmdet_zoo_parity import randomise

    install_shim_if_needed()
    import mmdet

    out.mkdir(parents=True, exist_ok=True)
    classes = [f"class_{i}" for i in range(COCO_CLASSES)]
    for i, (name, config) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = build(config)
        randomise(model, seed)
        state = model.state_dict()
        if i % 2 == 0:  # mmdetection 3.x (mmengine) layout
            obj = {"meta": {"mmdet_version": mmdet.__version__, "dataset_meta": {"classes": classes}},
                   "state_dict": state}
            torch.save(obj, out / f"{name}.pth")
        else:  # mmdetection 2.x layout, the old serialisation
            obj = {"meta": {"mmdet_version": "2.28.2", "CLASSES": classes, "config": config}, "state_dict": state}
            torch.save(obj, out / f"{name}.pth", _use_new_zipfile_serialization=False)
        print(f"{out / name}.pth: {config}, {len(state)} tensors, mmdetection {'3.x' if i % 2 == 0 else '2.x'} file",
              flush=True)


def vfnet(*args: str, log: Path) -> float:
    """Run `vfnet ARGS`, output appended to log; seconds taken. Raises on a non-zero exit."""
    begin = time.monotonic()
    with log.open("a") as fh:
        fh.write(f"$ vfnet {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run([sys.executable, "-m", "vfnet.cli", *args], cwd=ROOT, stdout=fh,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"vfnet {args[0]} exited {proc.returncode} (log: {log})")
    return time.monotonic() - begin


def val_subset(work: Path, count: int = 8) -> Path:
    """The first `count` images of BCCD's test split as a COCO json in work: the training run's
    own final evaluation (`vfnet eval` afterwards takes the whole split)."""
    data = json.loads((BCCD / "annotations" / "test.json").read_text())
    data["images"] = data["images"][:count]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = work / "bccd_test_first8.json"
    path.write_text(json.dumps(data))
    return path


def training_overrides(converted: Path, val_ann: Path) -> list[str]:
    """BCCD's 3 classes from the converted weights: 2 iterations of 2 images at 320x240; every
    scored box kept at inference, so that the evaluation and the export comparison see detections."""
    sets = {
        "model.pretrained": '""', "model.num_classes": "3", "model.init_from": f'"{converted}"',
        "model.kernels": '"torch"', "data.train_ann": f'"{BCCD / "annotations" / "trainval.json"}"',
        "data.train_images": f'"{BCCD / "images"}"', "data.val_ann": f'"{val_ann}"',
        "data.val_images": f'"{BCCD / "images"}"', "data.img_scale": "[320, 240]",
        "data.scale_range": "[[320, 192], [320, 288]]", "data.num_workers": "0", "train.batch_size": "2",
        "train.max_iters": "2", "train.warmup_iters": "1", "train.amp": "false", "train.device": '"cpu"',
        "train.log_interval": "1", "train.keep_checkpoints": "1",
        "infer.score_thr": "0.0",  # random weights score below the default 0.05: keep every box
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


TIE = 1e-5  # scores closer than this may come out in either order (float32 rounding decides)


def compare_export(checkpoint: Path, program_file: Path) -> tuple[int, float, float, int]:
    """The exported program against the PyTorch model on 2 BCCD test images at 320x240:
    (detections, max box difference px, max score difference, detections in swapped places).

    Counts must agree and scores position by position; a box is compared with the PyTorch box
    of the same label and a score within TIE that is closest to it (the random weights give
    many near-equal scores, whose order either side may swap; how many moved is reported)."""
    import numpy as np
    from PIL import Image

    import vfnet.interop.export  # noqa: F401  (registers vfnet::non_max_suppression before the load)
    from vfnet.api import Detector

    names = [im["file_name"] for im in json.loads((BCCD / "annotations" / "test.json").read_text())["images"][:2]]
    arrays = [np.asarray(Image.open(BCCD / "images" / n).convert("RGB").resize((320, 240), Image.BILINEAR))
              for n in names]
    want = Detector.from_checkpoint(checkpoint, device="cpu")(arrays)
    with torch.no_grad():
        boxes, scores, labels, num = torch.export.load(program_file).module()(
            torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float())
    box_diff = score_diff = 0.0
    swapped = 0
    for i, det in enumerate(want):
        n = int(num[i])
        if n != len(det):
            raise AssertionError(f"{program_file}: image {i}: {n} detections, PyTorch {len(det)}")
        if not n:
            continue
        score_diff = max(score_diff, (scores[i, :n] - det.scores).abs().max().item())
        same = (labels[i, :n, None] == det.labels[None]) & ((scores[i, :n, None] - det.scores[None]).abs() <= TIE)
        apart = (boxes[i, :n, None] - det.boxes[None]).abs().amax(-1).masked_fill(~same, float("inf"))
        nearest, where = apart.min(dim=1)
        box_diff = max(box_diff, nearest.max().item())
        swapped += int((where != torch.arange(n)).sum())
    return sum(len(d) for d in want), box_diff, score_diff, swapped


def export_cell(checkpoint: Path, program_file: Path) -> str:
    """`compare_export` as the summary's last cell."""
    dets, box_diff, score_diff, swapped = compare_export(checkpoint, program_file)
    return f"{dets}, {box_diff:.1e}, {score_diff:.1e}, {swapped}"


def run(checkpoints: Path, work: Path, names: list[str], onnx: bool) -> int:
    work.mkdir(parents=True, exist_ok=True)
    val_ann = val_subset(work)
    rows = ["| model | convert s | train 2 it s | eval s | bbox_mAP | torch.export s | ONNX s | "
            "exported vs PyTorch (dets, max box px, max score, swapped) |", "|---|---|---|---|---|---|---|---|"]
    failed = 0
    for name in names:
        log = work / f"{name}.log"
        log.unlink(missing_ok=True)
        converted, run_dir = work / f"{name}_coco.pt", work / name
        cells = [name]
        last = run_dir / "checkpoints" / "last.pt"
        steps = [
            ("convert", "mmdet", str(checkpoints / f"{name}.pth"), str(converted)),
            ("train", "--config", CONFIGS[name], "--workdir", str(run_dir), "--no-resume",
             *training_overrides(converted, val_ann)),
            ("eval", "--checkpoint", str(last), "--ann", str(BCCD / "annotations" / "test.json"),
             "--images", str(BCCD / "images"), "--out", str(run_dir / "eval")),
            ("export", "--checkpoint", str(last), "--format", "torch", "--out", str(run_dir / "model.pt2")),
            ("export", "--checkpoint", str(last), "--format", "onnx", "--out", str(run_dir / "model.onnx")),
        ]
        try:
            for args in steps[:3]:
                cells.append(f"{vfnet(*args, log=log):.0f}")
            cells.append(f"{json.loads((run_dir / 'eval' / 'eval.json').read_text())['bbox_mAP']:.4f}")
            cells.append(f"{vfnet(*steps[3], log=log):.0f}")
            cells.append(f"{vfnet(*steps[4], log=log):.0f}" if onnx else "not run")
            cells.append(export_cell(last, run_dir / "model.pt2"))
        except Exception as err:  # noqa: BLE001  (reported in the table; the other models still run)
            failed += 1
            cells.append(f"FAILED: {err}")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    (work / "summary.md").write_text("\n".join(rows) + "\n")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    ckpt = sub.add_parser("checkpoints", help="write mmdetection-built checkpoints (mmdetection's environment)")
    ckpt.add_argument("--out", type=Path, required=True)
    ckpt.add_argument("--seed", type=int, default=0)
    go = sub.add_parser("run", help="convert, train, evaluate, export each (vfnet's environment)")
    go.add_argument("--checkpoints", type=Path, required=True)
    go.add_argument("--work", type=Path, required=True)
    go.add_argument("--names", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="NAME")
    go.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (tens of minutes per DCN model)")
    again = sub.add_parser("compare", help="the exported-vs-PyTorch cell again for models `run` left in --work")
    again.add_argument("--work", type=Path, required=True)
    again.add_argument("--names", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="NAME")
    args = parser.parse_args()
    if args.step == "checkpoints":
        write_checkpoints(args.out, args.seed)
        return 0
    if args.step == "compare":
        for name in args.names:
            run_dir = args.work / name
            print(f"| {name} | {export_cell(run_dir / 'checkpoints' / 'last.pt', run_dir / 'model.pt2')} |", flush=True)
        return 0
    return run(args.checkpoints, args.work, args.names, not args.no_onnx)


if __name__ == "__main__":
    sys.exit(main())
