from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FAKE_BASE_CONFIG, edit_config

from agent_finetune.registry.adapter import read_safetensors_header, validate_adapter
from agent_finetune.training.numpy_adapter import TINY_CONFIG, write_adapter


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


# -- validator gaps the old code accepted (issue 9) --------------------------------------------
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_2_LAYERS = {**TINY_CONFIG, "num_hidden_layers": 2}


def _poison(folder: Path, value: float, dtype: str = "float32") -> None:
    from safetensors.numpy import load_file, save_file

    w = folder / "adapter_model.safetensors"
    tensors = {k: v.astype(dtype) for k, v in load_file(str(w)).items()}
    key = sorted(tensors)[0]
    tensors[key].flat[3] = value
    save_file(tensors, str(w))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_weights_are_refused(tmp_path: Path, value: float, dtype: str) -> None:
    a = write_adapter(tmp_path / "a")
    assert validate_adapter(a).ok
    _poison(a, value, dtype)
    problems = validate_adapter(a).problems
    assert any("1 of" in p and "NaN/Inf" in p for p in problems), problems


def test_nan_in_bf16_weights_is_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    a = write_adapter(tmp_path / "a")
    w = a / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(w)).items()}
    save_file(tensors, str(w))
    assert validate_adapter(a).ok
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(w))
    assert any("NaN/Inf" in p for p in validate_adapter(a).problems)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        # a layer the base model does not have
        ({"layers": 3}, "layer 2 does not exist in the base model (2 layers)"),
        # a module path the base model does not have
        (
            {
                "extra_tensors": {
                    "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": (4, 128),
                    "base_model.model.model.layers.0.mlp.q_proj.lora_B.weight": (128, 4),
                }
            },
            "sits under 'mlp'",
        ),
        (
            {
                "extra_tensors": {
                    "base_model.model.model.q_proj.lora_A.weight": (4, 128),
                    "base_model.model.model.q_proj.lora_B.weight": (128, 4),
                }
            },
            "no layers.<index>",
        ),
    ],
)
def test_modules_or_layers_missing_from_the_base_model_are_refused(
    tmp_path: Path, kwargs: dict[str, object], fragment: str
) -> None:
    a = write_adapter(tmp_path / "a", **kwargs)  # type: ignore[arg-type]
    problems = validate_adapter(a, base_config=TINY_2_LAYERS).problems
    assert any(fragment in p for p in problems), problems


def test_a_lora_a_without_its_lora_b_is_refused(tmp_path: Path) -> None:
    a = write_adapter(
        tmp_path / "a",
        extra_tensors={"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": (4, 128)},
    )
    assert any("no lora_B" in p for p in validate_adapter(a).problems)


def test_a_huge_rank_is_refused_without_a_given_maximum(tmp_path: Path) -> None:
    from agent_finetune.registry.adapter import DEFAULT_MAX_RANK

    a = write_adapter(tmp_path / "a", r=DEFAULT_MAX_RANK + 1, layers=1, modules=["q_proj"])
    problems = validate_adapter(a).problems
    assert any(f"exceeds the server's --max-lora-rank {DEFAULT_MAX_RANK}" in p for p in problems)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"lora_alpha": None}, "lora_alpha is missing"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"lora_alpha": "16"}, "lora_alpha='16' is not a number"),
        ({"init_lora_weights": "pissa"}, "PiSSA"),
        ({"init_lora_weights": "olora"}, "PiSSA, OLoRA"),
        ({"lora_bias": True}, "LoRA bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"use_qalora": True}, "QALoRA"),
        ({"alora_invocation_tokens": [1, 2]}, "Activated LoRA"),
        ({"rank_pattern": {"q_proj": 0}}, "expected a positive integer"),
        ({"rank_pattern": {"(": 4}}, "not a valid pattern"),
        ({"alpha_pattern": {"q_proj": "x"}}, "expected a number"),
        ({"rank_pattern": {"q_proj": 64}}, "rank_pattern"),  # > max_rank 16
    ],
)
def test_options_vllm_refuses_are_refused_with_the_reason(
    tmp_path: Path, change: dict[str, object], fragment: str
) -> None:
    a = write_adapter(tmp_path / "a")
    cfg = json.loads((a / "adapter_config.json").read_text())
    for key, value in change.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    problems = validate_adapter(a, max_rank=16).problems
    assert any(fragment in p for p in problems), problems


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva"])
def test_plain_inits_are_accepted(tmp_path: Path, init: object) -> None:
    a = write_adapter(tmp_path / "a", extra_config={"init_lora_weights": init})
    assert validate_adapter(a).ok


def _per_module_rank_adapter(folder: Path, r: int, q_rank: int) -> Path:
    """r for v_proj, ``q_rank`` for q_proj (PEFT's rank_pattern), as PEFT saves it."""
    import numpy as np
    from safetensors.numpy import save_file

    write_adapter(folder, r=r, layers=1)
    rng = np.random.default_rng(0)
    p = "base_model.model.model.layers.0.self_attn"
    tensors = {
        f"{p}.q_proj.lora_A.weight": rng.standard_normal((q_rank, 128)).astype(np.float32),
        f"{p}.q_proj.lora_B.weight": rng.standard_normal((128, q_rank)).astype(np.float32),
        f"{p}.v_proj.lora_A.weight": rng.standard_normal((r, 128)).astype(np.float32),
        f"{p}.v_proj.lora_B.weight": rng.standard_normal((64, r)).astype(np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    edit_config(folder, rank_pattern={"q_proj": q_rank}, alpha_pattern={"q_proj": 2.0 * q_rank})
    return folder


def test_rank_and_alpha_patterns_are_accepted_and_checked(tmp_path: Path) -> None:
    a = _per_module_rank_adapter(tmp_path / "a", r=4, q_rank=8)
    report = validate_adapter(a, max_rank=8, base_config=TINY_CONFIG)
    assert report.ok, report.problems
    # The per-module rank counts against the server's maximum.
    problems = validate_adapter(a, max_rank=4).problems
    assert any("rank_pattern" in p and "=8 exceeds" in p for p in problems), problems
    # A tensor whose rank matches neither pattern nor r is still caught.
    edit_config(a, rank_pattern={"q_proj": 6})
    assert any("does not match rank r=6" in p for p in validate_adapter(a).problems)
