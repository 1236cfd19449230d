"""Sidecar mode: the same reconcile loop driving a server through its runtime LoRA HTTP API.

For servers where the plugin cannot be installed. The server must expose
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, which vLLM does only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (probed once at start, with a clear error), and
must be able to read the sidecar's cache folder at the same path (same machine or shared
filesystem).

What the server serves is read once per pass from ``GET /v1/models``, so a restarted
server (which serves nothing) is loaded again within one pass. Errors are told apart by
vLLM's error ``type`` and HTTP code: 4xx refusals are permanent, 5xx, timeouts and
connection errors are ``ServerUnavailableError`` (retried with backoff).

Caveat: the HTTP API cannot repoint a name in one step. A swap loads ``<name>@vNNNN``,
unloads ``<name>``, waits until the server runs no request (``vllm:num_requests_running``
and ``_waiting`` are 0, or its newest ``vllm:lora_requests_info`` sample does not list the
name: vLLM's worker keys adapters by name, and two LoRA ids under one name in one batch
crash its engine), then loads ``<name>`` again from the new version's path; if that load
fails, the previous path is loaded back. Meanwhile ``<name>`` answers 404: clients should
retry, or pin versions, or use the plugin, which has no such window.

The cache folder is ``<cache>/sidecar-<hash of the server URL>``, locked for the sidecar's
lifetime (a second sidecar for the same server refuses to start) and kept at exit: the
server may still re-read the copies it serves.

Refuses vLLM 0.26-0.30 with prefix caching on: those key cached prompts by LoRA name alone,
so the reloaded name would answer from the old version's KV (``compat.stale_prefix_cache_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
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

from agent_finetune.errors import ConfigError, LoadError, RegistryError, ServerUnavailableError
from agent_finetune.registry import Registry
from agent_finetune.registry.adapter import load_base_config
from agent_finetune.registry.files import atomic_write_json
from agent_finetune.registry.names import server_root
from server_plugin.cache import AdapterCache, Limits, ProcessDir
from server_plugin.compat import stale_prefix_cache_error
from server_plugin.reconciler import Reconciler
from server_plugin.settings import ENV_DRAIN, ENV_PRELOAD, MAX_LORA_RANK, Settings
from server_plugin.watcher import RegistryWatcher

logger = logging.getLogger(__name__)

RUNTIME_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
STATUS_FILE = "status.json"
_PROBE_NAME = "agent-finetune-probe-not-an-adapter"


def error_of(response: httpx.Response) -> tuple[str | None, str]:
    """(vLLM error ``type`` or None when the body is not a vLLM error, message)."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return str(error.get("type")), str(error.get("message", ""))[:500]
    if isinstance(body, dict) and "detail" in body:  # FastAPI's own answer: no such route
        return None, str(body["detail"])[:500]
    return None, response.text[:500]


