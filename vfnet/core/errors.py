"""Errors a user can fix, and the one boundary where the entry points report them.

Everything the user can fix (a config key, a data file, a checkpoint, a command-line flag, the
machine or cluster) raises a subclass of `UserError` whose message names the file, key, field or
flag at fault. The entry points (`vfnet`, `python -m orchestration.train` / `.tune`) run their
work through `run_main`: a `UserError` becomes one line `vfnet: error: <message>` on stderr and
exit status 2; any other exception is a bug: its traceback, a line saying how to report it, and
exit status 1. Nothing else catches broad exception types on the user's behalf, so a bug never
looks like a user mistake.
"""
from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable

PREFIX = "vfnet: error: "
EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
BUG_HINT = ("vfnet: internal error (a bug, not your input): please report it with the command "
            "line, the config and the traceback above (README: Reporting bugs)")

log = logging.getLogger("vfnet")


class UserError(Exception):
    """Something the user can fix; the message names the file, key, field or flag at fault."""


class ConfigError(UserError):
    """A config file, key or value (including `--set`) is invalid."""


class DatasetError(UserError):
    """A data file (annotations, image, xml, shard) is missing, unreadable or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, truncated, corrupt or not a vfnet checkpoint."""


class ArgumentError(UserError):
    """A command-line flag (or a library argument it maps to) has an invalid value."""


class EnvError(UserError):
    """The machine or cluster cannot do what was asked: no CUDA device, an unreachable Ray
    cluster, a full disk or a read-only output directory."""


class MissingPackageError(EnvError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message says what to install."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite (usually: lower `train.lr` or raise warm-up); the message
    names the iteration (1-based)."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace runs collapsed), else its type name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_main(body: Callable[[], int]) -> int:
    """Run an entry point's `body` and map its outcome to an exit status (see the module
    docstring): its own status, 2 for a `UserError`, 1 for a bug, 130 on Ctrl-C."""
    try:
        return body()
    except UserError as exc:
        log.debug("traceback of the error below", exc_info=True)
        print(PREFIX + one_line(exc), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vfnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - the bug boundary: show everything, exit 1
        traceback.print_exc()
        print(BUG_HINT, file=sys.stderr)
        return EXIT_BUG
