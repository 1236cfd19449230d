"""An adapter's weights written in the dtype vLLM serves LoRA in, once, by the server's copy.

vLLM's worker casts every LoRA tensor to its ``lora_dtype`` each time it loads an adapter
(``LoRAModel.from_lora_tensors``: ``tensor.to(dtype=...)``), inside the engine's step loop:
every running request waits for it. Trainers save LoRA weights in fp32 (PEFT keeps them fp32
under bf16 autocast) or fp16, and the served dtype is usually bf16, so that cast is most of
a real-size load. The server's verified copy (``server_plugin.cache``) is written in the
served dtype instead, with the same torch cast (bit-identical to what vLLM would compute),
in a worker thread of the API server, ahead of the swap.

Only casts that cannot overflow are made: to bf16 or fp32 (bf16 has fp32's exponent range).
A narrowing cast to fp16 is left to vLLM, as are tensors of other dtypes. Needs torch and
safetensors (present wherever vLLM is); without them the file is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

from agent_finetune.registry.adapter import read_safetensors

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
"""safetensors dtype -> torch dtype name."""
_SAFE_TARGETS = frozenset({"BF16", "F32"})
_FLOATS = frozenset({"BF16", "F16", "F32"})


def safetensors_dtype(torch_dtype: object) -> str | None:
    """``torch.bfloat16`` (or ``"bfloat16"``) -> ``"BF16"``; None for other dtypes."""
    name = str(torch_dtype).removeprefix("torch.")
    return next((k for k, v in TORCH_DTYPES.items() if v == name), None)


def needs_cast(path: Path, target: str) -> bool:
    """Whether ``path`` holds float tensors in another dtype that may be cast to ``target``."""
    if target not in _SAFE_TARGETS:
        return False
    header = read_safetensors(path)
    return any(t.dtype in _FLOATS and t.dtype != target for t in header.tensors.values())


def cast_weights(path: Path, target: str) -> bool:
    """Rewrite ``path`` (a safetensors file) with its float tensors in ``target``; whether it
    did. Leaves the file as it is when no cast is needed or safe, or torch is missing."""
    if not needs_cast(path, target):
        return False
    try:
        import safetensors.torch
        import torch
    except ImportError:
        return False
    dtype = getattr(torch, TORCH_DTYPES[target])
    tensors = safetensors.torch.load_file(str(path))
    cast = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = _metadata(path)
    tmp = path.with_name(f".{path.name}.cast")
    safetensors.torch.save_file(cast, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return True


def _metadata(path: Path) -> dict[str, str] | None:
    """The file's ``__metadata__`` (PEFT writes ``{"format": "pt"}``), kept across the cast."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__")
    if isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()):
        return dict(meta)
    return None
