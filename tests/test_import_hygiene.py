"""The kernels, the model, the data loaders, the benchmarks and the test modules import on a
machine without Ray, pycocotools or tomli_w (the GPU box has none of them); code that needs one
fails with one line naming the package to install."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A meta-path hook that makes the optional packages look absent, then the imports under test.
BLOCK = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pycocotools", "tomli_w"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, Absent())
"""

MODULES = [
    "kernels", "kernels.reference", "vfnet.core.config", "vfnet.model", "vfnet.data", "vfnet.evaluate",
    "vfnet.core.checkpoint", "vfnet.train.engine", "vfnet.cli", "benchmarks.harness", "benchmarks.workload",
    "benchmarks.vfl", "benchmarks.star_conv", "benchmarks.train_throughput", "benchmarks.inference",
    "benchmarks.dataloader", "benchmarks.profile_step", "benchmarks.suite", "kernels.aot",
]


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_hook_blocks_the_packages():
    proc = _run_blocked("import tomli_w")
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def test_modules_and_tests_import_without_optional_packages():
    """Every module imports, the optional packages stay unloaded, and pytest collects the whole
    suite without a collection error (modules that need a package skip themselves)."""
    code = f"""
import importlib, sys
for name in {MODULES!r}:
    importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] in ("ray", "pycocotools", "tomli_w")]
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"]))
"""
    proc = _run_blocked(code)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.splitlines()[-1]


def test_missing_package_fails_with_one_line_naming_it():
    code = """
from vfnet.core.config import Config
from vfnet.core.optional import require
for call in (lambda: Config().to_toml(), lambda: require("pycocotools.cocoeval", "COCO evaluation")):
    try:
        call()
    except ModuleNotFoundError as exc:
        print(exc)
"""
    proc = _run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "writing a config as TOML needs tomli-w: pip install tomli-w",
        "COCO evaluation needs pycocotools: pip install pycocotools",
    ]


def test_public_api_does_not_import_the_trainer():
    """`from vfnet import Detector, load_model` loads the model and data code only: no
    `vfnet.train` (engine, optimiser, tracking), no `vfnet.interop`, no CLI."""
    code = """
import sys
from vfnet import Detector, load_model
loaded = sorted(m for m in sys.modules if m.startswith(("vfnet.train", "vfnet.interop", "vfnet.cli")))
print(loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
