"""``fsck``: find (and with ``repair``, fix) what crashes and hand edits leave in a registry.

Like ``git fsck`` / ``pg_amcheck``: it reads everything, reports each problem with its path,
and repairs only what can be repaired without guessing:

- stale staging folders (no live publisher holds their flock) and temp files: removed;
- torn or unparsable history lines: the history is rewritten without them (the dropped
  lines are kept in ``history.jsonl.rejected``);
- versions whose files no longer match their manifest (or that have none): moved to
  ``.quarantine/``, so no server loads them; their number stays used;
- ``current`` unreadable or pointing to a missing version: moved back to the newest version
  that was current before and still verifies (or removed when no version is left);
- a pointer move missing from the history (a writer died in between): logged as ``recover``;
- a missing or stale high-water mark (``.next-version``): rebuilt from history + folders;
- a canary whose start or end a writer died before logging: the entry is logged; a canary
  file that is unreadable, already ended, compares with a version that is no longer current,
  or whose candidate left the registry: ended (``canary_abort``).

A file that cannot be READ (EIO, ESTALE, EACCES) is reported and never acted on: a read
error says nothing about the bytes, and quarantining the live version over a transient
error would take it offline. ``repair`` holds the name's lock throughout (every writer takes
it, so the history rewrite loses no entry); a read-only check takes it only for the quick
consistency checks, never while it hashes versions, so a rollback does not wait on it.

Entries of the root that are not adapter folders are reported, never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_finetune.errors import RegistryError, RegistryReadError
from agent_finetune.registry.files import (
    TMP_SUFFIX,
    atomic_write_json,
    io_errors,
    is_locked,
    os_error,
    write_atomic,
)
from agent_finetune.registry.history import (
    CANARY_START,
    current_stack,
    last_pointer_move,
    open_canary_ids,
    parse_history,
)
from agent_finetune.registry.layout import (
    CANARY,
    CURRENT,
    HISTORY,
    MANIFEST,
    NEXT_VERSION,
    QUARANTINE,
    STAGING_PREFIX,
    VERSIONS,
)
from agent_finetune.registry.manifest import checksum_problems, read_manifest
from agent_finetune.registry.names import is_version, utc_now
from agent_finetune.registry.store import Registry

_TMP = re.compile(r"\..+\.[0-9a-f]{32}" + re.escape(TMP_SUFFIX))


@dataclass
class Finding:
    """One problem: where, what, and what the repair did (None: not repaired)."""

    path: Path
    problem: str
    repaired: str | None = None


@dataclass
class FsckReport:
    findings: list[Finding] = field(default_factory=list)

    @property
    def remaining(self) -> list[Finding]:
        """Problems still there (all of them without ``repair``)."""
        return [f for f in self.findings if f.repaired is None]

    @property
    def ok(self) -> bool:
        return not self.remaining


def fsck(registry: Registry, *, repair: bool = False) -> FsckReport:
    """Check every adapter folder of ``registry``; with ``repair``, fix what can be fixed."""
    report = FsckReport()
    if not registry.root.is_dir():
        report.findings.append(Finding(registry.root, "registry folder does not exist"))
        return report
    names, skipped = registry.scan("folders")
    for problem in skipped:
        path, _, why = problem.partition(": ")
        report.findings.append(Finding(Path(path), why))
    for name in names:
        try:
            _check_name(registry, name, repair, report)
        except RegistryError as e:
            report.findings.append(Finding(registry.root / name, f"cannot check: {e}"))
        except OSError as e:
            error = os_error(e, "check", registry.root / name)
            report.findings.append(Finding(registry.root / name, str(error)))
    return report


@contextlib.contextmanager
def _locked_if(registry: Registry, name: str, take: bool, *, required: bool) -> Iterator[None]:
    """The name's lock when ``take``; when it cannot be had (a read-only registry) and is not
    ``required``, the check goes on without it."""
    with contextlib.ExitStack() as stack:
        if take:
            try:
                stack.enter_context(registry.lock(name))
            except RegistryError:
                if required:
                    raise
        yield


def _check_name(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    with _locked_if(registry, name, repair, required=True):
        _check_leftovers(registry, name, repair, report)
        _check_versions(registry, name, repair, report)
        with _locked_if(registry, name, not repair, required=False):
            _check_history(registry, name, repair, report)
            _check_pointer(registry, name, repair, report)
            _check_high_water(registry, name, repair, report)
            _check_canary(registry, name, repair, report)


def _check_leftovers(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    ndir = registry.name_dir(name)
    add = report.findings.append
    for entry in sorted(os.listdir(ndir)):
        path = ndir / entry
        if entry.startswith(STAGING_PREFIX) and path.is_dir() and _abandoned(path):
            add(Finding(path, "staging folder left by an interrupted publish or gc"))
            if repair:
                with io_errors("remove", path):
                    shutil.rmtree(path)
                report.findings[-1].repaired = "removed"
        elif _TMP.fullmatch(entry) and path.is_file():
            add(Finding(path, "temp file left by an interrupted write"))
            if repair:
                with io_errors("remove", path):
                    path.unlink()
                report.findings[-1].repaired = "removed"


def _abandoned(staging: Path) -> bool:
    """True when no live process holds the staging folder's flock (its publisher died)."""
    return is_locked(staging) is False


