"""What the serving fleet shares about a rollout, beside the canary: ``<name>/rollout/``.

Every server (replica) writes only its own files and reads everyone's, so a fact one replica
learns is known to all within one resync, and no two writers share a file::

    rollout/responses/<replica>.jsonl   {"id", "version", "canary_id", "ts"}: the answers
                                        this replica issued for the name (the only ids that
                                        feedback is accepted for, and the version that
                                        answered each: labels never come from the client)
    rollout/feedback/<replica>.jsonl    {"id", "score", "version", "canary_id", "ts"}: the
                                        scores agents posted to this replica; the latest
                                        score of an id replaces the earlier ones
    rollout/counts/<replica>.json       this replica's counters of the running canary (its
                                        id, per version: requests, errors, latency per
                                        output token); the guards judge their sum

Bounded: a replica's log rotates to ``<replica>.1.jsonl`` at ``SEGMENT_BYTES`` (two
segments per replica and log), files of replicas silent for ``RETAIN_S`` are removed, and
``counts/`` is emptied when a canary starts. The logs are advisory: a torn line is skipped.
The next issue's flywheel joins captured exchanges and feedback by response id here.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_finetune.registry.files import (
    append_lines,
    io_errors,
    json_line,
    parse_jsonl,
    write_atomic,
)

ROLLOUT = "rollout"
RESPONSES = "responses"
FEEDBACK = "feedback"
COUNTS = "counts"
SEGMENT_BYTES = 4 << 20
"""A replica's log rotates past this size (one older segment is kept)."""
RETAIN_S = 7 * 86400.0
"""Logs of replicas that wrote nothing for this long are removed."""
_OLD = ".1"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def replica_id() -> str:
    """A name for this server process, unique across hosts and restarts, safe as a file name."""
    host = _SAFE.sub("_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def rollout_dir(name_dir: Path) -> Path:
    return name_dir / ROLLOUT


@dataclass
class _Cursor:
    inode: int
    offset: int


@dataclass
class FleetLog:
    """One log kind (``responses`` or ``feedback``) of one name: append to this replica's
    segment; ``tail`` returns what every other replica appended since the last call."""

    folder: Path
    replica: str
    segment_bytes: int = SEGMENT_BYTES
    _cursors: dict[str, _Cursor] = field(default_factory=dict)

    @property
    def own(self) -> Path:
        return self.folder / f"{self.replica}.jsonl"

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Append entries to this replica's segment (one write); RegistryError."""
        data = b"".join(json_line(e) for e in entries)
        if not data:
            return
        with io_errors("create", self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.own.stat().st_size + len(data) > self.segment_bytes:
                with io_errors("rotate", self.own):
                    os.replace(self.own, self.own.with_name(self.own.stem + _OLD + ".jsonl"))
        # Advisory and rebuilt from traffic: no fsync per batch on the serving path.
        append_lines(self.own, data, sync=False)

    def tail(self) -> list[dict[str, Any]]:
        """New complete entries of the other replicas' segments (oldest segment first);
        a replica seen for the first time is read from the start of its older segment."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:
            return []
        out: list[dict[str, Any]] = []
        for fname in names:
            if not fname.endswith(".jsonl") or fname.endswith(_OLD + ".jsonl"):
                continue
            replica = fname.removesuffix(".jsonl")
            if replica != self.replica:
                out += self._tail_one(replica)
        return out

    def _tail_one(self, replica: str) -> list[dict[str, Any]]:
        path = self.folder / f"{replica}.jsonl"
        old = self.folder / f"{replica}{_OLD}.jsonl"
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return []
        cursor = self._cursors.get(replica)
        out: list[dict[str, Any]] = []
        if cursor is None:  # first sight: the older segment too
            with contextlib.suppress(OSError):
                out += _read_from(old, 0)[0]
            cursor = _Cursor(inode, 0)
        elif cursor.inode != inode:  # rotated: finish the segment we were reading
            with contextlib.suppress(OSError):
                if os.stat(old).st_ino == cursor.inode:
                    out += _read_from(old, cursor.offset)[0]
            cursor = _Cursor(inode, 0)
        try:
            entries, cursor.offset = _read_from(path, cursor.offset)
        except OSError:
            entries = []
        self._cursors[replica] = cursor
        return out + entries

    def prune(self, now: float | None = None) -> None:
        """Remove other replicas' segments that were not written for ``RETAIN_S``."""
        now = time.time() if now is None else now
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.folder):
                if entry.name.startswith(self.replica):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > RETAIN_S:
                        os.unlink(entry.path)


def _read_from(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """(entries of the complete lines after ``offset``, the offset after the last one)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    entries, _ = parse_jsonl(data[:end].decode("utf-8", "replace"))
    return entries, offset + end


def write_counts(name_dir: Path, replica: str, counts: dict[str, Any]) -> None:
    """Replace this replica's canary counters (not fsync'd: rewritten every pass); OSError."""
    folder = rollout_dir(name_dir) / COUNTS
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(counts, separators=(",", ":")).encode()
    write_atomic(folder / f"{replica}.json", body, durable=False)


def read_counts(name_dir: Path, canary_id: str, *, skip: str = "") -> dict[str, dict[str, Any]]:
    """replica -> counters of the canary ``canary_id`` (unreadable files and other canaries'
    counters are skipped; so is the replica ``skip``)."""
    folder = rollout_dir(name_dir) / COUNTS
    out: dict[str, dict[str, Any]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for fname in names:
        replica = fname.removesuffix(".json")
        if not fname.endswith(".json") or replica == skip:
            continue
        try:
            data = json.loads((folder / fname).read_bytes())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and data.get("canary_id") == canary_id:
            out[replica] = data
    return out


def clear_counts(name_dir: Path) -> None:
    """Remove every replica's counters (a canary starts: none of them are its evidence)."""
    folder = rollout_dir(name_dir) / COUNTS
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
