"""mmdetection checkpoints: the name map against mmdetection's own VFNet, conversion, safe
reading, refusals, and fine-tuning from a converted checkpoint (`model.init_from`)."""
import collections
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vfnet.api import class_info, load_model
from vfnet.cli import main
from vfnet.core.checkpoint import CheckpointError, load_checkpoint
from vfnet.core.config import Config
from vfnet.interop.mmdet import from_mmdet_name, read_untrusted, to_mmdet_name
from vfnet.model import VFNet
from vfnet.train.engine import train
from vfnet.train.transfer import init_from

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data"
BCCD = Path(__file__).resolve().parents[3] / "shared" / "data" / "bccd"
COCO_NAMES = tuple(f"thing{i}" for i in range(80))


def reference_keys(depth: int) -> dict[str, tuple[int, ...]]:
    """mmdetection's VFNet R-<depth> tensor names and shapes (tools/mmdet_vfnet_keys.py)."""
    keys = {}
    for line in (DATA / f"mmdet_vfnet_r{depth}_keys.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split("\t")
        keys[name] = tuple(int(s) for s in shape.split(",") if s)
    return keys


def model_cfg(depth=18, num_classes=80, channels=32, stacked_convs=1) -> Config:
    cfg = Config()
    cfg.model.depth, cfg.model.num_classes = depth, num_classes
    cfg.model.fpn_channels = cfg.model.head_channels = channels
    cfg.model.stacked_convs = stacked_convs
    cfg.model.kernels = "torch"
    return cfg


@pytest.mark.parametrize("depth", [50, 101])
def test_map_covers_every_tensor_of_mmdetections_vfnet(depth):
    theirs = reference_keys(depth)
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VFNet.from_config(model_cfg(depth, 80, 256, 3)).state_dict().items()}
    mapped = {}
    for name, shape in theirs.items():
        our_name = from_mmdet_name(name)
        assert our_name is not None, name
        assert to_mmdet_name(our_name) == name
        mapped[our_name] = shape
    assert mapped == ours  # every tensor, same shapes, nothing left over on either side


@pytest.mark.parametrize("depth", [18, 50])
def test_our_names_to_mmdet_and_back_is_the_identity(depth):
    with torch.device("meta"):
        names = list(VFNet.from_config(model_cfg(depth)).state_dict())
    theirs = [to_mmdet_name(n) for n in names]
    assert len(set(theirs)) == len(names)
    assert [from_mmdet_name(n) for n in theirs] == names


# ---------------------------------------------------------------------------------------------
# Converting


@pytest.fixture(scope="module")
def source():
    """A 'COCO-trained' mmdetection VFNet R-18 (random weights): model and mmdetection tensors."""
    torch.manual_seed(0)
    model = VFNet.from_config(model_cfg())
    return model, {to_mmdet_name(k): v.clone() for k, v in model.state_dict().items()}


def write_mmdet(path, weights, version=3, prefix=""):
    """An mmdetection-style checkpoint with the non-tensor objects such files carry."""
    state = collections.OrderedDict((prefix + k, v) for k, v in weights.items())
    if version == 2:
        obj = {"meta": {"mmdet_version": "2.6.0", "CLASSES": COCO_NAMES, "config": "model = dict(...)"},
               "state_dict": state}
        torch.save(obj, path, _use_new_zipfile_serialization=False)  # 2020-era files
        return path
    # mmengine's HistoryBuffer, from a module that is gone when the file is read
    module = types.ModuleType("fake_mmengine_logging")
    buffer_cls = type("HistoryBuffer", (), {"__module__": module.__name__})
    module.HistoryBuffer = buffer_cls
    sys.modules[module.__name__] = module
    buffer = buffer_cls()
    buffer.log = np.arange(4.0)
    obj = {"meta": {"dataset_meta": {"classes": COCO_NAMES, "palette": [(1, 2, 3)]}, "seed": np.int64(7)},
           "state_dict": state, "message_hub": {"log_scalars": {"loss": buffer}}}
    try:
        torch.save(obj, path)
    finally:
        del sys.modules[module.__name__]
    return path


