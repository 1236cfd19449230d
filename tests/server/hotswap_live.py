"""The session's live vLLM server for the end-to-end tests, and the constants they share.

Two variables point the same tests at other hardware (e.g. GPU vLLM on an H200, see
BENCHMARKS.md "GPU serving"):

- ``AGENT_FINETUNE_TEST_MODEL``: a local model folder to serve instead of the tiny one
  (e.g. ``build_shaped_model(out, "qwen2.5-0.5b")``: a real shape, random weights);
- ``AGENT_FINETUNE_TEST_VLLM_ARGS``: more vLLM arguments for every test server, appended
  last so they win (e.g. ``--gpu-memory-utilization 0.15 --enforce-eager``: up to three
  test servers share one GPU).

The tests compare greedy token ids exactly. On a GPU that needs ``VLLM_BATCH_INVARIANT=1``
in the environment: bf16 kernels otherwise round differently with the batch's size and
with prefix-cache hits, and a random model's near-tied logits flip (seen on the H200).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_finetune.registry import Registry
from server_plugin.launch import ServerHandle, start_server

API_KEY = "test-key"
RESYNC_S = 1.0
PROMPT = "How do I reset my password?"
MAX_TOKENS = 16
GOOD_SEEDS = range(8)
ENV_TEST_MODEL = "AGENT_FINETUNE_TEST_MODEL"
ENV_TEST_VLLM_ARGS = "AGENT_FINETUNE_TEST_VLLM_ARGS"
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


def vllm_args() -> list[str]:
    """Every test server's vLLM arguments, then ``AGENT_FINETUNE_TEST_VLLM_ARGS``."""
    base = ["--max-model-len", "256", "--dtype", "bfloat16", "--api-key", API_KEY]
    return [*base, *shlex.split(os.environ.get(ENV_TEST_VLLM_ARGS, ""))]


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
    def settings(self, cache: str) -> dict[str, str]:
        """What every test server of this session is started with; its own cache folder."""
        return {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "AGENT_FINETUNE_RESYNC_S": str(RESYNC_S),
            "AGENT_FINETUNE_CACHE_DIR": str(self.workdir / cache),
        }

    def start(self, *, runtime_updates: bool = False, wait: bool = True) -> None:
        settings = {
            **self.settings("cache"),
            "AGENT_FINETUNE_MAX_PINNED": "4",
            "AGENT_FINETUNE_RETRY_MAX_S": "1",
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
            extra_args=vllm_args(),
            max_cpu_loras=8,
            tool_call_parser="hermes",  # what agent frameworks' `tools` need
            wait=wait,
        )

    def start_replica(
        self, tag: str, settings: dict[str, str] | None = None, **options: Any
    ) -> ServerHandle:
        """Another plugin server on this session's model and registry (not waited for);
        ``options`` go to ``start_server`` (e.g. ``max_cpu_loras``)."""
        return start_server(
            str(self.model),
            self.registry.root,
            log_path=self.workdir / f"{tag}.log",
            settings={**self.settings(f"{tag}-cache"), **(settings or {})},
            extra_args=vllm_args(),
            wait=False,
            **options,
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

    def wait_servable(self, name: str, version: str) -> None:
        """``name`` serving ``version``, loading it with a request if the plugin left it
        lazy (more names than AGENT_FINETUNE_PRELOAD keeps loaded: earlier tests' names)."""

        def known() -> bool:
            a = self.adapter(name)
            return a is not None and a["desired"] == version and a["state"] in ("live", "lazy")

        self.wait_for(known, f"the plugin to see {name}@{version}", 30 * RESYNC_S + 10)
        self.ask(name, max_tokens=1)
        self.wait_live(name, version)
