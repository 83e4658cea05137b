"""The one error boundary: user errors are one line and exit 2, anything else is a bug (exit 1)."""
import pytest

from vfnet import cli
from vfnet.core.errors import (
    BUG_HINT,
    ArgumentError,
    CheckpointError,
    ConfigError,
    DatasetError,
    EnvError,
    NonFiniteLossError,
    UserError,
    run_main,
)


@pytest.mark.parametrize("cls", [ConfigError, DatasetError, CheckpointError, ArgumentError, EnvError,
                                 NonFiniteLossError])
def test_user_errors_are_one_line_exit_2(cls, capsys):
    def body():
        raise cls("data/x.json: field 'bbox'\n  must be 4 numbers")

    assert not issubclass(cls, (ValueError, OSError))  # a library ValueError is never "bad input"
    assert run_main(body) == 2
    assert capsys.readouterr().err == "vfnet: error: data/x.json: field 'bbox' must be 4 numbers\n"


@pytest.mark.parametrize("exc", [ValueError("internal shape mismatch"), OSError(5, "I/O error"),
                                 KeyError("x"), RuntimeError("boom")])
def test_anything_else_is_a_bug_with_traceback_exit_1(exc, capsys):
    def body():
        raise exc

    assert run_main(body) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith(BUG_HINT)
    assert "vfnet: error:" not in err


def test_cli_reports_a_bug_as_a_bug(monkeypatch, capsys):
    import vfnet.data.synth

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(vfnet.data.synth, "synthesize", broken)  # imported by the command at call time
    assert cli.main(["data", "synth", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and BUG_HINT in err


def test_user_error_is_one_base():
    assert all(issubclass(c, UserError) for c in (ConfigError, DatasetError, CheckpointError,
                                                  ArgumentError, EnvError, NonFiniteLossError))
