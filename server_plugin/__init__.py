"""Hot-load every version of every registry adapter into a running vLLM server.

Two ways to run the same reconcile loop (``server_plugin.reconciler``):

- in-process, as the vLLM endpoint plugin ``agent_finetune`` (``server_plugin.plugin``;
  enable with ``VLLM_PLUGINS=agent_finetune``; ``agent-finetune serve`` does it for you);
- as a sidecar over vLLM's runtime LoRA HTTP API (``agent-finetune sync``,
  ``server_plugin.sidecar``; needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` on that server).

Settings come from ``AGENT_FINETUNE_*`` environment variables, documented in
``server_plugin.settings``.

Imports run one way: this package imports ``agent_finetune.registry`` and
``agent_finetune.errors`` only. Only ``server_plugin.compat`` imports vLLM internals (the
plugin reaches them through it), and importing this package imports nothing: the names below
load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server_plugin.launch import ServerHandle, start_server
    from server_plugin.reconciler import Reconciler
    from server_plugin.served import Transport
    from server_plugin.settings import Settings
    from server_plugin.status import AdapterStatus

__all__ = ["AdapterStatus", "Reconciler", "ServerHandle", "Settings", "Transport", "start_server"]

_LAZY = {
    "AdapterStatus": "server_plugin.status",
    "Reconciler": "server_plugin.reconciler",
    "Transport": "server_plugin.served",
    "ServerHandle": "server_plugin.launch",
    "start_server": "server_plugin.launch",
    "Settings": "server_plugin.settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'server_plugin' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
