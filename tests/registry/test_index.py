"""The listing index: as true as the folders, and used only while provably fresh."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent_finetune.registry import Registry, index
from agent_finetune.registry.eval_records import append_eval, latest_eval
from agent_finetune.registry.index import INDEX, listing
from agent_finetune.training.numpy_adapter import write_adapter


def truth(reg: Registry) -> list[tuple[str, str, bool, object]]:
    return [(i.name, i.version, i.current, i.manifest.get("created_at")) for i in reg.entries()]


def seen(reg: Registry) -> list[tuple[str, str, bool, object]]:
    return [(i.name, i.version, i.current, i.manifest.get("created_at")) for i in listing(reg)]


def age(reg: Registry, seconds: float) -> None:
    """Make every folder's change look ``seconds`` old (past the racy window)."""
    past = time.time() - seconds
    for name in reg.names():
        for p in ("versions", "current", "evals.jsonl"):
            if (reg.name_dir(name) / p).exists():
                os.utime(reg.name_dir(name) / p, (past, past))


def test_listing_matches_the_folders_through_every_change(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    src = write_adapter(tmp_path / "a")
    for name in ("b", "a", "c"):
        reg.publish(name, src)
    assert seen(reg) == truth(reg) and (reg.root / INDEX).is_file()
    age(reg, 60)
    assert seen(reg) == truth(reg)  # written again with old stamps: now trusted
    reg.publish("a", src)  # new version folder: versions/ stamp changes
    assert seen(reg) == truth(reg)
    reg.rollback("a")  # pointer only: current's stamp changes
    assert seen(reg) == truth(reg)
    reg.publish("a", src)
    reg.publish("a", src)
    age(reg, 60)
    seen(reg)
    reg.gc("a", keep=1)
    assert seen(reg) == truth(reg)
    (reg.root / INDEX).write_text("{not json")  # a broken index is rebuilt
    assert seen(reg) == truth(reg)
    (reg.root / INDEX).unlink()
    assert seen(reg) == truth(reg)


def test_a_fresh_entry_is_used_and_a_racy_one_is_not(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.publish("x", write_adapter(tmp_path / "a"))
    age(reg, 60)
    seen(reg)  # index written, entries older than the racy window
    manifest = reg.version_dir("x", "v0001") / "manifest.json"
    data = json.loads(manifest.read_text())
    data["created_at"] = "edited in place"  # never done by agent-finetune: proves the source
    manifest.write_text(json.dumps(data))
    assert seen(reg)[0][3] != "edited in place"  # served from the index
    # Same stamps, but the index written within the racy window after the last change:
    # an equal mtime could hide a second change in that tick, so the name is re-read.
    index = json.loads((reg.root / INDEX).read_text())
    index["written_ns"] = max(s[1] for s in index["names"]["x"]["stamps"] if s) + 10**9
    (reg.root / INDEX).write_text(json.dumps(index))
    assert seen(reg)[0][3] == "edited in place"


def test_a_read_only_root_still_lists(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.publish("x", write_adapter(tmp_path / "a"))
    os.chmod(reg.root, 0o555)
    try:
        assert seen(reg) == truth(reg)
    finally:
        os.chmod(reg.root, 0o755)


def test_a_symlink_out_of_the_root_is_not_listed(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.publish("x", write_adapter(tmp_path / "a"))
    other = Registry(tmp_path / "other")
    other.publish("y", write_adapter(tmp_path / "b"))
    (reg.root / "y").symlink_to(other.name_dir("y"))
    assert [i.name for i in listing(reg)] == ["x"]


def test_pointer_scan_agrees_with_the_registry_and_rereads_what_changed(tmp_path: Path) -> None:
    from agent_finetune.registry.index import pointers

    reg = Registry(tmp_path / "registry")
    src = write_adapter(tmp_path / "a")
    for name in ("a", "b", "c", "d"):
        reg.publish(name, src)
    reg.publish("b", src, make_current=False)
    (reg.name_dir("c") / "current").write_text("{broken")
    (reg.name_dir("d") / "current").unlink()
    (reg.root / "unpublished").mkdir()
    other = Registry(tmp_path / "other")
    other.publish("e", src)
    (reg.root / "e").symlink_to(other.name_dir("e"))

    def expected() -> dict[str, str | None]:
        return {n: reg.current(n) for n in reg.names()}

    memo: dict[str, object] = {}
    found = pointers(reg, memo)  # type: ignore[arg-type]
    assert (
        {n: p.version for n, p in found.items()}
        == expected()
        == {
            "a": "v0001",
            "b": "v0001",
            "c": None,
            "d": None,
        }
    )
    reg.promote("b", "v0002")
    reg.promote("c", "v0001")
    found = pointers(reg, memo)  # type: ignore[arg-type]
    assert {n: p.version for n, p in found.items()} == expected()
    assert found["b"].version == "v0002"
    import shutil

    shutil.rmtree(reg.name_dir("a"))
    assert "a" not in pointers(reg, memo) and "a" not in memo  # type: ignore[arg-type]


def test_each_versions_latest_eval_comes_from_the_index_and_follows_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``list`` showed each row's latest evaluation by opening evals.jsonl per row (436 ms at
    10,000 names); the index keeps it, keyed by the log's stamp."""
    reg = Registry(tmp_path / "registry")
    src = write_adapter(tmp_path / "a")
    reg.publish("x", src)
    reg.publish("x", src)

    def evals() -> dict[str, object]:
        return {i.version: i.eval for i in listing(reg)}

    assert evals() == {"v0001": None, "v0002": None}
    append_eval(reg, "x", {"version": "v0001", "metrics": {"score": 0.1}})
    append_eval(reg, "x", {"version": "v0001", "metrics": {"score": 0.3}})
    age(reg, 60)
    assert evals() == {"v0001": latest_eval(reg, "x", "v0001"), "v0002": None}
    assert evals()["v0001"]["metrics"] == {"score": 0.3}  # type: ignore[index]
    append_eval(reg, "x", {"version": "v0002", "metrics": {"score": 0.5}})  # the log's stamp moves
    assert evals() == {v: latest_eval(reg, "x", v) for v in ("v0001", "v0002")}
    age(reg, 60)
    seen(reg)
    reads: list[str] = []
    monkeypatch.setattr(index, "read_evals", lambda r, n: reads.append(n) or [])
    assert evals()["v0002"] is not None  # a fresh entry: served from the index
    assert reads == []
