"""The one home of every serving setting (``server_plugin.settings``): read, checked,
documented from one table (README's copy of it: tests/test_docs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_finetune.errors import ConfigError
from server_plugin.settings import Settings, as_env, spec_of, specs

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_is_documented_once_and_named_like_its_room() -> None:
    envs = [spec.env for _, spec in specs()]
    assert len(envs) == len(set(envs))
    assert all(e.startswith("AGENT_FINETUNE_") for e in envs)
    assert all(spec.help.endswith((".", ")")) for _, spec in specs())


def test_settings_name_the_bad_variable_and_its_flag(tmp_path: Path) -> None:
    s = Settings.from_env({"AGENT_FINETUNE_REGISTRY": str(tmp_path), "AGENT_FINETUNE_POLLING": "1"})
    assert s.polling and s.registry == tmp_path and s.resync_s == 2.0
    with pytest.raises(ConfigError, match="AGENT_FINETUNE_REGISTRY is not set"):
        Settings.from_env({}).registry_root()
    with pytest.raises(ConfigError, match=r"AGENT_FINETUNE_RESYNC_S='soon' \(or --resync\)"):
        Settings.from_env({"AGENT_FINETUNE_RESYNC_S": "soon"})
    with pytest.raises(ConfigError, match="AGENT_FINETUNE_STRICT_BASE='maybe'"):
        Settings.from_env({"AGENT_FINETUNE_STRICT_BASE": "maybe"})
    with pytest.raises(ConfigError, match=r"AGENT_FINETUNE_MAX_LOADS='0': must be >= 1"):
        Settings.from_env({"AGENT_FINETUNE_MAX_LOADS": "0"})
    with pytest.raises(ConfigError, match="AGENT_FINETUNE_PINS='some': expected one of any"):
        Settings.from_env({"AGENT_FINETUNE_PINS": "some"})
    assert Settings.from_env({"AGENT_FINETUNE_POLLING": " "}).polling is False  # empty: unset


def test_defaults_are_the_dataclass_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    assert Settings().cache_root("sidecar").name == "sidecar"
    assert Settings(cache_dir=Path("/c")).cache_root("sidecar") == Path("/c")


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "resync_s": st.floats(0.05, 1e6, allow_nan=False),
            "polling": st.booleans(),
            "max_pinned": st.integers(0, 10_000),
            "strict_base": st.booleans(),
            "cache_max_bytes": st.integers(0, 1 << 50),
            "pins": st.sampled_from(["any", "current"]),
            "preload": st.sampled_from(["auto", "all", "none", "recent:3", "a,b"]),
            "cache_dir": st.just(Path("/srv/cache")),
        },
    )
)
def test_as_env_round_trips(chosen: dict[str, object]) -> None:
    """What `serve` hands to the plugin is what the plugin reads back."""
    read = Settings.from_env(as_env(chosen))
    assert {k: getattr(read, k) for k in chosen} == chosen


def test_every_flag_belongs_to_a_setting() -> None:
    flags = {spec.flag for _, spec in specs() if spec.flag}
    assert flags == {
        "--registry",
        "--cache-dir",
        "--resync",
        "--polling",
        "--max-pinned",
        "--max-staged",
        "--no-strict-base",
        "--preload",
    }
    assert spec_of("strict_base").flag == "--no-strict-base"
