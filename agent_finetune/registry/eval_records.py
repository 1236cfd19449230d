"""Evaluation records: what each version scored, append-only, beside the versions.

``<root>/<name>/evals.jsonl`` holds one JSON object per line: the version evaluated, the data
(path, sha256, rows), how it was measured (through a server or offline), the settings and
the mean metrics, plus the paired comparison when it was evaluated against another version.
It never lives inside an immutable version folder, so a version's checksums never change.

Standard library only.
"""

from __future__ import annotations

from typing import Any

from agent_finetune.registry.files import append_jsonl, read_jsonl
from agent_finetune.registry.history import actor
from agent_finetune.registry.layout import EVALS
from agent_finetune.registry.names import check_version, utc_now
from agent_finetune.registry.store import Registry


def append_eval(registry: Registry, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Append one evaluation record for ``name`` (``record["version"]`` required); return it.

    A sealed JSONL append (``files.append_jsonl``): concurrent writers never interleave
    lines, a torn line left by a dead writer never swallows this one, and a full disk or a
    read-only mount is a RegistryError that says so.
    """
    check_version(str(record.get("version")))
    entry = {"ts": utc_now(), **actor(), **record}
    append_jsonl(registry.name_dir(name) / EVALS, entry)
    return entry


def read_evals(registry: Registry, name: str, version: str | None = None) -> list[dict[str, Any]]:
    """Every evaluation record of ``name`` (of one ``version``), oldest first.

    A torn or foreign line is skipped, never fatal: the log is advisory.
    """
    entries, _ = read_jsonl(registry.name_dir(name) / EVALS)
    return [e for e in entries if version is None or e.get("version") == version]


def latest_eval(registry: Registry, name: str, version: str) -> dict[str, Any] | None:
    """The newest evaluation record of ``name@version``, or None."""
    found = read_evals(registry, name, version)
    return found[-1] if found else None