class HttpTransport:
    """Load, repoint and unload adapters through vLLM's runtime LoRA routes."""

    def __init__(self, client: httpx.AsyncClient, *, drain_s: float = Settings.drain_s) -> None:
        self.client = client
        self.drain_s = drain_s
        # Names this sidecar unloaded: loading one again gives it a new LoRA id in vLLM, so
        # its old requests must finish first (two ids of one name in a batch: see compat).
        self._unloaded: set[str] = set()

    async def _request(self, method: str, route: str, **kw: Any) -> httpx.Response:
        try:
            r = await self.client.request(method, route, **kw)
        except httpx.HTTPError as e:
            raise ServerUnavailableError(
                f"{self.client.base_url}{route}: {type(e).__name__}: {e}"
            ) from e
        if r.status_code >= 500:
            kind, message = error_of(r)
            raise ServerUnavailableError(
                f"{self.client.base_url}{route}: HTTP {r.status_code} {kind or ''}: {message}"
            )
        if r.status_code == 401:
            raise LoadError(f"{self.client.base_url}{route}: HTTP 401: pass the server's --api-key")
        return r

    async def models(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/models`` as id -> model card."""
        r = await self._request("GET", "/v1/models")
        if r.status_code != 200:
            raise ServerUnavailableError(f"{self.client.base_url}/v1/models: HTTP {r.status_code}")
        cards = r.json().get("data", [])
        # A plugin server also lists versions it has not loaded ("loaded": false).
        return {m["id"]: m for m in cards if isinstance(m, dict) and m.get("loaded", True)}

    async def served(self) -> dict[str, str]:
        """Every adapter the server serves (cards with a parent) -> its path."""
        return {
            name: str(card.get("root"))
            for name, card in (await self.models()).items()
            if card.get("parent")
        }

    async def probe(self) -> None:
        """Raise LoadError, saying how to fix it, when the runtime LoRA API is off."""
        r = await self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": _PROBE_NAME})
        kind, message = error_of(r)
        if r.status_code in (404, 405) and kind is None:
            raise LoadError(
                f"{self.client.base_url} has no runtime LoRA API "
                f"(POST /v1/unload_lora_adapter: HTTP {r.status_code} {message}); "
                f"start vLLM with {RUNTIME_FLAG}"
            )

    async def _post(self, route: str, payload: dict[str, Any]) -> tuple[int, str | None, str]:
        r = await self._request("POST", route, json=payload)
        if r.status_code == 200:
            return 200, None, ""
        kind, message = error_of(r)
        if r.status_code in (404, 405) and kind is None:
            raise LoadError(
                f"{self.client.base_url}{route}: HTTP {r.status_code}; the server has no "
                f"runtime LoRA API: start vLLM with {RUNTIME_FLAG}"
            )
        return r.status_code, kind, message

    async def load(self, served_name: str, path: str) -> None:
        if served_name in self._unloaded:
            await self.drain(served_name)
        code, kind, message = await self._post(
            "/v1/load_lora_adapter", {"lora_name": served_name, "lora_path": path}
        )
        if code == 200:
            return
        if code == 400 and "already been loaded" in message:
            # Ours from before a restart of this sidecar, or someone else's.
            card = (await self.models()).get(served_name, {})
            if card.get("root") == path:
                return
            await self.unload(served_name)
            await self.drain(served_name)
            return await self.load(served_name, path)
        raise LoadError(f"server refused to load {path}: HTTP {code} {kind}: {message}")

    async def repoint(self, name: str, target: str) -> None:
        cards = await self.models()
        if target not in cards:
            raise LoadError(f"cannot point {name} at {target}: {target} is not loaded")
        path = str(cards[target].get("root"))
        previous = cards.get(name, {}).get("root")
        if previous == path:
            return
        if previous is not None:
            await self.unload(name)
            await self.drain(name)
        try:
            await self.load(name, path)
        except Exception:
            if previous is not None:  # put the previous version back; the error stands
                try:
                    await self.load(name, str(previous))
                    logger.warning("agent_finetune sync: %s restored to %s", name, previous)
                except Exception:
                    logger.exception("agent_finetune sync: restoring %s failed", name)
            raise

    async def drain(self, name: str) -> None:
        """Wait until the server runs no request that may use adapter ``name``.

        Reads the server's own gauges from ``/metrics`` (no clock is compared): idle when
        ``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` sum to 0, or when
        its newest ``vllm:lora_requests_info`` sample does not list ``name``. No sample is
        not idle. Gives up after ``drain_s`` seconds with a warning.
        """
        deadline = time.monotonic() + self.drain_s
        self._unloaded.discard(name)
        while True:
            try:
                r = await self.client.get("/metrics")
                busy = r.status_code != 200 or adapter_busy(r.text, name)
            except httpx.HTTPError:
                busy = True
            if not busy:
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "agent_finetune sync: %s still busy after %.0fs (%s); loading anyway",
                    name,
                    self.drain_s,
                    ENV_DRAIN,
                )
                return
            await asyncio.sleep(0.05)

    async def unload(self, served_name: str) -> None:
        code, kind, message = await self._post(
            "/v1/unload_lora_adapter", {"lora_name": served_name}
        )
        if code == 200 or (code == 404 and kind == "NotFoundError"):
            self._unloaded.add(served_name)
            return  # unknown names are ignored
        raise LoadError(f"server refused to unload {served_name}: HTTP {code} {kind}: {message}")


_SAMPLE = re.compile(
    r"^(?P<metric>vllm:[a-z_]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)", re.MULTILINE
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


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def adapter_busy(metrics_text: str, name: str) -> bool:
    """Whether the server's ``/metrics`` says a request may still run on adapter ``name``."""
    counts: list[float] = []
    newest: tuple[float, dict[str, str]] | None = None
    for m in _SAMPLE.finditer(metrics_text):
        metric, value = m["metric"], float(m["value"])
        if metric in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            counts.append(value)
        elif metric == "vllm:lora_requests_info" and (newest is None or value > newest[0]):
            newest = (value, dict(_LABEL.findall(m["labels"] or "")))
    if counts and sum(counts) == 0:
        return False
    if newest is not None and counts:
        labels = newest[1]
        in_use = labels.get("running_lora_adapters", "").split(",")
        in_use += labels.get("waiting_lora_adapters", "").split(",")
        return name in in_use
    return True  # no sample: cannot tell, so not idle


@dataclass(frozen=True)
class SyncOptions:
    """Options of ``agent-finetune sync`` beyond the serving settings (see
    ``cli.serve.add_sync_parser``)."""

    server: str
    api_key: str | None = None
    once: bool = False
    max_rank: int | None = MAX_LORA_RANK
    base_model: str | None = None


async def _base_model(transport: HttpTransport) -> str | None:
    """The served base model's path/name: the model card without a parent."""
    for card in (await transport.models()).values():
        if not card.get("parent"):
            root = card.get("root") or card.get("id")
            return str(root) if root else None
    return None


def _sidecar_settings(settings: Settings) -> Settings:
    """The sidecar has no request path to load a lazy name on: it preloads every name."""
    if settings.preload not in ("auto", "all"):
        logger.warning(
            "agent_finetune sync: %s=%s applies to the plugin only; the sidecar loads every name",
            ENV_PRELOAD,
            settings.preload,
        )
    return dataclasses.replace(settings, preload="all")


async def sync(
    options: SyncOptions, settings: Settings, http: httpx.AsyncBaseTransport | None = None
) -> int:
    """Run the sidecar; with ``once`` reconcile one pass, print the status, exit 1 on failures.

    Exit 2 when the server cannot be reached or cannot swap safely. ``http`` replaces the
    network (tests).
    """
    try:
        registry = settings.registry_root()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = _sidecar_settings(settings)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    base_url = server_root(options.server)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=60.0, transport=http
    ) as client:
        transport = HttpTransport(client, drain_s=settings.drain_s)
        try:
            # Read-only checks first: a server that cannot swap safely gets no request at all.
            stale = stale_prefix_cache_error(*await server_facts(client))
            if stale is None:
                await transport.probe()
                base_model = options.base_model or await _base_model(transport)
        except (LoadError, httpx.HTTPError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if stale is not None:
            print(f"error: {base_url}: {stale}", file=sys.stderr)
            return 2
        base_config = load_base_config(base_model) if base_model else None
        limits = Limits(options.max_rank, base_model, base_config, settings.strict_base)
        server_id = hashlib.sha256(base_url.encode()).hexdigest()[:12]
        try:
            folder = ProcessDir(settings.cache_root("sidecar"), name=f"sidecar-{server_id}")
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            return await _run(options, settings, registry, folder, limits, transport, base_url)
        finally:
            folder.close()


async def _run(
    options: SyncOptions,
    settings: Settings,
    registry: Path,
    folder: ProcessDir,
    limits: Limits,
    transport: HttpTransport,
    base_url: str,
) -> int:
    cache = AdapterCache(
        folder.path, limits, max_bytes=settings.cache_max_bytes, grace_s=settings.cache_grace_s
    )
    cache.release_existing()  # copies of an earlier run: kept while the server serves them
    reconciler = Reconciler(Registry(registry), cache, transport, settings)
    status_path = folder.path / STATUS_FILE

    def write_status() -> None:
        try:
            atomic_write_json(status_path, reconciler.status())
        except (RegistryError, OSError) as e:  # RegistryError: what a failed write raises
            logger.error("agent_finetune sync: cannot write the status: %s", e)

    if options.once:
        await reconciler.reconcile_once()
        write_status()
        status = reconciler.status()
        print(json.dumps(status, indent=2))
        failed = [a for a in status["data"] if a["state"] != "live"]
        return 1 if failed or status["sync_error"] or status["server_error"] else 0
    watcher = RegistryWatcher(registry, reconciler.wake, polling=settings.polling)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, reconciler.stop)
    logger.info("agent_finetune sync: %s -> %s", registry, base_url)
    logger.info("agent_finetune sync: status in %s", status_path)
    try:
        await reconciler.run(before_pass=watcher.start, after_pass=write_status)
    finally:
        watcher.stop()
    return 0
