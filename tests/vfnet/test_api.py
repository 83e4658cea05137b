"""vfnet.Detector: inputs of every kind, single and batched, the same detections as the model's
predict; the README example; vfnet predict on a directory; vfnet export's missing-package error."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfnet import Detections, Detector
from vfnet.cli import main
from vfnet.core.checkpoint import save_checkpoint
from vfnet.core.config import Config
from vfnet.core.errors import ArgumentError, DatasetError
from vfnet.data import Sample, build_transform, collate
from vfnet.data.synth import synthesize
from vfnet.model import VFNet

README = Path(__file__).resolve().parents[2] / "README.md"
NAMES = ["circle", "square", "triangle", "cross"]


def write_checkpoint(directory: Path) -> Path:
    """A 4-class R-18 checkpoint (narrow head, 96 px inputs) whose class scores spread over (0, 1)."""
    cfg = Config()
    cfg.model.depth, cfg.model.num_classes, cfg.model.kernels = 18, 4, "torch"
    cfg.model.fpn_channels = cfg.model.head_channels = 16
    cfg.model.gn_groups, cfg.model.stacked_convs = 4, 1
    cfg.model.class_names = list(NAMES)
    cfg.data.img_scale = [96, 96]
    cfg.data.val_ann = cfg.data.train_ann = "absent.json"
    cfg.train.device = "cpu"
    torch.manual_seed(0)
    model = VFNet.from_config(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls.weight, std=0.5)
        model.head.cls.bias.fill_(-2.0)
    return save_checkpoint(directory, model=model, optimizer=None, iteration=0, epoch=0, config=cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    checkpoint = write_checkpoint(root / "work_dirs" / "shapes_tiny" / "checkpoints")
    synthesize(root / "data" / "shapes", images=16, size=80, seed=0)
    images = sorted((root / "data" / "shapes" / "images" / "val").glob("*.png"))
    return root, checkpoint, images


def predict_directly(detector: Detector, image: Image.Image) -> dict:
    """The model's own predict on the evaluation transform of `image` (what `vfnet eval` runs)."""
    t = build_transform(detector.cfg.data, train=False)(image, np.zeros((0, 4), np.float32))
    sample = Sample(image=t.image, boxes=t.boxes, labels=torch.zeros(0, dtype=torch.int64), image_id=0,
                    orig_size=(image.height, image.width), scale=t.scale)
    batch = collate([sample], detector.cfg.data.size_divisor)
    return detector.model.predict(batch.images, batch.image_sizes, batch.scales)[0]


def same(a: Detections, b: Detections) -> None:
    assert torch.equal(a.labels, b.labels) and a.names == b.names and a.category_ids == b.category_ids
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)


def test_every_input_kind_single_and_batched(setup, one_thread):
    _, checkpoint, paths = setup
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    assert detector.class_names == NAMES and detector.device == torch.device("cpu")
    pil = Image.open(paths[0]).convert("RGB")
    array = np.array(pil)
    base = detector(paths[0])
    assert isinstance(base, Detections) and len(base) > 0
    want = predict_directly(detector, pil)
    torch.testing.assert_close(base.boxes, want["boxes"], rtol=0, atol=0)
    assert torch.equal(base.labels, want["labels"]) and base.names == [NAMES[i] for i in want["labels"].tolist()]
    assert base.boxes.shape == (len(base), 4) and (base.boxes[:, 2:] <= torch.tensor([pil.width, pil.height])).all()
    for single in (str(paths[0]), pil, array, torch.from_numpy(array).permute(2, 0, 1)):
        same(detector(single), base)
    batch = detector([paths[0], paths[1], array], batch_size=2)  # mixed kinds, two network batches
    assert len(batch) == 3
    same(batch[0], base)
    same(batch[2], base)
    same(batch[1], detector(paths[1]))
    stacked = np.stack([array, array])
    for many in (stacked, torch.from_numpy(stacked).permute(0, 3, 1, 2)):
        out = detector(many)
        assert isinstance(out, list) and len(out) == 2
        same(out[1], base)


def test_bad_inputs_name_the_problem(setup):
    _, checkpoint, paths = setup
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ArgumentError, match=r"uint8 \[H, W, 3\]"):
        detector(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ArgumentError, match=r"uint8 \[3, H, W\]"):
        detector(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ArgumentError, match="path, PIL image"):
        detector(3)
    with pytest.raises(ArgumentError, match="no images"):
        detector([])
    with pytest.raises(DatasetError, match="missing.png"):
        detector(paths[0].parent / "missing.png")


def test_readme_example_runs_as_written(setup, monkeypatch, capsys, one_thread):
    root, _, _ = setup
    section = README.read_text().split("## Python API and export", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(root)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.split()[1] in NAMES for line in lines)


def test_predict_accepts_a_directory(setup, tmp_path, capsys):
    _, checkpoint, paths = setup
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(paths[0].parent)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([p.stem + ".png" for p in paths] + ["results.json"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(empty)]) == 2
    assert "no images" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--out", "a.onnx", "b.pt2"], "--format gives the format of a single --out file"),
    (["--out", "model.bin"], "--out model.bin: the format is not clear from the name"),
    (["--out", "a.onnx", "b.ONNX"], "--out: one file per format"),
])
def test_export_files_that_do_not_say_their_format_are_one_line(argv, message, capsys):
    """Refused before the checkpoint (here none) is read."""
    assert main(["export", "--checkpoint", "missing.pt", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_export_without_onnx_is_one_line(setup, monkeypatch, capsys):
    _, checkpoint, _ = setup
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", "m.onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "onnxruntime" in err and ".[export]" in err
