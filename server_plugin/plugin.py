"""The vLLM endpoint plugin: the reconcile loop inside vLLM's API-server process.

Enabled by ``VLLM_PLUGINS=agent_finetune`` (entry point group ``vllm.endpoint_plugins``)
and configured by the ``AGENT_FINETUNE_*`` variables (see ``server_plugin.settings``).
It runs the reconcile loop inside the API-server process and drives vLLM through
``state.openai_serving_models``: no ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` needed, and the
routes it adds (``GET /v1/adapters``, ``/v1/models``, ``/v1/models/{id}``) change nothing but
the canary feedback counters (``POST /v1/adapters/{name}/feedback``). Every model answer names
the version that answered in the ``x-adapter-version`` header (``server_plugin.answers``).
Every vLLM internal it touches goes through ``server_plugin.compat`` (which says which, for
which vLLM versions). Every exception is logged and kept away from vLLM: a broken plugin
leaves a server that serves the base model.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import threading
import time
from argparse import Namespace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent_finetune.errors import (
    ConfigError,
    LoadError,
    ServerUnavailableError,
    VllmCompatError,
)
from agent_finetune.registry import Registry
from agent_finetune.registry.adapter import linear_shapes, load_base_config
from server_plugin import compat
from server_plugin.answers import AnswerHeaders, missing_model_message
from server_plugin.cache import AdapterCache, Limits, ProcessDir
from server_plugin.canary_router import CanaryRouter
from server_plugin.capture import Capture, CaptureMiddleware
from server_plugin.feedback import FEEDBACK_PATH, FeedbackRoute
from server_plugin.http_errors import error_response
from server_plugin.listing import annotate_cards
from server_plugin.middleware import MODEL_ROUTES, ModelRequestMiddleware
from server_plugin.preload import USAGE_FILE, Usage
from server_plugin.reconciler import Reconciler
from server_plugin.served_dtype import safetensors_dtype
from server_plugin.settings import PLUGIN_NAME, Settings
from server_plugin.version_metrics import Loaded, VersionMetrics, install
from server_plugin.watcher import RegistryWatcher

logger = logging.getLogger(__name__)


class VllmTransport:
    """Change vLLM's served names in-process (``compat.ServingModels``)."""

    def __init__(self, models: compat.ServingModels) -> None:
        self.models = models

    async def served(self) -> dict[str, str]:
        return {name: served.path for name, served in self.models.table().items()}

    async def load(self, served_name: str, path: str) -> None:
        existing = self.models.get(served_name)
        if existing is not None:
            if existing.path == path:
                return
            raise LoadError(
                f"{served_name} is already served from {existing.path}; "
                "versions are never reloaded in place"
            )
        refused = await self.models.load_detail(served_name, path)
        if refused is not None:
            code, message = refused
            message = f"vLLM refused to load {path}: HTTP {code}: {message}"
            if code >= 500:  # the engine failed, not necessarily the adapter: retried
                raise ServerUnavailableError(message)
            raise LoadError(message)

    async def repoint(self, name: str, target: str) -> None:
        if self.models.is_base_model(name):
            raise LoadError(
                f"adapter name {name!r} is also a served base model name; rename the adapter "
                "or start vLLM with another --served-model-name"
            )
        if not self.models.point(name, target):
            raise LoadError(f"cannot point {name} at {target}: {target} is not loaded")

    async def unload(self, served_name: str) -> None:
        # Unloading frees no engine memory in vLLM 0.32; the name simply stops resolving.
        self.models.drop(served_name)


def _limits(engine_client: Any, args: Namespace, settings: Settings) -> Limits:
    """The served model's LoRA rank bound, name and layer shapes."""
    vllm_config = engine_client.vllm_config
    lora_config = vllm_config.lora_config
    base_config: dict[str, Any] | None = None
    try:
        base_config = vllm_config.model_config.hf_text_config.to_dict()
        linear_shapes(base_config)  # the shape check needs these keys
    except Exception:
        base_config = load_base_config(str(args.model))
        try:
            if base_config is not None:
                linear_shapes(base_config)
        except Exception:
            logger.warning("agent_finetune: no layer shapes for %s; shape checks off", args.model)
            base_config = None
    return Limits(
        max_rank=int(lora_config.max_lora_rank) if lora_config is not None else None,
        base_model=str(args.model),
        base_config=base_config,
        check_base_name=settings.strict_base,
        served_dtype=safetensors_dtype(getattr(lora_config, "lora_dtype", None)),
    )


def _engine_bound(engine_client: Any) -> int | None:
    """``--max-cpu-loras``: adapters the engine keeps in host memory (its LRU)."""
    try:
        return int(engine_client.vllm_config.lora_config.max_cpu_loras)
    except (AttributeError, TypeError, ValueError):
        return None


