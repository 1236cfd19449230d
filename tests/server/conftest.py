"""Session fixtures for the server tests: one tiny model, one set of adapters, and as few
vLLM servers as possible (one, restarted once)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import FAKE_BASE_CONFIG, edit_config
from hotswap_live import ENV_TEST_MODEL, GOOD_SEEDS, Live

from agent_finetune.training.numpy_adapter import write_adapter
from agent_finetune.training.tiny_model import random_adapter


def _build_adapters(live: Live) -> None:
    model, out = live.model, live.workdir / "adapters"
    for seed in GOOD_SEEDS:
        live.good[seed] = random_adapter(model, out / f"good{seed}", seed=seed)
    live.bad["rank"] = random_adapter(model, out / "rank", seed=100, r=32)
    live.bad["modules_to_save"] = random_adapter(
        model, out / "modules_to_save", seed=101, modules_to_save=["lm_head"]
    )
    live.bad["dora"] = random_adapter(model, out / "dora", seed=102, use_dora=True)
    live.bad["embed"] = random_adapter(
        model, out / "embed", seed=103, target_modules=["q_proj", "v_proj", "embed_tokens"]
    )
    # Shapes of a smaller model, but claiming to be for the served one.
    live.bad["shapes"] = write_adapter(
        out / "shapes", seed=104, r=8, base_config=FAKE_BASE_CONFIG, base_model=str(model)
    )
    live.bad["base_name"] = random_adapter(model, out / "base_name", seed=105)
    edit_config(live.bad["base_name"], base_model_name_or_path="meta-llama/Llama-3.1-8B")
    live.bad["truncated"] = random_adapter(model, out / "truncated", seed=106)
    weights = live.bad["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    live.bad["checksum"] = random_adapter(model, out / "checksum", seed=107)  # corrupted later


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Tiny model + one plugin server (started while the adapters are built)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent_finetune.training.tiny_model import build_tiny_model

    workdir = tmp_path_factory.mktemp("hotswap")
    given = os.environ.get(ENV_TEST_MODEL)
    model = Path(given).absolute() if given else build_tiny_model(workdir / "tiny")
    server = Live(model, workdir)
    server.start(wait=False)
    try:
        _build_adapters(server)
        server.handle.wait_ready(600)
        yield server
    finally:
        server.stop()
