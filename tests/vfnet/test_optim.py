import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from vfnet.core.config import TrainConfig, load_config
from vfnet.core.errors import ConfigError
from vfnet.train.optim import LrSchedule, build_optimizer, param_groups, scaled_lr


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Conv2d(3, 4, 3)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv2d(4, 8, 3, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)
        self.scale = nn.Parameter(torch.ones(()))


def _group_of(groups, param):
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def test_param_groups_follow_reference_multipliers():
    cfg = TrainConfig(weight_decay=1e-4, bias_lr_mult=2.0, bias_decay_mult=0.0)
    net = _Net()
    groups = param_groups(net, cfg)
    assert _group_of(groups, net.head.bias)["lr_mult"] == 2.0
    assert _group_of(groups, net.head.bias)["weight_decay"] == 0.0
    for p in (net.conv.weight, net.head.weight, net.scale, net.gn.weight, net.gn.bias,
              net.bn.weight, net.bn.bias):
        assert _group_of(groups, p)["lr_mult"] == 1.0
        assert _group_of(groups, p)["weight_decay"] == 1e-4
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert not any(p is net.frozen.weight or p is net.frozen.bias for p in grouped)
    assert len(grouped) == sum(1 for p in net.parameters() if p.requires_grad)


def test_linear_scaling_and_optimizer_lrs():
    cfg = TrainConfig(lr=0.01, base_batch_size=16, batch_size=2)
    assert scaled_lr(cfg, world_size=8) == pytest.approx(0.01)
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.00125)
    opt = build_optimizer(_Net(), cfg, world_size=4)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.005, 0.01])
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    with pytest.raises(ValueError, match="world_size"):
        scaled_lr(cfg, world_size=0)


def test_adamw_keeps_the_groups_and_decouples_weight_decay():
    """`train.optimizer = "adamw"`: the same groups and lrs as SGD; a parameter with zero gradient
    only decays, by lr * weight_decay of its value per step (decoupled, not through the moments)."""
    cfg = TrainConfig(lr=0.01, base_batch_size=16, batch_size=2, optimizer="adamw", weight_decay=0.05)
    net = _Net()
    opt = build_optimizer(net, cfg, world_size=4)
    assert isinstance(opt, torch.optim.AdamW)
    sgd = build_optimizer(net, replace(cfg, optimizer="sgd"), world_size=4)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        (g["lr"], g["weight_decay"]) for g in sgd.param_groups]
    weight = _group_of(opt.param_groups, net.conv.weight)
    before = net.conv.weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(net.conv.weight, before * (1 - weight["lr"] * weight["weight_decay"]))
    with pytest.raises(ConfigError, match="train.optimizer = 'adam' is invalid"):
        load_config("shapes_tiny", ["train.optimizer='adam'"])


def test_step_schedule_with_warmup_known_values():
    cfg = TrainConfig(lr=0.01, batch_size=16, base_batch_size=16, warmup_iters=500,
                      warmup_ratio=0.1, schedule="step", lr_steps=[8.0, 11.0], lr_gamma=0.1)
    sched = LrSchedule.from_config(cfg, iters_per_epoch=1000, total_iters=12000)
    assert sched.step_iters == (8000, 11000)
    assert sched.lr(0) == pytest.approx(0.001)
    assert sched.lr(250) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))
    assert sched.lr(500) == pytest.approx(0.01)
    assert sched.lr(7999) == pytest.approx(0.01)
    assert sched.lr(8000) == pytest.approx(0.001)
    assert sched.lr(10999) == pytest.approx(0.001)
    assert sched.lr(11000) == pytest.approx(0.0001)


def test_cosine_schedule_known_values():
    sched = LrSchedule(base_lr=0.02, total_iters=1000, warmup_iters=100, warmup_ratio=0.5,
                       kind="cosine")
    assert sched.lr(0) == pytest.approx(0.02 * 0.5)
    assert sched.lr(50) == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi * 0.05)) * 0.75)
    assert sched.lr(500) == pytest.approx(0.01)
    assert sched.lr(1000) == pytest.approx(0.0, abs=1e-12)


def test_apply_sets_group_lrs_from_iteration_alone():
    cfg = TrainConfig(lr=0.01, batch_size=16, base_batch_size=16, warmup_iters=10)
    net = _Net()
    opt = build_optimizer(net, cfg)
    sched = LrSchedule.from_config(cfg, iters_per_epoch=10, total_iters=120)
    sched.apply(opt, 85)  # a resumed run sets the lr from the iteration, whatever came before
    lr = sched.apply(opt, 3)
    assert lr == pytest.approx(0.01 * (0.1 + 0.9 * 0.3))
    assert _group_of(opt.param_groups, net.head.bias)["lr"] == pytest.approx(2 * lr)
    assert _group_of(opt.param_groups, net.conv.weight)["lr"] == pytest.approx(lr)
