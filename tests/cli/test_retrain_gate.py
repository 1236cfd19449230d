"""`retrain --canary`: the gate's verdict starts a guarded canary of the winner, or refuses
(offline evaluation with PEFT on the tiny model; no training, no server)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from agent_finetune.cli.retrain import _gate_step
from agent_finetune.registry import Registry
from agent_finetune.registry.canary_state import read_canary
from agent_finetune.training.tiny_model import random_adapter

ASSETS = Path(__file__).resolve().parents[2] / "agent_finetune" / "assets"
pytestmark = pytest.mark.slow


def _args(**kw: object) -> argparse.Namespace:
    base = {
        "name": "bot",
        "canary": 10.0,
        "canary_duration": "5m",
        "metric": None,
        "server": None,
        "min_rows": 10,
        "json": True,
    }
    return argparse.Namespace(**{**base, **kw})


def test_a_winner_is_canaried_and_a_loser_refused(tiny_model: Path, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    reg.publish("bot", random_adapter(tiny_model, tmp_path / "a", seed=1))
    candidate = reg.publish(
        "bot", random_adapter(tiny_model, tmp_path / "b", seed=2), make_current=False
    ).version
    heldout = tmp_path / "heldout.json"
    shutil.copy(ASSETS / "support_heldout.json", heldout)

    refused = _gate_step(_args(), reg, candidate, heldout, str(tiny_model), {"min_delta": 1e6})
    assert not refused["promoted"] and not refused.get("canary")
    assert reg.history("bot")[-1]["decision"] == "refuse" and read_canary(reg, "bot") is None

    won = _gate_step(_args(), reg, candidate, heldout, str(tiny_model), {"min_delta": -1e6})
    canary = read_canary(reg, "bot")
    assert won["canary"] == 10.0 and canary is not None
    assert canary.version == candidate and canary.weight == 10.0 and canary.auto_promote
    assert canary.guards.duration_s == 300 and reg.current("bot") == "v0001"
