from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FAKE_BASE_CONFIG, TINY_CONFIG, write_adapter

from agent_finetune.registry.adapter import read_safetensors_header, validate_adapter


def test_good_adapter_passes_with_shapes(tmp_path: Path) -> None:
    a = write_adapter(
        tmp_path / "a",
        modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    report = validate_adapter(a, max_rank=16, base_model="tiny-base", base_config=TINY_CONFIG)
    assert report.ok, report.problems
    assert report.rank == 4 and len(report.target_modules) == 7


@pytest.mark.parametrize(
    "kwargs, limits, fragment",
    [
        ({"r": 32}, {"max_rank": 16}, "exceeds the server's --max-lora-rank 16"),
        ({"extra_config": {"modules_to_save": ["lm_head"]}}, {}, "modules_to_save"),
        ({"extra_config": {"use_dora": True}}, {}, "DoRA"),
        ({"modules": ["q_proj", "embed_tokens"]}, {}, "'embed_tokens' cannot be served"),
        ({"modules": ["lm_head"]}, {}, "'lm_head' cannot be served"),
        (
            {"extra_tensors": {"base_model.model.lm_head.weight": (8, 8)}},
            {},
            "not a LoRA A/B weight",
        ),
        (
            {"base_config": FAKE_BASE_CONFIG},
            {"base_config": TINY_CONFIG},
            "does not fit the base model",
        ),
        ({"base_model": "other/model"}, {"base_model": "tiny-base"}, "does not match the served"),
        ({"extra_config": {"peft_type": "IA3"}}, {}, "only LORA"),
    ],
)
def test_unservable_adapters_are_rejected(
    tmp_path: Path, kwargs: dict[str, object], limits: dict[str, object], fragment: str
) -> None:
    a = write_adapter(tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    report = validate_adapter(a, **limits)  # type: ignore[arg-type]
    assert not report.ok
    assert any(fragment in p for p in report.problems), report.problems


def test_truncated_and_missing_weights(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a")
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    assert any("truncated" in p for p in validate_adapter(a).problems)
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors_header(w)
    w.unlink()
    assert any("missing" in p for p in validate_adapter(a).problems)


def test_missing_or_bad_config(tmp_path: Path) -> None:
    assert "not a folder" in validate_adapter(tmp_path / "nope").problems[0]
    a = write_adapter(tmp_path / "a")
    (a / "adapter_config.json").write_text("{bad", encoding="utf-8")
    assert "invalid JSON" in validate_adapter(a).problems[0]
    (a / "adapter_config.json").unlink()
    assert "missing" in validate_adapter(a).problems[0]


def test_rank_mismatch_between_config_and_tensors(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a", r=4)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = 8
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert any("does not match rank" in p for p in validate_adapter(a).problems)
