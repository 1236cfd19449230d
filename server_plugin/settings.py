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
                                            (``~/.cache/...``); the plugin uses a
                                            ``pid-<pid>`` folder inside it.
``AGENT_FINETUNE_MAX_PINNED``    ``4``      Versioned names (``name@vNNNN``: pinned requests
                                            and recently replaced versions) kept loaded
                                            besides the live ones; least recently used go.
``AGENT_FINETUNE_STRICT_BASE``   ``1``      ``0``: do not compare the adapter's
                                            ``base_model_name_or_path`` with the served
                                            model (tensor shapes are still checked).
``AGENT_FINETUNE_CACHE_GRACE_S`` ``600``    Seconds a cache copy outlives its last served
                                            name (requests in flight may still need it).
===============================  =========  ===============================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent_finetune.registry.names import ENV_REGISTRY

PLUGIN_NAME = "agent_finetune"
"""The name of the vLLM endpoint plugin (pyproject.toml entry point, ``VLLM_PLUGINS``)."""
ENV_RESYNC = "AGENT_FINETUNE_RESYNC_S"
ENV_POLLING = "AGENT_FINETUNE_POLLING"
ENV_CACHE_DIR = "AGENT_FINETUNE_CACHE_DIR"
ENV_MAX_PINNED = "AGENT_FINETUNE_MAX_PINNED"
ENV_STRICT_BASE = "AGENT_FINETUNE_STRICT_BASE"
ENV_CACHE_GRACE = "AGENT_FINETUNE_CACHE_GRACE_S"

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
        )
