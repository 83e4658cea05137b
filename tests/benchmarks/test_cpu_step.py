"""`benchmarks.cpu_step`: the side-by-side comparison runs both trees through their own code."""
from __future__ import annotations

import csv
import shutil

import pytest

from benchmarks import cpu_step


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_compares_the_tree_with_a_baseline_worktree(tmp_path):
    if not (cpu_step.REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    rows = cpu_step.main(["--baseline", "HEAD", "--rounds", "1", "--steps", "1", "--warmup", "0",
                          "--threads", "1", "--out-dir", str(tmp_path)])
    with (tmp_path / "cpu_step.csv").open(newline="") as fh:
        written = list(csv.DictReader(fh))
    providers = {r["provider"] for r in written}
    assert providers == {"current", f"baseline {cpu_step._git('rev-parse', '--short', 'HEAD')}"}
    assert {(r["mode"], r["metric"]) for r in written} == {
        (mode, metric) for mode in ("train_step", "infer") for metric in ("ms", "img_per_s")}
    assert all(float(r["p50"]) > 0 for r in written) and len(rows) == len(written) == 8
    assert (tmp_path / "cpu_step.png").exists()
    assert "vfnet-cpu-step-" not in cpu_step._git("worktree", "list")  # the worktree is removed


def test_a_baseline_git_cannot_resolve_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="cannot resolve --baseline 'no-such-rev'"):
        cpu_step.main(["--baseline", "no-such-rev", "--out-dir", str(tmp_path)])
