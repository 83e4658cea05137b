"""benchmarks.suite without a GPU: the self-check CI runs (every gpu test is in a step of its
part, every benchmark step's arguments parse with the script's own parser, the pre-compilation
plan of each part), the step runner (caps, the global budget, the summary and the archive
written before and after every step, the exit status), the bounded pre-compilation workers and
the benchmark steps' strict torch.compile."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time

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


def test_parts_split_the_steps_and_the_check_covers_each_part():
    assert suite.steps_of(1) + suite.steps_of(2) == suite.STEPS and suite.steps_of(None) == suite.STEPS
    assert [s.name for s in suite.steps_of(1)][:1] == ["t_kernels"] and suite.steps_of(2)[0].name == "t_step"
    for part in suite.PARTS:
        lines = suite.self_check(part=part)
        names = {line.split(":")[0] for line in lines[:-1]}
        assert names == {s.name for s in suite.steps_of(part)}
        assert lines[-1].startswith(f"precompile plan for sm_90: part {part}: ")
    # the two star-conv steps keep their own chart and CSV
    assert len({s.results for s in suite.STEPS if s.args[0] == "benchmarks.star_conv"}) == 2


def test_check_fails_when_a_gpu_test_is_in_no_step():
    steps = tuple(s for s in suite.STEPS if s.name != "t_step")
    with pytest.raises(RuntimeError, match="gpu tests in no step: .*test_host_sync"):
        suite.self_check(steps)


def test_precompile_plan_per_part():
    import json

    one, two = (suite.precompile_tasks(232448, 90, part) for part in suite.PARTS)
    both = suite.precompile_tasks(232448, 90)
    json.dumps(both)  # the workers get it as JSON
    assert {t["kind"] for t in one} == {t["kind"] for t in two} == {"star", "vfl"}
    assert all(1 in t["case"]["parts"] for t in one) and all(2 in t["case"]["parts"] for t in two)
    assert len(both) < len(one) + len(two)  # the cases of both parts are planned once
    bf16_head = [t["j"] for t in one if t["kind"] == "star" and t["case"]["dtype"] == "bfloat16"
                 and t["case"]["cin"] == 256]
    assert bf16_head == list(range(5))  # the longest bf16 config list on sm_90


FAKE_TARGET = """
import os, time
def run(task):
    if task == "crash":
        os._exit(9)
    if task == "error":
        raise ValueError("no such config")
    if task == "hang":
        time.sleep(120)
    print("a compiler's chatter", end="")  # no newline: the result line must still be read
    return task
