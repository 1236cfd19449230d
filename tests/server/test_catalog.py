"""The registry as the loop last saw it (``server_plugin.catalog``): what requests ask about
the registry is answered without scanning it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import fake_adapter

from agent_finetune.registry import Registry
from agent_finetune.registry.index import pointers
from server_plugin.catalog import Catalog


def aged(registry: Registry, name: str) -> None:
    """Date a name's versions/ folder back past the racy window (as any folder not written
    in the last seconds)."""
    old = time.time() - 60
    os.utime(registry.name_dir(name) / "versions", (old, old))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.publish("x", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("x", fake_adapter(tmp_path / "a2", seed=2), make_current=False)
    registry.publish("y", fake_adapter(tmp_path / "a3", seed=3))
    return registry


def counting(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    listed: list[str] = []
    real = registry.versions
    monkeypatch.setattr(registry, "versions", lambda n: listed.append(n) or real(n))
    return listed


def test_a_names_versions_are_read_once_per_change_of_its_folder(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aged(registry, "x")
    catalog = Catalog(registry)
    catalog.update(pointers(registry))
    listed = counting(registry, monkeypatch)
    assert catalog.names() == ["x", "y"] and catalog.current("x") == "v0001"
    for _ in range(5):
        assert catalog.versions("x") == ["v0001", "v0002"]
        assert catalog.versions("nobody") == [] and not catalog.knows("nobody")
    assert listed == ["x"]
    registry.publish("x", fake_adapter(tmp_path / "a4", seed=4), make_current=False)
    aged(registry, "x")
    listed.clear()
    assert catalog.versions("x") == ["v0001", "v0002"]  # as of the last pass
    catalog.update(pointers(registry))  # the next pass (a watcher event wakes it)
    assert catalog.versions("x") == ["v0001", "v0002", "v0003"]
    assert listed == ["x"]


def test_a_folder_changed_within_the_racy_window_is_read_again(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two publishes in one mtime tick leave one stamp: a young stamp is never trusted."""
    catalog = Catalog(registry)
    catalog.update(pointers(registry))
    listed = counting(registry, monkeypatch)
    catalog.versions("x")
    catalog.versions("x")
    assert listed == ["x", "x"]


def test_names_that_left_are_forgotten(registry: Registry, tmp_path: Path) -> None:
    catalog = Catalog(registry)
    catalog.update(pointers(registry))
    catalog.versions("y")
    (registry.name_dir("y")).rename(tmp_path / "y-away")
    catalog.update(pointers(registry))
    assert catalog.names() == ["x"] and catalog.versions("y") == [] and not catalog.knows("y")
