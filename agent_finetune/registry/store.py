"""The adapter registry: a folder that is the single source of truth.

Layout (see DESIGN.md)::

    <root>/<name>/versions/vNNNN/   immutable: adapter files + manifest.json
    <root>/<name>/current           JSON pointer to the live version (atomic replace)
    <root>/<name>/history.jsonl     append-only log of every pointer move
    <root>/<name>/.staging-*        publishes in progress; readers ignore them
    <root>/<name>/.lock             serialises writers (version numbers, pointer moves)

Imports nothing heavy: the server plugin and the CLI start fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune._version import __version__
from agent_finetune.errors import InvalidNameError, NotFoundError, RegistryError, ValidationError
from agent_finetune.registry.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    AdapterReport,
    validate_adapter,
)
from agent_finetune.registry.names import (
    ENV_REGISTRY,
    check_name,
    check_version,
    format_version,
    is_name,
    is_version,
    utc_now,
    version_number,
)

MANIFEST = "manifest.json"
CURRENT = "current"
HISTORY = "history.jsonl"
VERSIONS = "versions"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
MANIFEST_FORMAT = 1

# Files copied from an adapter folder besides the two PEFT files: tokenizer files make a
# version self-contained for `load_model_and_tokenizer`; vLLM ignores them.
_EXTRA_FILES = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via temp file + fsync + rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_checksums(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names
    }


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found comparing ``folder``'s files against the manifest's sizes and sha256."""
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{folder / MANIFEST}: lists no files"]
    for name, meta in files.items():
        path = folder / name
        if Path(name).name != name:
            problems.append(f"manifest file name {name!r} is not a plain file name")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != meta.get("size"):
            problems.append(f"{name}: size {path.stat().st_size} != manifest {meta.get('size')}")
        elif sha256_file(path) != meta.get("sha256"):
            problems.append(f"{name}: sha256 does not match the manifest (file changed?)")
    return problems


