import json
import logging

import pytest
import torch
from PIL import Image

from vfnet.cli import main
from vfnet.data import CocoDetection, DatasetError
from vfnet.data.yolo import convert_yolo, convert_yolo_yaml, read_names


def write_set(root, split="train"):
    """A YOLO set in the ultralytics layout: root/images/<split>/*, root/labels/<split>/*.txt.
    a.png 40x20 (two boxes, one repeated line), b.jpg 30x60 (a polygon and a zero-width box),
    c.png (no label file), sub/d.png (empty label file)."""
    images, labels = root / "images" / split, root / "labels" / split
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20)).save(images / "a.png")
    Image.new("RGB", (30, 60)).save(images / "b.jpg")
    Image.new("L", (8, 8)).save(images / "c.png")
    Image.new("RGB", (16, 16)).save(images / "sub" / "d.png")
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n2 0.25 0.75 0.5 0.5\n\n0 0.5 0.5 0.5 0.5\n")
    (labels / "b.txt").write_text("1 0.1 0.2 0.5 0.2 0.3 0.9\n1 0.5 0.5 0 0.4\n")
    (labels / "sub" / "d.txt").write_text("")
    return images, labels


@pytest.fixture
def yolo(tmp_path):
    images, labels = write_set(tmp_path / "set")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n\n")
    return labels, images, tmp_path / "classes.txt"


EXPECTED_ANNOTATIONS = [  # (image_id, category_id, bbox in pixels)
    (1, 1, [10.0, 5.0, 20.0, 10.0]),  # a.png 40x20: centre (20, 10), 20 x 10
    (1, 3, [0.0, 10.0, 20.0, 10.0]),  # centre (10, 15)
    (2, 2, [3.0, 12.0, 12.0, 42.0]),  # b.jpg 30x60: polygon x 0.1..0.5, y 0.2..0.9
]


def annotations(data):
    """(image_id, category_id) and the flat bbox list of every annotation."""
    return ([(a["image_id"], a["category_id"]) for a in data["annotations"]],
            [v for a in data["annotations"] for v in a["bbox"]])


def test_conversion(yolo, tmp_path, caplog):
    labels, images, names = yolo
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    out = tmp_path / "out" / "train.json"
    with caplog.at_level(logging.WARNING, logger="vfnet.data"):
        stats = convert_yolo(labels, images, names, out)
    assert stats == {"images": 4, "annotations": 3, "categories": 3, "background": 2,
                     "dropped_zero_size": 1, "duplicates": 1, "rotated_exif": 0, "orphan_labels": 1}
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 1 YOLO boxes" in warnings and "1 repeated" in warnings and "1 label files have no image" in warnings
    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 1, "name": "cat", "supercategory": "none"},
                                  {"id": 2, "name": "dog", "supercategory": "none"},
                                  {"id": 3, "name": "bird", "supercategory": "none"}]
    assert data["images"] == [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                              {"id": 2, "file_name": "b.jpg", "width": 30, "height": 60},
                              {"id": 3, "file_name": "c.png", "width": 8, "height": 8},
                              {"id": 4, "file_name": "sub/d.png", "width": 16, "height": 16}]
    ids, boxes = annotations(data)
    assert ids == [e[:2] for e in EXPECTED_ANNOTATIONS]
    assert boxes == pytest.approx([v for e in EXPECTED_ANNOTATIONS for v in e[2]])
    assert [a["area"] for a in data["annotations"]] == pytest.approx([200.0, 200.0, 504.0])
    # the loader reads it: labels contiguous = YOLO class, background images kept
    dataset = CocoDetection(out, images)
    assert len(dataset) == 4
    assert [r.labels.tolist() for r in dataset.records] == [[0, 2], [1], [], []]


def test_boxes_clipped_to_image(yolo, tmp_path):
    labels, images, names = yolo
    (labels / "a.txt").write_text("1 0.9 0.1 0.4 0.4\n")  # x 0.7..1.1, y -0.1..0.3
    convert_yolo(labels, images, names, tmp_path / "c.json")
    (ann,) = [a for a in json.loads((tmp_path / "c.json").read_text())["annotations"] if a["image_id"] == 1]
    assert ann["bbox"] == pytest.approx([28.0, 0.0, 12.0, 6.0])


