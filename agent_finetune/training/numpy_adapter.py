"""Random PEFT LoRA adapter folders written with numpy: no torch, no model, seconds.

Tests and benchmarks use them where the weights' values do not matter (registry and server
checks, load timings at a real model's shapes, e.g. a 7B-shaped r=16 adapter of ~81 MB).
Adapters that a real vLLM must answer with come from ``tiny_model.random_adapter``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from agent_finetune.registry.adapter import linear_shapes

# The tiny test model's widths (``tiny_model.build_tiny_model``'s defaults): hidden 128,
# 4 heads x 32, 2 kv heads, intermediate 256.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
}

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapter(
    folder: Path,
    *,
    r: int = 4,
    modules: Iterable[str] = ("q_proj", "v_proj"),
    layers: int = 2,
    base_model: str = "tiny-base",
    base_config: dict[str, Any] = TINY_CONFIG,
    extra_config: dict[str, Any] | None = None,
    extra_tensors: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    dtype: Any = np.float32,
) -> Path:
    """Write a PEFT LoRA folder with random weights shaped for ``base_config``; return it.

    ``modules`` the base model does not have get 128 x 128 weights; ``extra_tensors``
    (name -> shape) are added as they are (for tests of what the checks refuse).
    """
    folder.mkdir(parents=True, exist_ok=True)
    modules = list(modules)
    rng = np.random.default_rng(seed)
    shapes = linear_shapes(base_config)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            in_f, out_f = shapes.get(m, (128, 128))
            group = "self_attn" if m.endswith(_ATTENTION) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, in_f)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, r)).astype(np.float32)
    for name, shape in (extra_tensors or {}).items():
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
    tensors = {k: v.astype(dtype, copy=False) for k, v in tensors.items()}
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
