"""A PEFT LoRA adapter folder on disk, and the checks that decide whether vLLM can serve it.

Pure Python (no torch): the server plugin and the CLI use it to validate an adapter
before vLLM ever sees it. vLLM itself accepts some broken adapters silently (another
base model's shapes, embedding targets) and dies or serves garbage later.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

# The linear layers vLLM's LoRA path serves for decoder-only models (Llama, Qwen2,
# Mistral, Gemma, ...). Embeddings and lm_head are refused: see DESIGN.md.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERVABLE_MODULES = frozenset(LINEAR_MODULES)


def unservable_modules(target_modules: Iterable[str]) -> list[str]:
    """The target modules vLLM's LoRA path cannot serve (embeddings, lm_head, anything else)."""
    return sorted(set(target_modules) - SERVABLE_MODULES)


FORBIDDEN_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out"})

_LORA_KEY = re.compile(
    r"^(?P<prefix>.*)\.(?P<module>[^.]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's dtype and shape from a safetensors header."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class AdapterReport:
    """What validation found. ``ok`` is True when ``problems`` is empty."""

    path: Path
    rank: int | None = None
    target_modules: list[str] = field(default_factory=list)
    base_model: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header; raise ValueError if the file is truncated or bad."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100 * 1024 * 1024:
            raise ValueError(f"{path}: header length {header_len} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not an object")
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "shape" not in info or "data_offsets" not in info:
            raise ValueError(f"{path}: tensor {name!r} has no shape/data_offsets")
        tensors[name] = TensorInfo(str(info.get("dtype")), tuple(int(d) for d in info["shape"]))
        end = max(end, int(info["data_offsets"][1]))
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path}: truncated: tensors need {8 + header_len + end} bytes, file has {size}"
        )
    return tensors


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Load ``adapter_config.json`` from an adapter folder."""
    path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; is {folder} a PEFT adapter folder?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def linear_shapes(base_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each servable linear layer of a decoder-only model."""
    cfg = base_config.get("text_config", base_config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg["intermediate_size"])
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def load_base_config(base_model: str | Path) -> dict[str, Any] | None:
    """The base model's ``config.json`` when ``base_model`` is a local folder, else None."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _same_model(a: str, b: str) -> bool:
    """Model names match if equal, or if both name the same folder / final path part."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return pa.name == pb.name and bool(pa.name)


def validate_adapter(
    folder: str | Path,
    *,
    max_rank: int | None = None,
    base_model: str | None = None,
    base_config: dict[str, Any] | None = None,
    check_base_name: bool = True,
    servable_modules: Iterable[str] = SERVABLE_MODULES,
) -> AdapterReport:
    """Check that vLLM can serve the LoRA adapter in ``folder``; collect every problem.

    ``base_config`` (a model's config.json) enables shape checks; ``base_model`` with
    ``check_base_name`` compares the adapter's ``base_model_name_or_path``.
    """
    folder = Path(folder)
    report = AdapterReport(path=folder)
    problems = report.problems
    if not folder.is_dir():
        problems.append(f"{folder}: not a folder")
        return report
    try:
        cfg = read_adapter_config(folder)
    except ValueError as e:
        problems.append(str(e))
        return report

    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be served")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"adapter_config.json: r={rank!r} is not a positive integer")
    else:
        report.rank = rank
        if max_rank is not None and rank > max_rank:
            problems.append(
                f"rank r={rank} exceeds the server's --max-lora-rank {max_rank}; retrain with "
                f"lora_r <= {max_rank} or restart the server with a larger --max-lora-rank"
            )
    if cfg.get("modules_to_save"):
        problems.append(
            f"modules_to_save={cfg['modules_to_save']!r}: vLLM cannot serve fully trained "
            "modules; train without modules_to_save"
        )
    if cfg.get("use_dora"):
        problems.append("use_dora=true: vLLM cannot serve DoRA adapters; train with use_dora=false")
    report.base_model = cfg.get("base_model_name_or_path")
    if (
        check_base_name
        and base_model
        and report.base_model
        and not _same_model(str(report.base_model), base_model)
    ):
        problems.append(
            f"base_model_name_or_path {report.base_model!r} does not match the served model "
            f"{base_model!r}; an adapter only works on the model it was trained on"
        )

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        problems.append(f"{weights.name}: missing (only safetensors adapters are served)")
        return report
    try:
        tensors = read_safetensors_header(weights)
    except (OSError, ValueError) as e:
        problems.append(str(e))
        return report

    allowed = set(servable_modules)
    shapes = linear_shapes(base_config) if base_config else None
    modules: set[str] = set()
    for key, info in tensors.items():
        if "modules_to_save" in key:
            problems.append(f"tensor {key}: modules_to_save weights cannot be served")
            continue
        m = _LORA_KEY.match(key)
        if not m:
            problems.append(f"tensor {key}: not a LoRA A/B weight (embedding or full weight?)")
            continue
        module = m["module"]
        modules.add(module)
        if module in FORBIDDEN_MODULES or module not in allowed:
            continue  # reported once per module below
        if len(info.shape) != 2:
            problems.append(f"tensor {key}: expected 2 dimensions, got shape {list(info.shape)}")
            continue
        if report.rank is not None:
            r_dim = info.shape[0] if m["ab"] == "A" else info.shape[1]
            if r_dim != report.rank:
                problems.append(
                    f"tensor {key}: shape {list(info.shape)} does not match rank r={report.rank}"
                )
        if shapes is not None:
            in_f, out_f = shapes[module]
            other = info.shape[1] if m["ab"] == "A" else info.shape[0]
            want = in_f if m["ab"] == "A" else out_f
            if other != want:
                problems.append(
                    f"tensor {key}: shape {list(info.shape)} does not fit the base model "
                    f"({module} has in={in_f}, out={out_f}); was it trained on another model?"
                )
    if not tensors:
        problems.append(f"{weights.name}: holds no tensors")
    for module in sorted(modules - allowed):
        problems.append(
            f"target module {module!r} cannot be served by vLLM; use only "
            f"{', '.join(sorted(allowed))}"
        )
    report.target_modules = sorted(modules)
    return report
