"""The training step must not make the host wait for the device (issue #6).

On a GPU (`gpu` marker) `torch.cuda.set_sync_debug_mode` reports every synchronising CUDA call.
On the CPU there is no device to wait for, so `HostSyncTrap` patches the Python-level tensor
operations that synchronise a CUDA stream and records (or rejects) every call made inside it:

- reading values to the host: `item`, `tolist`, `bool(t)`, `int(t)`, `float(t)`, `t.__index__`
  (a tensor used as a Python index), `cpu`, `numpy`;
- data-dependent output sizes: `nonzero` / `torch.nonzero` / `argwhere` / one-argument `where`,
  `unique`, `masked_select`, and indexing or index-assignment with a boolean mask;
- `torch.tensor` / `torch.as_tensor` (host data copied to the device synchronously).

What it cannot catch: synchronisations inside C++ operators that the Python call does not reveal
(e.g. `repeat_interleave` without `output_size`, an index-assignment whose index is computed
on the device), `torch.cuda.synchronize`, pageable host-to-device copies of tensors already
built (`t.to("cuda")`), and allocator stalls; the GPU test covers those.
"""
from __future__ import annotations

import math
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kernels.dispatch
from vfnet.core.config import Config
from vfnet.data import Batch
from vfnet.model import VFNet
from vfnet.train.engine import LOSS_NAMES, NonFiniteLossError, _Meter
from vfnet.train.step import train_step

ROOT = Path(__file__).resolve().parents[2]


class HostSyncError(RuntimeError):
    """A synchronising tensor operation ran inside a `HostSyncTrap(record=False)`."""


_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
            "nonzero", "argwhere", "unique", "masked_select")
_FUNCTIONS = ("nonzero", "argwhere", "unique", "masked_select", "tensor", "as_tensor")


def _has_mask(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class HostSyncTrap:
    """Within `with HostSyncTrap():` a synchronising call raises HostSyncError; with
    `record=True` it runs and `calls` lists (operation, "file:line" of the caller)."""

    def __init__(self, *, record: bool = False):
        self.monkeypatch, self.record = pytest.MonkeyPatch(), record
        self.calls: list[tuple[str, str]] = []
        self.active = False

    def _hit(self, name: str) -> None:
        caller = traceback.extract_stack()[-3]
        try:
            where = Path(caller.filename).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            where = caller.filename
        self.calls.append((name, f"{where}:{caller.lineno}"))
        if not self.record:
            raise HostSyncError(f"{name} synchronises the device (called at {where}:{caller.lineno})")

    def _wrap(self, name: str, original, check=None):
        def patched(*args, **kwargs):
            if self.active and (check is None or check(args, kwargs)):
                self.active = False  # the original may call other trapped operations
                try:
                    self._hit(name)
                finally:
                    self.active = True
            return original(*args, **kwargs)
        return patched

    def __enter__(self) -> HostSyncTrap:
        mp = self.monkeypatch
        for name in _METHODS:
            mp.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}", getattr(torch.Tensor, name)))
        for name in _FUNCTIONS:
            mp.setattr(torch, name, self._wrap(f"torch.{name}", getattr(torch, name)))
        mp.setattr(torch, "where", self._wrap("torch.where(condition)", torch.where,
                                              lambda args, kwargs: len(args) + len(kwargs) == 1))
        mask_index = lambda args, kwargs: _has_mask(args[1])  # noqa: E731
        for name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            mp.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}[mask]", getattr(torch.Tensor, name),
                                                      mask_index))
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False
        self.monkeypatch.undo()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def device_checks_off(monkeypatch):
    """Kernels skip their value checks as they do on CUDA (on the CPU they always run)."""
    monkeypatch.setattr(kernels.dispatch, "value_checks_enabled", lambda tensor: False)


def tiny_model(kernel_choice: str, device: str = "cpu") -> VFNet:
    cfg = Config()
    cfg.model.depth = 18
    cfg.model.num_classes = 3
    cfg.model.fpn_channels = cfg.model.head_channels = 32
    cfg.model.gn_groups = 8
    cfg.model.stacked_convs = 1
    cfg.model.kernels = kernel_choice
    torch.manual_seed(0)
    return VFNet.from_config(cfg).to(device).train()


def batch(device: str = "cpu"):
    images = torch.randn(2, 3, 64, 64, device=device)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 18.0, 60.0, 62.0]], device=device),
             torch.tensor([[8.0, 8.0, 28.0, 36.0]], device=device)]
    labels = [torch.tensor([0, 2], device=device), torch.tensor([1], device=device)]
    return images, boxes, labels


# ---------------------------------------------------------------------------------------------
# The trap itself


