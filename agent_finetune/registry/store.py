"""The adapter registry: a folder that is the single source of truth.

Layout (see DESIGN.md)::

    <root>/<name>/versions/vNNNN/   immutable: adapter files + manifest.json
    <root>/<name>/current           JSON pointer to the live version (atomic replace)
    <root>/<name>/history.jsonl     append-only log of every pointer move
    <root>/<name>/.next-version     high-water mark: the next version number (under the lock)
    <root>/<name>/.staging-*        publishes in progress (flock'd by their writer)
    <root>/<name>/.quarantine/      versions ``fsck --repair`` moved out (checksums broken)
    <root>/<name>/.lock             serialises writers (version numbers, pointer moves)
    <root>/.agent-finetune-registry marker written by the first write: a root without it (an
                                    unmounted volume, a recreated folder) is not a registry

Crash safety: a version appears by one rename of a fully written, validated staging folder;
``current`` is replaced atomically and moved BEFORE its history entry is appended, so an
interrupted move leaves a pointer without a log line, which the next move (or ``fsck``)
records as ``recover``; a torn last history line is sealed with a newline before the next
append. Every OSError of a write becomes a RegistryError naming the path and errno.

Imports nothing heavy: the server plugin and the CLI start fast.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune._version import __version__
from agent_finetune.errors import InvalidNameError, NotFoundError, RegistryError, ValidationError
from agent_finetune.registry.adapter import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    AdapterReport,
    read_adapter_config,
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

log = logging.getLogger("agent_finetune.registry")

MANIFEST = "manifest.json"
CURRENT = "current"
HISTORY = "history.jsonl"
VERSIONS = "versions"
LOCK = ".lock"
NEXT_VERSION = ".next-version"
STAGING_PREFIX = ".staging-"
QUARANTINE = ".quarantine"
TMP_SUFFIX = ".tmp"
MARKER = ".agent-finetune-registry"
MANIFEST_FORMAT = 1

# Files copied from an adapter folder besides the two PEFT files: tokenizer files make a
# version self-contained for `load_model_and_tokenizer`; vLLM ignores them. Anything else in
# the folder (checkpoints, optimizer state) is not copied.
EXTRA_FILES = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "agent_finetune_format.json",
)
# Per-file size caps for publish: a 7B r=256 all-linear adapter in fp32 is ~2.6 GB.
MAX_WEIGHTS_BYTES = 16 << 30
MAX_FILE_BYTES = 64 << 20

# History actions that move ``current``. "rollback" returns to a version (popping back to it
# when it is on the stack of past currents); the others push, so a rollback after them goes
# back to what was current before. "recover" logs a move whose writer died before logging it.
POINTER_MOVES = ("promote", "rollback", "recover", "fsck")

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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
def _io(doing: str, path: Path | str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise os_error(e, doing, path) from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - write(2) returns 0 only for a zero-length buffer
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    with _io("sync folder", path):
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tmp_path(path: Path) -> Path:
    """The temp file ``atomic_write_json`` writes before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def atomic_write_json(path: Path, data: Any, *, sync_dir: bool = True) -> None:
    """Write JSON to ``path`` via temp file + fsync + rename: readers see old or new, never half.

    On failure the temp file is removed and a RegistryError names the path and errno.
    ``sync_dir=False`` skips the fsync that makes the rename itself durable.
    """
    tmp = tmp_path(path)
    body = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()
    try:
        _create_synced(tmp, body)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise os_error(e, "write", path) from e
    if sync_dir:
        _fsync_dir(path.parent)


def _create_synced(path: Path, body: bytes) -> None:
    """Create ``path`` (it must not exist, nor be a link) with ``body``, fsync'd; OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
    try:
        _write_all(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new_file(path: Path, body: bytes) -> None:
    """Create ``path`` (it must not exist) with ``body``, fsync'd; for private staging folders."""
    with _io("write", path):
        _create_synced(path, body)


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
            continue
        try:
            if not path.is_file() or path.is_symlink():
                problems.append(f"{name}: missing")
            elif not isinstance(meta, dict) or path.stat().st_size != meta.get("size"):
                want = meta.get("size") if isinstance(meta, dict) else meta
                problems.append(f"{name}: size {path.stat().st_size} != manifest {want}")
            elif sha256_file(path) != meta.get("sha256"):
                problems.append(f"{name}: sha256 does not match the manifest (file changed?)")
        except OSError as e:
            problems.append(f"{name}: cannot read: {e.strerror or e}")
    return problems


