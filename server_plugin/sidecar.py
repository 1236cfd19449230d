"""Sidecar mode: the same reconcile loop driving a server through its runtime LoRA HTTP API.

For servers where the plugin cannot be installed. The server must expose
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, which vLLM does only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, and must be able to read the sidecar's cache
folder at the same path (same machine or shared filesystem).

Caveat: the HTTP API cannot repoint a name in one step. A swap loads ``<name>@vNNNN``,
unloads ``<name>``, waits until no request on ``<name>`` is running (vLLM's worker keys
adapters by name: two LoRA ids under one name in one batch crash its engine), then loads
``<name>`` again from the new version's path. Meanwhile ``<name>`` answers 404: clients
should retry, or pin versions, or use the plugin, which has no such window.

Refuses vLLM 0.26-0.30 with prefix caching on: those key cached prompts by LoRA name alone,
so the reloaded name would answer from the old version's KV (``compat.stale_prefix_cache_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent_finetune.errors import LoadError
from agent_finetune.registry import Registry
from agent_finetune.registry.adapter import load_base_config
from server_plugin.cache import AdapterCache, Limits
from server_plugin.compat import stale_prefix_cache_error
from server_plugin.reconciler import Reconciler
from server_plugin.settings import default_cache_root
from server_plugin.watcher import RegistryWatcher

logger = logging.getLogger(__name__)

RUNTIME_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"


class HttpTransport:
    """Load, repoint and unload adapters through vLLM's runtime LoRA routes."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def models(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/models`` as id -> model card."""
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        return {m["id"]: m for m in r.json().get("data", []) if isinstance(m, dict)}

    async def _post(self, route: str, payload: dict[str, Any]) -> httpx.Response:
        r = await self.client.post(route, json=payload)
        if r.status_code in (404, 405) and "lora_name" not in r.text:
            raise LoadError(
                f"{self.client.base_url}{route}: HTTP {r.status_code}; the server has no runtime "
                f"LoRA API: start vLLM with {RUNTIME_FLAG}"
            )
        return r

    async def load(self, served_name: str, path: str) -> None:
        card = (await self.models()).get(served_name)
        if card is not None:
            if card.get("root") == path:
                return
            await self.unload(served_name)
        r = await self._post("/v1/load_lora_adapter", {"lora_name": served_name, "lora_path": path})
        if r.status_code != 200:
            raise LoadError(f"server refused to load {path}: HTTP {r.status_code}: {r.text[:500]}")

    async def repoint(self, name: str, target: str) -> None:
        cards = await self.models()
        if target not in cards:
            raise LoadError(f"cannot point {name} at {target}: {target} is not loaded")
        path = str(cards[target].get("root"))
        if name in cards:
            if cards[name].get("root") == path:
                return
            await self.unload(name)
            await self.drain(name)
        await self.load(name, path)

    async def drain(self, name: str, timeout_s: float = 300.0) -> None:
        """Wait until no running or waiting request uses adapter ``name``.

        Reads ``vllm:lora_requests_info`` from ``/metrics``: its newest sample lists the
        adapters in use; a sample older than a second means the engine is idle.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                r = await self.client.get("/metrics")
                busy = _adapter_in_use(r.text, name) if r.status_code == 200 else True
            except httpx.HTTPError:
                busy = True
            if not busy:
                return
            await asyncio.sleep(0.05)
        logger.warning(
            "agent_finetune sync: %s still busy after %.0fs; loading anyway", name, timeout_s
        )

    async def unload(self, served_name: str) -> None:
        r = await self._post("/v1/unload_lora_adapter", {"lora_name": served_name})
        if r.status_code not in (200, 404):
            raise LoadError(
                f"server refused to unload {served_name}: HTTP {r.status_code}: {r.text[:500]}"
            )


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.M)


async def server_facts(client: httpx.AsyncClient) -> tuple[str | None, bool | None]:
    """The server's vLLM version (``GET /version``) and whether prefix caching is on
    (``vllm:cache_config_info`` in ``/metrics``); None where the server does not say."""
    version: str | None = None
    prefix_caching: bool | None = None
    r = await client.get("/version")
    if r.status_code == 200:
        with contextlib.suppress(ValueError, AttributeError):
            found = r.json().get("version")
            version = str(found) if found else None
    r = await client.get("/metrics")
    if r.status_code == 200 and (m := _CACHE_INFO.search(r.text)):
        flag = dict(_LABEL.findall(m["labels"])).get("enable_prefix_caching")
        if flag is not None:
            prefix_caching = flag.lower() == "true"
    return version, prefix_caching


_LORA_INFO = re.compile(r"^vllm:lora_requests_info\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _adapter_in_use(metrics_text: str, name: str) -> bool:
    """Whether the newest ``vllm:lora_requests_info`` sample lists ``name`` as in use."""
    newest: tuple[float, dict[str, str]] | None = None
    for m in _LORA_INFO.finditer(metrics_text):
        value = float(m["value"])
        if newest is None or value > newest[0]:
            newest = (value, dict(_LABEL.findall(m["labels"])))
    if newest is None or time.time() - newest[0] > 1.0:
        return False  # no sample yet, or none for a second: nothing is running
    labels = newest[1]
    in_use = labels.get("running_lora_adapters", "").split(",")
    in_use += labels.get("waiting_lora_adapters", "").split(",")
    return name in in_use


@dataclass(frozen=True)
class SyncOptions:
    """Options of ``agent-finetune sync`` (see ``commands.add_sync_parser``)."""

    server: str
    registry: Path
    cache_dir: Path | None = None
    api_key: str | None = None
    once: bool = False
    resync_s: float = 2.0
    polling: bool = False
    max_pinned: int = 4
    max_rank: int | None = 16
    base_model: str | None = None
    strict_base: bool = True


async def _base_model(transport: HttpTransport) -> str | None:
    """The served base model's path/name: the model card without a parent."""
    for card in (await transport.models()).values():
        if not card.get("parent"):
            root = card.get("root") or card.get("id")
            return str(root) if root else None
    return None