class EndpointPlugin:
    """Entry point ``agent_finetune`` of ``vllm.endpoint_plugins``."""

    name = PLUGIN_NAME
    required_tasks: tuple[str, ...] | None = ("generate",)

    def __init__(self) -> None:
        self.reconciler: Reconciler | None = None
        self.canary: CanaryRouter | None = None
        self.capture: Capture | None = None
        self.max_parse_bytes = Settings.max_parse_bytes
        self.watcher: RegistryWatcher | None = None
        self.error: str | None = None
        self.startup_s: float | None = None
        self.internals: compat.Internals | None = None
        self.models: compat.ServingModels | None = None
        self._task: asyncio.Task[None] | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self.versions = install(VersionMetrics())

    def attach_router(self, app: Any) -> None:
        try:
            self.internals = compat.detect()
        except VllmCompatError as e:
            self.error = str(e)
            logger.error("agent_finetune: %s; plugin disabled", e)
        try:
            compat.replace_route(app, "/v1/adapters", self.adapters, ["GET"])
            app.add_api_route(FEEDBACK_PATH, FeedbackRoute(self).post, methods=["POST"])
            if self.internals is not None:  # else vLLM's own /v1/models keeps answering
                compat.replace_route(app, "/v1/models", self.list_models, ["GET"])
                compat.replace_route(app, "/v1/models/{model_id:path}", self.model_card, ["GET"])
            # Innermost: capture sees the body as vLLM will (a canary's pin included).
            app.add_middleware(CaptureMiddleware, capture=lambda: self.capture)
            app.add_middleware(ModelRequestMiddleware, plugin=self)
            app.add_middleware(
                AnswerHeaders,
                routes=MODEL_ROUTES,
                describe=self.missing_model,
                versions=self.versions,
            )
        except Exception:
            logger.exception("agent_finetune: attaching routes failed; plugin disabled")

    async def list_models(self, request: Request) -> Response:
        """vLLM's ``/v1/models``: each adapter under its served name, then the lazy names (not
        loaded yet; their first request loads them), with name <-> version links and every
        pinnable version (``server_plugin.listing``)."""
        models = self.models
        if models is None and self.internals is not None:
            models = compat.ServingModels.from_state(request.app.state, self.internals)
        if models is None:
            return error_response(503, self.error or "agent_finetune plugin is starting")
        body = await models.model_list()
        reconciler = self.reconciler
        try:
            cards = body["data"]
            if reconciler is not None and reconciler.lazy:
                base = cards[0]
                served = {c.get("id") for c in cards}
                cards.extend(
                    {**base, "id": n, "root": n, "parent": base.get("id"), "max_model_len": None}
                    for n in reconciler.lazy_names()
                    if n not in served
                )
            served_as = {name: s.name for name, s in models.table().items()}
            catalog = reconciler.catalog if reconciler is not None else None
            paths = getattr(models.models, "base_model_paths", None)
            base_id = paths[0].name if paths else None
            body["data"] = await asyncio.to_thread(
                annotate_cards, cards, served_as, catalog, base_id
            )
        except Exception:
            logger.exception("agent_finetune: annotating /v1/models failed")
        return JSONResponse(content=body)

    async def model_card(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (the openai SDK's ``models.retrieve``): one card, or 404."""
        model = request.path_params["model_id"]
        listing = await self.list_models(request)
        try:
            cards = json.loads(bytes(listing.body))["data"]
        except (ValueError, KeyError, TypeError):
            cards = []
        card = next((c for c in cards if c.get("id") == model), None)
        if card is not None:
            return JSONResponse(card)
        message = await self.missing_model(model) or f"The model `{model}` does not exist."
        return error_response(404, message)

    async def missing_model(self, model: str) -> str | None:
        """What to say instead of vLLM's bare 404 for ``model``."""
        if self.reconciler is None:
            return None
        return await asyncio.to_thread(missing_model_message, self.reconciler.catalog, model)

    async def adapters(self, request: Request) -> Response:
        """Per adapter name: desired and live version, state, last error, load times."""
        if self.reconciler is None:
            return error_response(
                503, self.error or "agent_finetune plugin is starting", param=None
            )
        status = {**self.reconciler.status(), "startup_seconds": self.startup_s}
        if self.canary is not None:
            status["canary"] = self.canary.status()
        if self.capture is not None:
            status["capture"] = self.capture.status()
        return JSONResponse(status)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        try:
            await self._init_state(engine_client, state, args)
        except Exception as e:
            self.error = f"agent_finetune plugin failed to start: {type(e).__name__}: {e}"
            logger.exception("agent_finetune: plugin failed to start; serving without it")

    async def _init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        t0 = time.monotonic()
        _setup_logging()
        if engine_client is None:
            self.error = "agent_finetune needs an engine (not the render-only server)"
            return
        if engine_client.vllm_config.lora_config is None:
            self.error = "agent_finetune needs LoRA: start vLLM with --enable-lora"
            logger.error("agent_finetune: %s", self.error)
            return
        count = compat.api_process_count(engine_client, args)
        if count > 1:
            self.error = compat.multiple_api_servers_error(count)
            logger.error("agent_finetune: %s; plugin disabled", self.error)
            return
        try:
            settings = Settings.from_env()
            root = settings.registry_root()
            self.internals = self.internals or compat.detect()
            models = self.models = compat.ServingModels.from_state(state, self.internals)
        except (ConfigError, VllmCompatError) as e:
            self.error = str(e)
            logger.error("agent_finetune: %s; plugin disabled", e)
            return
        reconciler = _reconciler(engine_client, args, settings, models)
        self.max_parse_bytes = settings.max_parse_bytes
        canary = CanaryRouter(reconciler.registry)
        # Stage each running canary's candidate ahead of its first routed request.
        reconciler.stager.canaries = lambda: {
            n: c.version for n in canary.names if (c := canary.canary(n)) is not None
        }
        self.versions.loaded = lambda: loaded_versions(reconciler)
        self.versions.on_disk = reconciler.cache.on_disk

        def wake() -> None:
            reconciler.wake()
            canary.wake()

        self.watcher = RegistryWatcher(
            root,
            wake,
            polling=settings.polling,
            poll_interval_s=min(1.0, settings.resync_s),
        )
        atexit.register(self.watcher.stop)
        # Serve every preloaded name before the server reports ready (lazy ones: metadata).
        await reconciler.reconcile_once()
        self.startup_s = round(time.monotonic() - t0, 6)
        self.reconciler = reconciler
        self._task = asyncio.get_running_loop().create_task(
            reconciler.run(before_pass=self.watcher.start), name="agent_finetune-reconcile"
        )
        self._task.add_done_callback(_log_task_end)
        await canary.pass_once()
        self.canary = canary
        self._canary_task = asyncio.get_running_loop().create_task(
            canary.run(settings.resync_s), name="agent_finetune-canary"
        )
        self._canary_task.add_done_callback(_log_task_end)
        self.capture = await asyncio.to_thread(_start_capture, canary, settings.resync_s)
        logger.info(
            "agent_finetune: serving registry %s (cache %s, max rank %s, resync %.2fs, %s)",
            root,
            reconciler.cache.root,
            reconciler.cache.limits.max_rank,
            settings.resync_s,
            "polling" if settings.polling else "inotify",
        )
        logger.info(
            "agent_finetune: start-up took %.2fs; preload %s", self.startup_s, reconciler.policy
        )


def _start_capture(canary: CanaryRouter, resync_s: float) -> Capture:
    """Read the capture settings once, then start the writer thread (stopped at exit)."""
    capture = Capture(canary.registry, canary.replica, on_issued=canary.captured)
    capture.refresh()
    stop = threading.Event()
    thread = threading.Thread(
        target=capture.run, args=(stop, resync_s), name="agent_finetune-capture", daemon=True
    )
    thread.start()
    atexit.register(stop.set)
    return capture


def _reconciler(
    engine_client: Any, args: Namespace, settings: Settings, models: compat.ServingModels
) -> Reconciler:
    """The reconcile loop on this server: its own cache folder (removed at exit), the
    usage record beside it, the engine's LoRA limits."""
    cache_root = settings.cache_root()
    usage = Usage(cache_root / USAGE_FILE)
    atexit.register(usage.save, True)
    folder = ProcessDir(cache_root)
    atexit.register(folder.close)
    cache = AdapterCache(
        folder.path,
        _limits(engine_client, args, settings),
        max_bytes=settings.cache_max_bytes,
        grace_s=settings.cache_grace_s,
    )
    return Reconciler(
        Registry(settings.registry_root()),
        cache,
        VllmTransport(models),
        settings,
        engine_bound=_engine_bound(engine_client),
        usage=usage,
    )


def loaded_versions(reconciler: Reconciler) -> list[Loaded]:
    """Every copy the server really has loaded, with its role (for the per-version series)."""
    served = reconciler.served
    routed = set(served.routes.values())
    out = []
    for s, copy in list(served.copies.items()):
        if not served.loaded(s):
            continue
        role = "live" if s in routed else "staged" if s in served.staged else "standby"
        out.append(Loaded(copy.name, copy.version, role, copy.load_seconds))
    return out


def _setup_logging() -> None:
    """Show this package's INFO logs beside vLLM's (the root logger has no handler)."""
    log = logging.getLogger("server_plugin")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("(APIServer) %(levelname)s %(asctime)s [%(name)s] %(message)s")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _log_task_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("agent_finetune: reconcile loop stopped", exc_info=task.exception())
