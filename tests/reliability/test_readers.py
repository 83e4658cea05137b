"""Every reader, every input: generated malformed inputs for each file the project reads.

Each test feeds one reader thousands of inputs (hypothesis, derandomized: the same cases every
run) and accepts exactly two outcomes: the reader's `UserError` naming the file, or a correct
result. Anything else (another exception, a silently different result) fails the test. The
`@example`s are the inputs that once escaped as tracebacks: kept as regression cases.

Case counts are per test (`CASES`); `HYPOTHESIS_PROFILE=deep` runs ten times as many.
"""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from vfnet.core.checkpoint import load_checkpoint, save_checkpoint, state_digest
from vfnet.core.config import Config, _all_keys, apply_overrides, load_config
from vfnet.core.errors import CheckpointError, ConfigError, DatasetError
from vfnet.data.coco import CocoDetection, decode_image
from vfnet.data.parquet import ParquetDetection, pack
from vfnet.data.voc import convert_voc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch and zipfile on odd inputs
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def cases(n: int) -> settings:
    """`n` generated cases (times ten under the deep profile)."""
    return settings(max_examples=n * SCALE)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfnet-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for p, b in zip(positions, bits):
        out[p % len(out)] ^= 1 << b
    return bytes(out)


flips = st.tuples(st.lists(st.integers(0, 1 << 30), min_size=1, max_size=8),
                  st.lists(st.integers(0, 7), min_size=8, max_size=8))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> tuple[bytes, str]:
    """A real (small) checkpoint's bytes and its content digest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    path = save_checkpoint(work / "ck", model=model, optimizer=None, iteration=5, epoch=1, config=Config())
    return _Checkpoint((path.read_bytes(), state_digest(torch.load(path, weights_only=True))))


def _check_checkpoint(path: Path, data: bytes, digest: str | None) -> None:
    path.write_bytes(data)
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return
    assert state_digest(state) == state["sha256"]  # verified, and (for damaged copies) unchanged
    if digest is not None:
        assert state["sha256"] == digest


class _Checkpoint(tuple):
    def __repr__(self) -> str:
        return f"checkpoint({len(self[0])} bytes)"


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _hostile_pickles() -> list[bytes]:
    import pickle

    payloads = [pickle.dumps(_Hostile(), protocol=p) for p in (0, 2, 4)]
    payloads.append(b"cbuiltins\neval\n(S'1+1'\ntR.")
    return payloads


@cases(600)
@given(cut=st.integers(0, 1 << 30), flip=flips, mode=st.sampled_from(["truncate", "flip", "both"]))
def test_checkpoint_damaged_copies(work, checkpoint, cut, flip, mode):
    data, digest = checkpoint
    if mode in ("truncate", "both"):
        data = data[: cut % len(data)]
    if mode in ("flip", "both") and data:
        data = _flip(data, *flip)
    _check_checkpoint(work / "damaged.pt", data, digest)


@cases(500)
@given(st.binary(max_size=3000) | st.builds(lambda head, tail: head + tail,
                                            st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"PK"]),
                                            st.binary(max_size=500)))
@example(b"\x80\x02]q\x00(K\x01h\x00e.")  # a pickle that refers to an unknown memo entry
def test_checkpoint_any_bytes(work, data):
    _check_checkpoint(work / "bytes.pt", data, None)


@cases(300)
@given(members=st.lists(st.tuples(st.sampled_from(["archive/data.pkl", "archive/version", "archive/byteorder",
                                                   "archive/data/0", "archive/.data/version", "x/data.pkl",
                                                   "data.pkl"]),
                                  st.binary(max_size=200) | st.sampled_from(_hostile_pickles())),
                        max_size=5))
def test_checkpoint_zips_with_wrong_members(work, checkpoint, members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members:
            archive.writestr(name, content)
    _check_checkpoint(work / "zip.pt", buffer.getvalue(), None)


@pytest.mark.parametrize("payload", _hostile_pickles())
def test_checkpoint_hostile_pickles_never_run(work, payload, capfd):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/version", b"3\n")
    for data in (payload, buffer.getvalue()):
        path = work / "hostile.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="hostile.pt"):
            load_checkpoint(path)
    assert "pwned" not in capfd.readouterr().out


@cases(300)
@given(value=json_values)
def test_checkpoint_valid_pickles_of_the_wrong_shape(work, value):
    path = work / "shape.pt"
    torch.save(value if not isinstance(value, dict) else {**value, "format": 2}, path)
    _check_checkpoint(path, path.read_bytes(), None)


# ---------------------------------------------------------------------------------------------
# COCO json


def _valid_coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 12},
                   {"id": 2, "file_name": "b.png", "width": 8, "height": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 5, 4], "area": 20, "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 4, "bbox": [0, 0, 8, 8], "iscrowd": 1}],
        "categories": [{"id": 3, "name": "a"}, {"id": 4, "name": "b"}],
    }


def _check_coco(path: Path, text: str) -> None:
    path.write_text(text)
    try:
        dataset = CocoDetection(path, path.parent, check_files=False)
        index = dataset.coco
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    assert len(index.getImgIds()) == len(dataset.records)
    for record in dataset.records:
        assert record.width >= 1 and record.height >= 1 and np.isfinite(record.boxes).all()
        assert (record.boxes[:, 2:] >= 1).all() and len(record.labels) == len(record.boxes)
        assert ((record.labels >= 0) & (record.labels < len(dataset.cat_ids))).all()


@cases(800)
@given(value=json_values)
def test_coco_any_json(work, value):
    _check_coco(work / "any.json", json.dumps(value))


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


_COCO_PATHS = list(_paths(_valid_coco()))[1:]


_ONE_DICT: dict = {}  # hypothesis hands out one shared object for sampled {} / []


@cases(1200)
@given(edits=st.lists(st.tuples(st.sampled_from(_COCO_PATHS), json_values | st.sampled_from(
    [0, -1, 1 << 64, 10 ** 400, 1e308, float("nan"), float("inf"), "", [], {}, None, True])), min_size=1, max_size=3))
@example(edits=[(("annotations", 0, "bbox", 0), 10 ** 400)])  # int too large for a float: OverflowError
@example(edits=[(("images", 0, "width"), 0)])
@example(edits=[(("images",), _ONE_DICT), (("images", 0), _ONE_DICT)])  # one object put inside itself
def test_coco_wrong_types_and_values_anywhere(work, edits):
    data = _valid_coco()
    for path, value in edits:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = copy.deepcopy(value)  # hypothesis may share one object between edits
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this place
    _check_coco(work / "edited.json", json.dumps(data))


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # RecursionError in the json module
    '{"images": ' + "[" * 50_000 + "]" * 50_000 + ', "annotations": [], "categories": []}',
    '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}], "x": ' + "9" * 5000 + "}",
    "\ufeff{}", "\x00" * 10, "",
])
def test_coco_pathological_files(work, text):
    _check_coco(work / "patho.json", text)


def test_coco_huge_file_is_read_or_refused_cleanly(work):
    images = [{"id": i, "file_name": f"{i}.png", "width": 4, "height": 4} for i in range(100_000)]
    _check_coco(work / "big.json", json.dumps({"images": images, "annotations": [], "categories": []}))


# ---------------------------------------------------------------------------------------------
# VOC xml

_VOC = """<annotation><filename>a.png</filename><size><width>16</width><height>12</height></size>
<object><name>cat</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax>
<ymax>9</ymax></bndbox></object></annotation>"""

_BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                   + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
                             for i in range(1, 10))
                   + ']><annotation><filename>&lol9;</filename></annotation>')
_EXTERNAL = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
             '<annotation><filename>&x;</filename></annotation>')


@pytest.fixture(scope="module")
def voc_dirs(work: Path) -> tuple[Path, Path]:
    images = work / "voc_images"
    images.mkdir()
    Image.new("RGB", (16, 12), (10, 20, 30)).save(images / "a.png")
    xml = work / "voc_xml"
    xml.mkdir()
    return xml, images


def _check_voc(dirs: tuple[Path, Path], data: bytes) -> None:
    xml_dir, images = dirs
    path = xml_dir / "a.xml"
    path.write_bytes(data)
    out = xml_dir.parent / "voc.json"
    try:
        stats = convert_voc(xml_dir, images, out)
    except DatasetError as exc:
        assert str(path) in str(exc) or str(images) in str(exc)
        return
    coco = json.loads(out.read_text())
    assert stats["images"] == 1 and len(coco["annotations"]) == stats["annotations"]
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 16 and y + h <= 12


@cases(500)
@given(st.binary(max_size=400))
def test_voc_any_bytes(voc_dirs, data):
    _check_voc(voc_dirs, data)


_VOC_TOKENS = ["<", ">", "</", "&", "&amp;", "<!DOCTYPE a>", "<![CDATA[", "]]>", "nan", "inf", "-1", "1e999",
               "\x00", "<object>", "</object>", "<bndbox>", "<xmin>", "</xmin>", "<?xml version='1.0' encoding='x'?>"]


@cases(800)
@given(edits=st.lists(st.tuples(st.integers(0, len(_VOC)), st.integers(0, 20),
                                st.sampled_from(_VOC_TOKENS) | st.text(max_size=6)), min_size=1, max_size=4))
@example(edits=[(_VOC.index("10</xmax>"), 2, "nan")])  # a NaN box coordinate
def test_voc_mutated_files(voc_dirs, edits):
    text = _VOC
    for at, drop, insert in edits:
        at = min(at, len(text))
        text = text[:at] + insert + text[at + drop:]
    _check_voc(voc_dirs, text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("text", [_BILLION_LAUGHS, _EXTERNAL, '<!DOCTYPE a><annotation/>'])
def test_voc_entities_are_refused(voc_dirs, text):
    (voc_dirs[0] / "a.xml").write_text(text)
    with pytest.raises(DatasetError, match=r"a\.xml: xml with a DTD or entity declarations is not accepted"):
        convert_voc(voc_dirs[0], voc_dirs[1], voc_dirs[0].parent / "x.json")


# ---------------------------------------------------------------------------------------------
# Images


def _encoded(mode: str, fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


_FORMATS = [("RGB", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("1", "PNG"),
            ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "BMP"), ("P", "GIF"), ("RGB", "TIFF"),
            ("F", "TIFF"), ("I", "TIFF"), ("LAB", "TIFF"), ("RGB", "WEBP"), ("RGB", "PPM")]


def _png_header(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _check_image(data: bytes) -> None:
    try:
        img = decode_image(data, "img.bin")
    except DatasetError as exc:
        assert "img.bin" in str(exc)
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@cases(600)
@given(kind=st.sampled_from(_FORMATS), w=st.integers(1, 40), h=st.integers(1, 40), seed=st.integers(0, 99),
       cut=st.integers(0, 1 << 20), flip=flips, mode=st.sampled_from(["whole", "truncate", "flip"]))
def test_image_encoded_then_damaged(kind, w, h, seed, cut, flip, mode):
    data = _encoded(*kind, (w, h), seed)
    if mode == "truncate":
        data = data[: cut % len(data)]
    elif mode == "flip":
        data = _flip(data, *flip)
    if mode == "whole":
        assert decode_image(data, "img.bin").size == (w, h)  # every mode reads as RGB
    else:
        _check_image(data)


@cases(1500)
@given(st.binary(max_size=600) | st.builds(lambda head, tail: head + tail, st.sampled_from(
    [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"P6\n"]),
    st.binary(max_size=300)))
def test_image_any_bytes(data):
    _check_image(data)


@cases(500)
@given(width=st.integers(1, (1 << 31) - 1), height=st.integers(1, (1 << 31) - 1),
       colour=st.sampled_from([0, 2, 3, 4, 6]), depth=st.sampled_from([1, 8, 16]))
@example(width=100_000, height=100_000, colour=2, depth=8)  # PIL's DecompressionBombError
def test_image_huge_dimensions_are_refused(width, height, colour, depth):
    data = _png_header(width, height, depth, colour)
    try:
        decode_image(data, "img.bin")
    except DatasetError as exc:
        assert "img.bin" in str(exc)
        if width * height > 1 << 27:
            assert "image too large" in str(exc) or "cannot read image" in str(exc)


def test_pixel_limit_is_configurable():
    data = _encoded("RGB", "PNG", (40, 30), 0)
    too_large = r"img.bin: image too large \(1200 pixels; data.max_image_pixels = 1000\)"
    with pytest.raises(DatasetError, match=too_large):
        decode_image(data, "img.bin", max_pixels=1000)
    assert decode_image(data, "img.bin", max_pixels=1200).size == (40, 30)


def test_pixel_limit_above_pils_own_is_not_refused_by_pil(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    data = _png_header(20000, 10000)  # 2e8 pixels: over twice PIL's default limit, no pixel data
    with pytest.raises(DatasetError, match="img.bin: cannot read image"):
        decode_image(data, "img.bin", max_pixels=1 << 28)


# ---------------------------------------------------------------------------------------------
# TOML configs and --set

_KEYS = _all_keys()
_toml_values = st.recursive(
    st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


def _check_config(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(cfg, Config) and tomllib.loads(cfg.to_toml())  # round-trips


@cases(600)
@given(st.text(max_size=200))
@example("a = " + "[" * 5000 + "]" * 5000)  # RecursionError in tomllib
@example("[train]\nlr = nan")
@example("[data]\nnum_workers = " + "9" * 5000)  # an int too long for int()
@example("[model]\ngn_groups = 0")  # a modulo by zero in validation
def test_config_any_text(work, text):
    _check_config(work / "any.toml", text)


@cases(500)
@given(entries=st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), _toml_values, max_size=4))
def test_config_known_keys_any_values(work, entries):
    import tomli_w

    raw: dict = {}
    for key, value in entries.items():
        section, _, name = key.partition(".")
        raw.setdefault(section or "x", {})[name or "y"] = value
    try:
        text = tomli_w.dumps(raw)
    except (TypeError, ValueError):
        return  # not representable in TOML (e.g. NaN keys): nothing to read
    _check_config(work / "keys.toml", text)


@cases(2000)
@given(key=st.sampled_from(_KEYS) | st.text(max_size=10), value=st.text(max_size=30) | st.sampled_from(
    ["nan", "inf", "-inf", "1e999", "9" * 5000, "[" * 3000, "0", "-1", "[]", "{}", '"s"', "true"]))
def test_config_set_values(key, value):
    item = f"{key}={value}"
    named = item.split("=", 1)[0].strip()
    try:
        cfg = apply_overrides(Config(), [item])
    except ConfigError as exc:
        assert named in str(exc) or repr(named) in str(exc) or "--set" in str(exc)
        return
    assert isinstance(cfg, Config)


# ---------------------------------------------------------------------------------------------
# Parquet shards


class Shard:
    """A packed shard's bytes and records (short repr: hypothesis prints its arguments)."""

    def __init__(self, data: bytes, records: list) -> None:
        self.data, self.records = data, records

    def __repr__(self) -> str:
        return f"Shard({len(self.data)} bytes)"


