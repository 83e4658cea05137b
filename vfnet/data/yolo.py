"""YOLO txt labels (and ultralytics data-set YAML files) -> one COCO json file.

YOLO labels: one `<image stem>.txt` per image, one object a line, `class cx cy w h` with the
class a 0-based index into the names and the box centre, width and height as fractions of the
image width and height (all in [0, 1]). A line of `class x1 y1 x2 y2 ... xn yn` (n >= 3, also
normalised) is an ultralytics segment: its box is the bounding box of the polygon.

Conventions:
- Category ids are the class index + 1 (all names are categories, used or not), so label i of the
  trained model is YOLO class i.
- Pixel boxes: x = (cx - w/2) * W, y = (cy - h/2) * H, width w * W, height h * H, with W x H the
  size in the image file's header (pixels as stored; EXIF orientation is not applied, as the
  loader does not apply it: images that carry a rotating orientation tag are counted in a
  warning), clipped to the image. Boxes of zero width or height and repeated lines are dropped
  (counted).
- An image without a label file, or with an empty one, is kept with no boxes (a background
  image). Label files without an image are counted in a warning.
- Images are numbered from 1 in sorted order of their path; `file_name` is the path relative to
  the images root given to the converter.
- A malformed line (wrong field count, not a number, class out of range, coordinate outside
  [0, 1]) stops the conversion with a DatasetError naming the file and the line number.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from vfnet.core.atomic import write_json
from vfnet.data import DatasetError
from vfnet.data.coco import open_image, read_image_size

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
ROTATING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
EXIF_ORIENTATION = 0x0112


def read_names(path: str | Path) -> list[str]:
    """Class names of a darknet/YOLO names file (`classes.txt`, `obj.names`): one a line, in class
    index order; trailing blank lines are ignored. DatasetError on a missing file, a blank line
    between names or a repeated name."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read class names: {exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for number, name in enumerate(names, start=1):
        if not name:
            raise DatasetError(f"{path}:{number}: empty class name")
    return _checked_names(names, path)


