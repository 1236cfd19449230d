"""Fixtures of the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry folder (not created yet) named by $AGENT_FINETUNE_REGISTRY."""
    registry = tmp_path / "registry"
    monkeypatch.setenv("AGENT_FINETUNE_REGISTRY", str(registry))
    return registry
