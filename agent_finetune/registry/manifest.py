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


def checksum_problems(folder: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(damage, read errors) comparing ``folder``'s files with the manifest.

    Damage is a fact about the bytes (missing, wrong size, wrong sha256); a read error says
    nothing about them (EIO, ESTALE, EACCES may pass), so a repair must not act on it.
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
            elif sha256_file(path) != meta.get("sha256"):
                damage.append(f"{name}: sha256 does not match the manifest (file changed?)")
        except OSError as e:
            unreadable.append(f"{name}: cannot read: {e.strerror or e}")
    return damage, unreadable


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found comparing ``folder``'s files against the manifest's sizes and sha256."""
    damage, unreadable = checksum_problems(folder, manifest)
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