def _check_history(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    path = registry.name_dir(name) / HISTORY
    text = registry.history_text(name)
    entries, bad = parse_history(text)
    torn_tail = bool(text) and not text.endswith("\n")
    if not bad and not torn_tail:
        return
    what = f"{len(bad)} unparsable line(s)" if bad else "no newline after the last line"
    report.findings.append(Finding(path, f"torn history: {what}"))
    if not repair:
        return
    if bad:
        with (
            io_errors("write", path.with_name(HISTORY + ".rejected")),
            open(path.with_name(HISTORY + ".rejected"), "a", encoding="utf-8") as f,
        ):
            f.writelines(line + "\n" for line in bad)
    body = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    with io_errors("rewrite", path):
        write_atomic(path, body.encode())
    report.findings[-1].repaired = (
        f"rewritten without them (kept in {HISTORY}.rejected)" if bad else "newline added"
    )


def _check_versions(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    vdir = registry.name_dir(name) / VERSIONS
    if not vdir.is_dir():
        return
    for entry in sorted(os.listdir(vdir)):
        path = vdir / entry
        if not is_version(entry) or not path.is_dir():
            report.findings.append(Finding(path, "not a version folder (vNNNN); left alone"))
            continue
        unreadable: list[str] = []
        try:
            damage, unreadable = checksum_problems(path, read_manifest(path))
        except FileNotFoundError:
            damage = [f"no {MANIFEST}"]
        except RegistryReadError as e:
            damage, unreadable = [], [str(e)]
        except RegistryError as e:
            damage = [str(e)]
        if unreadable and not damage:
            report.findings.append(
                Finding(
                    path,
                    "; ".join(unreadable) + " (a read error says nothing about the files: "
                    "not quarantined; fix the storage and run fsck again)",
                )
            )
            continue
        if not damage:
            continue
        report.findings.append(Finding(path, "; ".join(damage + unreadable)))
        if repair:
            qdir = registry.name_dir(name) / QUARANTINE
            dest = qdir / f"{entry}-{uuid.uuid4().hex[:8]}"
            with io_errors("quarantine", path):
                qdir.mkdir(exist_ok=True)
                os.rename(path, dest)
            report.findings[-1].repaired = f"moved to {dest} (its number is never reused)"


def _check_pointer(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    ndir = registry.name_dir(name)
    path = ndir / CURRENT
    versions = registry.versions(name)
    cur = registry.current(name)
    history = registry.history(name)
    problem = None
    if os.path.lexists(path) and cur is None:
        problem = "current is unreadable"
    elif cur is not None and cur not in versions:
        problem = f"current points to {cur}, which is not a published version"
    if problem:
        report.findings.append(Finding(path, problem))
        if repair:
            candidates = [v for v in current_stack(history) if v in versions] or versions
            if candidates:
                target = candidates[-1]
                atomic_write_json(
                    path, {"version": target, "updated_at": utc_now(), "action": "fsck"}
                )
                registry.append_history(
                    name, {"action": "fsck", "from": cur, "to": target, "reason": problem}
                )
                report.findings[-1].repaired = f"current -> {target}"
            else:
                with io_errors("remove", path):
                    path.unlink()
                report.findings[-1].repaired = "removed (no version left)"
        return
    logged = last_pointer_move(history)
    if cur is not None and cur != logged:
        report.findings.append(
            Finding(ndir / HISTORY, f"current is {cur} but the history's last move is to {logged}")
        )
        if repair:
            registry._record_unlogged_move(name, history)
            report.findings[-1].repaired = "recorded as a recover entry"


def _check_high_water(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    ndir = registry.name_dir(name)
    path = ndir / NEXT_VERSION
    if not registry.versions(name) and not path.exists():
        return
    needed = registry.next_version_number(name)  # the mark, or rebuilt when it is damaged
    try:
        mark = int(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        mark = None
    if mark == needed:
        return
    problem = "missing or unreadable" if mark is None else f"says {mark}, must be {needed}"
    report.findings.append(Finding(path, f"high-water mark {problem}"))
    if repair:
        atomic_write_json(path, needed)
        report.findings[-1].repaired = f"set to {needed}"


def _check_canary(registry: Registry, name: str, repair: bool, report: FsckReport) -> None:
    """The canary file and the history agree: what ran is logged, what runs is sound."""
    history = registry.history(name)
    still_open = open_canary_ids(history)
    record = registry.canary_record(name)
    if record is None:
        for open_id in still_open:
            _finding(
                report,
                registry.name_dir(name) / HISTORY,
                f"canary {open_id} ended without a history entry (a writer died in between)",
            )
            if repair:
                registry.append_history(
                    name,
                    {
                        "action": "canary_abort",
                        "from": None,
                        "to": None,
                        "canary_id": open_id,
                        "reason": "fsck: the canary's end was never recorded (interrupted)",
                    },
                )
                report.findings[-1].repaired = "recorded as canary_abort"
        return
    path = registry.name_dir(name) / CANARY
    cid = record.get("id")
    started = {e.get("canary_id") for e in history if e.get("action") == CANARY_START}
    if isinstance(cid, str) and cid not in started:
        _finding(report, path, f"canary {cid} has no canary_start entry (interrupted start)")
        if repair:
            registry.append_history(
                name,
                {
                    "action": CANARY_START,
                    "from": record.get("baseline"),
                    "to": record.get("version"),
                    "canary_id": cid,
                    "reason": "fsck: the canary's start was never recorded (interrupted)",
                },
            )
            report.findings[-1].repaired = "recorded as canary_start"
        still_open.append(cid)
    problem = _canary_problem(registry, name, record, still_open)
    if problem is None:
        return
    _finding(report, path, problem)
    if not repair:
        return
    if isinstance(cid, str) and cid not in still_open:  # ended in history: the file only
        with io_errors("remove", path):
            path.unlink()
        report.findings[-1].repaired = "removed (its end is in the history)"
    else:
        registry.end_canary(name, "abort", f"fsck: {problem}")
        report.findings[-1].repaired = "ended: canary_abort recorded"


def _canary_problem(
    registry: Registry, name: str, record: dict[str, Any], still_open: list[str]
) -> str | None:
    cid, version, baseline = record.get("id"), record.get("version"), record.get("baseline")
    if not isinstance(cid, str) or not is_version(version) or not is_version(baseline):
        return "the canary file is unreadable or malformed"
    if cid not in still_open:
        return f"canary {cid} already ended in the history, but its file is still there"
    if version not in registry.versions(name):
        return f"the canary's candidate {version} is not published (it left the registry)"
    current = registry.current(name)
    if baseline != current:
        return (
            f"the canary compares {version} with {baseline}, but current is {current} "
            "(current moved under it)"
        )
    return None


def _finding(report: FsckReport, path: Path, problem: str) -> None:
    report.findings.append(Finding(path, problem))
