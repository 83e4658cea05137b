"""The built wheel works without the source tree: installed alone into a fresh environment (its
dependencies borrowed from this one), `vfnet train` in an empty directory runs the shipped default
config (issue #19: the configs are package data)."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "vfnet", "orchestration", "benchmarks")
TINY = ("data.synth_images=8", "data.synth_size=64", "data.img_scale=[64, 64]", "data.num_workers=0",
        "model.kernels='torch'", "train.device='cpu'", "train.amp=false", "train.batch_size=2",
        "train.max_iters=2", "train.warmup_iters=1", "train.log_interval=1", "train.tensorboard=false")

pytestmark = pytest.mark.slow


def _run(args: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done


def test_wheel_trains_the_shipped_default_config_in_an_empty_directory(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp_path / "dist", source])
    (wheel,) = (tmp_path / "dist").glob("vfnet_triton-*.whl")

    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # The dependencies (and pip) from this environment's site-packages, as plain sys.path entries:
    # its .pth files are not run, so the editable install of the source tree stays out.
    (purelib / "dependencies.pth").write_text("\n".join([sysconfig.get_path("purelib"), *site.getsitepackages()]))
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel])

    empty = tmp_path / "empty"
    empty.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([python, "-c", "import vfnet.core.config as c; print(c.CONFIG_DIR)"], cwd=empty, env=environ)
    assert Path(where.stdout.strip()) == purelib / "vfnet" / "configs"  # the wheel's copy, not the checkout
    sets = [arg for item in TINY for arg in ("--set", item)]
    done = _run([env_dir / "bin" / "vfnet", "train", *sets], cwd=empty, env=environ)
    assert "Average Precision" in done.stdout
    assert (empty / "work_dirs" / "shapes_tiny" / "checkpoints" / "last.pt").is_file()
    assert (empty / "data" / "shapes" / "annotations" / "train.json").is_file()  # the default config's synth data
