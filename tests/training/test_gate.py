"""The promotion gate offline (PEFT on the base model): what CI runs without vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_finetune.cli.app import EXIT_REFUSED, main
from agent_finetune.registry import Registry
from agent_finetune.registry.eval_records import read_evals
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.gate import gate
from agent_finetune.training.tiny_model import random_adapter
from agent_finetune.training.train import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "agent_finetune" / "assets"


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    data = json.loads((ASSETS / "support_heldout.json").read_text(encoding="utf-8"))[:5]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_offline_gate_refuses_a_twin_and_promotes_past_a_low_bar(
    tiny_model: Path, tmp_path: Path, rows: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path / "registry")
    src = random_adapter(tiny_model, tmp_path / "a", seed=1)
    reg.publish("bot", src)
    twin = reg.publish("bot", src, make_current=False).version

    result = gate(reg, "bot", twin, rows)
    assert not result.promoted and result.comparison is not None
    assert result.comparison.ties == 5 and result.comparison.delta == 0
    assert reg.current("bot") == "v0001"
    assert reg.history("bot")[-1]["decision"] == "refuse"
    assert {e["version"] for e in read_evals(reg, "bot")} == {"v0001", twin}
    assert "offline" in read_evals(reg, "bot")[0]["via"]

    # The CLI: a refusal exits 3 and prints the table; f1 needs generated answers.
    args = ["promote", f"bot@{twin}", "--if-better", "--data", str(rows), "--metric", "f1"]
    assert main([*args, "--registry", str(reg.root), "--max-tokens", "4"]) == EXIT_REFUSED
    out = capsys.readouterr().out
    assert "REFUSED" in out and "f1" in out and "exact" in out

    other = reg.publish(
        "bot", random_adapter(tiny_model, tmp_path / "b", seed=2), make_current=False
    )
    assert gate(reg, "bot", other.version, rows, min_delta=-1000).promoted
    assert reg.current("bot") == other.version


def test_train_with_if_better_publishes_then_gates(
    tiny_model: Path, tmp_path: Path, rows: Path
) -> None:
    def run(tag: str) -> object:
        cfg = FineTuningConfig.from_yaml(
            ASSETS / "tiny-cpu.yaml",
            model_name=str(tiny_model),
            output_dir=str(tmp_path / tag),
            registry_dir=str(tmp_path / "registry"),
            adapter_name="bot",
            max_steps=2,
            promotion={"policy": "if_better", "eval_data": str(rows)},
        )
        return train(cfg, ASSETS / "support_v1.json", train_test_split=0.0)

    first = run("one")
    assert first.gate.promoted and first.gate.live is None  # type: ignore[attr-defined]
    second = run("two")  # the same seed and data: the same weights, so not better
    assert second.published.version == "v0002"  # type: ignore[attr-defined]
    assert not second.gate.promoted  # type: ignore[attr-defined]
    reg = Registry(tmp_path / "registry")
    assert reg.current("bot") == "v0001"
    assert [e["action"] for e in reg.history("bot")] == [
        "publish",
        "gate",
        "promote",
        "publish",
        "gate",
    ]


def test_promotion_block_is_validated() -> None:
    from agent_finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_data"):
        FineTuningConfig.from_dict({"promotion": {"policy": "if_better"}})
    with pytest.raises(ConfigError, match="did you mean 'policy'"):
        FineTuningConfig.from_dict({"promotion": {"polcy": "never"}})