def test_yaml_dir_and_list_splits(tmp_path):
    root = tmp_path / "ds"
    write_set(root, "train")
    val_images, val_labels = root / "images" / "val", root / "labels" / "val"
    val_images.mkdir(parents=True)
    val_labels.mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(val_images / "v.png")
    (val_labels / "v.txt").write_text("1 0.5 0.5 1 1\n")
    (root / "val.txt").write_text("./images/val/v.png\n")
    (tmp_path / "data.yaml").write_text(
        "path: ds\ntrain: images/train\nval: [val.txt]\nnc: 3\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    stats, got_root = convert_yolo_yaml(tmp_path / "data.yaml", "train", tmp_path / "train.json")
    assert got_root == root and stats["images"] == 4 and stats["annotations"] == 3
    data = json.loads((tmp_path / "train.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["images/train/a.png", "images/train/b.jpg",
                                                         "images/train/c.png", "images/train/sub/d.png"]
    ids, boxes = annotations(data)
    assert ids == [e[:2] for e in EXPECTED_ANNOTATIONS]
    assert boxes == pytest.approx([v for e in EXPECTED_ANNOTATIONS for v in e[2]])
    # the CLI, val split from the list file; images relative to the root it prints
    assert main(["data", "convert", "--yolo-yaml", str(tmp_path / "data.yaml"), "--split", "val",
                 "--out", str(tmp_path / "val.json")]) == 0
    dataset = CocoDetection(tmp_path / "val.json", root)
    assert [c["name"] for c in json.loads((tmp_path / "val.json").read_text())["categories"]] == ["cat", "dog", "bird"]
    assert dataset.records[0].boxes.tolist() == [[0.0, 0.0, 10.0, 10.0]]
    assert torch.equal(dataset[0].labels, torch.tensor([1]))


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.5", r"a\.txt:2: expected 'class cx cy w h' .* got 4 fields"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.4", r"a\.txt:2: expected .* got 8 fields"),
    ("x 0.5 0.5 0.5 0.5", r"a\.txt:2: class is not an integer: 'x'"),
    ("1.0 0.5 0.5 0.5 0.5", r"a\.txt:2: class is not an integer"),
    ("3 0.5 0.5 0.5 0.5", r"a\.txt:2: class 3 out of range \(0\.\.2\)"),
    ("-1 0.5 0.5 0.5 0.5", r"a\.txt:2: class -1 out of range"),
    ("0 0.5 abc 0.5 0.5", r"a\.txt:2: coordinate is not a number"),
    ("0 0.5 0.5 1.5 0.5", r"a\.txt:2: coordinates must be normalised to \[0, 1\]"),
    ("0 0.5 nan 0.5 0.5", r"a\.txt:2: coordinates must be normalised"),
    ("0 20 10 20 10", r"a\.txt:2: coordinates must be normalised"),  # pixel boxes
])
def test_bad_lines_name_file_and_line(yolo, tmp_path, line, message, capsys):
    labels, images, names = yolo
    (labels / "a.txt").write_text(f"0 0.5 0.5 0.5 0.5\n{line}\n")
    out = tmp_path / "c.json"
    with pytest.raises(DatasetError, match=message):
        convert_yolo(labels, images, names, out)
    assert not out.exists()
    capsys.readouterr()
    args = ["data", "convert", "--yolo", str(labels), "--images", str(images), "--names", str(names), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vfnet: error: ") and f"{labels / 'a.txt'}:2:" in err[0]


def test_bad_names_and_yaml(tmp_path, yolo):
    _, images, _ = yolo
    (tmp_path / "n.txt").write_text("cat\n\ndog\n")
    with pytest.raises(DatasetError, match=r"n\.txt:2: empty class name"):
        read_names(tmp_path / "n.txt")
    (tmp_path / "n.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match=r"n\.txt: class names repeated: cat"):
        read_names(tmp_path / "n.txt")
    with pytest.raises(DatasetError, match=r"nope\.txt: cannot read class names"):
        read_names(tmp_path / "nope.txt")
    with pytest.raises(DatasetError, match="label directory not found"):
        convert_yolo(tmp_path / "nowhere", images, tmp_path / "n.txt", tmp_path / "c.json")
    data = tmp_path / "data.yaml"
    for text, message in [
        ("train: images/train\nnames: [a, b]\nnc: 3\n", "'nc' is 3 but 'names' has 2 entries"),
        ("train: images/train\nnames: {0: a, 2: b}\n", r"'names' keys must be the class indices 0\.\.1"),
        ("train: images/train\n", "'names' must be a list"),
        ("val: images/val\nnames: [a]\n", "no 'train' split"),
        ("train: images/nowhere\nnames: [a]\n", r"'train' entry 'images/nowhere' is neither"),
        ("train: [1]\nnames: [a]\n", "'train' must be a path or a list of paths"),
        ("path: gone\ntrain: images\nnames: [a]\n", "data-set root 'path' .*gone not found"),
        ("train: [images/train\n", "not valid YAML"),
        ("- a\n", "expected a mapping"),
    ]:
        data.write_text(text)
        with pytest.raises(DatasetError, match=message):
            convert_yolo_yaml(data, "train", tmp_path / "c.json")
    (tmp_path / "list.txt").write_text("images/missing.png\n")
    data.write_text("train: list.txt\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"missing\.png: image file not found \(listed for 'train'"):
        convert_yolo_yaml(data, "train", tmp_path / "c.json")


def test_cli_flag_combinations(yolo, tmp_path, capsys):
    labels, images, names = yolo
    out = str(tmp_path / "c.json")
    for args, message in [
        (["--yolo", str(labels), "--images", str(images)], "--yolo needs --names"),
        (["--yolo", str(labels), "--names", str(names)], "--images is required"),
        (["--yolo-yaml", "d.yaml"], "--yolo-yaml needs --split train, val or test, got None"),
        (["--yolo-yaml", "d.yaml", "--split", "val", "--images", "x"], "--images does not go with --yolo-yaml"),
        (["--voc", "x", "--images", "y", "--names", str(names)], "--names does not go with --voc"),
    ]:
        assert main(["data", "convert", *args, "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert main(["data", "convert", "--voc", "x", "--yolo", "y", "--images", "i", "--out", out]) == 2  # argparse