@pytest.mark.parametrize("operation", [
    lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: bool(t.sum() > 0),
    lambda t: float(t.sum()), lambda t: [0, 1][t[0].long()], lambda t: t.nonzero(),
    lambda t: torch.nonzero(t), lambda t: torch.where(t > 0), lambda t: t.unique(),
    lambda t: t[t > 0], lambda t: t.masked_select(t > 0), lambda t: torch.tensor(1.0),
    lambda t: t.clone().__setitem__(t > 0, 0.0), lambda t: t.cpu(),
])
def test_trap_rejects_each_synchronising_operation(operation):
    t = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(HostSyncError, match="synchronises"):
        with HostSyncTrap():
            operation(t)


def test_trap_allows_device_side_work_and_restores_torch():
    t = torch.tensor([0.5, -1.0, 2.0])
    index = torch.tensor([2, 0])
    with HostSyncTrap() as trap:
        out = torch.where(t > 0, t, torch.zeros_like(t)).sum() + t[index].sum() + t[1:].sum()
        t.masked_fill(t < 0, 0.0).topk(2)
    assert trap.calls == []
    assert out.item() == pytest.approx(6.0)  # patches removed on exit
    assert bool(t[0] > 0)


def test_record_mode_lists_calls_with_their_site():
    with HostSyncTrap(record=True) as trap:
        torch.ones(2).sum().item()
    assert [name for name, _ in trap.calls] == ["Tensor.item"]
    assert trap.calls[0][1].startswith("tests/vfnet/test_host_sync.py:")


# ---------------------------------------------------------------------------------------------
# The training step


@pytest.mark.interpret
def test_forward_and_loss_do_not_sync(device_checks_off):
    """Model forward, ATSS assignment and the loss (Triton kernels through the interpreter, as
    on CUDA): no synchronising call at all."""
    model = tiny_model("triton")
    images, boxes, labels = batch()
    with HostSyncTrap():
        losses = model.loss(model(images), boxes, labels)
        total = losses["loss_cls"] + losses["loss_bbox_init"] + losses["loss_bbox_refine"]
    assert torch.isfinite(total) and losses["num_pos"] > 0


def engine_run(model: VFNet, device: str = "cpu", grad_clip: float = 35.0) -> SimpleNamespace:
    """What the engine's step reads of a run: the model, its optimiser, config and device."""
    cfg = Config()
    cfg.train.grad_clip = grad_clip
    cfg.train.amp = device == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return SimpleNamespace(cfg=cfg, device=torch.device(device), model=model, core=model,
                           optimizer=optimizer, world_size=1)


def _step(run: SimpleNamespace, data: Batch):
    """`vfnet.train.step.train_step` as the engine calls it."""
    return train_step(run.model, data, run.optimizer, amp=run.cfg.train.amp, grad_clip=run.cfg.train.grad_clip)


def engine_batch(device: str = "cpu") -> Batch:
    images, boxes, labels = batch(device)
    sizes = torch.tensor([[64, 64], [64, 64]], device=device)
    return Batch(images, boxes, labels, sizes, torch.ones(2, 2, device=device), sizes, [1, 2], [(64, 64)] * 2)


@pytest.mark.interpret
def test_engine_step_does_not_sync(device_checks_off):
    """Two steps of the engine as `vfnet train` runs them (forward, ATSS, loss, backward with the
    Triton kernels, gradient clipping, SGD, the interval statistics): no synchronising call at
    all; the host reads the statistics once, at log time."""
    model = tiny_model("triton")
    run = engine_run(model)
    meter = _Meter()
    batches = [engine_batch(), engine_batch()]
    with HostSyncTrap():
        for it, data in enumerate(batches, 1):
            names, stats = _step(run, data)
            meter.add(names, stats, it, 0.0, 0.0)
    means = meter.read()
    assert set(means) == {"loss", *LOSS_NAMES, "num_pos", "grad_norm", "time_per_iter", "data_time"}
    assert all(math.isfinite(v) for v in means.values()) and means["num_pos"] > 0
    assert all(p.grad is not None for p in model.head.parameters())


def test_meter_reports_the_first_non_finite_step():
    meter = _Meter()
    names = ("loss", *LOSS_NAMES, "num_pos")
    for it, loss in ((1, 1.0), (2, math.nan), (3, math.inf)):
        meter.add(names, torch.tensor([loss, 0.5, loss, 0.25, 3.0]), it, 0.0, 0.0)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2 \(loss_cls=0.5, loss_bbox_init=nan, "
                                                  r"loss_bbox_refine=0.25\)"):
        meter.read()


@pytest.mark.gpu
def test_cuda_engine_step_does_not_sync():
    """On CUDA (bf16 autocast) under `set_sync_debug_mode("error")`, which also sees the
    synchronisations inside C++ operators that the CPU trap cannot: two engine steps, none."""
    model = tiny_model("triton", "cuda")
    run = engine_run(model, "cuda")
    meter = _Meter()
    batches = [engine_batch("cuda"), engine_batch("cuda")]
    _step(run, batches[0])  # warm-up: Triton autotuning synchronises on first use
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for it, data in enumerate(batches, 1):
            names, stats = _step(run, data)
            meter.add(names, stats, it, 0.0, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(meter.read()["loss"])
