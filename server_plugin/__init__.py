"""Hot-load every version of every registry adapter into a running vLLM server.

Two ways to run the same reconcile loop (``server_plugin.reconciler``):

- in-process, as the vLLM endpoint plugin ``agent_finetune`` (``server_plugin.plugin``;
  enable with ``VLLM_PLUGINS=agent_finetune``; ``agent-finetune serve`` does it for you);
- as a sidecar over vLLM's runtime LoRA HTTP API (``agent-finetune sync``,
  ``server_plugin.sidecar``; needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on that server).

Settings come from ``AGENT_FINETUNE_*`` environment variables, documented in
``server_plugin.settings``: ``AGENT_FINETUNE_REGISTRY`` (required),
``AGENT_FINETUNE_RESYNC_S`` (2.0), ``AGENT_FINETUNE_POLLING`` (0),
``AGENT_FINETUNE_CACHE_DIR`` (~/.cache/agent-finetune/served),
``AGENT_FINETUNE_MAX_PINNED`` (4), ``AGENT_FINETUNE_STRICT_BASE`` (1),
``AGENT_FINETUNE_CACHE_GRACE_S`` (600).

Only ``server_plugin.plugin`` imports vLLM; importing this package does not.
"""

from server_plugin.commands import add_serve_parser, add_sync_parser
from server_plugin.launch import ServerHandle, start_server
from server_plugin.reconciler import AdapterStatus, LoadError, Reconciler, Transport
from server_plugin.settings import Settings

__all__ = [
    "AdapterStatus",
    "LoadError",
    "Reconciler",
    "ServerHandle",
    "Settings",
    "Transport",
    "add_serve_parser",
    "add_sync_parser",
    "start_server",
]
