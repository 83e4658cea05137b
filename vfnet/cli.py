"""The `vfnet` command: train, eval, predict and the data tools.

    vfnet train   [--config FILE|NAME] [--workdir DIR] [--set key=value ...] [--no-resume]
    vfnet train --ray ...   (Ray Train: the flags of `python -m orchestration.train`)
    vfnet tune ...          (Ray Tune: the flags of `python -m orchestration.tune`)
    vfnet eval    --checkpoint FILE [--ann FILE --images DIR] [--out DIR] [--set key=value ...]
    vfnet predict --checkpoint FILE --out DIR [--score-thr S] [--set key=value ...] IMAGE|DIR...
    vfnet export  --checkpoint FILE --out FILE.onnx|FILE.pt2 [FILE ...] [--format onnx|torch] [--set key=value ...]
    vfnet convert mmdet IN.pth OUT.pt
    vfnet data synth   --out DIR [--images N] [--size PX] [--seed S]
    vfnet data convert --voc XML_DIR --images DIR [--split LIST] --out FILE.json
    vfnet data convert --yolo LABELS_DIR --images DIR --names FILE --out FILE.json
    vfnet data convert --yolo-yaml DATA.yaml --split train|val|test --out FILE.json
    vfnet data pack    --ann FILE --images DIR --out DIR [--rows-per-shard N]

The Ray commands hand their arguments to `orchestration.train.main` / `orchestration.tune.main`
unchanged and return their exit status (0 done, 2 bad input or cluster unreachable, 1 failed);
Ray is imported only when they run.

Bad input (a missing or corrupt file, an unknown config key, a wrong value type, a missing or
corrupt checkpoint, a non-finite loss: any `vfnet.core.errors.UserError`) prints one line
`vfnet: error: ...` naming the file, key or value on stderr and exits with status 2, without a
traceback (`-v` logs it). Anything else is a bug: traceback, exit status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vfnet.core.atomic import atomic_write
from vfnet.core.config import DEFAULT_CONFIG_NAME, config_name, load_config, shipped_configs
from vfnet.core.errors import ArgumentError, DatasetError, run_main

log = logging.getLogger("vfnet")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from vfnet.evaluate import format_table
    from vfnet.train.engine import train

    cfg = load_config(args.config, args.set)
    workdir = Path(args.workdir) if args.workdir else Path("work_dirs") / config_name(args.config)
    with logging_redirect_tqdm():
        metrics = train(cfg, workdir, resume=not args.no_resume)
    print(format_table(metrics))
    print(f"iterations: {int(metrics['iterations'])}; metrics in {workdir / 'eval.json'}, "
          f"checkpoint {workdir / 'checkpoints' / 'last.pt'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vfnet.api import load_model
    from vfnet.data import build_val_loader
    from vfnet.evaluate import evaluate, format_table, write_json

    if (args.ann is None) != (args.images is None):
        raise ArgumentError("--ann and --images go together: give both or neither")
    model, cfg, device = load_model(args.checkpoint, args.set)
    loader, dataset = build_val_loader(cfg, args.ann, args.images)
    metrics = evaluate(model, loader, dataset, device)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    path = write_json(out / "eval.json", metrics)
    print(format_table(metrics))
    print(f"metrics in {path}")
    return 0


IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def image_files(paths: Sequence[str]) -> list[Path]:
    """The image files named on the command line, a directory standing for its images (files
    with an IMAGE_SUFFIXES suffix, sorted by name, not recursive). DatasetError for a missing
    path or a directory without images."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DatasetError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DatasetError(f"{path}: image file not found")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import ImageDraw
    from tqdm import tqdm

    from vfnet.api import Detector
    from vfnet.data.coco import decode_image
    from vfnet.evaluate import to_coco_results, write_json

    if not 0 <= args.score_thr <= 1:
        raise ArgumentError(f"--score-thr must be in [0, 1], got {args.score_thr}")
    images = image_files(args.images)  # fail before any work on a typo
    detector = Detector.from_checkpoint(args.checkpoint, overrides=args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    progress = tqdm(images, desc="predict", unit="img", disable=not sys.stderr.isatty())
    for image_id, path in enumerate(progress, start=1):
        image = decode_image(path, path, detector.cfg.data.max_image_pixels)
        found = detector(image)
        pred = {"boxes": found.boxes, "scores": found.scores, "labels": found.labels}
        for entry, name in zip(to_coco_results([pred], [image_id], detector.category_ids), found.names):
            results.append({**entry, "category_name": name, "file_name": path.name})
        draw = ImageDraw.Draw(image)
        shown = 0
        for box, score, label, name in zip(found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(),
                                            found.names):
            if score < args.score_thr:
                continue
            shown += 1
            draw.rectangle(box, outline=_colour(label), width=2)
            text = f"{name} {score:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text)
            x = max(min(box[0], image.width - (right - left) - 2), 0)  # keep the label inside
            y = max(box[1] - (bottom - top) - 2, 0)
            draw.rectangle((x, y, x + right - left + 2, y + bottom - top + 2), fill=_colour(label))
            draw.text((x + 1, y), text, fill=(255, 255, 255))
        target = out / f"{path.stem}.png"
        with atomic_write(target) as fh:
            image.save(fh, format="PNG")
        log.debug("%s: %d detections (%d drawn with score >= %.2f) -> %s", path, len(found), shown,
                  args.score_thr, target)
    write_json(out / "results.json", results)
    print(f"{len(images)} images, {len(results)} detections; PNGs and results.json in {out}")
    return 0


EXPORT_SUFFIXES = {".onnx": "onnx", ".pt2": "torch"}


def export_targets(outs: Sequence[str], fmt: str | None) -> list[tuple[str, Path]]:
    """(format, file) for each `--out` of `vfnet export`: `--format` for a single file, else
    each file's suffix (.onnx: ONNX, .pt2: torch.export); one file per format."""
    if fmt is not None:
        if len(outs) > 1:
            raise ArgumentError("--format gives the format of a single --out file; for several, leave it out "
                                "and end each file in .onnx or .pt2")
        return [(fmt, Path(outs[0]))]
    targets = []
    for out in map(Path, outs):
        kind = EXPORT_SUFFIXES.get(out.suffix.lower())
        if kind is None:
            raise ArgumentError(f"--out {out}: the format is not clear from the name: end it in .onnx or .pt2, "
                                "or give --format")
        targets.append((kind, out))
    if len({kind for kind, _ in targets}) < len(targets):
        raise ArgumentError("--out: one file per format (one .onnx, one .pt2)")
    return targets


def cmd_export(args: argparse.Namespace) -> int:
    from vfnet.api import Detector
    from vfnet.interop.export import export_onnx, export_program, export_torch, require_onnx

    targets = export_targets(args.out, args.format)
    if any(fmt == "onnx" for fmt, _ in targets):
        require_onnx()  # before loading anything
    detector = Detector.from_checkpoint(args.checkpoint, device="cpu", overrides=args.set)
    program = export_program(detector.model)  # one trace for every file
    for fmt, out in targets:
        path = (export_onnx if fmt == "onnx" else export_torch)(detector.model, out, program=program)
        print(f"wrote {path} ({fmt})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vfnet.interop.mmdet import convert, describe

    cfg = convert(args.input, args.output)
    print(f"{args.output}: {describe(cfg)} (from {args.input})")
    return 0


def _colour(label: int) -> tuple[int, int, int]:
    palette = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (128, 128, 0))
    return palette[label % len(palette)]


def cmd_data_synth(args: argparse.Namespace) -> int:
    from vfnet.data.synth import synthesize

    stats = synthesize(args.out, images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    if args.yolo_yaml is not None:
        from vfnet.data.yolo import convert_yolo_yaml

        for flag in ("images", "names"):
            if getattr(args, flag) is not None:
                raise ArgumentError(f"--{flag} does not go with --yolo-yaml (the YAML gives the images and names)")
        if args.split not in ("train", "val", "test"):
            raise ArgumentError(f"--yolo-yaml needs --split train, val or test, got {args.split!r}")
        stats, root = convert_yolo_yaml(args.yolo_yaml, args.split, args.out)
        print(f"wrote {args.out} (images relative to {root}): " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        return 0
    if args.images is None:
        raise ArgumentError("--images is required with --voc and --yolo")
    if args.yolo is not None:
        from vfnet.data.yolo import convert_yolo

        if args.names is None:
            raise ArgumentError("--yolo needs --names FILE (the class names, one a line)")
        if args.split is not None:
            raise ArgumentError("--split does not go with --yolo (convert each split's directories)")
        stats = convert_yolo(args.yolo, args.images, args.names, args.out)
    else:
        from vfnet.data.voc import convert_voc

        if args.names is not None:
            raise ArgumentError("--names does not go with --voc (the xml files name the classes)")
        stats = convert_voc(args.voc, args.images, args.out, split_file=args.split)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from vfnet.data.parquet import pack

    shards = pack(args.ann, args.images, args.out, rows_per_shard=args.rows_per_shard)
    print(f"wrote {len(shards)} shards to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `vfnet` command."""
    parser = argparse.ArgumentParser(prog="vfnet", description="VarifocalNet training with Triton kernels.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sets = dict(action="append", default=[], metavar="KEY=VALUE",
                help="override a config key, e.g. train.max_iters=100 (value in TOML syntax)")
    p = sub.add_parser("train", help="train (and evaluate) a detector")
    p.add_argument("--config", metavar="FILE|NAME", help="a TOML config file, or the name of a shipped config: "
                   f"{', '.join(shipped_configs())} (default: {DEFAULT_CONFIG_NAME})")
    p.add_argument("--workdir", help="output directory (default: work_dirs/<config name>)")
    p.add_argument("--set", **sets)
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if WORKDIR/checkpoints/last.pt exists")
    p.add_argument("--ray", action="store_true",
                   help="train on Ray Train instead, with the flags of python -m orchestration.train "
                        "(vfnet train --ray --help lists them)")
    p.set_defaults(func=cmd_train)

    # Listed for --help only: main() hands `tune` to orchestration.tune before parsing.
    sub.add_parser("tune", help="hyper-parameter sweep on Ray Tune (vfnet tune --help)", add_help=False)

    p = sub.add_parser("eval", help="COCO bbox evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ann", help="COCO json (default: the checkpoint config's data.val_ann)")
    p.add_argument("--images", help="image directory of --ann")
    p.add_argument("--out", help="where eval.json goes (default: the checkpoint's directory)")
    p.add_argument("--set", **sets)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="draw detections on images and write COCO results")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output directory for PNGs and results.json")
    p.add_argument("--score-thr", type=float, default=0.3, help="draw boxes scoring at least this")
    p.add_argument("--set", **sets)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of images")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX and/or a torch.export program")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, nargs="+", metavar="FILE",
                   help="file(s) to write, the format from the suffix: .onnx (ONNX), .pt2 (torch.export); "
                        "both from one trace")
    p.add_argument("--format", choices=["onnx", "torch"], help="the format of a single --out file, whatever its name")
    p.add_argument("--set", **sets)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="another framework's checkpoint to a vfnet checkpoint")
    p.add_argument("source", choices=["mmdet"], help="the framework: mmdet (mmdetection 2.x or 3.x VFNet)")
    p.add_argument("input", metavar="IN", help="the checkpoint to convert (.pth)")
    p.add_argument("output", metavar="OUT", help="the vfnet checkpoint to write (.pt)")
    p.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True,
                                                                        metavar="TOOL")
    p = data.add_parser("synth", help="generate the synthetic shapes data set")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=512, help="training images (val gets a quarter)")
    p.add_argument("--size", type=int, default=256, help="image side, pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("convert", help="Pascal VOC xml or YOLO txt labels to COCO json")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--voc", help="directory of VOC xml files")
    source.add_argument("--yolo", help="directory of YOLO txt label files")
    source.add_argument("--yolo-yaml", help="ultralytics data-set YAML (with --split train|val|test)")
    p.add_argument("--images", help="image directory (--voc, --yolo)")
    p.add_argument("--names", help="class names, one a line (--yolo)")
    p.add_argument("--split", help="--voc: file of xml stems to convert, one a line; "
                   "--yolo-yaml: the split, train, val or test")
    p.add_argument("--out", required=True, help="COCO json to write")
    p.set_defaults(func=cmd_data_convert)
    p = data.add_parser("pack", help="COCO json + images to Parquet shards")
    p.add_argument("--ann", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.set_defaults(func=cmd_data_pack)
    return parser


def ray_command(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """("train", args) for `[-v] train ... --ray ...` and ("tune", args) for `[-v] tune ...`, the
    args being what follows the command minus `--ray`; None for every other command."""
    argv = list(argv)
    start = 1 if argv[:1] in (["-v"], ["--verbose"]) else 0
    command, rest = argv[start:start + 1], argv[start + 1:]
    if command == ["tune"]:
        return "tune", rest
    if command == ["train"] and "--ray" in rest:
        return "train", [a for a in rest if a != "--ray"]
    return None


def run_ray_command(command: str, argv: list[str]) -> int:
    """Run `python -m orchestration.<command>` with `argv` in this process; its exit status."""
    import importlib

    module = importlib.import_module(f"orchestration.{command}")
    prog = {"train": "vfnet train --ray", "tune": "vfnet tune"}[command]
    try:
        return module.main(argv, prog=prog)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return int(exc.code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `vfnet` command; returns the exit status (2 for bad input, 1 for a bug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    delegated = ray_command(argv)
    if delegated is not None:
        return run_ray_command(*delegated)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_main(lambda: args.func(args))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
