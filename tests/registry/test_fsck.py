"""fsck: each kind of damage is reported, repaired, and the registry is clean afterwards."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from agent_finetune.registry import Registry
from agent_finetune.registry.fsck import fsck
from agent_finetune.training.numpy_adapter import write_adapter


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "registry")
    adapter = write_adapter(tmp_path / "adapter", layers=1)
    for _ in range(3):
        r.publish("bot", adapter)
    return r


def problems(reg: Registry) -> list[str]:
    return [f"{f.path.name}: {f.problem}" for f in fsck(reg).findings]


def repair_then_clean(reg: Registry) -> list[str]:
    report = fsck(reg, repair=True)
    assert report.ok, report.remaining
    assert fsck(reg).findings == []
    return [f.repaired or "" for f in report.findings]


def test_a_healthy_registry_is_clean(reg: Registry) -> None:
    assert fsck(reg).findings == [] and fsck(reg).ok


def test_stale_staging_and_temp_files_are_removed_but_a_live_publish_is_not(
    reg: Registry,
) -> None:
    ndir = reg.name_dir("bot")
    (ndir / ".staging-dead").mkdir()
    (ndir / ".staging-dead" / "adapter_config.json").write_text("{}")
    (ndir / f".current.{'a' * 32}.tmp").write_text("{")
    live = ndir / ".staging-live"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a publisher still working on it
    try:
        found = problems(reg)
        assert any(".staging-dead" in p for p in found)
        assert any(".tmp: temp file" in p for p in found)
        assert not any(".staging-live" in p for p in found)
        repair_then_clean(reg)
        assert live.is_dir() and not (ndir / ".staging-dead").exists()
    finally:
        os.close(fd)


def test_torn_history_is_rewritten_and_the_bad_lines_kept(reg: Registry) -> None:
    path = reg.name_dir("bot") / "history.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], lines[2][:20], *lines[3:]]) + "\n" + lines[2][:7])
    assert any("torn history: 2 unparsable" in p for p in problems(reg))
    repair_then_clean(reg)
    assert len(reg.history("bot")) == len(lines) - 1
    assert (path.parent / "history.jsonl.rejected").read_text().count("\n") == 2


def test_a_version_whose_checksums_broke_is_quarantined_and_current_moved_back(
    reg: Registry, tmp_path: Path
) -> None:
    w = reg.version_dir("bot", "v0003") / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"XXXX")
    assert any("sha256 does not match" in p for p in problems(reg))
    repaired = repair_then_clean(reg)
    assert reg.versions("bot") == ["v0001", "v0002"]
    assert reg.current("bot") == "v0002" and reg.history("bot")[-1]["action"] == "fsck"
    assert any("quarantine" in r for r in repaired)
    # The quarantined number stays used.
    assert reg.publish("bot", write_adapter(tmp_path / "b", layers=1)).version == "v0004"


def test_a_pointer_to_a_missing_version_is_moved_back(reg: Registry) -> None:
    import shutil

    reg.rollback("bot")  # current v0002, v0003 was current before
    shutil.rmtree(reg.version_dir("bot", "v0002"))
    assert any("current points to v0002" in p for p in problems(reg))
    repair_then_clean(reg)
    assert reg.current("bot") == "v0001"


def test_an_unreadable_pointer_is_repaired(reg: Registry) -> None:
    (reg.name_dir("bot") / "current").write_text("{garbage")
    assert any("current is unreadable" in p for p in problems(reg))
    repair_then_clean(reg)
    assert reg.current("bot") == "v0003"


def test_a_pointer_move_missing_from_history_is_recorded(reg: Registry) -> None:
    path = reg.name_dir("bot") / "current"
    path.write_text(json.dumps({"version": "v0001"}))  # a promote killed before its log line
    assert any("history's last move is to v0003" in p for p in problems(reg))
    repair_then_clean(reg)
    assert reg.history("bot")[-1]["action"] == "recover"
    assert reg.rollback("bot") == "v0003"


def test_a_lost_high_water_mark_is_rebuilt_from_history(reg: Registry) -> None:
    import shutil

    (reg.name_dir("bot") / ".next-version").unlink()
    shutil.rmtree(reg.version_dir("bot", "v0003"))
    reg.rollback("bot", to="v0002")
    assert any("high-water mark missing" in p for p in problems(reg))
    repair_then_clean(reg)
    assert json.loads((reg.name_dir("bot") / ".next-version").read_text()) == 4


def test_odd_root_entries_are_reported_not_touched(reg: Registry, tmp_path: Path) -> None:
    (reg.root / "Bad Name").mkdir()
    (reg.root / "evil").symlink_to(tmp_path)
    found = problems(reg)
    assert any("not a valid adapter name" in p for p in found)
    assert any("symlink out of the registry root" in p for p in found)
    assert not fsck(reg, repair=True).ok  # nothing it may fix: exit code stays non-zero
    assert (reg.root / "Bad Name").is_dir()


def test_a_missing_registry_is_a_problem(tmp_path: Path) -> None:
    report = fsck(Registry(tmp_path / "nope"))
    assert not report.ok and "does not exist" in report.findings[0].problem


# -- transient read errors, concurrent appends, durability, lock time ----------------------------
def test_a_transient_read_error_never_quarantines_the_live_version(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: `fsck --repair` quarantined the live version on one EIO while hashing it."""
    import errno

    from agent_finetune.registry import manifest

    real = manifest.sha256_file

    def flaky(path: Path) -> str:
        if "v0003" in str(path):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(manifest, "sha256_file", flaky)
    report = fsck(reg, repair=True)
    assert reg.versions("bot") == ["v0001", "v0002", "v0003"] and reg.current("bot") == "v0003"
    [finding] = report.remaining
    assert "cannot read" in finding.problem and "not quarantined" in finding.problem
    monkeypatch.undo()
    assert fsck(reg).findings == []  # the storage recovered: nothing was lost


