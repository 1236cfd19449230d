"""The registry's root folder: the one scan of its entries, and the rule that keeps every
name's folder inside it.

Listing, ``fsck``, the canary router and the server share the scan, so one unreadable or
symlinked-out entry is skipped (and reported) the same way everywhere, never fatal for the
other names.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from agent_finetune.registry.files import os_error
from agent_finetune.registry.layout import VERSIONS
from agent_finetune.registry.names import is_name

ScanKind = Literal["published", "folders", "any"]


def inside_root(root: Path, path: Path) -> bool:
    """Whether the name folder ``path`` stays inside ``root``.

    Names cannot contain '/', so only a symlinked name folder can point outside. One lstat,
    not two realpaths: this runs for every name on every reconcile pass.
    """
    if not os.path.islink(path):
        return True
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def scan_root(root: Path, kind: ScanKind = "published") -> tuple[list[str], list[str]]:
    """(adapter names, problems with the entries skipped), reading ``root`` once.

    An entry that is unreadable, a symlink out of the root, or not a valid name is skipped
    and reported. Dot-entries are the registry's own files and are not listed. ``kind``:
    ``published`` names have a ``versions/`` folder (one stat each), ``folders`` are
    folders, ``any`` costs no stat.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    except OSError as e:
        raise os_error(e, "list", root) from e
    names, skipped = [], []
    for entry in entries:
        path = root / entry.name
        if entry.name.startswith("."):
            continue
        try:
            if not is_name(entry.name):
                if entry.is_dir():
                    skipped.append(f"{path}: not a valid adapter name; ignored")
                continue
            if entry.is_symlink() and not inside_root(root, path):
                skipped.append(f"{path}: symlink out of the registry root; ignored")
                continue
            if kind == "published" and not stat.S_ISDIR(os.stat(path / VERSIONS).st_mode):
                continue
            if kind == "folders" and not stat.S_ISDIR(os.stat(path).st_mode):
                continue
        except FileNotFoundError:
            continue
        except OSError as e:
            skipped.append(f"{path}: unreadable ({e.strerror or e}); ignored")
            continue
        names.append(entry.name)
    return names, skipped
