"""Crash-safe file primitives: the only way registry modules write, lock and append.

- ``atomic_write_json`` / ``write_atomic``: temp file, fsync, rename (and fsync the folder):
  readers see the old content or the new, never half of it;
- ``append_jsonl``: one JSON line appended with ``O_APPEND`` (never through a symlink, every
  byte written, fsync'd); a torn last line left by a writer that died is sealed first, so a
  new entry is never glued to it; ``read_jsonl`` skips (and returns) unparsable lines;
- ``sync_all``: fsync several files and folders at once (one thread each): the filesystem's
  journal commits them together, so N fsyncs that need no order among them cost about one;
- ``locked``: an exclusive ``flock`` held for a ``with`` block; ``is_locked`` probes one;
- ``os_error``: every OSError becomes a RegistryError naming what failed, the path, the
  errno and, for the usual ones (full disk, read-only mount, permissions), the cause.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent_finetune.errors import RegistryError

TMP_SUFFIX = ".tmp"

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def os_error(e: OSError, doing: str, path: Path | str) -> RegistryError:
    """A RegistryError that says what failed, on which path, and the errno."""
    where = e.filename if e.filename is not None else path
    code = errno.errorcode.get(e.errno or 0, "?")
    hint = {
        errno.ENOSPC: "; the disk is full",
        errno.EDQUOT: "; the disk quota is exhausted",
        errno.EROFS: "; the registry is on a read-only filesystem",
        errno.EACCES: "; no permission: whoever may write the registry folder may publish",
    }.get(e.errno or 0, "")
    return RegistryError(
        f"cannot {doing} {where}: {e.strerror or e} (errno {e.errno} {code}){hint}"
    )


@contextlib.contextmanager
def io_errors(doing: str, path: Path | str) -> Iterator[None]:
    """Turn any OSError raised in the block into ``os_error(e, doing, path)``."""
    try:
        yield
    except OSError as e:
        raise os_error(e, doing, path) from e


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (``write(2)`` may write less than asked); OSError."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - write(2) returns 0 only for a zero-length buffer
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a rename, a new file) durable; RegistryError."""
    with io_errors("sync folder", path):
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_all(paths: Sequence[Path]) -> None:
    """fsync every file or folder of ``paths``, all at once; RegistryError naming the first
    that failed (after every other one finished).

    For writes that need no order among them (they must all be durable before one later
    step, e.g. the rename that publishes them): one thread each, because the journal then
    commits them together instead of one commit per fsync. Threads are made per call, never
    pooled: a pool's workers do not survive ``fork`` (the kill -9 tests fork publishers).
    """
    if len(paths) <= 1:
        for path in paths:
            with io_errors("sync", path):
                _sync(path)
        return
    failed: list[tuple[Path, OSError]] = []

    def sync(path: Path) -> None:
        try:
            _sync(path)
        except OSError as e:
            failed.append((path, e))

    threads = [threading.Thread(target=sync, args=(p,), daemon=True) for p in paths[1:]]
    for t in threads:
        t.start()
    sync(paths[0])
    for t in threads:
        t.join()
    if failed:
        path, e = min(failed, key=lambda f: paths.index(f[0]))
        raise os_error(e, "sync", path) from e


def tmp_path(path: Path) -> Path:
    """The temp file an atomic write of ``path`` writes before renaming it into place."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def create_synced(path: Path, body: bytes, *, sync: bool = True) -> None:
    """Create ``path`` (it must not exist, nor be a link) with ``body``, fsync'd unless
    ``sync`` is False (the caller then syncs it, e.g. with ``sync_all``); OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
    try:
        write_all(fd, body)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, body: bytes, *, sync: bool = True) -> None:
    """Create ``path`` (it must not exist) with ``body``, fsync'd unless ``sync`` is False
    (the caller syncs it); RegistryError."""
    with io_errors("write", path):
        create_synced(path, body, sync=sync)


@contextlib.contextmanager
def temp_file(path: Path, body: bytes) -> Iterator[Path]:
    """The temp file of an atomic write of ``path``, written but not fsync'd: the block
    syncs it (with others, ``sync_all``) and renames it into place; a temp file left
    behind by a failure is removed. RegistryError when it cannot be written."""
    tmp = tmp_path(path)
    try:
        with io_errors("write", path):
            create_synced(tmp, body, sync=False)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_atomic(path: Path, body: bytes, *, sync_dir: bool = True, durable: bool = True) -> None:
    """Replace ``path`` with ``body`` (temp file, fsync, rename); OSError, temp removed.

    ``sync_dir=False`` skips the fsync that makes the rename itself durable; ``durable=False``
    skips both fsyncs (a cache that is rebuilt when it is lost or garbled).
    """
    tmp = tmp_path(path)
    try:
        if durable:
            create_synced(tmp, body)
        else:
            tmp.write_bytes(body)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and sync_dir:
        fd = os.open(path.parent, os.O_RDONLY | O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_json(path: Path, data: Any, *, sync_dir: bool = True) -> None:
    """Write JSON to ``path`` via ``write_atomic``: readers see old or new, never half.

    On failure the temp file is removed and a RegistryError names the path and errno.
    """
    body = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
    with io_errors("write", path):
        write_atomic(path, body, sync_dir=sync_dir)


def json_line(entry: Any) -> bytes:
    """One JSONL line (compact, UTF-8, newline-terminated)."""
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def append_lines(path: Path, lines: bytes, *, sync: bool = True) -> None:
    """Append whole lines to ``path`` with ``O_APPEND`` (never through a symlink); seal a
    torn last line first. One ``write`` per call where the kernel allows, so concurrent
    appenders' lines never interleave. RegistryError on any OSError."""
    with io_errors("append to", path):
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A writer died mid-line: end that line so this entry is not glued to it.
                lines = b"\n" + lines
            write_all(fd, lines)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def append_jsonl(path: Path, entry: Any, *, sync: bool = True) -> None:
    """Append one JSON object as a line (``append_lines``); RegistryError."""
    append_lines(path, json_line(entry), sync=sync)


def parse_jsonl(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(JSON objects, unparsable lines) of a JSONL text; blank lines are skipped."""
    entries, bad = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            bad.append(line)
    return entries, bad


def read_text(path: Path) -> str:
    """A file's text ("" when it does not exist); RegistryError when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise os_error(e, "read", path) from e


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(JSON objects, unparsable lines) of a JSONL file; ([], []) when it does not exist."""
    return parse_jsonl(read_text(path))


@contextlib.contextmanager
def locked(path: Path, *, create: bool = True) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` for the block; yield its descriptor.

    ``create``: a lock file, created when missing (never through a symlink); else an
    existing file or folder, opened read-only. Closing the descriptor releases the lock,
    also when the process dies. RegistryError when it cannot be opened or locked.
    """
    flags = (os.O_RDWR | os.O_CREAT | O_NOFOLLOW) if create else os.O_RDONLY
    with io_errors("lock", path):
        fd = os.open(path, flags | O_CLOEXEC, 0o644)
    try:
        with io_errors("lock", path):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool | None:
    """Whether a live process holds ``path``'s flock (None: it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
