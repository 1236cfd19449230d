from __future__ import annotations

from pathlib import Path

import pytest

from agent_finetune.errors import ConfigError
from agent_finetune.training.config import FineTuningConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEED_FIELDS = [
    "model_name",
    "output_dir",
    "max_seq_length",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "batch_size",
    "num_train_epochs",
    "save_steps",
    "logging_steps",
    "eval_steps",
    "fp16",
    "bf16",
    "use_wandb",
    "wandb_project",
    "wandb_run_name",
]


def test_seed_fields_exist_with_defaults_and_descriptions() -> None:
    fields = FineTuningConfig.model_fields
    for name in SEED_FIELDS:
        assert name in fields, name
    for name, info in fields.items():
        assert info.description, f"{name} has no description"
    FineTuningConfig()  # every field has a default


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    if path.name == "agent.yaml":
        from agent_finetune.cli.agent_config import AgentConfig

        AgentConfig.from_yaml(path)
    else:
        FineTuningConfig.from_yaml(path)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = FineTuningConfig(model_name="m", lora_r=8, template_vars={"domain": "医疗"})
    path = cfg.to_yaml(tmp_path / "c.yaml")
    assert FineTuningConfig.from_yaml(path) == cfg
    assert "医疗" in path.read_text(encoding="utf-8")


def test_mistyped_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model_name: m\nlora_rank: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        FineTuningConfig.from_yaml(path)
    msg = str(e.value)
    assert "lora_rank" in msg and str(path) in msg and "lora_r" in msg


def test_bad_value_names_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: -1\nbackend: tpu\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        FineTuningConfig.from_yaml(path)
    assert "learning_rate" in str(e.value) and "-1" in str(e.value)
    assert "backend" in str(e.value) and "tpu" in str(e.value)


def test_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\n", encoding="utf-8")
    assert FineTuningConfig.from_yaml(path, lora_r=4).lora_r == 4


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"fp16": True, "bf16": True}, "fp16 and bf16"),
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"use_wandb": True}, "wandb_project"),
    ],
)
def test_cross_field_rules(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        FineTuningConfig.from_dict(kwargs)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        FineTuningConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        FineTuningConfig.from_yaml(bad)


def test_lr_scheduler_names_are_transformers_schedulers() -> None:
    from typing import get_args

    from transformers import SchedulerType

    from agent_finetune.training.config import LrScheduler

    assert set(get_args(LrScheduler)) <= {s.value for s in SchedulerType}


def test_misspelled_lr_scheduler_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr_scheduler_type: cosin\n")
    with pytest.raises(ConfigError, match="lr_scheduler_type") as e:
        FineTuningConfig.from_yaml(cfg)
    assert "cosine" in str(e.value) and str(cfg) in str(e.value)
