"""The adapter registry: a folder that is the single source of truth (layout: ``layout``).

Crash safety: a version appears by one rename of a fully written, validated staging folder;
``current`` is replaced atomically and moved BEFORE its history entry is appended, so an
interrupted move leaves a pointer without a log line, which the next move (or ``fsck``)
records as ``recover``; a torn last history line is sealed with a newline before the next
append. Every OSError of a write becomes a RegistryError naming the path and errno.

Every write to a name (versions, ``current``, history, the canary) happens under that name's
lock, so ``fsck --repair`` rewriting the history under it never loses an entry.

Operators win: a manual promote or rollback (and a publish that makes its version current)
first ends a running canary, recorded in history; a decision taken on a ``current`` read
earlier (a canary verdict, the promotion gate) is a compare-and-swap: ``expect`` names the
version it started from, and the move is refused (``CurrentMovedError``) if it moved.

Imports nothing heavy: the server plugin and the CLI start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune.errors import (
    CurrentMovedError,
    InvalidNameError,
    NotFoundError,
    RegistryError,
    ValidationError,
)
from agent_finetune.registry.adapter import AdapterReport
from agent_finetune.registry.files import (
    append_jsonl,
    append_lines,
    atomic_write_json,
    fsync_dir,
    io_errors,
    json_line,
    locked,
    os_error,
    read_text,
    sync_all,
    temp_file,
    write_new_file,
)
from agent_finetune.registry.history import (
    POINTER_MOVES,
    actor,
    highest_number,
    last_pointer_move,
    open_canary_ids,
    parse_history,
    parse_pointer,
    text,
)
from agent_finetune.registry.layout import (
    CANARY,
    CURRENT,
    HISTORY,
    LOCK,
    MANIFEST,
    MARKER,
    NEXT_VERSION,
    QUARANTINE,
    STAGING_PREFIX,
    VERSIONS,
)
from agent_finetune.registry.manifest import file_stamp, read_manifest, verify_folder
from agent_finetune.registry.names import (
    ENV_REGISTRY,
    check_name,
    check_version,
    format_version,
    is_version,
    utc_now,
    version_number,
)
from agent_finetune.registry.publish import stage, staging_folder
from agent_finetune.registry.root import ScanKind, inside_root, scan_root

# Re-exported for the server plugin (layout names and the atomic write it shares).
__all__ = [
    "CURRENT",
    "MANIFEST",
    "MARKER",
    "VERSIONS",
    "Registry",
    "VersionInfo",
    "atomic_write_json",
]

log = logging.getLogger("agent_finetune.registry")


@dataclass(frozen=True)
class VersionInfo:
    """One published version, as listed."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    current: bool


