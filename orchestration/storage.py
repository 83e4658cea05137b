"""Run storage: a local directory or any `pyarrow.fs` URI (`s3://bucket/prefix`, `gs://...`, ...).

`--storage` of the Ray commands names it. Ray stores checkpoints and Tune results there through
the same `pyarrow.fs` file system (passed as `storage_filesystem`), and the orchestration writes
its own files through `RunStorage`: `result.json`, the worker records, the packed Parquet shards
(which the workers then read from there) and rank 0's work dir (synced by `WorkdirSync`). On a
multi-node cluster without a shared disk this is what makes a run resumable on any node.

Transient errors of the store (throttling, 5xx answers, dropped connections, timeouts:
`is_transient`) are retried with exponential backoff (`RetryPolicy`): every `RunStorage`
operation, and the checkpoint uploads of a Ray Train run (`checkpoint_uploader`), so that a
burst of them costs seconds instead of a worker-group restart; any other error (denied access, a
missing bucket) fails at once.

Credentials come from the file system's standard sources (for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_DEFAULT_REGION`,
`AWS_ENDPOINT_URL` for S3-compatible servers; for GCS: `GOOGLE_APPLICATION_CREDENTIALS`); a URI is
only ever shown without its user-info part and query, so keys put there are not logged.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from vfnet.core.atomic import write_json, write_text
from vfnet.core.errors import ArgumentError, EnvError, one_line

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a transient failure of an object store looks like in the message of the OSError pyarrow
# raises: the AWS SDK's retryable error kinds (which S3-compatible servers also produce), HTTP 5xx
# and 429 answers, and connections that dropped or timed out.
_TRANSIENT = re.compile(
    r"AWS Error (SLOW_DOWN|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|NETWORK_CONNECTION|REQUEST_TIMEOUT|THROTTLING)"
    r"|HTTP (status|response) code:? ?(5\d\d|429)|\b(503 Service Unavailable|500 Internal Server Error"
    r"|502 Bad Gateway|504 Gateway Time-?out|429 Too Many Requests)\b"
    r"|[Cc]onnection (reset|refused|aborted|closed)|[Bb]roken pipe|[Tt]imed? ?out|[Tt]emporar(il)?y")


def is_transient(exc: BaseException) -> bool:
    """True for an error that may go away when the same request is sent again (see _TRANSIENT;
    also Python's ConnectionError and TimeoutError)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, (OSError, pa.ArrowException)) and bool(_TRANSIENT.search(str(exc)))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a storage operation is retried after a transient error:
    `attempts` tries in all, waiting `backoff_s`, 2 x `backoff_s`, 4 x ... (at most
    `max_backoff_s`) between them. The default rides out about a minute of failures."""

    attempts: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"RetryPolicy needs attempts >= 1 and backoffs >= 0, got {self}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        return min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s)

    def call(self, action: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep) -> T:
        """`action()`, tried again after each transient error (logged as a warning with the
        attempt and the wait) until it succeeds or `attempts` are spent; the last error, or
        the first that is not transient, propagates."""
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except Exception as exc:
                if attempt == self.attempts or not is_transient(exc):
                    raise
                wait = self.delay(attempt)
                log.warning("%s: transient storage error (attempt %d of %d), retrying in %.3g s: %s",
                            what, attempt, self.attempts, wait, one_line(exc))
                sleep(wait)
        raise AssertionError("unreachable")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` (not a plain path)."""
    return "://" in str(location)


def redact(uri: str) -> str:
    """`uri` without user-info (`key:secret@`) and query (`?access_key=...`)."""
    if not is_uri(uri):
        return uri
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


@dataclass(frozen=True)
class RunStorage:
    """Where runs live. Paths (`path(...)`) are in the file system `fs`: absolute local paths, or
    `bucket/prefix/...` for object stores. Picklable (workers get it in their spec)."""

    location: str  # as given, made absolute for a local path
    fs: Any = field(compare=False)  # pyarrow.fs.FileSystem
    root: str  # the location's path inside fs
    retry: RetryPolicy = RetryPolicy()  # for every operation (and a Ray run's checkpoint uploads)

    @classmethod
    def parse(cls, location: str | Path | RunStorage) -> RunStorage:
        """A local path (made absolute) or a URI; ArgumentError naming --storage when pyarrow
        has no file system for it. A RunStorage is returned as it is."""
        if isinstance(location, RunStorage):
            return location
        text = str(location)
        if not is_uri(text):
            path = str(Path(text).resolve())
            return cls(path, pafs.LocalFileSystem(), path)
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ArgumentError(f"--storage {redact(text)}: not a usable file system URI: "
                                f"{one_line(exc)}") from None
        return cls(text, fs, root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """`root/part/...` in the file system."""
        return "/".join([self.root, *parts])

    def child(self, *parts: str) -> RunStorage:
        """The storage at `root/part/...`, same file system (a URI keeps its query, e.g.
        `?endpoint_override=...`)."""
        if self.is_local:
            location = self.path(*parts)
        else:
            uri = urlsplit(self.location)
            location = urlunsplit(uri._replace(path="/".join([uri.path.rstrip("/"), *parts])))
        return RunStorage(location, self.fs, self.path(*parts), self.retry)

    def display(self, path: str) -> str:
        """A path of this storage as the user would write it (a URI for object stores, without
        credentials)."""
        if self.is_local:
            return path
        return f"{urlsplit(self.location).scheme}://{path}"

    # -- files ------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self._call(path, lambda: self.fs.get_file_info(path).type != pafs.FileType.NotFound)

    def list(self, directory: str) -> list[str]:
        """Names of the files directly in `directory` (none when it does not exist), without
        hidden ones: on a local disk an atomic write's temporary file (`.<name>.<random>.tmp`,
        `vfnet.core.atomic`) is not a file of the run until it is renamed."""
        selector = pafs.FileSelector(directory, allow_not_found=True)
        infos = self._call(directory, lambda: self.fs.get_file_info(selector))
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.File and not i.base_name.startswith("."))

    def write_json(self, path: str, data: Any) -> None:
        """Write `data` as indented json: atomically on a local disk (`vfnet.core.atomic`), as one
        object upload (which object stores make visible all at once) elsewhere."""
        if self.is_local:
            write_json(path, data, indent=2, sort_keys=True)
            return
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        self._call(path, lambda: self._write(path, payload))

    def _write(self, path: str, payload: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(payload)

    def write_text(self, path: str, text: str) -> None:
        """Write a small text file (atomically on a local disk, one upload elsewhere)."""
        if self.is_local:
            write_text(path, text)
            return
        self._call(path, lambda: self._write(path, text.encode()))

    def read_json(self, path: str) -> Any:
        def read() -> Any:
            with self.fs.open_input_stream(path) as src:
                return json.loads(src.read())
        return self._call(path, read)

    def upload(self, local_dir: Path, path: str) -> None:
        """Copy the files under `local_dir` to `path` (same relative names)."""

        def copy() -> None:
            self.fs.create_dir(path)  # a local file system needs it
            pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

        self._call(path, copy)

    def download(self, path: str, local_dir: Path) -> bool:
        """Copy the files under `path` into `local_dir`; False when `path` does not exist."""
        if not self.exists(path):
            return False
        local_dir.mkdir(parents=True, exist_ok=True)
        self._call(path, lambda: pafs.copy_files(path, str(local_dir), source_filesystem=self.fs,
                                                 destination_filesystem=pafs.LocalFileSystem()))
        return True

    def _call(self, path: str, action: Any) -> Any:
        try:
            return self.retry.call(action, self.display(path))
        except (OSError, pa.ArrowException) as exc:
            raise EnvError(f"{self.display(path)}: run storage not reachable or not writable: "
                           f"{one_line(exc)}") from exc


class WorkdirSync:
    """The engine's work dir kept beside a Ray run's checkpoints: the engine writes into a
    node-local directory, which is filled from `remote` when a worker or trial (re)starts
    (`pull`, so a resumed run keeps its `metrics.jsonl` and TensorBoard events) and copied back
    before every report (`push`, `pushing`). `checkpoints/` stays local: Ray stores the registered
    checkpoints itself. Used for rank 0 of a Ray Train run on an object store (remote:
    `<run>/workdir`) and for every Tune trial (remote: `<trial dir>/workdir`, which Tune copies to
    the sweep's storage; copies never delete, so the engine's pruned per-epoch checkpoints would
    pile up there)."""

    SKIP = ("checkpoints",)

    def __init__(self, storage: RunStorage, remote: str, local: Path) -> None:
        self.storage, self.remote, self.local = storage, remote, local

    def pull(self) -> None:
        if self.storage.download(self.remote, self.local):
            log.info("work dir restored from %s", self.storage.display(self.remote))

    def push(self) -> None:
        with tempfile.TemporaryDirectory(prefix="vfnet-workdir-") as tmp:
            staged = Path(tmp)
            for entry in self.local.iterdir() if self.local.is_dir() else ():
                if entry.name in self.SKIP or entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, staged / entry.name)
                else:
                    shutil.copy2(entry, staged / entry.name)
            if any(staged.iterdir()):
                self.storage.upload(staged, self.remote)

    def pushing(self, report: Callable[[dict[str, float], Path | None], None]) -> Callable[..., None]:
        """`report` (an `Observers.report`) preceded by a push, so that the work dir is in
        storage once Ray registers the report's checkpoint."""

        def push_then_report(metrics: dict[str, float], checkpoint_file: Path | None) -> None:
            self.push()
            report(metrics, checkpoint_file)

        return push_then_report


def checkpoint_uploader(policy: RetryPolicy) -> Callable[[Any, str], Any]:
    """A `checkpoint_upload_fn` for `ray.train.report`: copies the reported checkpoint directory
    to `<run>/<checkpoint_dir_name>` in the run's storage as Ray's own upload does, but retried
    with `policy` after transient errors (each try copies every file again; an object appears
    only when its upload completes). Ray registers the checkpoint only after this returns."""

    def upload(checkpoint: Any, checkpoint_dir_name: str) -> Any:
        import ray.train

        context = ray.train.get_context().get_storage()
        fs = context.storage_filesystem
        dest = f"{context.experiment_fs_path}/{checkpoint_dir_name}"

        def copy() -> None:
            fs.create_dir(dest)
            pafs.copy_files(checkpoint.path, dest, source_filesystem=checkpoint.filesystem,
                            destination_filesystem=fs)

        policy.call(copy, f"checkpoint upload to {redact(dest)}")
        return ray.train.Checkpoint(dest, filesystem=fs)

    return upload


@contextmanager
def attempt_workdir(name: str) -> Iterator[Path]:
    """A new, empty node-local directory for one attempt's work dir of the run `name` (rank 0 of a
    Ray Train run on an object store, a Tune trial), removed when the attempt ends.

    One directory per attempt, not per run: when Ray restarts a worker group, the abandoned
    attempt's rank 0 can still be running for a moment on this node, and in a shared directory
    its last appends to `metrics.jsonl` would land after the new attempt had pulled and trimmed
    the file (seen under load: iterations 1, 2, 3, 4, 3, 4). The directories of attempts whose
    process is gone (SIGKILLed) are removed when the next attempt of the run starts here."""
    parent = Path(tempfile.gettempdir()) / f"vfnet-workdir-{os.getuid()}" / name.replace("/", "_")
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob("attempt-*"):
        if not _process_alive(int(old.name.split("-")[1])):
            shutil.rmtree(old, ignore_errors=True)
    local = Path(tempfile.mkdtemp(prefix=f"attempt-{os.getpid()}-", dir=parent))
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
