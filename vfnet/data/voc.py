"""Pascal VOC xml annotations -> one COCO json file (`vfnet data convert`).

Conventions:
- VOC boxes are 1-based pixel indices, inclusive: `xmin=1, xmax=W` covers a whole image W pixels
  wide. COCO boxes are continuous edge coordinates from 0, so the box becomes
  [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1] (clipped to the image).
- A box with xmax <= xmin or ymax <= ymin (zero or negative size as written) is an annotation
  mistake and is dropped, as is one wholly outside the image, with one counted warning.
- `difficult` objects become `iscrowd: 1`: not training targets, and ignored (neither hit nor
  miss) by COCO evaluation, which is how VOC evaluation treats them.
- Categories are the object names found, sorted, with ids from 1; images are numbered from 1 in
  split-list order (or sorted xml file name order without a list); sizes are read from the
  image files (a differing xml <size> is counted in a warning).
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.parsers import expat

from vfnet.core.atomic import write_json
from vfnet.core.errors import DatasetError, one_line
from vfnet.data.coco import read_image_size

log = logging.getLogger(__name__)


def _text(node: ET.Element, path: str, source: Path) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise DatasetError(f"{source}: missing field <{path}>")
    return found.text.strip()


def _number(node: ET.Element, path: str, source: Path) -> float:
    text = _text(node, path, source)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"{source}: field <{path}> is not a finite number: {text[:80]!r}")
    return value


def parse_xml(path: Path) -> ET.Element:
    """The root element of an xml file. Documents with a DTD (where entity declarations, and
    so entity expansion attacks, live) are refused; DatasetError naming the file for those and
    for anything the parser cannot read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read xml file: {exc.strerror or exc}") from None

    def refuse(*_: Any) -> None:
        raise DatasetError(f"{path}: xml with a DTD or entity declarations is not accepted")

    scan = expat.ParserCreate()
    scan.StartDoctypeDeclHandler = refuse
    scan.EntityDeclHandler = refuse
    try:
        scan.Parse(data, True)
        return ET.fromstring(data)
    except (expat.ExpatError, ET.ParseError, ValueError, LookupError) as exc:
        raise DatasetError(f"{path}: not a readable VOC xml file: {one_line(exc)}") from None


def _xml_files(xml_dir: Path, split_file: Path | None) -> list[Path]:
    if not xml_dir.is_dir():
        raise DatasetError(f"{xml_dir}: xml directory not found")
    if split_file is None:
        return sorted(xml_dir.glob("*.xml"))
    try:
        stems = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{split_file}: cannot read split list: {exc}") from None
    files = [xml_dir / f"{stem}.xml" for stem in stems]
    for path in files:
        if not path.is_file():
            raise DatasetError(f"{path}: xml file listed in {split_file} not found")
    return files


def convert_voc(xml_dir: str | Path, images_dir: str | Path, out_json: str | Path,
                split_file: str | Path | None = None) -> dict[str, int]:
    """Convert the VOC xml files of `xml_dir` (those named in `split_file`, one stem a line,
    when given) to COCO json at `out_json` (written atomically). Returns counts: `images`,
    `annotations`, `categories`, `difficult`, `dropped_zero_size`, `size_mismatch`."""
    xml_dir, images_dir, out_json = Path(xml_dir), Path(images_dir), Path(out_json)
    files = _xml_files(xml_dir, Path(split_file) if split_file is not None else None)
    if not files:
        raise DatasetError(f"{xml_dir}: no .xml files to convert")
    parsed: list[tuple[dict[str, Any], list[tuple[str, list[float], int]]]] = []
    dropped = difficult = mismatched = 0
    for path in files:
        root = parse_xml(path)
        found = root.find("filename")
        file_name = found.text.strip() if found is not None and found.text else f"{path.stem}.jpg"
        width, height = read_image_size(images_dir / file_name)
        if root.find("size/width") is not None and (
            _number(root, "size/width", path), _number(root, "size/height", path)) != (width, height):
            mismatched += 1
        objects = []
        for obj in root.iter("object"):
            name = _text(obj, "name", path)
            x1, y1, x2, y2 = (_number(obj, f"bndbox/{k}", path) for k in ("xmin", "ymin", "xmax", "ymax"))
            left, top = max(x1 - 1, 0.0), max(y1 - 1, 0.0)
            right, bottom = min(x2, float(width)), min(y2, float(height))
            if x2 <= x1 or y2 <= y1 or right <= left or bottom <= top:
                dropped += 1  # zero/negative size as written, or wholly outside the image
                continue
            is_difficult = obj.find("difficult") is not None and _number(obj, "difficult", path) != 0
            difficult += is_difficult
            objects.append((name, [left, top, right - left, bottom - top], int(is_difficult)))
        parsed.append(({"file_name": file_name, "width": width, "height": height}, objects))

    names = sorted({name for _, objects in parsed for name, _, _ in objects})
    cat_id = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for image_id, (entry, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, **entry})
        for name, bbox, crowd in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[name],
                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd,
            })
    data = {
        "images": images, "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "none"} for n in names],
    }
    if dropped:
        log.warning("%s: dropped %d boxes of zero or negative size or outside the image", xml_dir, dropped)
    if mismatched:
        log.warning("%s: %d xml files give an image size that differs from the image file's "
                    "(the file's size is used)", xml_dir, mismatched)
    write_json(out_json, data)
    stats = {"images": len(images), "annotations": len(annotations), "categories": len(names),
             "difficult": difficult, "dropped_zero_size": dropped, "size_mismatch": mismatched}
    log.info("converted %s -> %s: %s", xml_dir, out_json, stats)
    return stats
