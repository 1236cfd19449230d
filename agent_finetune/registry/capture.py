"""Captured production traffic: settings, segments and the join of feedback to exchanges.

Opt-in per adapter name, off by default. Everything lives under ``<root>/<name>/capture/``::

    capture/settings.json              {"enabled", "sample", "max_bytes", "max_age_s",
                                        "redact", "updated"}: every replica reads it on each
                                        pass, so the fleet agrees (like the canary)
    capture/<replica>.<NNNNNN>.jsonl   one replica's segments, rotated at ``segment_bytes``;
                                        no two writers share a file

Two record kinds, one JSON object a line (already redacted by the writer):

- ``{"kind": "exchange", "id", "time", "version", "messages", "answer", "latency_s",
  "replica"}``: ``id`` is the response id the server issued (the answer's ``id``);
- ``{"kind": "feedback", "id", "time", "score", "correction", "replica"}``: the latest
  feedback of an id wins, whichever replica received it.

Bounds: ``enforce`` deletes segments older than ``max_age_s`` and then the oldest segments
(of every replica) until the folder holds at most ``max_bytes``. A torn line (a writer
killed mid-write) is sealed by the next append and skipped, counted, by the reader.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent_finetune.errors import CaptureError, RegistryError
from agent_finetune.registry.files import (
    append_lines,
    atomic_write_json,
    io_errors,
    json_line,
    read_text,
)
from agent_finetune.registry.names import utc_now

CAPTURE = "capture"
SETTINGS = "settings.json"
EXCHANGE = "exchange"
FEEDBACK = "feedback"
DEFAULT_SAMPLE = 1.0
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_AGE_S = 30 * 86400.0
MIN_MAX_BYTES = 64 * 1024
MAX_SEGMENT_BYTES = 64 << 20
MAX_CORRECTION_CHARS = 16_000
"""The longest correction a feedback post may carry (characters)."""
_SEGMENT_RE = re.compile(r"(?P<replica>[A-Za-z0-9._-]+)\.(?P<seq>\d{6,})\.jsonl")
_HOOK_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_AGE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def capture_dir(name_dir: Path) -> Path:
    return name_dir / CAPTURE


def parse_size(text: str) -> int:
    """``"1G"`` -> bytes (k, m, g, t: powers of 1024); CaptureError."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise CaptureError(f"invalid size {text!r}: use a number with k, M, G or T, e.g. 1G")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_age(text: str) -> float:
    """``"30d"`` -> seconds (s, m, h, d, w); CaptureError."""
    m = _AGE_RE.fullmatch(text.strip())
    if m is None:
        raise CaptureError(f"invalid duration {text!r}: use a number with s, m, h, d or w")
    return float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class CaptureSettings:
    """One name's capture settings (``capture/settings.json``)."""

    enabled: bool = False
    sample: float = DEFAULT_SAMPLE
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age_s: float = DEFAULT_MAX_AGE_S
    redact: str | None = None
    updated: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.sample, int | float) and 0 <= self.sample <= 1):
            raise CaptureError(f"capture sample must be from 0 to 1, got {self.sample!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < MIN_MAX_BYTES:
            raise CaptureError(
                f"capture max_bytes must be at least {MIN_MAX_BYTES} (64k), got {self.max_bytes!r}"
            )
        age = self.max_age_s
        if not isinstance(age, int | float) or not math.isfinite(age) or age <= 0:
            raise CaptureError(f"capture max_age_s must be positive seconds, got {age!r}")
        if self.redact is not None and not _HOOK_RE.fullmatch(str(self.redact)):
            raise CaptureError(
                f"capture redact must be 'module:function' (e.g. mycompany.pii:scrub), "
                f"got {self.redact!r}"
            )

    @property
    def segment_bytes(self) -> int:
        """A segment rotates past this size: an eighth of the bound, so deleting the oldest
        segments keeps the folder under ``max_bytes`` without emptying it."""
        return max(4096, min(self.max_bytes // 8, MAX_SEGMENT_BYTES))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> CaptureSettings:
        if not isinstance(data, dict):
            raise CaptureError(f"{where}: expected a JSON object of capture settings")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise CaptureError(f"{where}: unknown capture setting(s) {', '.join(unknown)}")
        if not isinstance(data.get("enabled", False), bool):
            raise CaptureError(f"{where}: 'enabled' must be true or false")
        try:
            return cls(**data)
        except CaptureError as e:
            raise CaptureError(f"{where}: {e}") from None
        except TypeError as e:
            raise CaptureError(f"{where}: {e}") from None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_settings(name_dir: Path) -> CaptureSettings | None:
    """The name's capture settings, or None when capture was never set up; CaptureError
    when the file is garbled (naming it)."""
    path = capture_dir(name_dir) / SETTINGS
    text = read_text(path)
    if not text:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CaptureError(f"{path}: not JSON ({e}); run `agent-finetune capture start`") from None
    return CaptureSettings.from_dict(data, str(path))


def write_settings(name_dir: Path, settings: CaptureSettings) -> CaptureSettings:
    """Replace the name's capture settings (atomic); returns them with ``updated`` set."""
    folder = capture_dir(name_dir)
    with io_errors("create", folder):
        folder.mkdir(parents=True, exist_ok=True)
    stamped = CaptureSettings(**{**settings.as_dict(), "updated": utc_now()})
    atomic_write_json(folder / SETTINGS, stamped.as_dict())
    return stamped


# -- segments ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    path: Path
    replica: str
    seq: int
    size: int
    mtime: float


def segments(folder: Path) -> list[Segment]:
    """Every segment in a capture folder, oldest first (by mtime, then name)."""
    out: list[Segment] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        m = _SEGMENT_RE.fullmatch(entry.name)
        if m is None:
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            out.append(
                Segment(Path(entry.path), m["replica"], int(m["seq"]), st.st_size, st.st_mtime)
            )
    out.sort(key=lambda s: (s.mtime, s.path.name))
    return out


def enforce(folder: Path, max_bytes: int, max_age_s: float, now: float | None = None) -> int:
    """Delete segments older than ``max_age_s``, then the oldest until the folder holds at
    most ``max_bytes``; returns how many were deleted."""
    now = time.time() if now is None else now
    found = segments(folder)
    total = sum(s.size for s in found)
    removed = 0
    for seg in found:
        if now - seg.mtime <= max_age_s and total <= max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            with io_errors("delete", seg.path):
                os.unlink(seg.path)
            removed += 1
        total -= seg.size
    return removed


@dataclass
class SegmentWriter:
    """This replica's side of one name's capture folder: append, rotate, enforce bounds."""

    folder: Path
    replica: str
    segment_bytes: int = 8 << 20
    seq: int = 1
    _size: int = -1

    @property
    def current(self) -> Path:
        return self.folder / f"{self.replica}.{self.seq:06d}.jsonl"

    def append(self, entries: Iterable[dict[str, Any]]) -> int:
        """Append records to this replica's segment (one write), rotating first when it
        would outgrow ``segment_bytes``; returns the bytes written. RegistryError."""
        data = b"".join(json_line(e) for e in entries)
        if not data:
            return 0
        if self._size < 0:
            with io_errors("create", self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
            self._size = _size_of(self.current)
        if self._size > 0 and self._size + len(data) > self.segment_bytes:
            self.seq += 1
            self._size = _size_of(self.current)
        try:
            append_lines(self.current, data, sync=False)
        except RegistryError:
            self._size = -1  # unknown after a failure: stat again next time
            raise
        self._size = _size_of(self.current)
        return len(data)


def _size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


# -- reading ----------------------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def valid_exchange(e: dict[str, Any]) -> bool:
    msgs = e.get("messages")
    return (
        isinstance(e.get("id"), str)
        and _number(e.get("time"))
        and isinstance(e.get("version"), str)
        and isinstance(msgs, list)
        and bool(msgs)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
        and isinstance(e.get("answer"), str)
    )


def valid_feedback(e: dict[str, Any]) -> bool:
    score, correction = e.get("score"), e.get("correction")
    return (
        isinstance(e.get("id"), str)
        and _number(e.get("time"))
        and _number(score)
        and -1 <= float(score or 0) <= 1
        and (correction is None or isinstance(correction, str))
    )


def parse_jsonl_lines(lines: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(JSON objects, unparsable lines) of JSONL lines; blank lines are skipped."""
    entries, bad = [], []
    for line in lines:
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


@dataclass
class CaptureLog:
    """Everything captured for one name: exchanges and their latest feedback, by id."""

    exchanges: dict[str, dict[str, Any]] = field(default_factory=dict)
    feedback: dict[str, dict[str, Any]] = field(default_factory=dict)
    segments: list[str] = field(default_factory=list)
    skipped: int = 0
    bytes: int = 0

    def joined(self) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """(exchange, its latest feedback or None), oldest exchange first."""
        ordered = sorted(self.exchanges.values(), key=lambda e: (e["time"], e["id"]))
        return [(e, self.feedback.get(e["id"])) for e in ordered]


def read_capture(name_dir: Path, since: float | None = None) -> CaptureLog:
    """Read every replica's segments of a name; exchanges before ``since`` (epoch seconds)
    are left out; unparsable lines and malformed records are skipped and counted."""
    log = CaptureLog()
    for seg in segments(capture_dir(name_dir)):
        try:
            text = seg.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue  # deleted by a bound meanwhile
        except OSError as err:
            raise RegistryError(f"cannot read {seg.path}: {err}") from err
        log.segments.append(seg.path.name)
        log.bytes += seg.size
        # Split on "\n" only: str.splitlines would also cut at U+0085 or U+2028 inside text.
        entries, bad = parse_jsonl_lines(text.split("\n"))
        log.skipped += len(bad)
        for e in entries:
            kind = e.get("kind")
            if kind == EXCHANGE and valid_exchange(e):
                if since is None or e["time"] >= since:
                    log.exchanges.setdefault(e["id"], e)
            elif kind == FEEDBACK and valid_feedback(e):
                old = log.feedback.get(e["id"])
                if old is None or (e["time"], e.get("replica", "")) >= (
                    old["time"],
                    old.get("replica", ""),
                ):
                    log.feedback[e["id"]] = e
            else:
                log.skipped += 1
    return log