def read_manifest(folder: Path) -> dict[str, Any]:
    """A version folder's manifest; RegistryError when unreadable or not a JSON object."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise os_error(e, "read", path) from e
    except (ValueError, RecursionError) as e:
        raise RegistryError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return data


def verify_folder(folder: Path, **limits: Any) -> AdapterReport:
    """``validate_adapter`` plus, when the folder has a manifest, its sizes and sha256."""
    report = validate_adapter(folder, **limits)
    if (folder / MANIFEST).is_file():
        try:
            manifest = read_manifest(folder)
        except RegistryError as e:
            report.problems.insert(0, str(e))
            return report
        report.problems[:0] = verify_checksums(folder, manifest)
    return report


def parse_history(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(entries, unparsable lines) of a history file's text."""
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


def parse_pointer(data: bytes) -> str | None:
    """The version a ``current`` file's bytes point to; None when they are not a pointer."""
    try:
        return check_version(json.loads(data)["version"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def current_stack(history: list[dict[str, Any]]) -> list[str]:
    """Versions that were current, oldest first, with rolled-back-from entries popped."""
    stack: list[str] = []
    for e in history:
        to, action = e.get("to"), e.get("action")
        if not isinstance(to, str) or action not in POINTER_MOVES:
            continue
        if action != "rollback" or to not in stack:
            stack.append(to)
        else:
            while stack[-1] != to:
                stack.pop()
    return stack


def last_pointer_move(history: list[dict[str, Any]]) -> str | None:
    """The version the last logged pointer move went to."""
    for e in reversed(history):
        if e.get("action") in POINTER_MOVES:
            to = e.get("to")
            return to if isinstance(to, str) else None
    return None


def highest_number(history: list[dict[str, Any]], folders: list[str]) -> int:
    """The highest version number the history or the given folder names mention."""
    seen: list[Any] = list(folders)
    for e in history:
        seen += [e.get("to"), *list(e.get("deleted") or [])]
    return max((int(v[1:]) for v in seen if is_version(v)), default=0)


def _copy_regular_file(src: Path, dest: Path, cap: int) -> None:
    """Copy ``src`` (a regular file, never a symlink, at most ``cap`` bytes) to new ``dest``."""
    try:
        fd = os.open(src, os.O_RDONLY | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValidationError(
                f"{src} is a symbolic link; publish copies regular files only "
                "(replace the link with the file itself, e.g. cp -L)",
                [f"{src.name}: symbolic link"],
            ) from None
        raise os_error(e, "read", src) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValidationError(
                f"{src} is not a regular file; publish copies regular files only",
                [f"{src.name}: not a regular file"],
            )
        too_big = ValidationError(
            f"{src} is larger than the {cap:,}-byte limit for {src.name}; is it the right file?",
            [f"{src.name}: over {cap} bytes"],
        )
        if st.st_size > cap:
            raise too_big
        with _io("write", dest):
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC)
            try:
                copied = 0
                while chunk := os.read(fd, 1 << 20):
                    copied += len(chunk)
                    if copied > cap:  # it grew while we copied
                        raise too_big
                    _write_all(out, chunk)
                os.fsync(out)
            finally:
                os.close(out)
    except OSError as e:
        raise os_error(e, "read", src) from e
    finally:
        os.close(fd)


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
        if not self._inside_root(path):
            raise InvalidNameError(f"adapter folder {path} escapes the registry root {self.root}")
        return path

    def _inside_root(self, path: Path) -> bool:
        # Names cannot contain '/', so only a symlinked name folder can point outside. One
        # lstat, not two realpaths: this runs for every name on every reconcile pass.
        if not os.path.islink(path):
            return True
        real_root = os.path.realpath(self.root)
        return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root

    def version_dir(self, name: str, version: str) -> Path:
        return self.name_dir(name) / VERSIONS / check_version(version)

    # -- reading ----------------------------------------------------------------------------
    def scan(self, *, published_only: bool = True) -> tuple[list[str], list[str]]:
        """(adapter names, problems with the entries skipped), reading the root once.

        An entry that is unreadable, a symlink out of the root, or not a valid name is
        skipped and reported, never fatal for the other names. Dot-entries are the
        registry's own files and are not listed. ``published_only``: only names with a
        ``versions/`` folder.
        """
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        except OSError as e:
            raise os_error(e, "list", self.root) from e
        names, skipped = [], []
        for entry in entries:
            path = self.root / entry.name
            if entry.name.startswith("."):
                continue
            try:
                if not is_name(entry.name):
                    if entry.is_dir():
                        skipped.append(f"{path}: not a valid adapter name; ignored")
                    continue
                if entry.is_symlink() and not self._inside_root(path):
                    skipped.append(f"{path}: symlink out of the registry root; ignored")
                    continue
                if published_only:
                    if not stat.S_ISDIR(os.stat(path / VERSIONS).st_mode):
                        continue
                elif not stat.S_ISDIR(os.stat(path).st_mode):
                    continue
            except FileNotFoundError:
                continue
            except OSError as e:
                skipped.append(f"{path}: unreadable ({e.strerror or e}); ignored")
                continue
            names.append(entry.name)
        return names, skipped

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
        path = self.name_dir(name) / HISTORY
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        except OSError as e:
            raise os_error(e, "read", path) from e

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every history entry; unparsable (torn) lines are skipped (``fsck`` reports them)."""
        return parse_history(self.history_text(name))[0]

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
        with _io("create", ndir):
            ndir.mkdir(parents=True, exist_ok=True)
        if not self.is_marked():
            with _io("mark", self.root / MARKER):
                (self.root / MARKER).write_text(
                    "This folder is an agent-finetune adapter registry.\n", encoding="utf-8"
                )
        with _io("lock", ndir / LOCK):
            fd = os.open(ndir / LOCK, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
        try:
            with _io("lock", ndir / LOCK):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield ndir
        finally:
            os.close(fd)  # closing releases the flock

    def _append_history(self, name: str, entry: dict[str, Any]) -> None:
        """Append one line with O_APPEND; first seal a torn last line left by a dead writer."""
        entry = {"ts": utc_now(), "user": _user(), "host": socket.gethostname(), **entry}
        line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        path = self.name_dir(name) / HISTORY
        with _io("append to", path):
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC
            fd = os.open(path, flags, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A writer died mid-line: end that line so this entry is not glued to it.
                    line = b"\n" + line
                _write_all(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _record_unlogged_move(self, name: str, history: list[dict[str, Any]]) -> None:
        """If ``current`` moved without a history line (a writer died in between), log it."""
        cur = self.current(name)
        logged = last_pointer_move(history)
        if cur is not None and cur != logged:
            self._append_history(
                name,
                {
                    "action": "recover",
                    "from": logged,
                    "to": cur,
                    "reason": "current was moved without a history entry (interrupted write)",
                },
            )
            history.append({"action": "recover", "to": cur})

    def _set_current(self, name: str, version: str, action: str, reason: str | None) -> None:
        """Move the pointer, then log the move (caller holds the lock).

        The pointer moves first: it is what servers read. If the log line then cannot be
        written, the error says the pointer moved, and the next move records it.
        """
        self._record_unlogged_move(name, self.history(name))
        old = self.current(name)
        try:
            atomic_write_json(
                self.name_dir(name) / CURRENT,
                {"version": version, "updated_at": utc_now(), "action": action},
            )
        except RegistryError as e:
            now = self.current(name)
            where = (
                f"current now points to {version}; its history entry was not written"
                if now == version and old != version
                else f"current still points to {now}"
            )
            raise RegistryError(f"{name}: {action} to {version} failed: {e}; {where}") from e
        try:
            self._append_history(
                name, {"action": action, "from": old, "to": version, "reason": reason}
            )
        except RegistryError as e:
            raise RegistryError(
                f"{name}: current now points to {version} ({action}), but its history entry "
                f"could not be written: {e}; the next promote/rollback or "
                "`agent-finetune fsck --repair` records it"
            ) from e

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

        Regular files only (never through a symlink) are copied into a staging folder beside
        ``versions/``; the STAGED copy is validated and checksummed, so what was checked is
        what gets published; then it is renamed into place under the lock with a number
        never used before. A folder that fails validation is never published.
        """
        check_name(name)
        src = Path(source)
        if not src.is_dir():
            raise ValidationError(f"{src}: not a folder", [f"{src}: not a folder"])
        ndir = self.name_dir(name)
        with _io("create", ndir / VERSIONS):
            (ndir / VERSIONS).mkdir(parents=True, exist_ok=True)
        staging = ndir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        with _io("create", staging):
            staging.mkdir()
        marker = -1
        try:
            # Held until we are done: `fsck` removes only staging folders nobody holds.
            with _io("lock", staging):
                marker = os.open(staging, os.O_RDONLY | _O_CLOEXEC)
                fcntl.flock(marker, fcntl.LOCK_EX)
            if os.fstat(marker).st_nlink == 0:  # `fsck --repair` took it before our flock
                raise RegistryError(f"{staging} was removed by a concurrent fsck; publish again")
            files = self._copy_in(src, staging)
            report = validate_adapter(staging, max_rank=max_rank, base_config=base_config)
            if not report.ok:
                problems = [p.replace(str(staging), str(src)) for p in report.problems]
                raise ValidationError(
                    f"{src} cannot be published as {name!r}:\n  - " + "\n  - ".join(problems),
                    problems,
                )
            adapter_cfg = read_adapter_config(staging)
            with _io("read", staging):
                checksums = file_checksums(staging, files)
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
                "files": checksums,
                **(metadata or {}),
            }
            with self.lock(name):
                number = self.next_version_number(name)
                version = format_version(number)
                # The mark moves first: a crash after it only skips a number, never reuses one.
                # Its rename need not be durable at once: a version that became durably
                # visible keeps its number through its folder; the mark only has to outlive
                # a later hand deletion, and writeback flushes it long before that.
                atomic_write_json(ndir / NEXT_VERSION, number + 1, sync_dir=False)
                manifest["version"] = version
                manifest["parent"] = self.current(name)
                body = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
                _write_new_file(staging / MANIFEST, body.encode())
                _fsync_dir(staging)
                with _io("rename", staging):
                    os.rename(staging, ndir / VERSIONS / version)
                _fsync_dir(ndir / VERSIONS)
                try:
                    self._append_history(
                        name, {"action": "publish", "from": None, "to": version, "reason": reason}
                    )
                except RegistryError as e:
                    raise RegistryError(
                        f"{name}@{version} was published to {ndir / VERSIONS / version}, but its "
                        f"history entry could not be written ({e}); it was not made current"
                    ) from e
                if make_current:
                    self._set_current(name, version, "promote", reason or "published")
        finally:
            if marker >= 0:
                os.close(marker)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return VersionInfo(name, version, ndir / VERSIONS / version, manifest, make_current)

    @staticmethod
    def _copy_in(src: Path, staging: Path) -> list[str]:
        """Copy the PEFT files and the allowed extras; return the names copied."""
        copied = []
        for fname in ADAPTER_FILES + EXTRA_FILES:
            if fname not in ADAPTER_FILES and not os.path.lexists(src / fname):
                continue
            if fname in ADAPTER_FILES and not os.path.lexists(src / fname):
                raise ValidationError(
                    f"{src / fname}: missing; is {src} a PEFT adapter folder?",
                    [f"{fname}: missing"],
                )
            cap = MAX_WEIGHTS_BYTES if fname == ADAPTER_WEIGHTS else MAX_FILE_BYTES
            _copy_regular_file(src / fname, staging / fname, cap)
            copied.append(fname)
        return copied

    def _require_name(self, name: str) -> None:
        if not self.versions(name):
            raise NotFoundError(
                f"no adapter named {name!r} in {self.root}; "
                f"known: {', '.join(self.names()) or 'none'}"
            )

    def promote(self, name: str, version: str, *, reason: str | None = None) -> str:
        """Make an existing, valid version current (already current: nothing is written)."""
        check_version(version)
        self._require_name(name)
        with self.lock(name):
            self.require_servable(name, version)
            if self.current(name) != version:
                self._set_current(name, version, "promote", reason)
        return version

    def rollback(self, name: str, *, to: str | None = None, reason: str | None = None) -> str:
        """Undo the last pointer move: ``current`` goes back to the version that was current
        just before it (or to ``to``); return it. Already there: nothing is written.

        One rule, like ``cd -``: a second rollback undoes the first. To go further back in
        history, name the version with ``to``.
        """
        if to is not None:
            check_version(to)
        self._require_name(name)
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
            if to != cur:
                self._set_current(name, to, "rollback", reason)
        return to

    def previous_current(self, name: str) -> str | None:
        """The version that was current just before the last pointer move, if any."""
        cur = self.current(name)
        for e in reversed(self.history(name)):
            if e.get("action") in POINTER_MOVES and e.get("to") == cur:
                before = e.get("from")
                return before if isinstance(before, str) and before != cur else None
        return None

    def require_servable(
        self, name: str, version: str, *, refused: str = "will not be made current"
    ) -> None:
        """Raise unless ``version`` is published and verifies; ``refused`` ends the message."""
        if version not in self.versions(name):
            raise NotFoundError(
                f"{name}@{version} not found; published versions: "
                f"{', '.join(self.versions(name)) or 'none'}"
            )
        report = self.verify(name, version)
        if not report.ok:
            raise ValidationError(
                f"{name}@{version} failed validation and {refused}:\n  - "
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
                # Keep the high-water mark above what we delete: numbers are never reused.
                number = self.next_version_number(name)
                atomic_write_json(self.name_dir(name) / NEXT_VERSION, number)
                for v in doomed:
                    # Rename first so a reader never sees a half-deleted version folder.
                    trash = self.name_dir(name) / f"{STAGING_PREFIX}gc-{v}-{uuid.uuid4().hex}"
                    with _io("rename", self.version_dir(name, v)):
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
