"""Adapters and registry edits for the server tests (and bench/hot_swap.py).

Random LoRA adapters need no training: ``init_lora_weights=False`` plus a scaled-up B
gives greedy outputs that differ from the base model and from each other.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent_finetune.adapter import LINEAR_MODULES
from agent_finetune.registry import (
    MANIFEST,
    VERSIONS,
    Registry,
    atomic_write_json,
    file_checksums,
    format_version,
    version_number,
)

LINEAR = list(LINEAR_MODULES)


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    r: int = 8,
    scale: float = 4.0,
    target_modules: list[str] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Save a random PEFT LoRA adapter for ``base`` to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules or LINEAR,
        init_lora_weights=False,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out


def write_version(registry: Registry, name: str, source: Path, *, make_current: bool = True) -> str:
    """Publish ``source`` WITHOUT validation (as a buggy or foreign writer would)."""
    ndir = registry.name_dir(name)
    (ndir / VERSIONS).mkdir(parents=True, exist_ok=True)
    with registry.lock(name):
        existing = registry.versions(name)
        version = format_version(version_number(existing[-1]) + 1 if existing else 1)
        staging = ndir / f".staging-raw-{version}"
        shutil.copytree(source, staging)
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        manifest = {
            "format": 1,
            "name": name,
            "version": version,
            "files": file_checksums(staging, files),
        }
        atomic_write_json(staging / MANIFEST, manifest)
        os.rename(staging, ndir / VERSIONS / version)
        if make_current:
            registry._set_current(name, version, "promote", "test: raw write")
    return version


def set_current(registry: Registry, name: str, version: str) -> None:
    """Move ``current`` without verifying the version (promote() refuses bad ones)."""
    with registry.lock(name):
        registry._set_current(name, version, "promote", "test: raw pointer move")


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


# A made-up base model for the fast tests: no torch, no vLLM.
FAKE_BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}


def fake_adapter(
    out: Path,
    *,
    seed: int = 0,
    r: int = 8,
    base_model: str = "fake-base",
    config: dict[str, Any] | None = None,
    **cfg_changes: Any,
) -> Path:
    """Write a small valid LoRA adapter for ``FAKE_BASE_CONFIG`` with numpy (fast)."""
    import numpy as np
    from safetensors.numpy import save_file

    from agent_finetune.adapter import linear_shapes

    rng = np.random.default_rng(seed)
    shapes = linear_shapes(config or FAKE_BASE_CONFIG)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        in_f, out_f = shapes[module]
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, in_f)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((out_f, r)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base_model,
        **cfg_changes,
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out
