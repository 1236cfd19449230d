"""agent-finetune: fine-tune LoRA adapters, publish them to a registry, hot-swap them in vLLM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent_finetune._version import __version__

if TYPE_CHECKING:
    from agent_finetune.training.config import FineTuningConfig
    from agent_finetune.training.inference import generate_text, load_model_and_tokenizer
    from agent_finetune.training.train import run_fine_tuning

__all__ = [
    "FineTuningConfig",
    "__version__",
    "generate_text",
    "load_model_and_tokenizer",
    "run_fine_tuning",
]

# Heavy modules (torch, transformers) load on first use, so `agent-finetune list` and the
# server plugin start fast.
_LAZY = {
    "FineTuningConfig": "agent_finetune.training.config",
    "run_fine_tuning": "agent_finetune.training.train",
    "load_model_and_tokenizer": "agent_finetune.training.inference",
    "generate_text": "agent_finetune.training.inference",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agent_finetune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
