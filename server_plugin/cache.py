"""The server's own verified copies of registry versions.

vLLM re-reads an adapter from its path whenever its engine cache evicted it, and dies if
that path is gone. So the server never loads from the registry: each version is copied
here, its checksums are verified against the manifest and it is validated, and only then
is the copy's path handed to vLLM. Copies are keyed by the sha256 of the manifest they
were verified against, so a rewritten registry folder (or a reused version number) can
never change weights the engine already serves.

Verify once, read once: each file is read once, its sha256 computed from the bytes as they
are copied; when the sha256 match the manifest and the manifest records that publish
scanned those bytes for NaN/Inf (``manifest.checks``), the scan is not repeated (the
config, header, rank and shape checks always run: they depend on this server). With
``Limits.served_dtype`` (the plugin: vLLM's LoRA dtype) the weights are then written in
that dtype, once, here (``server_plugin.served_dtype``): vLLM's engine would otherwise cast
them on every load, with every running request waiting.

Ownership: each process copies into its own folder under the cache root and holds an
``flock`` on it for its lifetime. Start-up cleanup removes only folders whose lock can be
taken (their owner is gone), which holds across PID namespaces and for two servers sharing
one cache volume; ``close()`` removes the folder at exit.

The invariant that keeps the engine alive: a copy is deleted only when the server no longer
serves it (``release``) and ``grace_s`` has passed since (requests admitted before the
unload may still re-read it). The byte bound never breaks that rule: when it cannot make
room, the load that needs room fails with a retryable error instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent_finetune.errors import CacheInUseError, RegistryError, ValidationError
from agent_finetune.registry import MANIFEST, Registry
from agent_finetune.registry.adapter import ADAPTER_WEIGHTS, validate_adapter
from agent_finetune.registry.manifest import scanned_at_publish
from server_plugin.served_dtype import cast_weights

logger = logging.getLogger(__name__)

_PROC_PREFIX = "proc-"
_LEGACY_PREFIX = "pid-"
_OWNER = ".owner"
_STALE_TMP_S = 60.0


@dataclass(frozen=True)
class Limits:
    """What the serving side accepts; passed to ``validate_adapter``."""

    max_rank: int | None = None
    base_model: str | None = None
    base_config: dict[str, Any] | None = None
    check_base_name: bool = True
    # The safetensors dtype vLLM serves LoRA weights in ("BF16", "F16", "F32"); copies are
    # written in it. None: as published (the sidecar cannot know the server's).
    served_dtype: str | None = None


def manifest_key(data: bytes) -> str:
    """The content key of a version: sha256 of its manifest's bytes (which list every
    file's sha256), shortened for paths."""
    return hashlib.sha256(data).hexdigest()[:16]


def _try_lock(path: Path) -> IO[bytes] | None:
    """An open, exclusively locked ``path``; None when another process holds it."""
    try:
        f = path.open("ab")
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


