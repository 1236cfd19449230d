"""The registry's file primitives on their own (the fault tests drive them through the
Registry: ENOSPC/EROFS at every write, kill -9, torn lines)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from agent_finetune.errors import RegistryError
from agent_finetune.registry.files import (
    append_jsonl,
    atomic_write_json,
    is_locked,
    locked,
    os_error,
    read_jsonl,
)


def test_an_atomic_write_leaves_old_or_new_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "current"
    atomic_write_json(path, {"version": "v0001"})

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(RegistryError, match="the disk is full"):
        atomic_write_json(path, {"version": "v0002"})
    assert '"v0001"' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["current"]


def test_jsonl_append_seals_a_torn_line_and_reads_skip_it(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == ([], [])
    append_jsonl(path, {"n": 1})
    with open(path, "ab") as f:
        f.write(b'{"n": 2, "tor')
    append_jsonl(path, {"n": 3})
    entries, bad = read_jsonl(path)
    assert [e["n"] for e in entries] == [1, 3] and bad == ['{"n": 2, "tor']


def test_the_lock_is_exclusive_and_probed_without_waiting(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    assert is_locked(lock) is None  # not there yet
    entered = threading.Event()
    with locked(lock):
        assert is_locked(lock) is True
        t = threading.Thread(target=lambda: (locked(lock).__enter__(), entered.set()))
        t.start()
        assert not entered.wait(0.3)  # a second holder waits
    assert entered.wait(5)
    t.join()


def test_os_errors_name_the_path_errno_and_cause() -> None:
    e = os_error(OSError(errno.EROFS, "Read-only file system"), "write", "/r/bot/current")
    assert str(e) == (
        "cannot write /r/bot/current: Read-only file system (errno 30 EROFS); "
        "the registry is on a read-only filesystem"
    )
