"""The root scan (registry.root): every entry kind is listed or skipped with a reason, the
same way for every caller, and one bad entry never hides the others."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_finetune.registry.root import inside_root, scan_root

KINDS = ("published", "folder", "file", "bad-name", "dot", "link-in", "link-out", "dangling")


def make(root: Path, outside: Path, i: int, kind: str) -> str | None:
    """Create entry ``i`` of ``kind``; return its name when a ``published`` scan lists it."""
    name = f"n{i}"
    if kind == "published":
        (root / name / "versions").mkdir(parents=True)
        return name
    if kind == "folder":
        (root / name).mkdir()
    elif kind == "file":
        (root / name).write_text("x")
    elif kind == "bad-name":
        (root / f"bad name {i}").mkdir()
    elif kind == "dot":
        (root / f".n{i}").mkdir()
    elif kind == "link-in":
        (root / f"t{i}" / "versions").mkdir(parents=True)
        os.symlink(root / f"t{i}", root / name)
        return name
    elif kind == "link-out":
        (outside / name / "versions").mkdir(parents=True)
        os.symlink(outside / name, root / name)
    elif kind == "dangling":
        os.symlink(root / "nowhere", root / name)
    return None


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kinds=st.lists(st.sampled_from(KINDS), max_size=8))
def test_a_published_scan_lists_exactly_the_published_names_inside_the_root(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str]
) -> None:
    base = tmp_path_factory.mktemp("scan")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    want = sorted(filter(None, (make(root, outside, i, k) for i, k in enumerate(kinds))))
    want += sorted(f"t{i}" for i, k in enumerate(kinds) if k == "link-in")
    names, skipped = scan_root(root)
    assert sorted(names) == sorted(want)
    assert len([p for p in skipped if "symlink out" in p]) == kinds.count("link-out")
    assert len([p for p in skipped if "not a valid adapter name" in p]) == kinds.count("bad-name")


def test_a_missing_root_is_empty_and_inside_root_follows_symlinks(tmp_path: Path) -> None:
    assert scan_root(tmp_path / "gone") == ([], [])
    (tmp_path / "out").mkdir()
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "out", tmp_path / "root" / "a")
    assert not inside_root(tmp_path / "root", tmp_path / "root" / "a")
    assert inside_root(tmp_path / "root", tmp_path / "root" / "b")
