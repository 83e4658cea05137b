"""kernels.tuning is the one place of the launch tuning: the autotuners are built from its tables,
and no module of kernels/ or benchmarks/ reaches into another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kernels import star_conv, tuning
from kernels.dispatch import interpreter_enabled

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "benchmarks")


def _private_uses(source: str, this: str) -> list[str]:
    """In module `this` (dotted name) with `source`: `from pkg.mod import _x`, and `mod._x` where
    `mod` names another module of PACKAGES."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> module of PACKAGES
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            for alias in node.names:
                if alias.name.startswith("_") and node.module != this:
                    found.append(f"{this}:{node.lineno}: from {node.module} import {alias.name}")
                elif node.module in PACKAGES:  # from kernels import star_conv
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            target = ast.unparse(node.value)
            if target in modules and modules[target] != this:
                found.append(f"{this}:{node.lineno}: {target}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).glob("*.py"))]
    assert len(files) > 10
    uses = [use for p in files
            for use in _private_uses(p.read_text(), ".".join(p.relative_to(ROOT).with_suffix("").parts))]
    assert uses == []


def test_the_check_sees_private_uses():
    source = ("from kernels import star_conv\nfrom kernels.star_conv import _channels_last\n"
              "import kernels.varifocal\nx = star_conv._m_log2(3)\ny = kernels.varifocal._launch\n"
              "z = star_conv.KERNELS, star_conv.__name__\n")
    assert len(_private_uses(source, "benchmarks.probe")) == 3
    assert _private_uses(source, "kernels.star_conv") == ["kernels.star_conv:5: kernels.varifocal._launch"]


@pytest.mark.parametrize("kernel", tuning.STAR_KERNELS)
def test_the_autotuners_are_built_from_the_tables(kernel):
    expected = tuning.INTERPRETER_CONFIGS if interpreter_enabled() else tuning.every_config(kernel)
    assert star_conv.KERNELS[kernel].configs == expected
    assert set(star_conv.KERNELS) == set(tuning.STAR_KERNELS)


def test_every_listed_config_is_pruned_by_its_own_estimate_only():
    """Each table entry is reachable: on sm_90 at Cout = 256 every config of every dot width fits
    the 227 KB (nothing in the tables is dead weight)."""
    for kernel in tuning.STAR_KERNELS:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            listed = tuning.CONFIGS[kernel][dtype.itemsize, True]
            assert tuning.gpu_configs(kernel, dtype, 232448, 256, 90) == listed


def test_dot_dtype_and_precision(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tuning.dot_dtype(torch.bfloat16) == torch.bfloat16
    assert tuning.dot_dtype(torch.float16) == torch.float16
    assert tuning.dot_dtype(torch.float32) == torch.float32
    assert tuning.dot_dtype(torch.float64) == torch.float64
    assert tuning.dot_precision(torch.float32) == "ieee"  # torch's default "highest"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert tuning.dot_precision(torch.float32) == "tf32"
    assert tuning.dot_precision(torch.bfloat16) == "ieee"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.dot_dtype(torch.bfloat16) == torch.float32  # bf16 dots are unreliable there
    assert tuning.dot_dtype(torch.bfloat16, interpreter=False) == torch.bfloat16  # a plan for a GPU
    assert tuning.dot_precision(torch.float32) == "ieee"


def test_vfl_launch_config():
    assert tuning.vfl_gpu_config(80, torch.float32) == (128, 16, 4)  # 16 x 5 columns, 2048 elements
    assert tuning.vfl_gpu_config(1203, torch.float32) == (32, 64, 4)  # 64 x 19
    assert tuning.vfl_gpu_config(80, torch.float64) == (32, 16, 4)  # 512 elements in float64