"""


def test_precompile_workers_are_bounded_and_survive_crashes(tmp_path):
    """A crashed worker loses only its own tasks, an error fails only its task, and a hung
    task is killed at the limit: the call returns on time with every worker gone."""
    (tmp_path / "fake_target.py").write_text(FAKE_TARGET)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(suite.ROOT)])}
    tasks = ["a", "crash", "error", "b", "lost", "hang"]  # dealt to 3 workers: [a, b] [crash, lost] [error, hang]
    lines = []
    begin = time.monotonic()
    report = suite.run_workers(tasks, 3, 15, lines.append, env, target="fake_target:run")
    assert time.monotonic() - begin < 40
    assert (report.ok, report.failed, report.lost, report.cancelled) == (2, 1, 2, 1)  # lost: crash's and its next
    assert report.status() == "PARTIAL (2/6 ok; 1 failed, 2 lost, 1 cancelled)"
    assert any("precompile a:" in ln and ln.endswith(" ok") for ln in lines)
    assert any("ValueError: no such config" in ln for ln in lines)
    assert any("exit status 9" in ln for ln in lines) and any("killed at the time limit" in ln for ln in lines)


def test_run_suite_saves_first_carries_on_after_a_broken_precompile_and_needs_no_git(tmp_path, monkeypatch):
    from benchmarks import harness

    monkeypatch.setenv("PATH", str(tmp_path))  # no git here (the GPU machine's copy has no .git either)
    monkeypatch.delenv("VFNET_COMMIT", raising=False)
    harness.git_commit.cache_clear()
    monkeypatch.setattr(suite.Suite, "command", lambda self, step: [sys.executable, "-c", "print('1 passed')"])
    out = tmp_path / "out"
    seen = {}

    def broken(part, jobs, timeout, log, env):
        seen["summary"] = (out / "summary.md").read_text()
        seen["timeout"] = timeout
        from concurrent.futures.process import BrokenProcessPool

        raise BrokenProcessPool("a worker was killed")

    steps = (suite.Step("first", "test", (), 20, "a test step"), suite.Step("second", "bench", (), 20, "a bench"))
    triton_env = {k: v for k, v in os.environ.items() if k.startswith("TRITON")}
    try:
        rc = suite.run_suite(out, 200, 2, tmp_path / "work", steps=steps, precompile_fn=broken,
                             require_cuda=False)
    finally:
        harness.git_commit.cache_clear()
    assert "| precompile | RUNNING (at most" in seen["summary"] and 0 < seen["timeout"] <= suite.PRECOMPILE_CAP_S
    text = (out / "summary.md").read_text()
    assert "| precompile | FAILED (BrokenProcessPool), carrying on |" in text
    assert "| first | ok |" in text and "| second | ok |" in text and "- commit unknown" in text
    assert "RUNNING" not in text and rc == 0
    assert {k: v for k, v in os.environ.items() if k.startswith("TRITON")} == triton_env  # the steps' env only


def test_exit_status_counts_only_the_steps_that_ran(tmp_path, monkeypatch):
    """Skipped steps and a step cut short by the budget do not fail the run; a failure or a
    step over its own cap does."""
    scripts = {"ok": "print('ok')", "long": "import time; time.sleep(60)", "bad": "raise SystemExit(3)"}
    monkeypatch.setattr(suite.Suite, "command", lambda self, step: [sys.executable, "-c", scripts[step.name]])
    # the real reserve and minimum scaled down so that "long" is cut after seconds, not half a minute;
    # "ok" may take up to 4 s (a loaded machine) and still leave "long" its minimum
    monkeypatch.setattr(suite, "SAVE_RESERVE_S", 1)
    monkeypatch.setattr(suite, "MIN_STEP_S", 3)
    run = suite.Suite(tmp_path / "out", budget=suite.SAVE_RESERVE_S + suite.MIN_STEP_S + 4, work=tmp_path / "w")
    run.run(suite.Step("ok", "bench", (), 20, "quick"))
    run.run(suite.Step("long", "bench", (), 300, "longer than the budget"))  # cut at what is left
    run.run(suite.Step("ok", "bench", (), 20, "no time left"))
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "| long | CUT (budget: stopped at" in text and "| ok | SKIPPED" in text
    assert [o for _, o in run.outcomes] == ["ok", "cut", "skipped"] and run.exit_code() == 0
    run.outcomes.append(("bad", "failed"))
    assert run.exit_code() == 1
    assert suite.Suite(tmp_path / "o2", 10, tmp_path / "w2").exit_code() == 1  # nothing ran


def test_summary_prints_ranges_low_high_and_autotune_times(tmp_path):
    run = suite.Suite(tmp_path / "out", 100, tmp_path / "work")
    (run.work / "results" / "star_bf16").mkdir()
    (run.work / "results" / "star_bf16" / "star_conv.csv").write_text(
        "benchmark,provider,mode,dtype,shape,metric,unit,p50,p20,p80\n"
        "star_conv,triton,fwd,bf16,P3,tflops,TFLOP/s,100,125,80\n")  # a rate: p20 > p80
    log = run.work / "logs" / "x.log"
    log.write_text("Triton autotuning for function _star_fwd_kernel,\nfinished after 0.50s,\n"
                   "Triton autotuning for function _star_bwd_data_kernel,\nfinished after 2.25s,\n")
    assert suite.autotune_times(log) == "autotune 2 x, 2.8 s (max 2.2 s); "
    run.save()
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "## star_bf16/star_conv" in text and "| 100 (80-125) |" in text


def test_benchmark_steps_run_with_a_strict_recompile_limit(tmp_path):
    (tmp_path / "probe_bench.py").write_text(
        "import sys, torch, torch._dynamo\n"
        "config = torch._dynamo.config\n"
        "print('args', sys.argv[1:], 'strict', config.fail_on_recompile_limit_hit, 'limit', config.recompile_limit)\n"
        "torch.compile(lambda x: x + 1, backend='eager')(torch.ones(2))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(suite.ROOT)])}
    run = suite.Suite(tmp_path / "out", 100, tmp_path / "work")
    command = run.command(suite.Step("b_probe", "bench", ("probe_bench", "--x", "1"), 60, "probe"))
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=suite.ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out_dir = str(tmp_path / "work" / "results")
    assert f"args ['--x', '1', '--out-dir', '{out_dir}'] strict True limit {suite.RECOMPILE_LIMIT}" in proc.stdout
    assert "torch.compile: 1 graphs compiled, 0 graph breaks" in proc.stdout


def test_the_budget_counts_from_the_process_start():
    """process_age counts the time before benchmarks.suite was imported (the interpreter's start,
    `import torch`): the budget's origin in main."""
    code = "import time; time.sleep(1.5); from benchmarks.suite import process_age; print(process_age())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=suite.ROOT, timeout=60)
    assert 1.5 <= float(proc.stdout) < 30, proc.stderr


@pytest.mark.interpret
def test_precompile_tasks_run_the_ops_in_workers(tmp_path):
    """The real task function in real workers, on the CPU through the interpreter (on the GPU
    the same calls compile the binaries): a star-conv task and a VFL task of the plan."""
    star = {"kind": "star", "case": {"op": "pair", "dtype": "float32", "cin": 16, "cout": 16, "bias": False,
                                     "parts": [1]}, "j": 0, "device": "cpu"}
    single = {**star, "case": {**star["case"], "op": "single", "bias": True}}
    vfl = {"kind": "vfl", "case": {"dtype": "float32", "n_rows": 37, "n_cols": 80, "parts": [1]}, "device": "cpu"}
    env = {**os.environ, "PYTHONPATH": str(suite.ROOT), "TRITON_INTERPRET": "1"}
    lines = []
    report = suite.run_workers([star, vfl, single], 2, 300, lines.append, env)
    assert report.status() == "ok", lines
    assert any("star pair float32 16->16 config 0" in ln for ln in lines)
