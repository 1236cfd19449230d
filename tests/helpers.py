"""Test helpers: the one numpy adapter writer (no torch), and raw registry edits.

Adapters that a real vLLM serves come from ``agent_finetune.training.tiny_model.random_adapter``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from agent_finetune.registry import MANIFEST, Registry
from agent_finetune.registry.adapter import linear_shapes
from agent_finetune.registry.files import atomic_write_json
from agent_finetune.registry.layout import VERSIONS
from agent_finetune.registry.manifest import file_checksums
from agent_finetune.registry.names import format_version, version_number

# The tests' tiny model: hidden 128, 4 heads x 32, 2 kv heads, intermediate 256.
TINY_CONFIG = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
}


# A made-up base model for the reconciler's fast tests: no torch, no vLLM.
FAKE_BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}


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
    """Write a PEFT LoRA folder with random weights shaped for ``base_config``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = linear_shapes(base_config)
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


def fake_adapter(
    folder: Path,
    *,
    seed: int = 0,
    r: int = 8,
    base_model: str = "fake-base",
    base_config: dict[str, Any] = FAKE_BASE_CONFIG,
) -> Path:
    """A one-layer adapter for ``FAKE_BASE_CONFIG``, the reconciler tests' made-up model."""
    return write_adapter(
        folder, r=r, layers=1, seed=seed, base_model=base_model, base_config=base_config
    )


def registry_with_versions(tmp_path: Path, name: str, count: int) -> Registry:
    """A registry under ``tmp_path`` where ``name`` has ``count`` published versions
    (distinct numpy adapters), v0001 current."""
    registry = Registry(tmp_path / "registry")
    for seed in range(count):
        folder = write_adapter(tmp_path / f"a{seed}", seed=seed)
        registry.publish(name, folder, make_current=seed == 0)
    return registry


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
            registry.set_current(name, version, "promote", "test: raw write")
    return version


def set_current(registry: Registry, name: str, version: str) -> None:
    """Move ``current`` without verifying the version (promote() refuses bad ones)."""
    with registry.lock(name):
        registry.set_current(name, version, "promote", "test: raw pointer move")


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
