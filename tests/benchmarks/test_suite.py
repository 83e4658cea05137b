"""benchmarks.suite without a GPU: the self-check CI runs (every gpu test step collects, every
benchmark step's arguments parse with the script's own parser) and the step runner (caps, the
global budget, the summary and the archive written after every step)."""
from __future__ import annotations

import sys
import tarfile

import pytest

from benchmarks import suite


def test_self_check_collects_every_test_step_and_parses_every_benchmark():
    lines = suite.self_check()
    for step in suite.STEPS:
        assert any(line.startswith(step.name + ":") for line in lines), step.name
    counts = [int(line.split(": ")[1].split()[0]) for line in lines if "gpu tests collected" in line]
    assert len(counts) == sum(s.kind == "test" for s in suite.STEPS) and min(counts) > 0
    assert lines[-1].startswith("precompile plan for sm_90: ")


def test_benchmark_arguments_are_parsed_not_run(tmp_path):
    step = next(s for s in suite.STEPS if s.name == "b_star_bf16")
    args = suite.parse_benchmark_args(step, out_dir=str(tmp_path))
    assert args.dtypes == ["bf16"] and args.providers == ["triton", "torchvision"]
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
    bad = suite.Step("b_bad", "bench", ("benchmarks.vfl", "--dtypes", "fp8"), 10, "bad")
    with pytest.raises(SystemExit):
        suite.parse_benchmark_args(bad)


def test_runner_caps_steps_keeps_the_budget_and_saves_after_each_step(tmp_path, monkeypatch):
    scripts = {"ok": "print('3 passed in 0.1s')", "fails": "import sys; print('boom'); sys.exit(3)",
               "slow": "import time; time.sleep(30)", "late": "print('never')"}
    monkeypatch.setattr(suite.Suite, "command",
                        lambda self, step: [sys.executable, "-c", scripts[step.name]])
    run = suite.Suite(tmp_path / "out", budget=40, work=tmp_path / "work")
    for name, cap in (("ok", 20), ("fails", 20), ("slow", 2), ("late", 20)):
        if name == "late":
            run.start -= 100  # the budget is spent: the step is skipped
        run.run(suite.Step(name, "bench", (), cap, f"the {name} step"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["suite.tar.gz", "summary.md"]
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| ok | ok |" in text and "3 passed in 0.1s" in text
    assert "| fails | FAILED (rc 3) |" in text and "| slow | TIMEOUT (2 s) |" in text
    assert "| late | SKIPPED (budget:" in text
    with tarfile.open(tmp_path / "out" / "suite.tar.gz") as tar:
        names = tar.getnames()
    assert {"logs/ok.log", "logs/fails.log", "logs/slow.log", "summary.md"} <= set(names)
