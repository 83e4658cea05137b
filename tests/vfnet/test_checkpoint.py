import random
import shutil

import numpy as np
import pytest
import torch
from corrupt import flip_tensor_bit
from torch import nn

from vfnet.core.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    checkpoint_candidates,
    checkpoint_config,
    load_checkpoint,
    load_newest_valid,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from vfnet.core.config import Config
from vfnet.core.errors import EnvError, UserError


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
    with pytest.raises(EnvError, match="last.pt: cannot write: disk full"):
        atomic_torch_save({"v": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_flipped_bit_in_tensor_data_is_reported_as_corruption(tmp_path):
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=3, epoch=0, config=Config())
    state = load_checkpoint(path)
    assert state["sha256"] == state_digest(state)
    for fraction in (0.0, 0.5, 0.999):
        damaged = tmp_path / f"flip{fraction}.pt"
        shutil.copyfile(path, damaged)
        flip_tensor_bit(damaged, fraction)
        # torch itself reads the damaged tensor back without complaint ...
        raw = torch.load(damaged, weights_only=True)
        assert raw["sha256"] == state["sha256"] and state_digest(raw) != state["sha256"]
        # ... the content hash does not
        with pytest.raises(CheckpointError, match=f"{damaged.name}: checkpoint is corrupt"):
            load_checkpoint(damaged)


def test_digest_covers_values_not_only_tensors():
    model, opt = _model_and_opt()
    state = {"format": 2, "model": model.state_dict(), "iteration": 3, "epoch": 0, "config": "x",
             "optimizer": opt.state_dict()}
    digest = state_digest(state)
    assert digest == state_digest({**state, "sha256": "ignored"})
    assert digest != state_digest({**state, "iteration": 4})
    assert digest != state_digest({**state, "config": "y"})
    assert digest != state_digest({**state, "epoch": 0.0})


def test_format_1_checkpoints_load_unverified(tmp_path, caplog):
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=3, epoch=0, config=Config())
    old = load_checkpoint(path)
    old.pop("sha256")
    old["format"] = 1
    torch.save(old, tmp_path / "v1.pt")
    assert load_checkpoint(tmp_path / "v1.pt")["iteration"] == 3
    assert "no content hash" in caplog.text


def test_newest_valid_skips_corrupt_and_names_them(tmp_path, caplog):
    model, opt = _model_and_opt()
    for epoch in (1, 2):
        save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=4 * epoch, epoch=epoch,
                        config=Config(), epoch_file=epoch)
    save_checkpoint(tmp_path, model=model, optimizer=opt, iteration=10, epoch=2, config=Config())
    assert [p.name for p in checkpoint_candidates(tmp_path)] == ["last.pt", "epoch_2.pt", "epoch_1.pt"]
    flip_tensor_bit(tmp_path / "last.pt")
    (tmp_path / "epoch_2.pt").write_bytes((tmp_path / "epoch_2.pt").read_bytes()[:500])
    state, path = load_newest_valid(checkpoint_candidates(tmp_path))
    assert path.name == "epoch_1.pt" and state["iteration"] == 4
    assert "skipping checkpoint" in caplog.text and "last.pt" in caplog.text and "epoch_2.pt" in caplog.text
    flip_tensor_bit(tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match="no checkpoint verifies.*last.pt.*epoch_2.pt.*epoch_1.pt"):
        load_newest_valid(checkpoint_candidates(tmp_path))
    assert load_newest_valid([]) is None