@pytest.mark.parametrize("version, prefix", [(3, ""), (2, ""), (3, "module.")])
def test_convert_writes_a_checkpoint_eval_and_predict_load(source, tmp_path, capsys, version, prefix):
    model, weights = source
    src = write_mmdet(tmp_path / "vfnet.pth", weights, version, prefix)
    assert main(["convert", "mmdet", str(src), str(tmp_path / "vfnet.pt")]) == 0
    assert "R-18, 80 classes, 80 class names" in capsys.readouterr().out
    loaded, cfg, _ = load_model(tmp_path / "vfnet.pt", device=torch.device("cpu"))
    assert (cfg.model.depth, cfg.model.num_classes, cfg.model.stacked_convs) == (18, 80, 1)
    assert cfg.model.fpn_channels == cfg.model.head_channels == 32
    assert cfg.model.class_names == list(COCO_NAMES) and class_info(cfg)[1] == list(COCO_NAMES)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert load_checkpoint(tmp_path / "vfnet.pt")["iteration"] == 0


def bad_weights(weights, case):
    w = dict(weights)
    if case == "dcn":
        w["backbone.layer3.0.conv2.conv_offset.weight"] = torch.zeros(18, 256, 3, 3)
    elif case == "res2net":
        w = {"backbone.stem.0.weight": torch.zeros(32, 3, 3, 3), **w}
    elif case == "resnext":
        w["backbone.layer2.0.conv2.weight"] = torch.zeros(128, 4, 3, 3)  # 32 groups
    elif case == "unknown":
        w["bbox_head.centerness.weight"] = torch.zeros(1, 32, 3, 3)
    elif case == "missing":
        del w["bbox_head.vfnet_reg_refine.bias"]
    elif case == "shape":
        w["neck.fpn_convs.4.conv.weight"] = torch.zeros(32, 32, 1, 1)
    elif case == "width":  # a head width GroupNorm 32 cannot split
        w["bbox_head.cls_convs.0.conv.weight"] = torch.zeros(48, 32, 3, 3)
    return w


