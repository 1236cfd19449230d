"""The replay guard: its config, and the base model's answers generated once and cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_finetune.errors import ConfigError
from agent_finetune.training import replay
from agent_finetune.training.config import FineTuningConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "agent_finetune" / "assets" / "tiny-cpu.yaml"


def test_replay_is_off_by_default_and_on_in_the_shipped_real_config() -> None:
    assert FineTuningConfig().replay.ratio == 0
    real = FineTuningConfig.from_yaml(ROOT / "agent_finetune" / "assets" / "smollm2-135m-cpu.yaml")
    assert real.replay.ratio == 1.0


def test_a_mistyped_replay_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("replay:\n  ration: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'replay.ration'; did you mean 'ratio'"):
        FineTuningConfig.from_yaml(path)
    with pytest.raises(ConfigError, match=r"replay.ratio"):
        FineTuningConfig.from_dict({"replay": {"ratio": -1}})


def test_packaged_prompts_load_and_a_bad_prompts_file_is_named(tmp_path: Path) -> None:
    assert len(replay.load_prompts(None)) >= 16
    bad = tmp_path / "p.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match=r"p.json: expected a non-empty JSON array"):
        replay.load_prompts(str(bad))


def test_base_answers_are_generated_once_per_base_model(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("AGENT_FINETUNE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["How long does shipping take?", "Can I return an item?"]))
    cfg = FineTuningConfig.from_yaml(
        TINY_YAML,
        model_name=str(tiny_model),
        replay={"ratio": 2.0, "max_new_tokens": 200, "prompts": str(prompts)},
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    first = replay.replay_examples(cfg, model, tokenizer, None, n_train=2)
    (cache,) = (tmp_path / "cache" / "replay").glob("*.json")
    answers = json.loads(cache.read_text())
    assert len(answers) == 2  # one per prompt, keyed by the prompt as training renders it
    finished = [a for a in answers.values() if a is not None]
    # ratio 2 x 2 rows: 4 replay rows cycling over the finished answers (none: none used)
    assert len(first) == (4 if finished else 0)
    assert {ex.response for ex in first} == set(finished)

    def no_generation(*args: object, **kw: object) -> None:
        raise AssertionError("the cached answers were generated again")

    monkeypatch.setattr(replay, "_generate", no_generation)
    again = replay.replay_examples(cfg, model, tokenizer, None, n_train=2)
    assert [ex.messages for ex in again] == [ex.messages for ex in first]
    off = FineTuningConfig.from_yaml(TINY_YAML, model_name=str(tiny_model))
    assert replay.replay_examples(off, model, tokenizer, None, n_train=2) == []


def test_the_configs_copy_of_the_real_model_config_is_the_packaged_one() -> None:
    name = "smollm2-135m-cpu.yaml"
    packaged = (ROOT / "agent_finetune" / "assets" / name).read_text()
    assert (ROOT / "configs" / name).read_text() == packaged
