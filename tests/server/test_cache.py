"""Cache folder ownership: flock-owned per-process folders, removed at exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server_plugin.cache import ProcessDir

HOLD = """
import sys
from pathlib import Path
from server_plugin.cache import ProcessDir
d = ProcessDir(Path(sys.argv[1]))
print(d.path, flush=True)
sys.stdin.read()
"""


def test_cleanup_removes_only_folders_whose_lock_is_free(tmp_path: Path) -> None:
    """Finding: liveness by kill(pid, 0) is wrong across PID namespaces (shared volume)."""
    root = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        theirs = Path(child.stdout.readline().strip())
        (theirs / "copy").mkdir()
        # An owner that died: its folder names a pid that is alive here (pid 1), which
        # kill(pid, 0) would take for its owner; nothing holds its lock.
        orphan = root / "proc-1-deadbeef"
        (orphan / "copy").mkdir(parents=True)
        mine = ProcessDir(root)
        assert (theirs / "copy").is_dir()  # its owner holds the lock: kept
        assert not orphan.exists()  # lock free: removed
        assert orphan in mine.removed
    finally:
        child.kill()
        child.wait()
    again = ProcessDir(root)
    assert not theirs.exists()  # killed -9: its lock went with it
    mine.close()
    again.close()


def test_copies_are_removed_at_exit(tmp_path: Path) -> None:
    """Finding: copies were never removed at exit (2,000 adapters left 555 MB)."""
    folder = ProcessDir(tmp_path / "cache")
    (folder.path / "x" / "v0001-abc").mkdir(parents=True)
    folder.close()
    assert not folder.path.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_two_sidecars_never_share_a_folder(tmp_path: Path) -> None:
    """Finding: two sidecars shared one folder and deleted each other's copies."""
    first = ProcessDir(tmp_path / "cache", name="sidecar-abc")
    with pytest.raises(OSError, match="owned by another running process"):
        ProcessDir(tmp_path / "cache", name="sidecar-abc")
    (first.path / "x").mkdir()
    first.close()  # kept at exit: the server may still re-read the copies
    assert (first.path / "x").is_dir()
    second = ProcessDir(tmp_path / "cache", name="sidecar-abc")
    assert (second.path / "x").is_dir()
    second.close()