async def sync(options: SyncOptions, http: httpx.AsyncBaseTransport | None = None) -> int:
    """Run the sidecar; with ``once`` reconcile one pass, print the status, exit 1 on failures.

    Exit 2 when the server cannot be reached or cannot swap safely. ``http`` replaces the
    network (tests).
    """
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    base_url = options.server.rstrip("/").removesuffix("/v1")
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=60.0, transport=http
    ) as client:
        transport = HttpTransport(client)
        try:
            base_model = options.base_model or await _base_model(transport)
            stale = stale_prefix_cache_error(*await server_facts(client))
        except httpx.HTTPError as e:
            print(f"error: cannot reach {base_url}/v1/models: {e}", file=sys.stderr)
            return 2
        if stale is not None:
            print(f"error: {base_url}: {stale}", file=sys.stderr)
            return 2
        base_config = load_base_config(base_model) if base_model else None
        limits = Limits(options.max_rank, base_model, base_config, options.strict_base)
        cache_root = options.cache_dir or default_cache_root().parent / "sidecar"
        cache_root.mkdir(parents=True, exist_ok=True)
        reconciler = Reconciler(
            Registry(options.registry),
            AdapterCache(cache_root, limits),
            transport,
            resync_s=options.resync_s,
            max_pinned=options.max_pinned,
        )
        if options.once:
            await reconciler.reconcile_once()
            status = reconciler.status()
            print(json.dumps(status, indent=2))
            failed = [a for a in status["data"] if a["state"] == "failed"]
            return 1 if failed or status["sync_error"] else 0
        watcher = RegistryWatcher(options.registry, reconciler.wake, polling=options.polling)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, reconciler.stop)
        logger.info("agent_finetune sync: %s -> %s", options.registry, base_url)
        try:
            await reconciler.run(before_pass=watcher.start)
        finally:
            watcher.stop()
        return 0
