"""The server's verified copies (``server_plugin.cache``): flock-owned per-process folders,
removed at exit, and copies never deleted while claimed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fakes import make_reconciler
from helpers import fake_adapter

from agent_finetune.errors import CacheInUseError
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
    with pytest.raises(CacheInUseError, match="owned by another running process"):
        ProcessDir(tmp_path / "cache", name="sidecar-abc")
    (first.path / "x").mkdir()
    first.close()  # kept at exit: the server may still re-read the copies
    assert (first.path / "x").is_dir()
    second = ProcessDir(tmp_path / "cache", name="sidecar-abc")
    assert (second.path / "x").is_dir()
    second.close()


def test_a_copy_claimed_again_is_not_deleted_by_a_deletion_decided_before(
    tmp_path: Path,
) -> None:
    """Run 1 of bench/scale.py: a lazy name reloaded while another load made room got its
    copy deleted between ``prepare`` and vLLM's load (vLLM 404, remembered as a refusal)."""
    registry, _, rec = make_reconciler(tmp_path)
    registry.publish("n00", fake_adapter(tmp_path / "a", seed=1))
    cache = rec.cache
    path, _ = cache.prepare(registry, "n00", "v0001")
    cache.release(path)
    chosen = list(cache._released)  # make_room()/collect() in another thread picked it ...
    again, _ = cache.prepare(registry, "n00", "v0001")  # ... while a load claimed it again
    assert again == path
    for p in chosen:
        cache.delete_if_released(p)
    assert path.is_dir()  # still there for vLLM to load