def _checked_names(names: list[str], source: Path) -> list[str]:
    if not names:
        raise DatasetError(f"{source}: no class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"{source}: class names repeated: {', '.join(repeated)}")
    return names


def parse_label_file(path: Path, num_classes: int) -> list[tuple[int, list[float]]]:
    """The objects of one label file: (class index, [cx, cy, w, h] normalised). DatasetError
    naming `path:line` for a malformed line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read label file: {exc}") from None
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DatasetError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 ... xn yn' "
                               f"(n >= 3), got {len(fields)} fields: {line.strip()!r}")
        try:
            cls = int(fields[0])
        except ValueError:
            raise DatasetError(f"{where}: class is not an integer: {fields[0]!r}") from None
        if not 0 <= cls < num_classes:
            raise DatasetError(f"{where}: class {cls} out of range (0..{num_classes - 1})")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise DatasetError(f"{where}: coordinate is not a number in {line.strip()!r}") from None
        if not all(0.0 <= v <= 1.0 for v in values):  # also catches nan
            raise DatasetError(f"{where}: coordinates must be normalised to [0, 1], got {line.strip()!r}")
        if len(values) == 4:
            box = values
        else:
            xs, ys = values[0::2], values[1::2]
            box = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        objects.append((cls, box))
    return objects


def _pixel_box(box: list[float], width: int, height: int) -> list[float] | None:
    """Normalised [cx, cy, w, h] -> COCO [x, y, w, h] in pixels clipped to the image; None when
    the box has no area."""
    cx, cy, w, h = box
    left, right = max((cx - w / 2) * width, 0.0), min((cx + w / 2) * width, float(width))
    top, bottom = max((cy - h / 2) * height, 0.0), min((cy + h / 2) * height, float(height))
    if right <= left or bottom <= top:
        return None
    return [left, top, right - left, bottom - top]


def _rotated(path: Path) -> bool:
    with open_image(path, path) as img:
        return img.getexif().get(EXIF_ORIENTATION, 1) in ROTATING_ORIENTATIONS


def label_path(image: Path, images_root: Path, labels_root: Path) -> Path:
    """The label file of `image` under `labels_root`, mirroring its place under `images_root`."""
    return (labels_root / image.relative_to(images_root)).with_suffix(".txt")


def ultralytics_label_path(image: Path) -> Path:
    """The ultralytics convention: the last `images` directory of the path becomes `labels`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")  # no images/ dir: beside the image, as ultralytics does


def convert_pairs(pairs: list[tuple[Path, Path]], names: list[str], images_root: Path,
                  out_json: str | Path) -> dict[str, int]:
    """Convert (image, label file) pairs to COCO json at `out_json` (written atomically). Returns
    counts: `images`, `annotations`, `categories`, `background` (images without boxes),
    `dropped_zero_size`, `duplicates`, `rotated_exif`."""
    images, annotations = [], []
    dropped = duplicates = rotated = background = 0
    for image_id, (image, labels) in enumerate(sorted(pairs), start=1):
        width, height = read_image_size(image)
        rotated += _rotated(image)
        objects = parse_label_file(labels, len(names)) if labels.is_file() else []
        unique = list(dict.fromkeys((cls, tuple(box)) for cls, box in objects))
        duplicates += len(objects) - len(unique)
        image_path = image.resolve()
        try:
            file_name = image_path.relative_to(images_root.resolve()).as_posix()
        except ValueError:  # a listed image outside the root: keep its absolute path
            file_name = image_path.as_posix()
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        kept = 0
        for cls, box in unique:
            bbox = _pixel_box(list(box), width, height)
            if bbox is None:
                dropped += 1
                continue
            kept += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        background += kept == 0
    if dropped:
        log.warning("dropped %d YOLO boxes of zero width or height", dropped)
    if duplicates:
        log.warning("dropped %d repeated label lines", duplicates)
    if rotated:
        log.warning("%d images carry an EXIF orientation that rotates them: their labels may be in the "
                    "rotated frame, the loader reads the pixels as stored", rotated)
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(names)]}
    write_json(out_json, data)
    stats = {"images": len(images), "annotations": len(annotations), "categories": len(names),
             "background": background, "dropped_zero_size": dropped, "duplicates": duplicates,
             "rotated_exif": rotated}
    log.info("wrote %s: %s", out_json, stats)
    return stats


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def convert_yolo(labels_dir: str | Path, images_dir: str | Path, names_file: str | Path,
                 out_json: str | Path) -> dict[str, int]:
    """Convert the images under `images_dir` (searched recursively) with their label files under
    `labels_dir` (same relative path, `.txt`) and the class names of `names_file` to COCO json at
    `out_json`; `file_name` is relative to `images_dir`. Counts as `convert_pairs`, plus
    `orphan_labels` (label files without an image)."""
    labels_dir, images_dir = Path(labels_dir), Path(images_dir)
    for directory, what in ((labels_dir, "label"), (images_dir, "image")):
        if not directory.is_dir():
            raise DatasetError(f"{directory}: {what} directory not found")
    names = read_names(names_file)
    images = _image_files(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pairs = [(image, label_path(image, images_dir, labels_dir)) for image in images]
    expected = {labels for _, labels in pairs}
    orphans = [p for p in labels_dir.rglob("*.txt") if p not in expected]
    if orphans:
        log.warning("%s: %d label files have no image (e.g. %s)", labels_dir, len(orphans), orphans[0])
    return {**convert_pairs(pairs, names, images_dir, out_json), "orphan_labels": len(orphans)}


def _yaml_names(data: dict[str, Any], source: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{source}: 'names' keys must be the class indices 0..{len(names) - 1}, "
                               f"got {sorted(names, key=str)}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
        raise DatasetError(f"{source}: 'names' must be a list of class names or a mapping index: name")
    names = _checked_names([str(n) for n in names], source)
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{source}: 'nc' is {data['nc']} but 'names' has {len(names)} entries")
    return names


def _split_images(entry: Any, root: Path, source: Path, split: str) -> list[Path]:
    """The images of one `train`/`val`/`test` entry: a directory, a .txt list of image paths, or a
    list of those (relative paths are relative to the data-set root; `./` lines of a list file are
    relative to the list's directory)."""
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise DatasetError(f"{source}: '{split}' must be a path or a list of paths, got {item!r}")
        path = root / item
        if path.is_dir():
            images += _image_files(path)
        elif path.is_file() and path.suffix == ".txt":
            for line in path.read_text().splitlines():
                line = line.strip()
                if line:
                    images.append(path.parent / line[2:] if line.startswith("./") else root / line)
        else:
            raise DatasetError(f"{source}: '{split}' entry {item!r} is neither an image directory nor a "
                               f".txt list ({path} not found)")
    for image in images:
        if not image.is_file():
            raise DatasetError(f"{image}: image file not found (listed for '{split}' in {source})")
    return images


def convert_yolo_yaml(yaml_file: str | Path, split: str, out_json: str | Path) -> tuple[dict[str, int], Path]:
    """Convert one split (`train`, `val` or `test`) of an ultralytics data-set YAML to COCO json at
    `out_json`. The YAML's `path` is the data-set root (relative: to the YAML's directory; absent:
    the YAML's directory); label files follow the ultralytics convention (`.../images/...` ->
    `.../labels/....txt`). Returns the counts of `convert_pairs` and the root, which is the images
    directory to use with the json (`data.train_images` / `data.val_images`)."""
    yaml_file = Path(yaml_file)
    try:
        data = yaml.safe_load(yaml_file.read_text())
    except OSError as exc:
        raise DatasetError(f"{yaml_file}: cannot read data-set YAML: {exc}") from None
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yaml_file}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{yaml_file}: expected a mapping with 'names' and '{split}'")
    if data.get(split) is None:
        raise DatasetError(f"{yaml_file}: no '{split}' split (keys: {', '.join(map(str, data))})")
    names = _yaml_names(data, yaml_file)
    root = yaml_file.parent / str(data.get("path") or ".")
    if not root.is_dir():
        raise DatasetError(f"{yaml_file}: data-set root 'path' {root} not found")
    images = _split_images(data[split], root, yaml_file, split)
    if not images:
        raise DatasetError(f"{yaml_file}: '{split}' has no images")
    pairs = [(image, ultralytics_label_path(image)) for image in images]
    return convert_pairs(pairs, names, root, out_json), root