@pytest.mark.parametrize("case, message", [
    ("dcn", "(DCN) are not supported: backbone.layer3.0.conv2.conv_offset.weight"),
    ("res2net", "Res2Net backbones are not supported: backbone.stem.0.weight"),
    ("resnext", "ResNeXt (grouped convolution) backbones are not supported: backbone.layer2.0.conv2.weight"),
    ("unknown", "tensor bbox_head.centerness.weight has no counterpart"),
    ("missing", "tensor bbox_head.vfnet_reg_refine.bias is missing"),
    ("shape", "tensor neck.fpn_convs.4.conv.weight has shape (32, 32, 1, 1), expected (32, 32, 3, 3)"),
    ("width", "model.head_channels = 48 is invalid"),
])
def test_bad_mmdet_checkpoints_give_one_line(source, tmp_path, capsys, case, message):
    src = write_mmdet(tmp_path / "bad.pth", bad_weights(source[1], case))
    assert main(["convert", "mmdet", str(src), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(src) in err
    assert not (tmp_path / "out.pt").exists()


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > pwned.txt",))


def test_files_that_are_not_checkpoints_or_run_code_are_refused(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for version in (2, 3):  # cut in half: a legacy pickle stream and a zip without its end
        data = write_mmdet(tmp_path / "whole.pth", source[1], version).read_bytes()
        (tmp_path / f"truncated{version}.pth").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _RunsCode()}, tmp_path / "evil.pth")
    torch.save({"nothing": 1}, tmp_path / "empty.pth")
    for name, message in (("missing.pth", "checkpoint not found"), ("garbage.pth", "not a readable checkpoint"),
                          ("truncated2.pth", "not a readable checkpoint"),
                          ("truncated3.pth", "not a readable checkpoint"),
                          ("evil.pth", "refused to load"), ("empty.pth", "not an mmdetection checkpoint")):
        assert main(["convert", "mmdet", str(tmp_path / name), str(tmp_path / "out.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "pwned.txt").exists()


def test_read_untrusted_keeps_the_data_and_stands_in_for_foreign_classes(source, tmp_path):
    obj = read_untrusted(write_mmdet(tmp_path / "a.pth", {"w": torch.arange(3)}))
    assert torch.equal(obj["state_dict"]["w"], torch.arange(3))
    assert obj["meta"]["dataset_meta"]["classes"] == COCO_NAMES
    assert type(obj["message_hub"]["log_scalars"]["loss"]).__name__ == "HistoryBuffer"


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a converted checkpoint


def test_init_from_keeps_mismatched_tensors_and_logs_them(source, tmp_path, caplog):
    model, weights = source
    src = write_mmdet(tmp_path / "coco.pth", weights)
    torch.manual_seed(1)
    target = VFNet.from_config(model_cfg(num_classes=3))
    fresh_cls = target.head.cls.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="vfnet.train.transfer"):
        skipped = init_from(target, src)
    assert sorted(s.split(":")[0] for s in skipped) == ["head.cls.bias", "head.cls.weight"]
    assert all("keeps its initialisation" in s for s in skipped)
    assert sum("init_from skipped head.cls" in r.message for r in caplog.records) == 2
    assert torch.equal(target.head.cls.weight, fresh_cls)
    for name, value in target.state_dict().items():
        if not name.startswith("head.cls."):
            assert torch.equal(value, model.state_dict()[name]), name
    with caplog.at_level(logging.INFO, logger="vfnet.train.transfer"):
        init_from(VFNet.from_config(model_cfg(depth=50, num_classes=3, channels=64)), src)
    assert any(r.levelname == "WARNING" and "match the checkpoint" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match="neither a vfnet nor"):
        torch.save({"a": torch.ones(1)}, tmp_path / "other.pt")
        init_from(target, tmp_path / "other.pt")


def subset(ann: Path, count: int, out: Path) -> Path:
    data = json.loads(ann.read_text())
    data["images"] = data["images"][:count]
    keep = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out.write_text(json.dumps(data))
    return out


@pytest.mark.skipif(not BCCD.is_dir(), reason="needs the shared BCCD data")
def test_bccd_fine_tune_from_a_converted_checkpoint(source, tmp_path, caplog):
    _, weights = source
    assert main(["convert", "mmdet", str(write_mmdet(tmp_path / "coco.pth", weights)),
                 str(tmp_path / "coco.pt")]) == 0
    cfg = model_cfg(num_classes=3)
    cfg.model.init_from = str(tmp_path / "coco.pt")
    cfg.model.frozen_stages = 4
    cfg.data.train_ann = str(subset(BCCD / "annotations" / "trainval.json", 4, tmp_path / "train.json"))
    cfg.data.val_ann = str(subset(BCCD / "annotations" / "test.json", 2, tmp_path / "val.json"))
    cfg.data.train_images = cfg.data.val_images = str(BCCD / "images")
    cfg.data.img_scale, cfg.data.num_workers = [160, 120], 0
    cfg.train.device, cfg.train.amp = "cpu", False
    cfg.train.batch_size, cfg.train.max_iters, cfg.train.warmup_iters, cfg.train.log_interval = 2, 2, 1, 1
    with caplog.at_level(logging.INFO, logger="vfnet.train.transfer"):
        metrics = train(cfg, tmp_path / "run")
    assert metrics["iterations"] == 2
    assert any("init_from" in r.message and "2 skipped" in r.message for r in caplog.records)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["iter"] == 1  # a fresh schedule, not a resume
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    _, cfg_out, _ = load_model(tmp_path / "run" / "checkpoints" / "last.pt", device=torch.device("cpu"))
    assert cfg_out.model.class_names == ["Platelets", "RBC", "WBC"]
