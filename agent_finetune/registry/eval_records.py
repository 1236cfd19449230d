"""Evaluation records: what each version scored, append-only, beside the versions.

``<root>/<name>/evals.jsonl`` holds one JSON object per line: the version evaluated, the data
(path, sha256, rows), how it was measured (through a server or offline), the settings and
the mean metrics, plus the paired comparison when it was evaluated against another version.
It never lives inside an immutable version folder, so a version's checksums never change.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from agent_finetune.registry.names import check_version, utc_now
from agent_finetune.registry.store import Registry, actor

EVALS = "evals.jsonl"


def append_eval(registry: Registry, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Append one evaluation record for ``name`` (``record["version"]`` required); return it.

    One ``write`` on an ``O_APPEND`` file: concurrent writers never interleave lines.
    """
    check_version(str(record.get("version")))
    entry = {"ts": utc_now(), **actor(), **record}
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    path = registry.name_dir(name) / EVALS
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read_evals(registry: Registry, name: str, version: str | None = None) -> list[dict[str, Any]]:
    """Every evaluation record of ``name`` (of one ``version``), oldest first.

    A torn or foreign line is skipped, never fatal: the log is advisory.
    """
    path = registry.name_dir(name) / EVALS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict) and (version is None or entry.get("version") == version):
                out.append(entry)
    return out


def latest_eval(registry: Registry, name: str, version: str) -> dict[str, Any] | None:
    """The newest evaluation record of ``name@version``, or None."""
    found = read_evals(registry, name, version)
    return found[-1] if found else None
