"""Plugin and sidecar settings, read from environment variables.

===============================  =========  ===============================================
Variable                         Default    Meaning
===============================  =========  ===============================================
``AGENT_FINETUNE_REGISTRY``      (none)     Registry folder to serve (required).
``AGENT_FINETUNE_RESYNC_S``      ``2.0``    Seconds between periodic resyncs; filesystem
                                            events wake the loop earlier.
``AGENT_FINETUNE_POLLING``       ``0``      ``1``: watch the registry with a polling
                                            observer (network filesystems send no inotify
                                            events) instead of inotify.
``AGENT_FINETUNE_CACHE_DIR``     see below  Where verified copies of served versions live.
                                            Default ``$XDG_CACHE_HOME/agent-finetune/served``
                                            (``~/.cache/...``); each process owns a
                                            ``proc-*`` folder inside it (an flock held for
                                            its lifetime) and removes it at exit.
``AGENT_FINETUNE_MAX_PINNED``    ``4``      Versioned names (``name@vNNNN``: pinned requests
                                            and recently replaced versions) kept loaded
                                            besides the live ones; least recently used go.
``AGENT_FINETUNE_STRICT_BASE``   ``1``      ``0``: do not compare the adapter's
                                            ``base_model_name_or_path`` with the served
                                            model (tensor shapes are still checked).
``AGENT_FINETUNE_CACHE_GRACE_S`` ``600``    Seconds a cache copy outlives its last served
                                            name (requests in flight may still need it).
``AGENT_FINETUNE_CACHE_MAX_BYTES`` (none)   Byte bound on the cache copies. Copies of
                                            current versions are always made; a pinned or
                                            retained copy that would pass the bound first
                                            evicts unused copies past their grace period,
                                            else its load is refused (503, retried later).
``AGENT_FINETUNE_RETRY_BASE_S``  ``0.5``    First delay before retrying a transient failure
                                            (I/O error, vLLM 5xx or timeout); doubles per
                                            attempt, with jitter.
``AGENT_FINETUNE_RETRY_MAX_S``   ``10``     Cap on that delay.
``AGENT_FINETUNE_UNLOAD_AFTER``  ``3``      Passes a name must be absent from a readable,
                                            marked registry before it is unloaded.
``AGENT_FINETUNE_MAX_REMOVALS``  ``16``     Names unloaded at most per pass.
``AGENT_FINETUNE_PINS``          ``any``    ``any``: ``name@vNNNN`` may name any published
                                            version (the eval gate needs it);
                                            ``current``: only versions that were ever
                                            ``current`` (history) may be pinned.
``AGENT_FINETUNE_MAX_LOADS``     ``2``      Pinned loads running at once; more wait.
``AGENT_FINETUNE_MAX_PARSE_BYTES`` ``1048576``  Request bodies up to this size are parsed
                                            for a pinned ``model``; larger ones pass through
                                            untouched (vLLM answers them; a pin must then
                                            already be loaded).
``AGENT_FINETUNE_DRAIN_S``       ``30``     Sidecar: longest wait for running requests to
                                            finish before a name is reloaded.
===============================  =========  ===============================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune.registry.names import ENV_REGISTRY

PLUGIN_NAME = "agent_finetune"
"""The name of the vLLM endpoint plugin (pyproject.toml entry point, ``VLLM_PLUGINS``)."""
ENV_RESYNC = "AGENT_FINETUNE_RESYNC_S"
ENV_POLLING = "AGENT_FINETUNE_POLLING"
ENV_CACHE_DIR = "AGENT_FINETUNE_CACHE_DIR"
ENV_MAX_PINNED = "AGENT_FINETUNE_MAX_PINNED"
ENV_STRICT_BASE = "AGENT_FINETUNE_STRICT_BASE"
ENV_CACHE_GRACE = "AGENT_FINETUNE_CACHE_GRACE_S"
ENV_CACHE_MAX_BYTES = "AGENT_FINETUNE_CACHE_MAX_BYTES"
ENV_RETRY_BASE = "AGENT_FINETUNE_RETRY_BASE_S"
ENV_RETRY_MAX = "AGENT_FINETUNE_RETRY_MAX_S"
ENV_UNLOAD_AFTER = "AGENT_FINETUNE_UNLOAD_AFTER"
ENV_MAX_REMOVALS = "AGENT_FINETUNE_MAX_REMOVALS"
ENV_PINS = "AGENT_FINETUNE_PINS"
ENV_MAX_LOADS = "AGENT_FINETUNE_MAX_LOADS"
ENV_MAX_PARSE_BYTES = "AGENT_FINETUNE_MAX_PARSE_BYTES"
ENV_DRAIN = "AGENT_FINETUNE_DRAIN_S"
PIN_POLICIES = ("any", "current")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/agent-finetune/served`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agent-finetune" / "served"


def _float(env: dict[str, str], key: str, default: float, minimum: float) -> float:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected a number of seconds, e.g. {default}") from None
    if value < minimum:
        raise ValueError(f"{key}={raw!r}: must be >= {minimum}")
    return value


def _int(env: dict[str, str], key: str, default: int, minimum: int) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r}: expected an integer, e.g. {default}") from None
    if value < minimum:
        raise ValueError(f"{key}={raw!r}: must be >= {minimum}")
    return value


def _bool(env: dict[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{key}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def _choice(env: dict[str, str], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(key, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{key}={env.get(key)!r}: expected one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the reconcile loop needs to know besides the server's own limits."""

    registry: Path
    cache_dir: Path
    resync_s: float = 2.0
    polling: bool = False
    max_pinned: int = 4
    strict_base: bool = True
    cache_grace_s: float = 600.0
    cache_max_bytes: int | None = None
    retry_base_s: float = 0.5
    retry_max_s: float = 10.0
    unload_after: int = 3
    max_removals: int = 16
    pins: str = "any"
    max_loads: int = 2
    max_parse_bytes: int = 1 << 20
    drain_s: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Read the ``AGENT_FINETUNE_*`` variables; raise ValueError naming a bad one."""
        env = dict(os.environ if env is None else env)
        registry = env.get(ENV_REGISTRY, "").strip()
        if not registry:
            raise ValueError(
                f"{ENV_REGISTRY} is not set: point it at the adapter registry folder "
                "(agent-finetune serve --registry DIR sets it for you)"
            )
        cache = env.get(ENV_CACHE_DIR, "").strip()
        return cls(
            registry=Path(registry).expanduser().absolute(),
            cache_dir=Path(cache).expanduser().absolute() if cache else default_cache_root(),
            resync_s=_float(env, ENV_RESYNC, 2.0, 0.05),
            polling=_bool(env, ENV_POLLING, False),
            max_pinned=_int(env, ENV_MAX_PINNED, 4, 0),
            strict_base=_bool(env, ENV_STRICT_BASE, True),
            cache_grace_s=_float(env, ENV_CACHE_GRACE, 600.0, 0.0),
            cache_max_bytes=_int(env, ENV_CACHE_MAX_BYTES, -1, 0)
            if env.get(ENV_CACHE_MAX_BYTES, "").strip()
            else None,
            retry_base_s=_float(env, ENV_RETRY_BASE, 0.5, 0.01),
            retry_max_s=_float(env, ENV_RETRY_MAX, 10.0, 0.01),
            unload_after=_int(env, ENV_UNLOAD_AFTER, 3, 1),
            max_removals=_int(env, ENV_MAX_REMOVALS, 16, 1),
            pins=_choice(env, ENV_PINS, "any", PIN_POLICIES),
            max_loads=_int(env, ENV_MAX_LOADS, 2, 1),
            max_parse_bytes=_int(env, ENV_MAX_PARSE_BYTES, 1 << 20, 0),
            drain_s=_float(env, ENV_DRAIN, 30.0, 0.0),
        )


def reconciler_options(settings: Settings) -> dict[str, Any]:
    """The ``Reconciler`` keyword arguments these settings choose (plugin and sidecar)."""
    return {
        "resync_s": settings.resync_s,
        "max_pinned": settings.max_pinned,
        "retry_base_s": settings.retry_base_s,
        "retry_max_s": settings.retry_max_s,
        "unload_after": settings.unload_after,
        "max_removals": settings.max_removals,
        "pins": settings.pins,
        "max_loads": settings.max_loads,
    }