class Registry:
    """Read and write one registry folder. Writers take a per-name file lock."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> Registry:
        value = root or os.environ.get(ENV_REGISTRY)
        if not value:
            raise RegistryError(f"no registry given: pass --registry DIR or set {ENV_REGISTRY}=DIR")
        return cls(value)

    # -- paths ------------------------------------------------------------------------------
    def name_dir(self, name: str) -> Path:
        path = self.root / check_name(name)
        if not inside_root(self.root, path):
            raise InvalidNameError(f"adapter folder {path} escapes the registry root {self.root}")
        return path

    def version_dir(self, name: str, version: str) -> Path:
        return self.name_dir(name) / VERSIONS / check_version(version)

    # -- reading ----------------------------------------------------------------------------
    def scan(self, kind: ScanKind = "published") -> tuple[list[str], list[str]]:
        """(adapter names, problems with the entries skipped): ``root.scan_root``."""
        return scan_root(self.root, kind)

    def is_marked(self) -> bool:
        """Whether the root carries the marker that every write leaves (read-only check).

        Readers that act on absence (the server unloads names that left the registry) must
        not trust a root without it: an unmounted network volume looks like an empty folder.
        """
        return (self.root / MARKER).is_file()

    def names(self) -> list[str]:
        """Adapter names that have at least one published version (bad entries are logged)."""
        names, skipped = self.scan()
        for problem in skipped:
            log.warning("registry: %s", problem)
        return names

    def versions(self, name: str) -> list[str]:
        vdir = self.name_dir(name) / VERSIONS
        try:
            found = [e.name for e in os.scandir(vdir) if is_version(e.name) and e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise os_error(e, "list", vdir) from e
        return sorted(found, key=version_number)

    def current(self, name: str) -> str | None:
        """The version ``current`` points to, or None when there is none or it is unreadable."""
        try:
            return parse_pointer((self.name_dir(name) / CURRENT).read_bytes())
        except OSError:
            return None

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        try:
            return read_manifest(self.version_dir(name, version))
        except FileNotFoundError:
            raise NotFoundError(f"{name}@{version} not found in {self.root}") from None

    def entries(self, name: str | None = None) -> list[VersionInfo]:
        """Every published version (of ``name``, or of all names), oldest first.

        Listing all names, a name that cannot be read is logged and skipped.
        """
        out = []
        for n in [name] if name else self.names():
            try:
                if name and not self.versions(n):
                    raise NotFoundError(f"no adapter named {n!r} in {self.root}")
                cur = self.current(n)
                for v in self.versions(n):
                    try:
                        m = self.manifest(n, v)
                    except RegistryError:
                        m = {}
                    out.append(VersionInfo(n, v, self.version_dir(n, v), m, v == cur))
            except RegistryError as e:
                if name:
                    raise
                log.warning("registry: skipping %s: %s", n, e)
        return out

    def history_text(self, name: str) -> str:
        return read_text(self.name_dir(name) / HISTORY)

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every history entry; unparsable (torn) lines are skipped (``fsck`` reports them)."""
        return parse_history(self.history_text(name))[0]

    def verify(
        self, name: str, version: str, *, once: bool = False, **limits: Any
    ) -> AdapterReport:
        """Validate a published version: manifest checksums plus the adapter checks
        (``once``: trust what publish checked of files unchanged since, ``verify_folder``)."""
        vdir = self.version_dir(name, version)
        if not (vdir / MANIFEST).is_file():
            raise NotFoundError(f"{name}@{version} not found in {self.root}")
        return verify_folder(vdir, once=once, **limits)

    def require_name(self, name: str) -> None:
        """NotFoundError naming the known names unless ``name`` has a published version."""
        if not self.versions(name):
            raise NotFoundError(
                f"no adapter named {name!r} in {self.root}; "
                f"known: {', '.join(self.names()) or 'none'}"
            )

    def require_servable(
        self, name: str, version: str, *, refused: str = "will not be made current"
    ) -> None:
        """Raise unless ``version`` is published and verifies; ``refused`` ends the message."""
        if version not in self.versions(name):
            raise NotFoundError(
                f"{name}@{version} not found; published versions: "
                f"{', '.join(self.versions(name)) or 'none'}"
            )
        report = self.verify(name, version, once=True)
        if not report.ok:
            raise ValidationError(
                f"{name}@{version} failed validation and {refused}:\n  - "
                + "\n  - ".join(report.problems),
                report.problems,
            )

    def previous_current(self, name: str) -> str | None:
        """The version that was current just before the last pointer move, if any."""
        cur = self.current(name)
        for e in reversed(self.history(name)):
            if e.get("action") in POINTER_MOVES and e.get("to") == cur:
                before = e.get("from")
                return before if isinstance(before, str) and before != cur else None
        return None

    def canary_record(self, name: str) -> dict[str, Any] | None:
        """The raw ``<name>/canary`` document (``{}`` when unreadable), None when there is
        none. ``canary_state.read_canary`` is the strict reader."""
        path = self.name_dir(name) / CANARY
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}

    # -- locked writes ----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[Path]:
        """Exclusive per-name lock (flock): held by every write to the name."""
        ndir = self.name_dir(name)
        with io_errors("create", ndir):
            ndir.mkdir(parents=True, exist_ok=True)
        if not self.is_marked():
            with io_errors("mark", self.root / MARKER):
                (self.root / MARKER).write_text(
                    "This folder is an agent-finetune adapter registry.\n", encoding="utf-8"
                )
        with locked(ndir / LOCK):
            yield ndir

    def append_history(self, name: str, entry: dict[str, Any]) -> None:
        """Append one entry, stamped with time, user and host (caller holds the lock)."""
        stamped = {"ts": utc_now(), **actor(), **entry}
        append_jsonl(self.name_dir(name) / HISTORY, stamped)

    def log_event(self, name: str, action: str, **fields: Any) -> None:
        """Append a history entry that moves no pointer (canary and gate decisions)."""
        with self.lock(name):
            self.append_history(name, {"action": action, "from": None, "to": None, **fields})

    def _record_unlogged_move(self, name: str, history: list[dict[str, Any]]) -> None:
        """If ``current`` moved without a history line (a writer died in between), log it."""
        cur = self.current(name)
        logged = last_pointer_move(history)
        if cur is not None and cur != logged:
            self.append_history(
                name,
                {
                    "action": "recover",
                    "from": logged,
                    "to": cur,
                    "reason": "current was moved without a history entry (interrupted write)",
                },
            )
            history.append({"action": "recover", "to": cur})

    def set_current(
        self,
        name: str,
        version: str,
        action: str,
        reason: str | None,
        *,
        publish: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Move the pointer, then log the move with ``fields`` (caller holds the lock).

        The pointer moves first: it is what servers read. If the log line then cannot be
        written, the error says the pointer moved, and the next move records it. ``publish``:
        the history entry of the version just renamed into ``versions/`` (whose fsync joins
        the pointer's temp file's); its line and the move's are one append.
        """
        ndir = self.name_dir(name)
        self._record_unlogged_move(name, self.history(name))
        old = self.current(name)
        what = f"{name}@{version} was published, but {action}" if publish else f"{name}: {action}"
        pointer = ndir / CURRENT
        body = {"version": version, "updated_at": utc_now(), "action": action}
        try:
            data = (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()
            with temp_file(pointer, data) as tmp:
                sync_all([ndir / VERSIONS, tmp] if publish else [tmp])
                with io_errors("write", pointer):
                    os.replace(tmp, pointer)
            sync_all([ndir])
        except RegistryError as e:
            now = self.current(name)
            moved = now == version and old != version
            if publish and not moved:  # published, not current: its own line, if it can be
                with contextlib.suppress(RegistryError):
                    self.append_history(name, publish)
            where = (
                f"current now points to {version}; its history entry was not written"
                if moved
                else f"current still points to {now}"
            )
            raise RegistryError(f"{what} to {version} failed: {e}; {where}") from e
        stamp = {"ts": utc_now(), **actor()}
        move = {"action": action, "from": old, "to": version, "reason": reason, **fields}
        lines = b"".join(json_line({**stamp, **e}) for e in (publish, move) if e)
        try:
            append_lines(ndir / HISTORY, lines)
        except RegistryError as e:
            raise RegistryError(
                f"{name}: current now points to {version} ({action}), but its history "
                f"entries could not be written: {e}; the next promote/rollback or "
                "`agent-finetune fsck --repair` records it"
            ) from e

    def end_canary(
        self, name: str, outcome: str, reason: str, **fields: Any
    ) -> dict[str, Any] | None:
        """Remove ``<name>/canary`` and log ``canary_<outcome>`` (caller holds the lock);
        return the removed document, None when no canary ran. The file goes first: servers
        stop routing to it even if the log line cannot be written (``fsck`` then logs it)."""
        record = self.canary_record(name)
        if record is None:
            return None
        path = self.name_dir(name) / CANARY
        with io_errors("remove", path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fsync_dir(path.parent)
        cid = text(record.get("id"))
        if cid is None:  # a garbled file: it was the canary the history last started
            cid = next(reversed(open_canary_ids(self.history(name))), None)
        self.append_history(
            name,
            {
                "action": f"canary_{outcome}",
                "from": text(record.get("baseline")),
                "to": text(record.get("version")),
                "canary_id": cid,
                "reason": reason,
                **fields,
            },
        )
        return record

    def _operator_move(
        self,
        name: str,
        version: str,
        action: str,
        reason: str | None,
        *,
        expect: str | None = None,
        **fields: Any,
    ) -> None:
        """The one road of a pointer move someone asked for (caller holds the lock): the
        compare-and-swap against ``expect``, then the canary ends, then the move (nothing is
        written when ``version`` is already current and no canary runs)."""
        cur = self.current(name)
        if expect is not None and cur != expect:
            raise CurrentMovedError(
                f"{name}: current is {cur}, not {expect} as when this {action} was decided "
                f"(someone moved it meanwhile); nothing was changed"
            )
        self.end_canary(name, "abort", f"superseded: {action} to {version} (operators win)")
        if cur != version:
            self.set_current(name, version, action, reason, **fields)

    def next_version_number(self, name: str) -> int:
        """The number the next publish gets (caller holds the lock): never one used before."""
        ndir = self.name_dir(name)
        used = [*self.versions(name), *self._quarantined(name)]
        try:
            mark = json.loads((ndir / NEXT_VERSION).read_text(encoding="utf-8"))
            if type(mark) is not int:
                raise ValueError(mark)
            floor = mark - 1
        except (OSError, ValueError):
            # No (or a damaged) mark: rebuild it from the history and the folders.
            floor = highest_number(self.history(name), used)
        return max([floor, *(version_number(v) for v in used)]) + 1

    def _quarantined(self, name: str) -> list[str]:
        qdir = self.name_dir(name) / QUARANTINE
        try:
            return [n.split("-")[0] for n in os.listdir(qdir) if is_version(n.split("-")[0])]
        except OSError:
            return []

    # -- operations -------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        metadata: dict[str, Any] | None = None,
        make_current: bool = True,
        reason: str | None = None,
        max_rank: int | None = None,
        base_config: dict[str, Any] | None = None,
    ) -> VersionInfo:
        """Copy a PEFT LoRA folder in as the next immutable version; make it current by default
        (ending a running canary first, like ``promote``).

        The folder is staged, validated and checksummed (``registry.publish``), then renamed
        into place under the lock with a number never used before. A folder that fails
        validation is never published.
        """
        check_name(name)
        src = Path(source)
        if not src.is_dir():
            raise ValidationError(f"{src}: not a folder", [f"{src}: not a folder"])
        ndir = self.name_dir(name)
        with io_errors("create", ndir / VERSIONS):
            (ndir / VERSIONS).mkdir(parents=True, exist_ok=True)
        with staging_folder(ndir) as staging:
            manifest = stage(
                name, src, staging, metadata=metadata, max_rank=max_rank, base_config=base_config
            )
            with self.lock(name):
                version = self._place_version(name, staging, manifest, reason, make_current)
        return VersionInfo(name, version, ndir / VERSIONS / version, manifest, make_current)

    def _place_version(
        self,
        name: str,
        staging: Path,
        manifest: dict[str, Any],
        reason: str | None,
        make_current: bool,
    ) -> str:
        """Number the staged folder, write its manifest, rename it into ``versions/``, make
        it current when asked, and log it (caller holds the lock); return the version.

        The same durable writes as one after the other, in four rounds of waiting: writes
        that need no order among them are fsync'd at once (``sync_all``): (1) the staged
        files, the manifest, the staging folder and the high-water mark; (2) after the
        version's rename, ``versions/`` with the new pointer's temp file; (3) after the
        pointer's rename, the name's folder; (4) one history append with the publish and
        promote lines. Each rename still follows the fsyncs of what it makes visible.
        """
        ndir = self.name_dir(name)
        number = self.next_version_number(name)
        version = format_version(number)
        manifest["version"] = version
        manifest["parent"] = self.current(name)
        for fname, meta in manifest["files"].items():  # verify once: promote trusts these
            with io_errors("read", staging / fname):
                meta["stamp"] = file_stamp((staging / fname).lstat())
        body = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        write_new_file(staging / MANIFEST, body.encode(), sync=False)
        mark = ndir / NEXT_VERSION
        with temp_file(mark, json.dumps(number + 1).encode()) as mark_tmp:
            sync_all(
                [*(staging / f for f in manifest["files"]), staging / MANIFEST, staging, mark_tmp]
            )
            # The mark moves first: a crash after it only skips a number, never reuses one.
            # Its rename need not be durable at once: a version that became durably visible
            # keeps its number through its folder; the mark only has to outlive a later hand
            # deletion, and writeback flushes it long before that.
            with io_errors("write", mark):
                os.replace(mark_tmp, mark)
        with io_errors("rename", staging):
            os.rename(staging, ndir / VERSIONS / version)
        publish = {"action": "publish", "from": None, "to": version, "reason": reason}
        if make_current and self.canary_record(name) is None:
            # The common case in one road: the pointer's temp file is synced with the
            # version's folder, and both history lines are one append.
            self.set_current(name, version, "promote", reason or "published", publish=publish)
            return version
        sync_all([ndir / VERSIONS])
        try:
            self.append_history(name, publish)
        except RegistryError as e:
            raise RegistryError(
                f"{name}@{version} was published to {ndir / VERSIONS / version}, but its "
                f"history entry could not be written ({e}); it was not made current"
            ) from e
        if make_current:
            self._operator_move(name, version, "promote", reason or "published")
        return version

    def promote(
        self,
        name: str,
        version: str,
        *,
        reason: str | None = None,
        expect: str | None = None,
        **fields: Any,
    ) -> str:
        """Make an existing, valid version current, ending a running canary first (already
        current: only the canary ends). ``expect``: only if current is still that version
        (else ``CurrentMovedError``); ``fields`` go into the move's history entry."""
        check_version(version)
        self.require_name(name)
        with self.lock(name):
            self.require_servable(name, version)
            self._operator_move(name, version, "promote", reason, expect=expect, **fields)
        return version

    def rollback(self, name: str, *, to: str | None = None, reason: str | None = None) -> str:
        """Undo the last pointer move: ``current`` goes back to the version that was current
        just before it (or to ``to``); return it. A running canary ends first. Already
        there: nothing else is written.

        One rule, like ``cd -``: a second rollback undoes the first. To go further back in
        history, name the version with ``to``.
        """
        if to is not None:
            check_version(to)
        self.require_name(name)
        with self.lock(name):
            cur = self.current(name)
            if to is None:
                self._record_unlogged_move(name, self.history(name))
                to = self.previous_current(name)
                if to is None or to not in self.versions(name):
                    raise RegistryError(
                        f"{name}: no pointer move to undo (current is {cur} and was never "
                        f"another version); use --to VERSION (published: "
                        f"{', '.join(self.versions(name))})"
                    )
            self.require_servable(name, to)
            self._operator_move(name, to, "rollback", reason)
        return to

    def gc(self, name: str, *, keep: int = 3, dry_run: bool = False) -> list[str]:
        """Delete old versions; never the current one, a running canary's candidate or
        baseline, nor the newest ``keep``. Return the deleted."""
        if keep < 1:
            raise RegistryError(f"gc keep={keep}: keep at least 1 version")
        self.require_name(name)
        with self.lock(name):
            versions = self.versions(name)
            canary = self.canary_record(name) or {}
            protected = set(versions[-keep:]) | {self.current(name)}
            protected |= {canary.get("version"), canary.get("baseline")}
            doomed = [v for v in versions if v not in protected]
            if not dry_run:
                # Keep the high-water mark above what we delete: numbers are never reused.
                number = self.next_version_number(name)
                atomic_write_json(self.name_dir(name) / NEXT_VERSION, number)
                for v in doomed:
                    # Rename first so a reader never sees a half-deleted version folder.
                    trash = self.name_dir(name) / f"{STAGING_PREFIX}gc-{v}-{uuid.uuid4().hex}"
                    with io_errors("rename", self.version_dir(name, v)):
                        os.rename(self.version_dir(name, v), trash)
                    shutil.rmtree(trash, ignore_errors=True)
                if doomed:
                    self.append_history(
                        name, {"action": "gc", "from": None, "to": None, "deleted": doomed}
                    )
        return doomed
