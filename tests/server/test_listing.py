"""``/v1/models`` made readable (``server_plugin.listing``): names and versions linked, every
pinnable version listed, from the catalog (no registry scan per call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import fake_adapter

from agent_finetune.registry import Registry
from agent_finetune.registry.index import pointers
from server_plugin.catalog import Catalog
from server_plugin.listing import OWNER, annotate_cards


def test_cards_link_names_and_versions_and_list_unloaded_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding (issue 25): every /v1/models call listed every name's versions folder
    (470 ms at 10,000 names)."""
    registry = Registry(tmp_path / "registry")
    registry.publish("bot", fake_adapter(tmp_path / "a1", seed=1))
    registry.publish("bot", fake_adapter(tmp_path / "a2", seed=2))
    catalog = Catalog(registry)
    catalog.update(pointers(registry))

    def no_scan(*args: Any) -> Any:
        raise AssertionError("a request scanned the registry root")

    monkeypatch.setattr(registry, "names", no_scan)
    cards = [
        {"id": "base", "root": "/m", "parent": None},
        {"id": "bot@v0002", "root": "/c/2", "parent": "base"},
        {"id": "bot", "root": "/c/2", "parent": "base"},
    ]
    served_as = {"bot@v0002": "bot@v0002", "bot": "bot@v0002"}
    out = {c["id"]: c for c in annotate_cards(cards, served_as, catalog, "base")}
    assert out["bot"]["version"] == "bot@v0002"
    assert out["bot@v0002"]["aliases"] == ["bot"] and out["bot@v0002"]["loaded"] is True
    assert out["bot@v0001"]["loaded"] is False and out["bot@v0001"]["owned_by"] == OWNER
    assert out["bot@v0001"]["parent"] == "base"
    assert annotate_cards(cards, served_as, None, "base") == [
        *cards[:1],
        {**cards[1], "aliases": ["bot"], "loaded": True},
        {**cards[2], "version": "bot@v0002"},
    ]
