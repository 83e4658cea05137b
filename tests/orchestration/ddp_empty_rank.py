"""One rank of a 2-process gloo run for test_empty_rank.py (run as a script, not collected).

    python ddp_empty_rank.py CONFIG.toml WORKDIR OUT.json     (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

Runs `vfnet.train.engine.train` with a `TrainData` of the config's training images; on the rank
named by EMPTY_RANK every image loses its boxes (background-only images, as a shard of
unannotated images gives). Writes to OUT.json: the sequence of torch.distributed calls this rank
made from Python (name and tensor shape), every step's per-rank loss values, a checksum of the
final weights, the trainable parameters left without a gradient by each step, and the engine's
returned metrics.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from vfnet.core.config import load_config
    from vfnet.data import build_train_loader
    from vfnet.data.loader import train_dataset
    from vfnet.train import step as step_module
    from vfnet.train.engine import TrainData, train

    config, workdir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    empty_rank = int(os.environ["EMPTY_RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config, [])

    calls: list[str] = []

    def logged(name, fn):
        def wrapper(*args, **kwargs):
            first = args[0] if args else None
            shape = list(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            calls.append(f"{name}{shape}")
            return fn(*args, **kwargs)
        return wrapper

    for name in ("all_reduce", "broadcast", "broadcast_object_list", "barrier", "all_gather",
                 "all_gather_object", "reduce", "gather", "scatter"):
        setattr(dist, name, logged(name, getattr(dist, name)))

    local: list[dict[str, float]] = []  # this rank's own loss terms, before any averaging
    mean: list[list[float]] = []  # the step statistics train_step returns (averaged over ranks)
    cores: list[torch.nn.Module] = []
    no_grad: list[int] = []  # per step: trainable parameters that got no gradient (DDP needs 0)
    step = step_module.train_step

    def recording_step(model, batch, optimizer, **kwargs):
        core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        if not cores:
            cores.append(core)
            loss = core.loss

            def recording_loss(*args, **kw):
                terms = loss(*args, **kw)
                local.append({k: float(v.detach()) for k, v in terms.items()})
                return terms

            core.loss = recording_loss
        result = step(model, batch, optimizer, **kwargs)
        mean.append(result.values.tolist())
        no_grad.append(sum(p.grad is None for p in core.parameters() if p.requires_grad))
        return result

    import vfnet.train.engine as engine
    engine.train_step = recording_step

    def batches(epoch: int, start: int):
        for batch in build_train_loader(cfg, epoch, rank=rank, world_size=world, start_batch=start):
            if rank == empty_rank:
                batch.boxes = [b[:0] for b in batch.boxes]
                batch.labels = [lb[:0] for lb in batch.labels]
            yield batch

    ipe = len(build_train_loader(cfg, 0, rank=rank, world_size=world))
    data = TrainData(batches, ipe, train_dataset(cfg.data).class_names)
    final = train(cfg, workdir, resume=False, data=data)
    weights = [float(p.detach().double().sum()) for p in cores[0].parameters()]
    out.write_text(json.dumps({
        "rank": rank, "calls": calls, "local": local, "mean": mean, "final": final, "weights": weights,
        "no_grad": no_grad,
        "finite": all(math.isfinite(v) for terms in local for v in terms.values())
        and all(math.isfinite(v) for values in mean for v in values),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
