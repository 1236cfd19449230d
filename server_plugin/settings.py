"""Every serving setting in one place: its environment variable, default, bounds and meaning.

The plugin (inside vLLM) and the sidecar (``agent-finetune sync``) read the
``AGENT_FINETUNE_*`` variables through :meth:`Settings.from_env`; ``serve`` and ``sync``
turn only the flags a user gave into settings (:func:`as_env`), so a flag the user did
not give never overrides a variable they set. The reference table in README.md
("Serving settings") is generated from the fields below (``python -m
server_plugin.settings``) and checked by a test, as the training config's is.

The vLLM arguments that ``serve`` chooses when the user gives none are here too (the
constants after :class:`Settings`), as vLLM keeps its own in ``vllm/envs.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from agent_finetune.errors import ConfigError
from agent_finetune.registry.names import ENV_REGISTRY
from server_plugin.preload import PreloadPolicy

PLUGIN_NAME = "agent_finetune"
"""The name of the vLLM endpoint plugin (pyproject.toml entry point, ``VLLM_PLUGINS``)."""

Scope = Literal["both", "plugin", "sidecar"]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
PIN_POLICIES = ("any", "current")

ENV_CACHE_DIR = "AGENT_FINETUNE_CACHE_DIR"
ENV_RESYNC = "AGENT_FINETUNE_RESYNC_S"
ENV_POLLING = "AGENT_FINETUNE_POLLING"
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
ENV_LOAD_WAIT = "AGENT_FINETUNE_LOAD_WAIT_S"
ENV_MAX_PARSE_BYTES = "AGENT_FINETUNE_MAX_PARSE_BYTES"
ENV_DRAIN = "AGENT_FINETUNE_DRAIN_S"
ENV_PRELOAD = "AGENT_FINETUNE_PRELOAD"
ENV_MAX_STAGED = "AGENT_FINETUNE_MAX_STAGED"


@dataclass(frozen=True)
class Spec:
    """How one setting is read and documented."""

    env: str
    help: str
    parse: Callable[[str], Any]
    scope: Scope = "both"
    shown: str | None = None  # the default as the reference shows it (when not the value)
    flag: str | None = None  # the `serve` / `sync` flag that sets it


def _number(kind: type[float] | type[int], minimum: float, example: Any) -> Callable[[str], Any]:
    unit = "a number of seconds" if kind is float else "an integer"

    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"expected {unit}, e.g. {example}") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return parse


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _path(raw: str) -> Path:
    return Path(raw).expanduser().absolute()


def _pins(raw: str) -> str:
    value = raw.strip().lower()
    if value not in PIN_POLICIES:
        raise ValueError(f"expected one of {', '.join(PIN_POLICIES)}")
    return value


def _preload(raw: str) -> str:
    return str(PreloadPolicy.parse(raw))


@dataclass(frozen=True)
class Settings:
    """What the plugin and the sidecar are tuned by; ``Settings()`` is every default."""

    registry: Path | None = field(
        default=None,
        metadata={
            "spec": Spec(
                ENV_REGISTRY,
                "Registry folder to serve (required; `serve`/`sync --registry` set it).",
                _path,
                shown="(none)",
                flag="--registry",
            )
        },
    )
    cache_dir: Path | None = field(
        default=None,
        metadata={
            "spec": Spec(
                ENV_CACHE_DIR,
                "Where the verified copies of served versions live. The plugin owns a `proc-*` "
                "folder inside it (an flock held for its lifetime) and removes it at exit; `sync` "
                "keeps `sidecar-<server hash>/` (the server may re-read it).",
                _path,
                shown="`$XDG_CACHE_HOME/agent-finetune/served` (`sync`: `.../sidecar`)",
                flag="--cache-dir",
            )
        },
    )
    resync_s: float = field(
        default=2.0,
        metadata={
            "spec": Spec(
                ENV_RESYNC,
                "Seconds between periodic resyncs; filesystem events wake the loop earlier.",
                _number(float, 0.05, 2.0),
                flag="--resync",
            )
        },
    )
    polling: bool = field(
        default=False,
        metadata={
            "spec": Spec(
                ENV_POLLING,
                "`1`: watch the registry with a polling observer (network filesystems send no "
                "inotify events) instead of inotify.",
                _flag,
                flag="--polling",
            )
        },
    )
    max_pinned: int = field(
        default=4,
        metadata={
            "spec": Spec(
                ENV_MAX_PINNED,
                "Loaded versions no name routes to (pinned `name@vNNNN` requests, replaced "
                "versions kept for a fast rollback); the least recently used are unloaded.",
                _number(int, 0, 4),
                flag="--max-pinned",
            )
        },
    )
    max_staged: int = field(
        default=4,
        metadata={
            "spec": Spec(
                ENV_MAX_STAGED,
                "Versions loaded ahead of going live, so promote and rollback only repoint the "
                "name: a canary's candidate, the newest published version above `current`, the "
                "version a rollback returns to (in that order, for the names loaded); `0`: none.",
                _number(int, 0, 4),
                flag="--max-staged",
            )
        },
    )
    strict_base: bool = field(
        default=True,
        metadata={
            "spec": Spec(
                ENV_STRICT_BASE,
                "`0`: do not compare an adapter's `base_model_name_or_path` with the served "
                "model (tensor shapes are still checked).",
                _flag,
                flag="--no-strict-base",
            )
        },
    )
    cache_grace_s: float = field(
        default=600.0,
        metadata={
            "spec": Spec(
                ENV_CACHE_GRACE,
                "Seconds a copy outlives its last served name (requests in flight may still "
                "need it).",
                _number(float, 0.0, 600),
            )
        },
    )
    cache_max_bytes: int | None = field(
        default=None,
        metadata={
            "spec": Spec(
                ENV_CACHE_MAX_BYTES,
                "Byte bound on the copies. Copies of current versions are always made; any other "
                "copy that would pass the bound first evicts unused copies past their grace "
                "period, else its load is refused (503, retried later).",
                _number(int, 0, 20_000_000_000),
                shown="(none)",
            )
        },
    )
    retry_base_s: float = field(
        default=0.5,
        metadata={
            "spec": Spec(
                ENV_RETRY_BASE,
                "First delay before retrying a transient failure (I/O error, vLLM 5xx, timeout); "
                "doubles per attempt, with jitter.",
                _number(float, 0.01, 0.5),
            )
        },
    )
    retry_max_s: float = field(
        default=10.0,
        metadata={
            "spec": Spec(
                ENV_RETRY_MAX,
                "Cap on that delay.",
                _number(float, 0.01, 10),
            )
        },
    )
    unload_after: int = field(
        default=3,
        metadata={
            "spec": Spec(
                ENV_UNLOAD_AFTER,
                "Passes a name must be absent from a readable, marked registry before it is "
                "unloaded (a name whose folders cannot be read is kept as it is).",
                _number(int, 1, 3),
            )
        },
    )
    max_removals: int = field(
        default=16,
        metadata={
            "spec": Spec(
                ENV_MAX_REMOVALS,
                "Names unloaded at most per pass.",
                _number(int, 1, 16),
            )
        },
    )
    pins: str = field(
        default="any",
        metadata={
            "spec": Spec(
                ENV_PINS,
                "`any`: `name@vNNNN` may name any published version (the eval gate needs it); "
                "`current`: only versions `current` really pointed at (history) may be pinned.",
                _pins,
                scope="plugin",
            )
        },
    )
    max_loads: int = field(
        default=2,
        metadata={
            "spec": Spec(
                ENV_MAX_LOADS,
                "Loads for requests (pins, lazy names) running at once; more wait.",
                _number(int, 1, 2),
                scope="plugin",
            )
        },
    )
    load_wait_s: float = field(
        default=10.0,
        metadata={
            "spec": Spec(
                ENV_LOAD_WAIT,
                "Longest a request waits for a free load slot; then it is answered 503 (retry "
                "later) instead of queueing behind slow loads.",
                _number(float, 0.0, 10),
                scope="plugin",
            )
        },
    )
    max_parse_bytes: int = field(
        default=1 << 20,
        metadata={
            "spec": Spec(
                ENV_MAX_PARSE_BYTES,
                "Request bodies up to this size are read for their `model`; larger ones pass "
                "through unread (a pinned or lazy model must then already be loaded).",
                _number(int, 0, 1 << 20),
                scope="plugin",
            )
        },
    )
    drain_s: float = field(
        default=30.0,
        metadata={
            "spec": Spec(
                ENV_DRAIN,
                "Longest wait for running requests to finish before a name is loaded again over "
                "vLLM's HTTP API.",
                _number(float, 0.0, 30),
                scope="sidecar",
            )
        },
    )
    preload: str = field(
        default="auto",
        metadata={
            "spec": Spec(
                ENV_PRELOAD,
                "Names loaded before their first request: `all`, `none`, `recent:N` or `a,b,c`; "
                "`auto`: all while they fit `--max-cpu-loras`, else the most recently used. The "
                "others load on their first request (`server_plugin.preload`).",
                _preload,
                scope="plugin",
                flag="--preload",
            )
        },
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``AGENT_FINETUNE_*`` variable; ConfigError naming a bad one and its fix."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f, spec in specs():
            raw = env.get(spec.env)
            if raw is None or not raw.strip():  # empty: unset, as for every variable here
                continue
            try:
                values[f] = spec.parse(raw.strip())
            except ValueError as e:
                flag = f" (or {spec.flag})" if spec.flag else ""
                raise ConfigError(f"{spec.env}={raw!r}{flag}: {e}") from None
        return cls(**values)

    def registry_root(self) -> Path:
        """The registry folder; ConfigError saying how to set it when it is not."""
        if self.registry is None:
            raise ConfigError(
                f"{ENV_REGISTRY} is not set: point it at the adapter registry folder "
                "(agent-finetune serve --registry DIR sets it for you)"
            )
        return self.registry

    def cache_root(self, kind: Literal["served", "sidecar"] = "served") -> Path:
        """``cache_dir``, else ``$XDG_CACHE_HOME/agent-finetune/<kind>``."""
        if self.cache_dir is not None:
            return self.cache_dir
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "agent-finetune" / kind


def specs() -> Iterator[tuple[str, Spec]]:
    """Each setting's field name and spec, in the reference's order."""
    for f in fields(Settings):
        yield f.name, f.metadata["spec"]


def spec_of(name: str) -> Spec:
    return next(spec for f, spec in specs() if f == name)


def as_env(chosen: Mapping[str, Any]) -> dict[str, str]:
    """The variables that give these settings (field name -> value) their values: how
    ``serve`` hands the flags a user gave to the plugin inside vLLM."""
    out = {}
    for name, value in chosen.items():
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, Path):
            text = str(value.expanduser().absolute())
        else:
            text = str(value)
        out[spec_of(name).env] = text
    return out


# -- vLLM arguments that `serve` and `sync` choose when the user gives none -----------------
SERVE_PORT = 8000
MAX_LORAS = 4
MAX_LORA_RANK = 16
LAZY_MAX_CPU_LORAS = 64
CPU_KV_CACHE_GIB = "4"
ENV_CPU_KV_CACHE = "VLLM_CPU_KVCACHE_SPACE"
ENV_VLLM_PLUGINS = "VLLM_PLUGINS"
VLLM_DEFAULTS = (
    ("--port", SERVE_PORT, "`serve`: the HTTP port."),
    ("--max-loras", MAX_LORAS, "`serve`: adapters in one batch."),
    (
        "--max-lora-rank",
        MAX_LORA_RANK,
        "`serve`: raised to the smallest rank vLLM accepts that fits every current version; "
        "`sync`: the rank it assumes the server was started with.",
    ),
    (
        "--max-cpu-loras",
        LAZY_MAX_CPU_LORAS,
        "`serve`: every name plus `AGENT_FINETUNE_MAX_PINNED` and `AGENT_FINETUNE_MAX_STAGED` "
        "under `--preload all`, else at most this many (more for a larger `recent:N` or name "
        "list).",
    ),
    (
        ENV_CPU_KV_CACHE,
        CPU_KV_CACHE_GIB,
        "`serve`, on a CPU host where it is unset: GiB of KV cache (vLLM's own default "
        "reserves most free memory and starts much slower).",
    ),
    (ENV_VLLM_PLUGINS, PLUGIN_NAME, "`serve`: added to the plugins vLLM would load anyway."),
)
"""What ``serve`` and ``sync`` pass to vLLM when the user gives none (arguments after ``--``
and variables the user set win)."""


def reference_markdown() -> str:
    """The "Serving settings" tables of README.md (kept in sync by a test)."""
    rows = ["| variable | flag | default | used by | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, spec in specs():
        default = getattr(Settings(), name)
        shown = spec.shown or f"`{_shown(default)}`"
        flag = f"`{spec.flag}`" if spec.flag else ""
        text = spec.help.replace("|", "\\|")
        rows.append(f"| `{spec.env}` | {flag} | {shown} | {spec.scope} | {text} |")
    rows += ["", "| vLLM argument | default | where |", "| --- | --- | --- |"]
    rows += [f"| `{arg}` | `{value}` | {text} |" for arg, value, text in VLLM_DEFAULTS]
    return "\n".join(rows)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


if __name__ == "__main__":  # python -m server_plugin.settings > the reference table
    print(reference_markdown())
