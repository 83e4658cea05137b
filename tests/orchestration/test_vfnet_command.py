"""`vfnet train --ray` and `vfnet tune`: the orchestration entry points behind the vfnet command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from orchestration import common
from vfnet.cli import main, ray_command


def test_ray_commands_are_recognised() -> None:
    assert ray_command(["train", "--num-workers", "2", "--ray"]) == ("train", ["--num-workers", "2"])
    assert ray_command(["-v", "tune", "--num-samples", "2"]) == ("tune", ["--num-samples", "2"])
    assert ray_command(["train", "--workdir", "w"]) is None
    assert ray_command(["data", "synth", "--out", "tune"]) is None


@pytest.mark.parametrize("command, argv, message", [
    (["train", "--ray"], ["--num-workers", "0"], "--num-workers must be >= 1"),
    (["train", "--ray"], ["--num-workers", "1", "--set", "train.nope=1"], "train.nope"),
    (["tune"], ["--num-samples", "0", "--out", "o"], "--num-samples must be >= 1"),
    (["tune"], ["--num-samples", "1", "--out", "o", "--set", "tune.space={}"], "tune.space is empty"),
])
def test_bad_input_exits_2_as_the_module_does(command, argv, message, capsys, monkeypatch) -> None:
    def no_connect(address):
        raise AssertionError("bad input must be reported before connecting to Ray")

    monkeypatch.setattr(common, "connect", no_connect)
    assert main([*command, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_usage_errors_and_help(capsys) -> None:
    assert main(["train", "--ray"]) == 2  # a worker count is required (the flag or train.num_workers)
    assert "give --num-workers N|MIN-MAX or set train.num_workers" in capsys.readouterr().err
    assert main(["tune", "--help"]) == 0
    assert "usage: vfnet tune" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "tune" in capsys.readouterr().out


def test_unreachable_cluster_exits_2(capsys, monkeypatch) -> None:
    def refuse(address):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(common, "connect", refuse)
    assert main(["train", "--ray", "--num-workers", "1", "--address", "127.0.0.1:1"]) == 2
    assert "vfnet: error: cannot connect to Ray (127.0.0.1:1)" in capsys.readouterr().err


def test_other_commands_do_not_import_ray(tmp_path) -> None:
    code = ("import sys; from vfnet.cli import main; "
            f"assert main(['data', 'synth', '--out', {str(tmp_path)!r}, '--images', '4', '--size', '32']) == 0; "
            "assert main(['train', '--config', 'missing.toml']) == 2; "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