def verify_folder(folder: Path, **limits: Any) -> AdapterReport:
    """``validate_adapter`` plus, when the folder has a manifest, its sizes and sha256."""
    report = validate_adapter(folder, **limits)
    path = folder / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            report.problems.insert(0, f"{path}: invalid JSON: {e}")
            return report
        if not isinstance(manifest, dict):
            report.problems.insert(0, f"{path}: expected a JSON object")
            return report
        report.problems[:0] = verify_checksums(folder, manifest)
    return report


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
        # Names cannot contain '/', but a symlinked name folder could still point outside.
        real_root = os.path.realpath(self.root)
        if path.exists() and os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise InvalidNameError(f"adapter folder {path} escapes the registry root {self.root}")
        return path

    def version_dir(self, name: str, version: str) -> Path:
        return self.name_dir(name) / VERSIONS / check_version(version)

    # -- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Adapter names that have at least one published version."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if is_name(p.name) and (p / VERSIONS).is_dir():
                out.append(p.name)
        return out

    def versions(self, name: str) -> list[str]:
        vdir = self.name_dir(name) / VERSIONS
        if not vdir.is_dir():
            return []
        found = [p.name for p in vdir.iterdir() if is_version(p.name) and p.is_dir()]
        return sorted(found, key=version_number)

    def current(self, name: str) -> str | None:
        """The version ``current`` points to, or None when there is none or it is unreadable."""
        path = self.name_dir(name) / CURRENT
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = data["version"]
            return check_version(version)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        path = self.version_dir(name, version) / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFoundError(f"{name}@{version} not found in {self.root}") from None
        except json.JSONDecodeError as e:
            raise RegistryError(f"{path}: invalid JSON: {e}") from e
        if not isinstance(data, dict):
            raise RegistryError(f"{path}: expected a JSON object")
        return data

    def entries(self, name: str | None = None) -> list[VersionInfo]:
        """Every published version (of ``name``, or of all names), oldest first."""
        out = []
        for n in [name] if name else self.names():
            if name and not self.versions(n):
                raise NotFoundError(f"no adapter named {n!r} in {self.root}")
            cur = self.current(n)
            for v in self.versions(n):
                try:
                    m = self.manifest(n, v)
                except RegistryError:
                    m = {}
                out.append(VersionInfo(n, v, self.version_dir(n, v), m, v == cur))
        return out

    def history(self, name: str) -> list[dict[str, Any]]:
        path = self.name_dir(name) / HISTORY
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def verify(self, name: str, version: str, **limits: Any) -> AdapterReport:
        """Validate a published version: manifest checksums plus the adapter checks."""
        vdir = self.version_dir(name, version)
        if not (vdir / MANIFEST).is_file():
            raise NotFoundError(f"{name}@{version} not found in {self.root}")
        return verify_folder(vdir, **limits)

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[Path]:
        """Exclusive per-name lock (flock), held while assigning versions or moving pointers."""
        ndir = self.name_dir(name)
        ndir.mkdir(parents=True, exist_ok=True)
        with (ndir / LOCK).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield ndir
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _append_history(self, name: str, entry: dict[str, Any]) -> None:
        entry = {"ts": utc_now(), "user": _user(), "host": socket.gethostname(), **entry}
        with (self.name_dir(name) / HISTORY).open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _set_current(self, name: str, version: str, action: str, reason: str | None) -> None:
        """Move the pointer (caller holds the lock) and log the move."""
        old = self.current(name)
        atomic_write_json(
            self.name_dir(name) / CURRENT,
            {"version": version, "updated_at": utc_now(), "action": action},
        )
        self._append_history(name, {"action": action, "from": old, "to": version, "reason": reason})

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
        """Copy a PEFT LoRA folder in as the next immutable version; make it current by default.

        The files are staged and validated beside ``versions/``, then renamed into place under
        the lock, so a reader never sees a half-written version and two publishers never
        collide. A folder that fails validation is never published.
        """
        check_name(name)
        src = Path(source)
        report = validate_adapter(src, max_rank=max_rank, base_config=base_config)
        if not report.ok:
            raise ValidationError(
                f"{src} cannot be published as {name!r}:\n  - " + "\n  - ".join(report.problems),
                report.problems,
            )
        ndir = self.name_dir(name)
        (ndir / VERSIONS).mkdir(parents=True, exist_ok=True)
        staging = ndir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            names = list(ADAPTER_FILES) + [f for f in _EXTRA_FILES if (src / f).is_file()]
            for f in names:
                shutil.copyfile(src / f, staging / f)
                with (staging / f).open("rb") as fh:
                    os.fsync(fh.fileno())
            adapter_cfg = json.loads((staging / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            manifest: dict[str, Any] = {
                "format": MANIFEST_FORMAT,
                "name": name,
                "created_at": utc_now(),
                "tool_version": __version__,
                "base_model": adapter_cfg.get("base_model_name_or_path"),
                "lora": {
                    "r": adapter_cfg.get("r"),
                    "alpha": adapter_cfg.get("lora_alpha"),
                    "target_modules": report.target_modules,
                },
                "source": str(src.absolute()),
                "files": file_checksums(staging, names),
                **(metadata or {}),
            }
            with self.lock(name):
                existing = self.versions(name)
                version = format_version(version_number(existing[-1]) + 1 if existing else 1)
                manifest["version"] = version
                manifest["parent"] = self.current(name)
                atomic_write_json(staging / MANIFEST, manifest)
                _fsync_dir(staging)
                os.rename(staging, ndir / VERSIONS / version)
                _fsync_dir(ndir / VERSIONS)
                self._append_history(
                    name, {"action": "publish", "from": None, "to": version, "reason": reason}
                )
                if make_current:
                    self._set_current(name, version, "promote", reason or "published")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return VersionInfo(name, version, ndir / VERSIONS / version, manifest, make_current)

    def _require_name(self, name: str) -> None:
        if not self.versions(name):
            raise NotFoundError(
                f"no adapter named {name!r} in {self.root}; "
                f"known: {', '.join(self.names()) or 'none'}"
            )

    def promote(self, name: str, version: str, *, reason: str | None = None) -> str:
        """Make an existing, valid version current."""
        check_version(version)
        self._require_name(name)
        with self.lock(name):
            self._require_servable(name, version)
            self._set_current(name, version, "promote", reason)
        return version

    def rollback(self, name: str, *, to: str | None = None, reason: str | None = None) -> str:
        """Point ``current`` back to the previous current version (or to ``to``); return it."""
        if to is not None:
            check_version(to)
        self._require_name(name)
        with self.lock(name):
            cur = self.current(name)
            if to is None:
                stack = [v for v in self._current_stack(name) if v != cur]
                existing = set(self.versions(name))
                candidates = [v for v in stack if v in existing]
                if not candidates:
                    raise RegistryError(
                        f"{name}: no earlier version to roll back to (current is {cur}); "
                        "use --to VERSION"
                    )
                to = candidates[-1]
            self._require_servable(name, to)
            self._set_current(name, to, "rollback", reason)
        return to

    def _current_stack(self, name: str) -> list[str]:
        """Versions that were current, oldest first, with rolled-back-from entries popped."""
        stack: list[str] = []
        for e in self.history(name):
            to = e.get("to")
            if e.get("action") == "promote" and to:
                stack.append(to)
            elif e.get("action") == "rollback" and to:
                if to in stack:
                    while stack[-1] != to:
                        stack.pop()
                else:
                    stack.append(to)
        return stack

    def _require_servable(self, name: str, version: str) -> None:
        if version not in self.versions(name):
            raise NotFoundError(
                f"{name}@{version} not found; published versions: "
                f"{', '.join(self.versions(name)) or 'none'}"
            )
        report = self.verify(name, version)
        if not report.ok:
            raise ValidationError(
                f"{name}@{version} failed validation and will not be made current:\n  - "
                + "\n  - ".join(report.problems),
                report.problems,
            )

    def log_event(self, name: str, action: str, **fields: Any) -> None:
        """Append a history entry that moves no pointer (canary and gate decisions)."""
        self._append_history(name, {"action": action, "from": None, "to": None, **fields})

    def gc(self, name: str, *, keep: int = 3, dry_run: bool = False) -> list[str]:
        """Delete old versions; never the current one nor the newest ``keep``. Return deleted."""
        if keep < 1:
            raise RegistryError(f"gc keep={keep}: keep at least 1 version")
        self._require_name(name)
        with self.lock(name):
            versions = self.versions(name)
            cur = self.current(name)
            protected = set(versions[-keep:]) | ({cur} if cur else set())
            doomed = [v for v in versions if v not in protected]
            if not dry_run:
                for v in doomed:
                    # Rename first so a reader never sees a half-deleted version folder.
                    trash = self.name_dir(name) / f"{STAGING_PREFIX}gc-{v}-{uuid.uuid4().hex}"
                    os.rename(self.version_dir(name, v), trash)
                    shutil.rmtree(trash, ignore_errors=True)
                if doomed:
                    self._append_history(
                        name, {"action": "gc", "from": None, "to": None, "deleted": doomed}
                    )
        return doomed


def actor() -> dict[str, str]:
    """Who is writing: the ``user`` and ``host`` stamped on history and eval records."""
    return {"user": _user(), "host": socket.gethostname()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
