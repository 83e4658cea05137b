"""benchmarks.harness: timing counts, rows on disk as soon as measured, the shared options."""
from __future__ import annotations

import argparse
import csv

import pytest
import torch

from benchmarks import harness


def _counting():
    calls = []
    return calls, lambda: calls.append(1)


def test_time_ms_runs_warmup_then_reps_calls_on_cpu():
    calls, fn = _counting()
    p50, p20, p80 = harness.time_ms(fn, torch.device("cpu"), warmup=2, reps=5)
    assert len(calls) == 7 and 0 <= p20 <= p50 <= p80
    with pytest.raises(ValueError, match="reps"):
        harness.time_ms(fn, torch.device("cpu"), warmup=0, reps=0)


@pytest.mark.gpu
def test_time_ms_runs_warmup_then_reps_calls_on_cuda():
    calls, fn = _counting()
    x = torch.ones(1 << 20, device="cuda")
    harness.time_ms(lambda: (fn(), x.mul_(1.0)), torch.device("cuda"), warmup=3, reps=4)
    assert len(calls) == 7


def test_rows_reach_the_csv_before_the_run_ends(tmp_path):
    results = harness.Results("probe", torch.device("cpu"), tmp_path)

    def measure():
        yield harness.Row("probe", "a", "fwd", "fp32", "s", "ms", "ms", 1.0, 0.5, 1.5)
        with (tmp_path / "probe.csv").open(newline="") as fh:
            assert [r["provider"] for r in csv.DictReader(fh)] == ["a"]  # already on disk
        raise KeyboardInterrupt  # a time cap stopping the run

    with pytest.raises(KeyboardInterrupt):
        results.add(measure())
    with (tmp_path / "probe.csv").open(newline="") as fh:
        (row,) = csv.DictReader(fh)
    assert row["p50"] == "1.0" and row["device"] == "cpu" and row["commit"]


def test_shared_options():
    parser = argparse.ArgumentParser()
    harness.add_size_args(parser, small="tiny", full="big")
    harness.add_timing_args(parser, default=harness.KERNEL_TIMING, quick=(1, 2))
    harness.add_output_args(parser, "probe")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    args = parser.parse_args([])
    assert harness.is_small(args, cpu) and not harness.is_small(args, cuda)
    assert harness.timing(args, True, cpu) == (1, 2) and harness.timing(args, False, cuda) == (10, 100)
    args = parser.parse_args(["--full", "--warmup", "0", "--reps", "7", "--no-ceiling"])
    assert not harness.is_small(args, cpu) and harness.timing(args, False, cpu) == (0, 7) and args.no_ceiling
    with pytest.raises(SystemExit):
        parser.parse_args(["--reps", "0"])


def test_rate_quantiles_swap_the_tails():
    """A rate falls as time grows: the rate's p20 is the amount over the time's p80."""
    p50, p20, p80 = harness.rate_quantiles(10.0, (2.0, 1.0, 4.0))  # ms: median 2, p20 1, p80 4
    assert (p50, p20, p80) == (5000.0, 2500.0, 10000.0) and p20 <= p50 <= p80
    rows = harness.ceiling_rows("probe", torch.device("cpu"))
    assert all(r.p20 <= r.p50 <= r.p80 for r in rows)


def test_git_commit_without_git_or_from_the_environment(monkeypatch, tmp_path):
    """The GPU machine's copy of the tree has no .git (and may have no git): "unknown", or the
    commit the caller passes in VFNET_COMMIT; never an exception."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable here
    monkeypatch.delenv("VFNET_COMMIT", raising=False)
    harness.git_commit.cache_clear()
    try:
        assert harness.git_commit() == "unknown"
        harness.git_commit.cache_clear()
        monkeypatch.setenv("VFNET_COMMIT", "abc1234")
        assert harness.git_commit() == "abc1234"
    finally:
        harness.git_commit.cache_clear()
