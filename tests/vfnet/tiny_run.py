"""A tiny training set-up shared by the engine and CLI tests: 8 synthetic 64 px training images,
2 validation images, a ResNet-18 at a quarter of its widths (`base_channels = 16`: checkpoints of
about 2 MB instead of 90) with a 16-channel head, torch kernels, CPU, no loader workers."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from vfnet.core.config import Config, config_from_dict
from vfnet.data.synth import synthesize


def make_data(root: Path) -> Path:
    """Synthesize the tiny shapes set under `root` (once per directory)."""
    if not (root / "annotations" / "val.json").is_file():
        synthesize(root, images=8, size=64, seed=0)
    return root


def tiny_dict(data: Path, **train: object) -> dict:
    """The tiny config as TOML-ready dicts; `train` overrides [train] keys."""
    return {
        "model": {"depth": 18, "base_channels": 16, "num_classes": 4, "fpn_channels": 16, "head_channels": 16,
                  "gn_groups": 4, "stacked_convs": 1, "kernels": "torch", "frozen_stages": 0,
                  "norm_eval": False},
        "data": {"train_ann": str(data / "annotations" / "train.json"),
                 "train_images": str(data / "images" / "train"),
                 "val_ann": str(data / "annotations" / "val.json"),
                 "val_images": str(data / "images" / "val"),
                 "img_scale": [64, 64], "num_workers": 0},
        "train": {"batch_size": 2, "max_iters": 6, "warmup_iters": 3, "lr": 0.04,
                  "log_interval": 1, "checkpoint_interval": 2, "device": "cpu", "amp": False,
                  **train},
        "infer": {"score_thr": 0.0},
    }


def tiny_config(data: Path, **train: object) -> Config:
    return config_from_dict(tiny_dict(data, **train), source="tiny")


def write_config(path: Path, data: Path, **train: object) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(tiny_dict(data, **train)))
    return path


def records(workdir: Path, mode: str = "train") -> list[dict]:
    """The `mode` records of a work dir's metrics.jsonl."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == mode]


def vfnet_command() -> list[str]:
    """The installed `vfnet` console script (next to this interpreter), else `python -m vfnet.cli`."""
    script = Path(sys.executable).with_name("vfnet")
    found = script if script.is_file() else shutil.which("vfnet")
    return [str(found)] if found else [sys.executable, "-m", "vfnet.cli"]


def run_vfnet(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*vfnet_command(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)
