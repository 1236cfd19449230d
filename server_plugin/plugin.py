"""The vLLM endpoint plugin: the reconcile loop inside vLLM's API-server process.

Enabled by ``VLLM_PLUGINS=agent_finetune`` (entry point group ``vllm.endpoint_plugins``)
and configured by the ``AGENT_FINETUNE_*`` variables (see ``server_plugin.settings``).
It runs the reconcile loop inside the API-server process and drives vLLM through
``state.openai_serving_models``: no ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` needed, and the
only route it adds (``GET /v1/adapters``) changes nothing. Every vLLM internal it touches
goes through ``server_plugin.compat`` (which says which, for which vLLM versions). Every
exception is logged and kept away from vLLM: a broken plugin leaves a server that serves
the base model.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
from argparse import Namespace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_finetune.errors import LoadError, VllmCompatError
from agent_finetune.registry import Registry
from agent_finetune.registry.adapter import linear_shapes, load_base_config
from server_plugin import compat
from server_plugin.cache import AdapterCache, Limits, process_cache_dir
from server_plugin.reconciler import Reconciler
from server_plugin.settings import PLUGIN_NAME, Settings
from server_plugin.watcher import RegistryWatcher

logger = logging.getLogger(__name__)

# Routes whose JSON body names a model; a pinned "name@vNNNN" is loaded before vLLM looks.
_MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class VllmTransport:
    """Change vLLM's served names in-process (``compat.ServingModels``)."""

    def __init__(self, models: compat.ServingModels) -> None:
        self.models = models

    async def load(self, served_name: str, path: str) -> None:
        existing = self.models.get(served_name)
        if existing is not None:
            if existing.path == path:
                return
            raise LoadError(
                f"{served_name} is already served from {existing.path}; "
                "versions are never reloaded in place"
            )
        refused = await self.models.load(served_name, path)
        if refused is not None:
            raise LoadError(f"vLLM refused to load {path}: {refused}")

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
    )


def _error(status: int, message: str, err_type: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": "model", "code": status}},
        status_code=status,
    )


class PinnedModelMiddleware:
    """Load ``model="name@vNNNN"`` on first use, before vLLM checks the model name.

    Peeks at the JSON body of the model routes only when it contains an ``@``; every other
    request passes through untouched.
    """

    def __init__(self, app: ASGIApp, plugin: EndpointPlugin) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reconciler = self.plugin.reconciler
        if (
            reconciler is None
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope["path"].removeprefix(scope.get("root_path", "")) not in _MODEL_ROUTES
        ):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if b"@" in body:
            error = await self._ensure_pinned(reconciler, body)
            if error is not None:
                await _error(400, error, "BadRequestError")(scope, receive, send)
                return

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _ensure_pinned(reconciler: Reconciler, body: bytes) -> str | None:
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return None  # vLLM reports the bad body itself
        if not isinstance(model, str) or "@" not in model:
            return None
        try:
            return await reconciler.ensure_pinned(model)
        except Exception:
            logger.exception("agent_finetune: loading pinned %s failed", model)
            return None


class EndpointPlugin:
    """Entry point ``agent_finetune`` of ``vllm.endpoint_plugins``."""

    name = PLUGIN_NAME
    required_tasks: tuple[str, ...] | None = ("generate",)

    def __init__(self) -> None:
        self.reconciler: Reconciler | None = None
        self.watcher: RegistryWatcher | None = None
        self.error: str | None = None
        self.internals: compat.Internals | None = None
        self.models: compat.ServingModels | None = None
        self._task: asyncio.Task[None] | None = None

    def attach_router(self, app: Any) -> None:
        try:
            self.internals = compat.detect()
        except VllmCompatError as e:
            self.error = str(e)
            logger.error("agent_finetune: %s; plugin disabled", e)
        try:
            compat.replace_route(app, "/v1/adapters", self.adapters, ["GET"])
            if self.internals is not None:  # else vLLM's own /v1/models keeps answering
                compat.replace_route(app, "/v1/models", self.list_models, ["GET"])
            app.add_middleware(PinnedModelMiddleware, plugin=self)
        except Exception:
            logger.exception("agent_finetune: attaching routes failed; plugin disabled")

    async def list_models(self, request: Request) -> Response:
        """vLLM's ``/v1/models``, listing each adapter under its served name."""
        models = self.models
        if models is None and self.internals is not None:
            models = compat.ServingModels.from_state(request.app.state, self.internals)
        if models is None:
            return _error(503, self.error or "agent_finetune plugin is starting", "Unavailable")
        return JSONResponse(content=await models.model_list())

    async def adapters(self, request: Request) -> Response:
        """Per adapter name: desired and live version, state, last error, load times."""
        if self.reconciler is None:
            return JSONResponse(
                {
                    "error": {
                        "message": self.error or "agent_finetune plugin is starting",
                        "type": "ServiceUnavailable",
                        "code": 503,
                    }
                },
                status_code=503,
            )
        return JSONResponse(self.reconciler.status())

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        try:
            await self._init_state(engine_client, state, args)
        except Exception as e:
            self.error = f"agent_finetune plugin failed to start: {type(e).__name__}: {e}"
            logger.exception("agent_finetune: plugin failed to start; serving without it")

    async def _init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
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
            self.internals = self.internals or compat.detect()
            models = self.models = compat.ServingModels.from_state(state, self.internals)
        except (ValueError, VllmCompatError) as e:
            self.error = str(e)
            logger.error("agent_finetune: %s; plugin disabled", e)
            return
        limits = _limits(engine_client, args, settings)
        cache = AdapterCache(process_cache_dir(settings.cache_dir), limits)
        reconciler = Reconciler(
            Registry(settings.registry),
            cache,
            VllmTransport(models),
            resync_s=settings.resync_s,
            max_pinned=settings.max_pinned,
            cache_grace_s=settings.cache_grace_s,
        )
        self.watcher = RegistryWatcher(
            settings.registry,
            reconciler.wake,
            polling=settings.polling,
            poll_interval_s=min(1.0, settings.resync_s),
        )
        atexit.register(self.watcher.stop)
        # Serve every current version before the server reports ready.
        await reconciler.reconcile_once()
        self.reconciler = reconciler
        self._task = asyncio.get_running_loop().create_task(
            reconciler.run(before_pass=self.watcher.start), name="agent_finetune-reconcile"
        )
        self._task.add_done_callback(_log_task_end)
        logger.info(
            "agent_finetune: serving registry %s (cache %s, max rank %s, resync %.2fs, %s)",
            settings.registry,
            cache.root,
            limits.max_rank,
            settings.resync_s,
            "polling" if settings.polling else "inotify",
        )


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
