"""A version's ``manifest.json``: what was published (sizes, sha256) and the checks of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from agent_finetune.errors import RegistryError, RegistryReadError
from agent_finetune.registry.adapter import AdapterReport, validate_adapter
from agent_finetune.registry.files import os_error
from agent_finetune.registry.layout import MANIFEST

MANIFEST_FORMAT = 1
CHECKS = "checks"
"""The manifest member that records what publish checked of the published bytes."""
NONFINITE_SCAN = "nonfinite_scan"
"""``checks`` value: every float tensor was read and holds no NaN/Inf (``count_nonfinite``)."""


def checks_record(*, scanned: bool) -> dict[str, Any]:
    """What publish checked of the bytes whose sha256 the manifest lists: the config, the
    safetensors header and the tensors' names and ranks always; every value for NaN/Inf
    when ``scanned``. A server that verified those sha256 itself may skip the scan."""
    return {"header": True, "tensors": True, NONFINITE_SCAN: scanned}


def scanned_at_publish(manifest: dict[str, Any]) -> bool:
    """Whether publish recorded a NaN/Inf scan of the bytes this manifest lists."""
    checks = manifest.get(CHECKS)
    return isinstance(checks, dict) and checks.get(NONFINITE_SCAN) is True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {
        n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names
    }


def file_stamp(st: Any) -> list[int]:
    """A file's identity as publish saw it: inode, size, mtime (ns)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def unchanged(path: Path, meta: Any) -> bool:
    """Whether ``path`` is the very file publish checksummed: its recorded ``stamp`` (inode,
    size, mtime) still matches. Any write, replacement or copy changes one of them (git
    trusts its index the same way); then the sha256 is computed again."""
    stamp = meta.get("stamp") if isinstance(meta, dict) else None
    if not isinstance(stamp, list):
        return False
    try:
        return file_stamp(path.lstat()) == stamp
    except OSError:
        return False


def checksum_problems(
    folder: Path, manifest: dict[str, Any], *, trust_stamps: bool = False
) -> tuple[list[str], list[str]]:
    """(damage, read errors) comparing ``folder``'s files with the manifest.

    Damage is a fact about the bytes (missing, wrong size, wrong sha256); a read error says
    nothing about them (EIO, ESTALE, EACCES may pass), so a repair must not act on it.
    ``trust_stamps``: a file whose stamp publish recorded is unchanged is not hashed again.
    """
    damage, unreadable = [], []
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{folder / MANIFEST}: lists no files"], []
    for name, meta in files.items():
        path = folder / name
        if Path(name).name != name:
            damage.append(f"manifest file name {name!r} is not a plain file name")
            continue
        try:
            if not path.is_file() or path.is_symlink():
                damage.append(f"{name}: missing")
            elif not isinstance(meta, dict) or path.stat().st_size != meta.get("size"):
                want = meta.get("size") if isinstance(meta, dict) else meta
                damage.append(f"{name}: size {path.stat().st_size} != manifest {want}")
            elif trust_stamps and unchanged(path, meta):
                continue
            elif sha256_file(path) != meta.get("sha256"):
                damage.append(f"{name}: sha256 does not match the manifest (file changed?)")
        except OSError as e:
            unreadable.append(f"{name}: cannot read: {e.strerror or e}")
    return damage, unreadable


def verify_checksums(
    folder: Path, manifest: dict[str, Any], *, trust_stamps: bool = False
) -> list[str]:
    """Problems found comparing ``folder``'s files against the manifest's sizes and sha256."""
    damage, unreadable = checksum_problems(folder, manifest, trust_stamps=trust_stamps)
    return damage + unreadable


def read_manifest(folder: Path) -> dict[str, Any]:
    """A version folder's manifest; RegistryError when unreadable or not a JSON object
    (``RegistryReadError`` for an I/O error), FileNotFoundError when there is none."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RegistryReadError(str(os_error(e, "read", path))) from e
    except (ValueError, RecursionError) as e:
        raise RegistryError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return data


def verify_folder(folder: Path, *, once: bool = False, **limits: Any) -> AdapterReport:
    """``validate_adapter`` plus, when the folder has a manifest, its sizes and sha256.

    ``once`` (verify once: what promote and rollback ask): files publish stamped and that
    are unchanged since are not hashed again, and the NaN/Inf scan publish recorded is not
    repeated for bytes whose sha256 (or unchanged stamp) proves they are publish's. The
    config, header and tensor checks always run.
    """
    manifest: dict[str, Any] | None = None
    if (folder / MANIFEST).is_file():
        try:
            manifest = read_manifest(folder)
        except RegistryError as e:
            report = validate_adapter(folder, **limits)
            report.problems.insert(0, str(e))
            return report
    damage: list[str] = []
    if manifest is not None:
        damage = verify_checksums(folder, manifest, trust_stamps=once)
    if once and manifest is not None and not damage and scanned_at_publish(manifest):
        limits.setdefault("scan_values", False)
    report = validate_adapter(folder, **limits)
    report.problems[:0] = damage
    return report
