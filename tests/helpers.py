"""Test helpers: a made-up base model for fast tests, and raw registry edits.

Random adapters come from ``agent_finetune.training.numpy_adapter`` (numpy) and
``agent_finetune.training.tiny_model.random_adapter`` (ones a real vLLM answers with).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent_finetune.registry import MANIFEST, Registry
from agent_finetune.registry.files import atomic_write_json
from agent_finetune.registry.layout import VERSIONS
from agent_finetune.registry.manifest import file_checksums
from agent_finetune.registry.names import format_version, version_number
from agent_finetune.training.numpy_adapter import write_adapter

# A made-up base model for the reconciler's fast tests: no torch, no vLLM.
FAKE_BASE_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}


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


def write_version(
    registry: Registry,
    name: str,
    source: Path,
    *,
    make_current: bool = True,
    rot: bool = False,
) -> str:
    """Publish ``source`` WITHOUT validation (as a buggy or foreign writer would). ``rot``:
    the weights' last byte flipped after the manifest's sha256 was taken, before the version
    appears (bit rot no server could have copied around)."""
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
        if rot:
            weights = staging / "adapter_model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))
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
