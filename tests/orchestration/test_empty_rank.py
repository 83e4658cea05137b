"""The empty-rank guarantee: a DDP rank whose batches hold only images without boxes (a shard of
unannotated images) trains in lock-step with the others: no hang, finite losses, the same
collectives in the same order on every rank, and identical weights at the end.

Two real processes on loopback (gloo, `torch.distributed` env init), each running the engine
(`ddp_empty_rank.py`); rank 1 gets only background images. Each rank logs the `torch.distributed`
calls it makes from Python (the loss normalisers, the step statistics, the evaluation broadcast),
which must match; DDP's own gradient all-reduce stays in step only if every trainable parameter
gets a gradient on every rank, which each rank checks after every step, and the final weights
must be equal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from conftest import free_port, tiny_config_dict, with_overrides

HELPER = Path(__file__).with_name("ddp_empty_rank.py")


def test_rank_with_only_empty_images_stays_in_lock_step(synth_dir: Path, tmp_path: Path) -> None:
    raw = with_overrides(tiny_config_dict(synth_dir), {"train.max_iters": 3, "train.checkpoint_interval": 2,
                                                       "train.eval_interval": 0})
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(raw))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "EMPTY_RANK": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)  # DETAIL segfaults in DDP's init with gloo (torch 2.13, CPU)
    procs = [subprocess.Popen([sys.executable, str(HELPER), str(config), str(tmp_path / "work"),
                               str(tmp_path / f"rank{rank}.json")],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in range(2)]
    outputs = []
    try:
        for proc in procs:  # a generous bound: a hang fails here instead of blocking the suite
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-6000:]
    full, empty = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert len(full["local"]) == len(empty["local"]) == 3
    # rank 1 really saw no positives, rank 0 did; every loss term finite on both
    assert all(terms["num_pos"] == 0 for terms in empty["local"])
    assert all(terms["num_pos"] > 0 for terms in full["local"])
    assert full["finite"] and empty["finite"]
    assert all(terms["loss_bbox_init"] == 0 and terms["loss_bbox_refine"] == 0 for terms in empty["local"])
    assert all(terms["loss_cls"] > 0 for terms in empty["local"])  # background points still learn
    # the same collectives in the same order, the same averaged statistics, the same weights
    assert full["calls"] == empty["calls"] and len(full["calls"]) > 3 * 4
    assert full["mean"] == empty["mean"]  # all-reduced: the same numbers on both ranks
    assert full["weights"] == pytest.approx(empty["weights"], rel=1e-6, abs=1e-9)
    assert full["no_grad"] == empty["no_grad"] == [0, 0, 0]  # DDP reduces every parameter on both
    assert full["final"] == empty["final"] and full["final"]["iterations"] == 3
