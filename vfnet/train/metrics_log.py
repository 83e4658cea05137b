"""`metrics.jsonl`, a run's records: one JSON object a line, written by rank 0 of the engine.

The one file of the project that is appended to rather than replaced (`vfnet.core.atomic`
states the exception): a record is one `write` of one line at the end of the file, so a run
killed mid-write leaves at most a torn last line, never a damaged earlier one. `read_records`
and a resumed run skip such a line; every rewrite (a fresh run's first record, a resumed run
dropping the records it will redo) goes through `vfnet.core.atomic.write_text`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vfnet.core.atomic import write_text


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in file order; lines that are not a JSON object (the torn
    last line of a killed run) are skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        record = _parse(line)
        if record is not None:
            records.append(record)
    return records


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """Appends records to `path`; rank 0 only.

    A fresh run (`resume_iter` None) replaces an old file with its first record (the old one
    stays until then); a resumed run first drops the records past the iteration it resumes from
    (they will be redone) and any torn line, atomically.
    """

    def __init__(self, path: Path, *, resume_iter: int | None) -> None:
        self.path = path
        self._fresh = resume_iter is None
        if resume_iter is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if (record := _parse(line)) is not None and int(record.get("iter", 0)) <= resume_iter]
            write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one line (the first record of a fresh run replaces the file)."""
        line = json.dumps(record) + "\n"
        if self._fresh:
            write_text(self.path, line)
            self._fresh = False
            return
        with self.path.open("a") as fh:
            fh.write(line)
