import random

import numpy as np
import pytest
import torch
from torch import nn

from vfnet.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    checkpoint_config,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vfnet.config import Config
from vfnet.errors import UserError


def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()  # creates momentum buffers
    return model, opt


def test_round_trip_restores_everything(tmp_path):
    model, opt = _model_and_opt()
    cfg = Config()
    cfg.train.lr = 0.123
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "ck", model=model, optimizer=opt, iteration=17, epoch=2,
                           config=cfg)
    assert path == tmp_path / "ck" / "last.pt"
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    state = load_checkpoint(path)
    assert state["iteration"] == 17 and state["epoch"] == 2
    assert checkpoint_config(state, path).train.lr == 0.123
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    fresh.load_state_dict(state["model"])
    for a, b in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_opt.load_state_dict(state["optimizer"])
    buf = fresh_opt.state[next(iter(fresh.parameters()))]["momentum_buffer"]
    torch.testing.assert_close(buf, opt.state[next(iter(model.parameters()))]["momentum_buffer"])

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_state_with_cached_gauss_round_trips():
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in both generators
    state = rng_state()
    expected = (random.gauss(0, 1), np.random.randn())
    set_rng_state(state)
    assert (random.gauss(0, 1), np.random.randn()) == expected


def test_epoch_files_kept_and_pruned(tmp_path):
    model, opt = _model_and_opt()
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=epoch * 10, epoch=epoch,
                        config=Config(), epoch_file=epoch, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["epoch_4.pt", "epoch_5.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 50
    assert load_checkpoint(tmp_path / "epoch_4.pt")["iteration"] == 40


def test_missing_truncated_and_foreign_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    model, opt = _model_and_opt()
    good = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=1, epoch=0, config=Config())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt.*missing"):
        load_checkpoint(foreign)
    assert issubclass(CheckpointError, UserError) and not issubclass(CheckpointError, ValueError)


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_torch_save({"v": torch.ones(3)}, target)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
