import pytest
import torch

from vfnet.api import class_info, load_model
from vfnet.core.checkpoint import CheckpointError, save_checkpoint
from vfnet.core.config import Config, ConfigError
from vfnet.model import VFNet


def _tiny_cfg() -> Config:
    cfg = Config()
    cfg.model.depth, cfg.model.num_classes, cfg.model.kernels = 18, 3, "torch"
    cfg.model.fpn_channels = cfg.model.head_channels = 16
    cfg.model.gn_groups = 4
    cfg.model.pretrained = "absent.pth"  # must not be read: the checkpoint holds every weight
    cfg.train.device = "cpu"
    cfg.data.val_ann = cfg.data.train_ann = "absent.json"
    return cfg


def test_load_model_restores_weights_config_and_overrides(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    cfg.model.pretrained = ""
    model = VFNet.from_config(cfg)
    cfg.model.pretrained = "absent.pth"
    path = save_checkpoint(tmp_path, model=model, optimizer=None, iteration=3, epoch=1, config=cfg)

    loaded, got_cfg, device = load_model(path, ["infer.score_thr=0.25"])
    assert device == torch.device("cpu") and not loaded.training
    assert got_cfg.infer.score_thr == 0.25 and got_cfg.model.pretrained == ""
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="nope"):
        load_model(path, ["infer.nope=1"])
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")


def test_class_info_falls_back_to_numbered_classes():
    assert class_info(_tiny_cfg()) == ([1, 2, 3], ["class_0", "class_1", "class_2"])
