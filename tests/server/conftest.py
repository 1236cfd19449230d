"""Session fixtures for the server tests: one tiny model, one set of adapters, and as few
vLLM servers as possible (one, restarted once)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hotswap_helpers import fake_adapter, make_adapter

from agent_finetune.registry import Registry
from server_plugin.launch import ServerHandle, start_server

API_KEY = "test-key"
RESYNC_S = 1.0
PROMPT = "How do I reset my password?"
MAX_TOKENS = 16
GOOD_SEEDS = range(8)
BAD_KINDS = (
    "rank",
    "modules_to_save",
    "dora",
    "embed",
    "shapes",
    "base_name",
    "truncated",
    "checksum",
)


class Live:
    """The session's vLLM server with the plugin, its registry and its adapters."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.model = model
        self.workdir = workdir
        self.registry = Registry(workdir / "registry")
        self.registry.root.mkdir(parents=True, exist_ok=True)
        self.good: dict[int, Path] = {}
        self.bad: dict[str, Path] = {}
        self.server: ServerHandle | None = None
        self.runtime_updates = False
        self.starts = 0

    # -- server -----------------------------------------------------------------------
    def start(self, *, runtime_updates: bool = False, wait: bool = True) -> None:
        settings = {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "AGENT_FINETUNE_RESYNC_S": str(RESYNC_S),
            "AGENT_FINETUNE_CACHE_DIR": str(self.workdir / "cache"),
            "AGENT_FINETUNE_MAX_PINNED": "4",
        }
        if runtime_updates:
            settings["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        self.starts += 1
        self.runtime_updates = runtime_updates
        self.server = start_server(
            str(self.model),
            self.registry.root,
            log_path=self.workdir / f"vllm-{self.starts}.log",
            settings=settings,
            extra_args=["--max-model-len", "256", "--dtype", "bfloat16", "--api-key", API_KEY],
            max_cpu_loras=8,
            wait=wait,
        )

    def restart(self, *, runtime_updates: bool = False) -> None:
        assert self.server is not None
        self.server.stop()
        self.start(runtime_updates=runtime_updates)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def handle(self) -> ServerHandle:
        assert self.server is not None
        return self.server

    # -- client side --------------------------------------------------------------------
    def client(self) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.handle.base_url, api_key=API_KEY, max_retries=0, timeout=120)

    def ask(self, model: str, client: Any = None, max_tokens: int = MAX_TOKENS) -> list[int]:
        """The greedy answer's token ids."""
        r = (client or self.client()).chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        return list(r.choices[0].token_ids)

    def status(self) -> dict[str, Any]:
        return dict(self.handle.get_json("/v1/adapters"))

    def adapter(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.status()["data"] if a["name"] == name), None)

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if not self.handle.alive:
                raise AssertionError(f"server died waiting for {what}:\n{self.handle.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status: {self.status()}")
            time.sleep(0.05)

    def wait_live(self, name: str, version: str, timeout: float = 30 * RESYNC_S + 10) -> None:
        def live() -> bool:
            a = self.adapter(name)
            return a is not None and a["live"] == version and a["state"] == "live"

        self.wait_for(live, f"{name} to serve {version}", timeout)


def _build_adapters(live: Live) -> None:
    model, out = live.model, live.workdir / "adapters"
    for seed in GOOD_SEEDS:
        live.good[seed] = make_adapter(model, out / f"good{seed}", seed=seed)
    live.bad["rank"] = make_adapter(model, out / "rank", seed=100, r=32)
    live.bad["modules_to_save"] = make_adapter(
        model, out / "modules_to_save", seed=101, modules_to_save=["lm_head"]
    )
    live.bad["dora"] = make_adapter(model, out / "dora", seed=102, use_dora=True)
    live.bad["embed"] = make_adapter(
        model, out / "embed", seed=103, target_modules=["q_proj", "v_proj", "embed_tokens"]
    )
    # Shapes of a smaller model, but claiming to be for the served one.
    small = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
    }
    live.bad["shapes"] = fake_adapter(out / "shapes", seed=104, config=small, base_model=str(model))
    live.bad["base_name"] = make_adapter(model, out / "base_name", seed=105)
    from hotswap_helpers import edit_config

    edit_config(live.bad["base_name"], base_model_name_or_path="meta-llama/Llama-3.1-8B")
    live.bad["truncated"] = make_adapter(model, out / "truncated", seed=106)
    weights = live.bad["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    live.bad["checksum"] = make_adapter(model, out / "checksum", seed=107)  # corrupted later


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Tiny model + one plugin server (started while the adapters are built)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from agent_finetune.tiny_model import build_tiny_model

    workdir = tmp_path_factory.mktemp("hotswap")
    model = build_tiny_model(workdir / "tiny")
    server = Live(model, workdir)
    server.start(wait=False)
    try:
        _build_adapters(server)
        server.handle.wait_ready(600)
        yield server
    finally:
        server.stop()
