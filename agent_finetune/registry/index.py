"""Fast reads of registry metadata at 10,000 names: the listing index and the pointer scan.

``pointers()`` reads every name's ``current`` in one pass over the root (two stats per name,
the file itself only when its stat changed): what a server reads at start-up and on every
resync.

The listing index keeps ``agent-finetune list`` fast.

``<root>/.index.json`` keeps, per name, the stamps of its ``versions/`` folder, its
``current`` file and its ``evals.jsonl``, the current version, a summary of each version's
manifest (``created_at``, base model, rank, metrics) and each version's latest evaluation
record. Listing stats those three paths per name and uses the entry only when every stamp
matches and neither changed within ``RACY_NS`` of
the index being written (a change in the same clock tick as the write could hide behind an
equal mtime: git's "racy index" rule); any other name is re-read from its folders, and the
file is rewritten when the root is writable.

The folders stay the truth: deleting the file is always safe (the next ``list`` rebuilds
it), writers never touch it, and the server never reads it. Version folders are immutable
once published, so a version's summary can only go stale by the folder leaving
``versions/``, which changes that folder's stamp.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple

from agent_finetune.errors import RegistryError
from agent_finetune.registry.eval_records import read_evals
from agent_finetune.registry.files import write_atomic
from agent_finetune.registry.history import parse_pointer
from agent_finetune.registry.layout import CURRENT, EVALS, VERSIONS
from agent_finetune.registry.names import is_name
from agent_finetune.registry.store import Registry

INDEX = ".index.json"
INDEX_FORMAT = 2  # 2: each name's latest evaluation per version, keyed by its log's stamp
RACY_NS = 2_000_000_000

Stamp = list[int]


class Listed(NamedTuple):
    """One published version as ``list`` shows it (``manifest``: its ``summary``; ``eval``:
    its newest evaluation record, or None)."""

    name: str
    version: str
    manifest: dict[str, Any]
    current: bool
    eval: dict[str, Any] | None = None


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


class Pointer(NamedTuple):
    """A name as one scan saw it: ``current``'s version (None when missing or unreadable),
    its mtime and stat stamp, the stamp of its ``versions/`` folder (inode, mtime; it changes
    when a version is added or removed), and ``error`` when the name's folders could not be
    read (EIO, ESTALE, EACCES): then nothing is known about it, not even that it is gone."""

    version: str | None
    moved_at: float | None
    stamp: tuple[int, int, int] | None
    versions_stamp: tuple[int, int] | None = None
    error: str | None = None


def pointers(registry: Registry, memo: dict[str, Pointer] | None = None) -> dict[str, Pointer]:
    """Every published name (as ``Registry.names()``) -> its pointer, in one pass over the
    root. A pointer whose stat matches ``memo`` is not read again; ``memo`` is updated.
    A name whose folders fail with an error other than "not found" is returned with
    ``error`` set (a transient fault on one name is not its deletion). Raises OSError when
    the root cannot be listed."""
    memo = {} if memo is None else memo
    root = str(registry.root)
    out: dict[str, Pointer] = {}
    with os.scandir(root) as it:
        entries = sorted((e.name, e.is_symlink()) for e in it)
    for name, link in entries:
        if name[0] == "." or not is_name(name):
            continue
        if link:
            try:
                registry.name_dir(name)
            except RegistryError:
                continue  # a symlink out of the root: not a name
        base = f"{root}/{name}"
        try:
            vst = os.stat(f"{base}/{VERSIONS}")
        except (FileNotFoundError, NotADirectoryError):
            continue  # not published (or gone)
        except OSError as e:
            out[name] = Pointer(None, None, None, error=f"{base}/{VERSIONS}: {e.strerror or e}")
            continue  # memo kept: the name may read again next pass
        if not stat.S_ISDIR(vst.st_mode):
            continue
        versions_stamp = (vst.st_ino, vst.st_mtime_ns)
        try:
            st = os.stat(f"{base}/{CURRENT}")
        except OSError:
            out[name] = memo[name] = Pointer(None, None, None, versions_stamp)
            continue
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = memo.get(name)
        if known is None or known.stamp != stamp:
            try:
                with open(f"{base}/{CURRENT}", "rb") as f:
                    version = parse_pointer(f.read())
            except OSError:
                version = None
            known = Pointer(version, st.st_mtime, stamp)
        out[name] = memo[name] = known._replace(versions_stamp=versions_stamp)
    for gone in memo.keys() - out.keys():
        del memo[gone]
    return out


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``list`` shows of a manifest."""
    lora = manifest.get("lora")
    return {
        "created_at": manifest.get("created_at"),
        "base_model": manifest.get("base_model"),
        "lora": {"r": lora.get("r") if isinstance(lora, dict) else None},
        "metrics": manifest.get("metrics"),
    }


def _read(registry: Registry, name: str) -> dict[str, Any]:
    versions = {}
    for v in registry.versions(name):
        try:
            versions[v] = summary(registry.manifest(name, v))
        except RegistryError:
            versions[v] = {}
    latest: dict[str, Any] = {}
    for record in read_evals(registry, name):  # oldest first: the last one per version wins
        evaluated = record.get("version")
        if isinstance(evaluated, str) and evaluated in versions:
            latest[evaluated] = record
    return {"current": registry.current(name), "versions": versions, "evals": latest}


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        return {}
    names = data.get("names")
    written = data.get("written_ns")
    if not isinstance(names, dict) or not isinstance(written, int):
        return {}
    return {"names": names, "written_ns": written}


def listing(registry: Registry) -> list[Listed]:
    """Every published version of every name, oldest first, as ``Registry.entries()``
    would list it, with manifests reduced to ``summary``."""
    root = str(registry.root)
    path = registry.root / INDEX
    old = _load(path)
    old_names: dict[str, Any] = old.get("names", {})
    trusted_before = old.get("written_ns", 0) - RACY_NS
    names, _ = registry.scan("any")
    started_ns = time.time_ns()
    fresh: dict[str, Any] = {}
    changed = False
    for name in names:
        stamps = [_stamp(f"{root}/{name}/{p}") for p in (VERSIONS, CURRENT, EVALS)]
        if stamps[0] is None:
            continue  # not a published name
        cached = old_names.get(name)
        if (
            isinstance(cached, dict)
            and cached.get("stamps") == stamps
            and all(s is None or s[1] < trusted_before for s in stamps)
            and isinstance(cached.get("versions"), dict)
        ):
            fresh[name] = cached
            continue
        try:
            fresh[name] = {"stamps": stamps, **_read(registry, name)}
        except RegistryError:
            continue  # an escaping symlink or a name that vanished: not listed
        changed = True
    if changed or set(fresh) != set(old_names):
        _write(path, {"format": INDEX_FORMAT, "written_ns": started_ns, "names": fresh})
    return [
        Listed(name, v, meta, v == item.get("current"), (item.get("evals") or {}).get(v))
        for name, item in fresh.items()
        for v, meta in item["versions"].items()
    ]


def _write(path: Path, data: dict[str, Any]) -> None:
    """Best effort: a reader without write access to the root just lists from folders."""
    with contextlib.suppress(OSError):
        write_atomic(path, json.dumps(data, separators=(",", ":")).encode(), durable=False)
