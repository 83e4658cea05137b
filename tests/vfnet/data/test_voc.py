import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from vfnet.data import DatasetError
from vfnet.data.voc import convert_voc

BCCD = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "bccd"
needs_bccd = pytest.mark.skipif(not (BCCD / "voc_xml").is_dir(), reason="BCCD data not present")


@needs_bccd
@pytest.mark.parametrize("split, boxes, dropped", [("test", 945, 0), ("trainval", 3941, 2)])
def test_bccd_split_matches_shipped_json(tmp_path, caplog, split, boxes, dropped):
    """The shipped json was made with x = xmin, w = xmax - xmin; ours applies the 1-based
    inclusive convention (x = xmin - 1, w = xmax - xmin + 1): same boxes otherwise."""
    out = tmp_path / f"{split}.json"
    with caplog.at_level(logging.WARNING, logger="vfnet.data"):
        stats = convert_voc(BCCD / "voc_xml", BCCD / "images", out, BCCD / "splits" / f"{split}.txt")
    assert stats["annotations"] == boxes and stats["dropped_zero_size"] == dropped
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == (1 if dropped else 0)
    ours, shipped = json.loads(out.read_text()), json.loads((BCCD / "annotations" / f"{split}.json").read_text())
    assert [c["name"] for c in ours["categories"]] == ["Platelets", "RBC", "WBC"]
    assert ours["categories"] == shipped["categories"]
    assert ours["images"] == shipped["images"]
    assert len(ours["annotations"]) == len(shipped["annotations"])
    for a, b in zip(ours["annotations"], shipped["annotations"]):
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (b["image_id"], b["category_id"], b["iscrowd"])
        x, y, w, h = b["bbox"]
        assert a["bbox"] == [x - 1, y - 1, w + 1, h + 1]


@needs_bccd
def test_bccd_all_files_without_split(tmp_path):
    stats = convert_voc(BCCD / "voc_xml", BCCD / "images", tmp_path / "all.json")
    assert stats == {"images": 364, "annotations": 4886, "categories": 3, "difficult": 0,
                     "dropped_zero_size": 2, "size_mismatch": 0}
    names = [im["file_name"] for im in json.loads((tmp_path / "all.json").read_text())["images"]]
    assert names == sorted(names) and names[0] == "BloodImage_00000.jpg"


def voc_xml(filename, objects, size=(40, 30)):
    objs = "".join(
        f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, diff in objects
    )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{filename}</filename>{size_xml}{objs}</annotation>"


@pytest.fixture
def voc(tmp_path):
    xml_dir, image_dir = tmp_path / "xml", tmp_path / "img"
    xml_dir.mkdir()
    image_dir.mkdir()
    Image.new("RGB", (40, 30)).save(image_dir / "b.png")
    Image.new("RGB", (20, 10)).save(image_dir / "a.png")
    (xml_dir / "b.xml").write_text(voc_xml("b.png", [
        ("zebra", (1, 1, 40, 30), 0),  # the whole image
        ("cat", (3, 4, 5, 9), 1),  # difficult -> iscrowd
        ("cat", (7, 7, 7, 9), 0),  # zero width: dropped
        ("cat", (30, 20, 45, 35), 0),  # past the edge: clipped
    ]))
    (xml_dir / "a.xml").write_text(voc_xml("a.png", [("ant", (2, 2, 3, 3), 0)], size=(21, 10)))
    return xml_dir, image_dir


def test_conversion_conventions(voc, tmp_path):
    xml_dir, image_dir = voc
    stats = convert_voc(xml_dir, image_dir, tmp_path / "out" / "c.json")
    assert stats == {"images": 2, "annotations": 4, "categories": 3, "difficult": 1,
                     "dropped_zero_size": 1, "size_mismatch": 1}
    data = json.loads((tmp_path / "out" / "c.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "ant"), (2, "cat"), (3, "zebra")]
    assert data["images"] == [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
                              {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]
    got = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"], a["area"]) for a in data["annotations"]]
    assert got == [
        (1, 1, [1.0, 1.0, 2.0, 2.0], 0, 4.0),
        (2, 3, [0.0, 0.0, 40.0, 30.0], 0, 1200.0),
        (2, 2, [2.0, 3.0, 3.0, 6.0], 1, 18.0),
        (2, 2, [29.0, 19.0, 11.0, 11.0], 0, 121.0),
    ]
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4]


def test_split_list_orders_images(voc, tmp_path):
    xml_dir, image_dir = voc
    (tmp_path / "split.txt").write_text("b\n\na\n")
    convert_voc(xml_dir, image_dir, tmp_path / "c.json", tmp_path / "split.txt")
    names = [im["file_name"] for im in json.loads((tmp_path / "c.json").read_text())["images"]]
    assert names == ["b.png", "a.png"]


def test_bad_inputs(voc, tmp_path):
    xml_dir, image_dir = voc
    out = tmp_path / "c.json"
    (tmp_path / "split.txt").write_text("a\nmissing\n")
    with pytest.raises(DatasetError, match=r"missing\.xml: xml file listed in .*split\.txt not found"):
        convert_voc(xml_dir, image_dir, out, tmp_path / "split.txt")
    with pytest.raises(DatasetError, match="cannot read split list"):
        convert_voc(xml_dir, image_dir, out, tmp_path / "nope.txt")
    with pytest.raises(DatasetError, match="xml directory not found"):
        convert_voc(tmp_path / "nowhere", image_dir, out)
    (image_dir / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"a\.png: image file not found"):
        convert_voc(xml_dir, image_dir, out)
    Image.new("RGB", (20, 10)).save(image_dir / "a.png")
    (xml_dir / "a.xml").write_text("<annotation><filename>a.png")
    with pytest.raises(DatasetError, match=r"a\.xml: not a readable VOC xml file"):
        convert_voc(xml_dir, image_dir, out)
    (xml_dir / "a.xml").write_text(voc_xml("a.png", [("ant", (2, 2, "x", 3), 0)]))
    with pytest.raises(DatasetError, match=r"a\.xml: field <bndbox/xmax> is not a finite number"):
        convert_voc(xml_dir, image_dir, out)
    no_box = "<annotation><filename>a.png</filename><object><name>ant</name></object></annotation>"
    (xml_dir / "a.xml").write_text(no_box)
    with pytest.raises(DatasetError, match=r"a\.xml: missing field <bndbox/xmin>"):
        convert_voc(xml_dir, image_dir, out)
    assert not out.exists()