def test_repair_keeps_history_entries_appended_while_it_rewrites(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: canary and gate entries were appended without the name's lock, so the
    history rewrite of `fsck --repair` dropped those written meanwhile."""
    import threading
    import time

    path = reg.name_dir("bot") / "history.jsonl"
    path.write_bytes(path.read_bytes() + b"{torn\n")
    real_replace = os.replace
    writer: list[threading.Thread] = []

    def replace(src: object, dst: object) -> None:
        if str(dst).endswith("history.jsonl") and not writer:
            t = threading.Thread(target=reg.log_event, args=("bot", "gate"), kwargs={"n": 1})
            writer.append(t)
            t.start()
            time.sleep(0.3)  # an unlocked appender would write now, into the old file
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    assert fsck(reg, repair=True).ok
    writer[0].join(10)
    assert [e["action"] for e in reg.history("bot")][-1] == "gate"


def test_the_history_rewrite_is_fsynced_before_it_replaces_the_file(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = reg.name_dir("bot") / "history.jsonl"
    path.write_bytes(path.read_bytes() + b"{torn\n")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert fsck(reg, repair=True).ok
    assert any(".history.jsonl." in p and p.endswith(".tmp") for p in synced), synced
    assert str(reg.name_dir("bot")) in synced  # and the rename itself


def test_a_read_only_check_does_not_make_a_rollback_wait(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: a read-only fsck held the writer lock while it hashed every version, so a
    rollback waited for it."""
    import threading

    from agent_finetune.registry import manifest

    hashing, release = threading.Event(), threading.Event()
    real = manifest.sha256_file

    def slow(p: Path) -> str:
        if threading.current_thread().name == "fsck":  # the rollback verifies too: not it
            hashing.set()
            release.wait(20)
        return real(p)

    monkeypatch.setattr(manifest, "sha256_file", slow)
    check = threading.Thread(target=fsck, args=(reg,), name="fsck")
    check.start()
    try:
        assert hashing.wait(10)
        done = threading.Event()
        roll = threading.Thread(target=lambda: (reg.rollback("bot"), done.set()))
        roll.start()
        assert done.wait(5), "rollback waited for a read-only fsck"
    finally:
        release.set()
        check.join(30)
    assert reg.current("bot") == "v0002"


# -- canary crash windows ------------------------------------------------------------------------
def test_a_canary_start_without_its_history_entry_is_recorded(reg: Registry) -> None:
    from agent_finetune.registry.canary_state import read_canary, start_canary

    path = reg.name_dir("bot") / "history.jsonl"
    before = path.read_bytes()
    c = start_canary(reg, "bot", "v0002", weight=10)
    path.write_bytes(before)  # the writer died between the canary file and its log line
    assert any("no canary_start entry" in p for p in problems(reg))
    repair_then_clean(reg)
    assert reg.history("bot")[-1]["canary_id"] == c.id and read_canary(reg, "bot") == c


def test_a_canary_end_without_its_history_entry_is_recorded(reg: Registry) -> None:
    from agent_finetune.registry.canary_state import start_canary

    c = start_canary(reg, "bot", "v0002", weight=10)
    (reg.name_dir("bot") / "canary").unlink()  # ended, and the writer died before logging
    assert any(f"canary {c.id} ended without a history entry" in p for p in problems(reg))
    repair_then_clean(reg)
    last = reg.history("bot")[-1]
    assert (last["action"], last["canary_id"]) == ("canary_abort", c.id)


@pytest.mark.parametrize("damage", ["current moved", "candidate gone", "unreadable", "ended"])
def test_a_canary_that_cannot_be_sound_is_ended(reg: Registry, damage: str) -> None:
    """A canary promote that died after the move (current is no longer its baseline), a
    candidate removed by hand, a garbled file, a file left after its logged end."""
    import shutil

    from helpers import set_current

    from agent_finetune.registry.canary_state import read_canary, start_canary

    reg.promote("bot", "v0001")
    start_canary(reg, "bot", "v0002", weight=10)
    canary = reg.name_dir("bot") / "canary"
    if damage == "current moved":
        set_current(reg, "bot", "v0003")
    elif damage == "candidate gone":
        shutil.rmtree(reg.version_dir("bot", "v0002"))
    elif damage == "unreadable":
        canary.write_text("{garbage")
    else:
        text = canary.read_text()
        from agent_finetune.registry.canary_state import finish_canary

        finish_canary(reg, "bot", "abort", reason="x")
        canary.write_text(text)
    found = problems(reg)
    assert any(p.startswith("canary:") for p in found), found
    repair_then_clean(reg)
    assert read_canary(reg, "bot") is None