@pytest.fixture(scope="module")
def shard(work: Path) -> Shard:
    """A real one-shard pack of 3 small images: the shard's bytes and its records."""
    from vfnet.data.synth import synthesize

    synthesize(work / "shapes", images=3, size=32, seed=0)
    shards = pack(work / "shapes" / "annotations" / "train.json", work / "shapes" / "images" / "train",
                  work / "packed")
    dataset = ParquetDetection(work / "packed")
    return Shard(shards[0].read_bytes(), [(r.image_id, r.boxes.tolist(), r.labels.tolist()) for r in dataset.records])


def _check_shard(directory: Path, data: bytes, expected: list | None) -> None:
    directory.mkdir(exist_ok=True)
    path = directory / "part-00000.parquet"
    path.write_bytes(data)
    try:
        dataset = ParquetDetection(directory)
        samples = [dataset[i] for i in range(len(dataset))]
    except DatasetError as exc:
        assert str(path) in str(exc)
        return
    got = [(r.image_id, r.boxes.tolist(), r.labels.tolist()) for r in dataset.records]
    if expected is not None:
        assert got == expected  # a damaged shard either fails or reads back the same targets
    assert all(s.image.shape[0] == 3 for s in samples)


@cases(1500)
@given(cut=st.integers(0, 1 << 30), flip=flips, mode=st.sampled_from(["truncate", "flip"]))
@example(cut=0, flip=([25], [0] * 8), mode="flip")  # image_id 2 read back as 3 (before page checksums)
@example(cut=0, flip=([0, (1 << 30) - 2], [0, 7] + [0] * 6), mode="flip")  # UnicodeDecodeError in pyarrow
def test_parquet_damaged_shards(work, shard, cut, flip, mode):
    data = shard.data[: cut % len(shard.data)] if mode == "truncate" else _flip(shard.data, *flip)
    _check_shard(work / "damaged_shard", data, shard.records)


_ARROW_TYPES = ["int64", "int32", "string", "binary", "double", "list<double>", "list<list<double>>",
                "list<int64>", "null"]


@cases(200)
@given(columns=st.dictionaries(st.sampled_from(["image_id", "file_name", "width", "height", "image", "boxes",
                                                "labels", "x"]), st.sampled_from(_ARROW_TYPES), max_size=8),
       meta=st.sampled_from([None, b"[]", b'[{"id": 1, "name": "a"}]', b"{", b'[{"id": "1"}]']))
def test_parquet_wrong_schema(work, shard, columns, meta):
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(), "binary": pa.binary(),
             "double": pa.float64(), "list<double>": pa.list_(pa.float64()),
             "list<list<double>>": pa.list_(pa.list_(pa.float64())), "list<int64>": pa.list_(pa.int64()),
             "null": pa.null()}
    schema = pa.schema([(name, types[kind]) for name, kind in columns.items()],
                       metadata={b"vfnet.categories": meta} if meta is not None else None)
    table = pa.Table.from_pylist([{name: None for name in columns}] * 2, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _check_shard(work / "schema_shard", buffer.getvalue(), None)
