"""Build PEFT-format adapter folders without torch (numpy + safetensors), for fast tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

# Shapes of tests' tiny model: hidden 128, 4 heads x 32, 2 kv heads, intermediate 256.
TINY_SHAPES = {
    "q_proj": (128, 128),
    "k_proj": (128, 64),
    "v_proj": (128, 64),
    "o_proj": (128, 128),
    "gate_proj": (128, 256),
    "up_proj": (128, 256),
    "down_proj": (256, 128),
}
TINY_CONFIG = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
}


def make_adapter(
    folder: Path,
    *,
    r: int = 4,
    modules: Iterable[str] = ("q_proj", "v_proj"),
    layers: int = 2,
    base_model: str = "tiny-base",
    shapes: dict[str, tuple[int, int]] = TINY_SHAPES,
    extra_config: dict[str, Any] | None = None,
    extra_tensors: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            in_f, out_f = shapes.get(m, (128, 128))
            group = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, in_f)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, r)).astype(np.float32)
    for name, shape in (extra_tensors or {}).items():
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted(modules),
        "base_model_name_or_path": base_model,
        "modules_to_save": None,
        "use_dora": False,
        "bias": "none",
    }
    config.update(extra_config or {})
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
