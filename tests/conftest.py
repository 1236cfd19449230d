"""Shared fixtures: a tiny local base model (built once per session) and fake adapters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "agent_finetune" / "assets"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer trained on the sample data (seconds to build)."""
    from agent_finetune.training.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    return build_tiny_model(out, corpus_files=sorted(EXAMPLES.glob("support_*.json")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
