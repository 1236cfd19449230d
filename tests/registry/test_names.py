"""The name grammar: ASCII only, whole string (the old `^...$` + `match` patterns accepted a
trailing newline, and `\\d` without re.ASCII accepted any Unicode digit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_finetune.registry import Registry
from agent_finetune.registry.names import is_name, is_version, split_model
from agent_finetune.training.numpy_adapter import write_adapter


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.mark.parametrize("name", ["evil\n", "bot\n", "a\r"])
def test_names_reject_a_trailing_newline(name: str) -> None:
    assert not is_name(name)


@pytest.mark.parametrize(
    "version",
    ["v0001\n", "v٠٠٠١", "v０００１", "v0001\u0663", "v१२३४"],
)
def test_versions_reject_a_trailing_newline_and_non_ascii_digits(version: str) -> None:
    assert not is_version(version)
    assert split_model(f"bot@{version}") is None


def test_publish_refuses_a_name_with_a_newline(reg: Registry, tmp_path: Path) -> None:
    from agent_finetune.errors import InvalidNameError

    with pytest.raises(InvalidNameError):
        reg.publish("evil\n", write_adapter(tmp_path / "c", layers=1))
    assert not reg.root.exists() or not any("\n" in p.name for p in reg.root.iterdir())
