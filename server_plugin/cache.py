"""The server's own verified copies of registry versions.

vLLM re-reads an adapter from its path whenever its engine cache evicted it, and dies if
that path is gone. So the server never loads from the registry: each version is copied
here, its checksums are verified against the manifest and it is validated, and only then
is the copy's path handed to vLLM. Copies are keyed by the manifest's file hashes, so a
rewritten registry folder can never change weights the engine already serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune.errors import RegistryError, ValidationError
from agent_finetune.registry import MANIFEST, Registry, verify_checksums
from agent_finetune.registry.adapter import validate_adapter

logger = logging.getLogger(__name__)

_PID_PREFIX = "pid-"


@dataclass(frozen=True)
class Limits:
    """What the serving side accepts; passed to ``validate_adapter``."""

    max_rank: int | None = None
    base_model: str | None = None
    base_config: dict[str, Any] | None = None
    check_base_name: bool = True


def process_cache_dir(root: Path) -> Path:
    """A per-process folder under ``root``; folders of dead processes are removed first.

    Two servers on one machine never delete each other's copies this way.
    """
    root.mkdir(parents=True, exist_ok=True)
    for child in root.iterdir():
        if not child.name.startswith(_PID_PREFIX):
            continue
        try:
            pid = int(child.name[len(_PID_PREFIX) :])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(child, ignore_errors=True)
    mine = root / f"{_PID_PREFIX}{os.getpid()}"
    mine.mkdir(exist_ok=True)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hint(problem: str) -> str:
    if "does not match the served model" in problem:
        return problem + " (same model under another name? set AGENT_FINETUNE_STRICT_BASE=0)"
    return problem


class AdapterCache:
    """Copy, verify and validate registry versions into ``root``; forget unused copies."""

    def __init__(self, root: Path, limits: Limits) -> None:
        self.root = root
        self.limits = limits
        self._released: dict[Path, float] = {}  # path -> monotonic time it became unused

    def prepare(self, registry: Registry, name: str, version: str) -> Path:
        """Return the path of a verified, validated copy of ``name@version``.

        Raises ValidationError (with every problem) or RegistryError; blocking file IO,
        so async callers run it in a thread.
        """
        manifest = registry.manifest(name, version)
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise ValidationError(
                f"{registry.version_dir(name, version) / MANIFEST}: lists no files; "
                "republish the adapter with `agent-finetune publish`",
                ["manifest lists no files"],
            )
        key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        dest = self.root / name / f"{version}-{key}"
        self._released.pop(dest, None)
        if dest.is_dir():
            return dest  # verified when it was made; nothing writes into the cache after that
        src = registry.version_dir(name, version)
        tmp = self.root / name / f".tmp-{version}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            for fname in [*files, MANIFEST]:
                if Path(fname).name != fname:
                    raise ValidationError(
                        f"{src / MANIFEST}: file name {fname!r} is not a plain file name",
                        [f"manifest file name {fname!r} is not a plain file name"],
                    )
                try:
                    shutil.copyfile(src / fname, tmp / fname)
                except FileNotFoundError:
                    if fname == MANIFEST:
                        raise
                    continue  # reported by verify_checksums as "missing"
            problems = verify_checksums(tmp, manifest)
            limits = self.limits
            report = validate_adapter(
                tmp,
                max_rank=limits.max_rank,
                base_model=limits.base_model,
                base_config=limits.base_config,
                check_base_name=limits.check_base_name,
            )
            problems += [_hint(p.replace(str(tmp), str(src))) for p in report.problems]
            if problems:
                raise ValidationError(
                    f"{name}@{version} ({src}) cannot be served:\n  - " + "\n  - ".join(problems),
                    problems,
                )
            os.rename(tmp, dest)
        except FileNotFoundError as e:
            raise RegistryError(f"{name}@{version}: {e.filename} vanished while copying") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def release(self, path: Path) -> None:
        """Mark a copy unused; ``collect`` deletes it after the grace period."""
        self._released.setdefault(path, time.monotonic())

    def collect(self, grace_s: float, in_use: set[Path]) -> list[Path]:
        """Delete copies released more than ``grace_s`` ago and not in use again."""
        now = time.monotonic()
        gone = []
        for path, since in list(self._released.items()):
            if path in in_use:
                del self._released[path]
            elif now - since >= grace_s:
                shutil.rmtree(path, ignore_errors=True)
                del self._released[path]
                gone.append(path)
        return gone