class ProcessDir:
    """A cache folder owned by this process through an flock held until ``close``.

    Without ``name``: a fresh ``proc-*`` folder, removed with its copies by ``close`` (the
    plugin: its engine ends with it). With ``name``: that folder, reused across runs and
    kept by ``close`` (the sidecar: the server may still re-read its copies); a second
    process asking for the same name gets a ``CacheInUseError`` saying so.
    """

    def __init__(self, root: Path, name: str | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.removed = _remove_orphans(root)
        self.keep = name is not None
        if name is not None:
            self.path = root / name
            self.path.mkdir(exist_ok=True)
            lock = _try_lock(self.path / _OWNER)
            if lock is None:
                raise CacheInUseError(
                    errno.EBUSY,
                    f"cache folder {self.path} is owned by another running process "
                    "(a second sidecar for the same server?); stop it or pass another "
                    "--cache-dir",
                )
        else:
            # Lock first, publish by rename after: a cleaner never sees the folder unlocked.
            tmp = root / f".{_PROC_PREFIX}{uuid.uuid4().hex}"
            tmp.mkdir()
            lock = _try_lock(tmp / _OWNER)
            if lock is None:  # cannot happen for a fresh folder; fail rather than share
                raise OSError(errno.EAGAIN, f"cannot lock new cache folder {tmp}")
            self.path = root / f"{_PROC_PREFIX}{os.getpid()}-{tmp.name[-8:]}"
            os.rename(tmp, self.path)
        self._lock: IO[bytes] | None = lock

    def close(self) -> None:
        """Drop the lock; a ``proc-*`` folder and its copies are removed first (at exit)."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
        lock.close()


def _remove_orphans(root: Path) -> list[Path]:
    """Delete folders under ``root`` whose owner lock can be taken (their process is gone)."""
    removed: list[Path] = []
    for child in root.iterdir():
        name = child.name
        if name.startswith("."):
            if not name.startswith(f".{_PROC_PREFIX}"):
                continue
            try:  # a folder being created is locked within microseconds; skip young ones
                if time.time() - child.stat().st_mtime < _STALE_TMP_S:
                    continue
            except OSError:
                continue
        elif name.startswith(_LEGACY_PREFIX):  # before the flock: only its own pid knew
            _remove_legacy(child, removed)
            continue
        elif not name.startswith(_PROC_PREFIX):
            continue
        if not child.is_dir():
            continue
        lock = _try_lock(child / _OWNER)
        if lock is None:
            continue  # a live owner, here or in another PID namespace
        try:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        finally:
            lock.close()
    return removed


def _remove_legacy(child: Path, removed: list[Path]) -> None:
    try:
        pid = int(child.name[len(_LEGACY_PREFIX) :])
        os.kill(pid, 0)
    except ValueError:
        return
    except ProcessLookupError:
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    except PermissionError:
        return


def _hint(problem: str) -> str:
    if "does not match the served model" in problem:
        return problem + " (same model under another name? set AGENT_FINETUNE_STRICT_BASE=0)"
    return problem


def _copy_hashed(src: Path, dest: Path) -> tuple[str, int]:
    """Copy ``src`` to new ``dest``; the sha256 and size of the bytes copied (one read)."""
    digest, size = hashlib.sha256(), 0
    with src.open("rb") as fin, dest.open("xb") as fout:
        while chunk := fin.read(1 << 20):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _copy_verified(
    src: Path, dest: Path, raw: bytes, manifest: dict[str, Any], limits: Limits
) -> None:
    """Copy ``src``'s files into a temporary folder, hashing them as they are copied,
    validate the copy there, then rename it to ``dest`` (never a half-made copy at
    ``dest``)."""
    files, label = manifest["files"], f"{src.parent.parent.name}@{src.name}"
    tmp = dest.parent / f".tmp-{src.name}-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    problems: list[str] = []
    try:
        for fname, meta in files.items():
            if Path(fname).name != fname or fname == MANIFEST:
                raise ValidationError(
                    f"{src / MANIFEST}: file name {fname!r} is not a plain adapter file",
                    [f"manifest file name {fname!r} is not a plain adapter file"],
                )
            try:
                sha, size = _copy_hashed(src / fname, tmp / fname)
            except FileNotFoundError:
                if not (src / MANIFEST).is_file():
                    raise FileNotFoundError(
                        errno.ENOENT, f"{label} vanished while copying", str(src)
                    ) from None
                problems.append(f"{fname}: missing")
                continue
            want = meta if isinstance(meta, dict) else {}
            if size != want.get("size"):
                problems.append(f"{fname}: size {size} != manifest {want.get('size', meta)}")
            elif sha != want.get("sha256"):
                problems.append(f"{fname}: sha256 does not match the manifest (file changed?)")
        (tmp / MANIFEST).write_bytes(raw)  # the bytes the key was computed from
        # Bytes whose sha256 match are publish's: the scan it recorded holds for them.
        report = validate_adapter(
            tmp,
            max_rank=limits.max_rank,
            base_model=limits.base_model,
            base_config=limits.base_config,
            check_base_name=limits.check_base_name,
            scan_values=bool(problems) or not scanned_at_publish(manifest),
        )
        problems += [_hint(p.replace(str(tmp), str(src))) for p in report.problems]
        if problems:
            raise ValidationError(
                f"{label} ({src}) cannot be served:\n  - " + "\n  - ".join(problems),
                problems,
            )
        if limits.served_dtype is not None:
            cast_weights(tmp / ADAPTER_WEIGHTS, limits.served_dtype)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tree_bytes(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    except OSError:
        return 0


class AdapterCache:
    """Copy, verify and validate registry versions into ``root``; forget unused copies.

    ``max_bytes`` bounds the copies the server keeps besides the live ones: before a bounded
    copy is made, released copies past their grace period are deleted oldest first; if that
    is not enough room, the copy is refused with a retryable ``OSError(ENOSPC)``.
    """

    def __init__(
        self, root: Path, limits: Limits, *, max_bytes: int | None = None, grace_s: float = 600.0
    ) -> None:
        self.root = root
        self.limits = limits
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self._released: dict[Path, float] = {}  # path -> monotonic time it became unused
        # prepare() (worker threads) claims a released copy while make_room() / collect()
        # (other threads) may be deleting it: claim and delete decide under this lock.
        self._lock = threading.Lock()
        self._sizes: dict[Path, int] = {}  # every copy this cache made and has not deleted
        # Paths the server may re-read now (set by the reconciler): never deleted.
        self.in_use: Callable[[], set[Path]] = set

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def on_disk(self) -> list[tuple[str, str]]:
        """(name, version) of every copy this cache holds on disk now."""
        return [(p.parent.name, p.name.partition("-")[0]) for p in list(self._sizes)]

    def path_for(self, name: str, version: str, key: str) -> Path:
        return self.root / name / f"{version}-{key}"

    def prepare(
        self, registry: Registry, name: str, version: str, *, bounded: bool = False
    ) -> tuple[Path, str]:
        """Return the path and content key of a verified, validated copy of ``name@version``.

        Raises ValidationError (with every problem), RegistryError, or OSError (I/O,
        including a folder that vanished mid-copy and, with ``bounded``, a full cache).
        Blocking file IO: async callers run it in a thread.
        """
        src = registry.version_dir(name, version)
        try:
            raw = (src / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"{name}@{version} not found in {registry.root}") from None
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise ValidationError(
                f"{src / MANIFEST}: invalid JSON: {e}", [f"manifest.json: invalid JSON: {e}"]
            ) from e
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not files:
            raise ValidationError(
                f"{src / MANIFEST}: lists no files; republish the adapter with "
                "`agent-finetune publish`",
                ["manifest lists no files"],
            )
        key = manifest_key(raw)
        dest = self.path_for(name, version, key)
        with self._lock:  # claimed: a deletion decided before this line now skips it
            self._released.pop(dest, None)
            exists = dest.is_dir()
        if exists:
            self._sizes.setdefault(dest, _tree_bytes(dest))
            return dest, key  # verified when it was made; nothing writes into it after that
        if bounded:
            need = len(raw) + sum(
                int(m.get("size", 0)) for m in files.values() if isinstance(m, dict)
            )
            self.make_room(need)
        _copy_verified(src, dest, raw, manifest, self.limits)
        self._sizes[dest] = _tree_bytes(dest)
        return dest, key

    def make_room(self, need: int) -> None:
        """Delete released copies past their grace period until ``need`` more bytes fit."""
        if self.max_bytes is None:
            return
        self.collect()
        now, in_use = time.monotonic(), self.in_use()
        for path, since in sorted(list(self._released.items()), key=lambda kv: kv[1]):
            if self.bytes + need <= self.max_bytes:
                return
            if now - since >= self.grace_s and path not in in_use:
                self.delete_if_released(path)
        if self.bytes + need > self.max_bytes:
            raise OSError(
                errno.ENOSPC,
                f"server cache {self.root} holds {self.bytes} bytes; {need} more would pass "
                f"AGENT_FINETUNE_CACHE_MAX_BYTES={self.max_bytes} and no unused copy is past "
                f"its {self.grace_s:.0f}s grace period yet (retried later)",
            )

    def release_existing(self) -> None:
        """Treat copies left by an earlier run as released now (deleted after the grace
        period unless used again, and never while the server serves them)."""
        for name_dir in self.root.iterdir():
            if not name_dir.is_dir() or name_dir.name.startswith("."):
                continue
            for copy in name_dir.iterdir():
                if copy.is_dir() and not copy.name.startswith("."):
                    self._sizes[copy] = _tree_bytes(copy)
                    self.release(copy)

    def release(self, path: Path) -> None:
        """Mark a copy unused; ``collect`` deletes it after the grace period."""
        self._released.setdefault(path, time.monotonic())

    def collect(self) -> list[Path]:
        """Delete copies released more than ``grace_s`` ago and not in use again."""
        now, in_use = time.monotonic(), self.in_use()
        gone = []
        for path, since in list(self._released.items()):
            if path in in_use:
                del self._released[path]
            elif now - since >= self.grace_s and self.delete_if_released(path):
                gone.append(path)
        return gone

    def delete_if_released(self, path: Path) -> bool:
        """Delete a copy only if it is still released: ``prepare`` may have claimed it again
        (in another thread) since the caller chose it, and vLLM is about to load it."""
        with self._lock:
            if path not in self._released:
                return False
            self._delete(path)
            return True

    def _delete(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        self._released.pop(path, None)
        self._sizes.pop(path, None)
