"""The promotion gate: its rules with scores given (fast), and offline with PEFT on the base
model (slow): what CI runs without vLLM."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agent_finetune.cli.app import EXIT_REFUSED, main
from agent_finetune.registry import Registry
from agent_finetune.registry.eval_records import read_evals
from agent_finetune.training.config import FineTuningConfig
from agent_finetune.training.gate import gate
from agent_finetune.training.tiny_model import random_adapter
from agent_finetune.training.train import train

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "agent_finetune" / "assets"


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    data = json.loads((ASSETS / "support_heldout.json").read_text(encoding="utf-8"))[:10]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_offline_gate_refuses_a_twin_and_promotes_past_a_low_bar(
    tiny_model: Path, tmp_path: Path, rows: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path / "registry")
    src = random_adapter(tiny_model, tmp_path / "a", seed=1)
    reg.publish("bot", src)
    twin = reg.publish("bot", src, make_current=False).version

    result = gate(reg, "bot", twin, rows)
    assert not result.promoted and result.comparison is not None
    assert result.comparison.ties == 10 and result.comparison.delta == 0
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


@pytest.mark.slow
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
    # The first promotion's gate decision is written with its move, in one entry.
    assert [e["action"] for e in reg.history("bot")] == ["publish", "promote", "publish", "gate"]
    assert reg.history("bot")[1]["gate"]["decision"] == "promote"


def test_promotion_block_is_validated() -> None:
    from agent_finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_data"):
        FineTuningConfig.from_dict({"promotion": {"policy": "if_better"}})
    with pytest.raises(ConfigError, match="did you mean 'policy'"):
        FineTuningConfig.from_dict({"promotion": {"polcy": "never"}})


# -- the gate's rules, with the scores given (no model) -------------------------------------------
class Scores:
    """An ``evaluate_offline`` that gives each version fixed per-row log-likelihoods, and
    may run ``during`` (an operator's move) while "evaluating"."""

    def __init__(self, by_version: dict[str, list[float]], during: Any = None) -> None:
        self.by_version, self.during = by_version, during

    def __call__(self, base: str, folders: dict[str, Path], examples: Any, **_: Any) -> Any:
        from agent_finetune.training.evaluate import EvalResult

        if self.during is not None:
            self.during()
        return {v: EvalResult(v, {"loglik": list(self.by_version[v])}) for v in folders}


def rows_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "heldout.json"
    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(n)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture
def reg3(tmp_path: Path) -> Registry:
    from helpers import registry_with_versions

    return registry_with_versions(tmp_path, "bot", 3)


def use(monkeypatch: pytest.MonkeyPatch, scores: Scores) -> None:
    import agent_finetune.training.gate as gate_module

    monkeypatch.setattr(gate_module, "evaluate_offline", scores)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.tuples(st.floats(-5, 0), st.floats(-2, 2)), min_size=10, max_size=30),
    where=st.integers(0, 29),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_a_non_finite_row_never_promotes(
    rows: list[tuple[float, float]], where: int, bad: float
) -> None:
    """Finding: a NaN row made the bootstrap's sort arbitrary: of 300 random candidates the
    finite rows refuse, 51 were promoted on 98b54db after one row became NaN (20 of them
    worse on average)."""
    from agent_finetune.training.evaluate import EvalResult, compare_scores, is_better
    from agent_finetune.training.gate import decide

    live = [x for x, _ in rows]
    candidate = [x + d for x, d in rows]
    assume(not is_better(compare_scores(candidate, live)))  # the finite rows refuse it
    candidate[where % len(candidate)] = bad
    results = {"c": EvalResult("c", {"loglik": candidate}), "l": EvalResult("l", {"loglik": live})}
    promoted, reason, _ = decide(results, "c", "l", "loglik", 0.0, 0)
    assert not promoted and "non-finite" in reason


def test_non_finite_scores_are_refused_by_name(
    reg3: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, Scores({"v0002": [0.0] * 9 + [math.nan], "v0001": [-1.0] * 10}))
    result = gate(reg3, "bot", "v0002", rows_file(tmp_path, 10))
    assert not result.promoted and "v0002 rows [10]" in result.reason
    assert reg3.current("bot") == "v0001" and reg3.history("bot")[-1]["decision"] == "refuse"


def test_the_gate_needs_a_minimum_of_held_out_rows(
    reg3: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: the gate promoted on one held-out row."""
    from agent_finetune.errors import EvalError

    use(monkeypatch, Scores({"v0002": [0.0], "v0001": [-1.0]}))
    with pytest.raises(EvalError, match="at least 10"):
        gate(reg3, "bot", "v0002", rows_file(tmp_path, 1))
    assert reg3.current("bot") == "v0001"
    use(monkeypatch, Scores({"v0002": [0.0] * 3, "v0001": [-1.0] * 3}))
    assert gate(reg3, "bot", "v0002", rows_file(tmp_path, 3), min_rows=3).promoted


def test_the_gate_promotes_only_if_live_is_still_current(
    reg3: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: the gate read live before a minutes-long eval and promoted without looking
    again: an operator's hotfix meanwhile was overwritten."""
    from agent_finetune.errors import CurrentMovedError

    hotfix = lambda: reg3.promote("bot", "v0003", reason="hotfix")  # noqa: E731
    use(monkeypatch, Scores({"v0002": [0.0] * 10, "v0001": [-1.0] * 10}, during=hotfix))
    with pytest.raises(CurrentMovedError, match="current is v0003, not v0001"):
        gate(reg3, "bot", "v0002", rows_file(tmp_path, 10))
    assert reg3.current("bot") == "v0003"
    last = reg3.history("bot")[-1]
    assert last["action"] == "gate" and last["decision"] == "stale"


def test_a_gate_promotion_is_one_history_entry_with_its_move(
    reg3: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: the `gate: promote` entry was written before the move (a crash between them
    logged a promotion that never happened)."""
    use(monkeypatch, Scores({"v0002": [0.0] * 10, "v0001": [-1.0] * 10}))
    before = len(reg3.history("bot"))
    assert gate(reg3, "bot", "v0002", rows_file(tmp_path, 10)).promoted
    [move] = reg3.history("bot")[before:]
    assert (move["action"], move["from"], move["to"]) == ("promote", "v0001", "v0002")
    assert move["gate"]["decision"] == "promote" and move["gate"]["comparison"]["rows"] == 10
    assert move["reason"].startswith("gate: loglik")


@pytest.mark.parametrize("decision", ["promote", "refuse"])
def test_a_gate_decision_about_the_canarys_version_ends_the_canary_first(
    reg3: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decision: str
) -> None:
    from agent_finetune.registry.canary_state import read_canary, start_canary

    c = start_canary(reg3, "bot", "v0002", weight=50, auto_promote=True)
    good = [0.0] * 10 if decision == "promote" else [-2.0] * 10
    use(monkeypatch, Scores({"v0002": good, "v0001": [-1.0] * 10}))
    assert gate(reg3, "bot", "v0002", rows_file(tmp_path, 10)).promoted == (decision == "promote")
    assert read_canary(reg3, "bot") is None
    end, last = reg3.history("bot")[-2:]
    assert end["action"] == "canary_abort" and end["canary_id"] == c.id
    assert "superseded" in end["reason"]
    assert last["action"] == ("promote" if decision == "promote" else "gate")
