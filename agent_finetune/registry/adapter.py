"""A PEFT LoRA adapter folder on disk, and the checks that decide whether vLLM can serve it.

No torch: the server plugin and the CLI use it to validate an adapter before vLLM ever sees
it. vLLM itself accepts some broken adapters silently (another base model's shapes, embedding
targets, NaN weights) and dies or serves garbage later. ``validate_adapter`` runs four steps,
each collecting problems: the config (``check_adapter_config``), the safetensors header
(``parse_safetensors_header``, as strict as the safetensors library), the tensors against the
config and the base model (``check_tensors``), and a NaN/Inf scan (``count_nonfinite``; numpy
is imported for it only).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_finetune.errors import AdapterFormatError, ValidationError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

# The linear layers vLLM's LoRA path serves for decoder-only models (Llama, Qwen2,
# Mistral, Gemma, ...). Embeddings and lm_head are refused: vLLM accepts them silently and
# then serves garbage or dies (README, "Troubleshooting").
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
SERVABLE_MODULES = frozenset(LINEAR_MODULES)
# The parent of each servable module in the decoder layer (``layers.N.<parent>.<module>``).
MODULE_PARENT = {
    **dict.fromkeys(ATTENTION_MODULES, "self_attn"),
    **dict.fromkeys(MLP_MODULES, "mlp"),
}

DEFAULT_MAX_RANK = 512
"""Rank limit when the caller gives none: the largest ``--max-lora-rank`` vLLM accepts."""


def unservable_modules(target_modules: Iterable[str]) -> list[str]:
    """The target modules vLLM's LoRA path cannot serve (embeddings, lm_head, anything else)."""
    return sorted(set(target_modules) - SERVABLE_MODULES)


FORBIDDEN_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out"})

_LORA_KEY = re.compile(
    r"(?P<prefix>.*)\.(?P<module>[^.]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight", re.ASCII
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.", re.ASCII)
_PEFT_PREFIX = "base_model.model."

# safetensors dtypes (safetensors/src/tensor.rs `Dtype`) and their size in bits.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
# LoRA weights must be one of these; they are the ones the NaN/Inf scan reads.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's limit

# PEFT ``init_lora_weights`` values that only set the initial weights, so the saved adapter is a
# plain LoRA (vllm/lora/peft_helper.py `_init_is_supported`).
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: the tensors and where the data section starts in the file."""

    tensors: dict[str, TensorInfo]
    data_start: int


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


# -- step 2: the safetensors header ---------------------------------------------------------
def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise AdapterFormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise AdapterFormatError(f"{name} is not valid JSON")


def _tensor_info(name: str, info: Any) -> TensorInfo:
    """One header entry, checked like safetensors' TensorInfo; raises AdapterFormatError."""
    if not isinstance(info, dict):
        raise AdapterFormatError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise AdapterFormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    # bool is an int in Python; JSON's Infinity/NaN/1e3 parse as floats: all refused here.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise AdapterFormatError(f"tensor {name!r}: shape {shape!r} is not a list of integers >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise AdapterFormatError(
            f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with integers >= 0"
        )
    start, end = offsets
    if end < start:
        raise AdapterFormatError(f"tensor {name!r}: data_offsets {offsets} end before they begin")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - start:
        raise AdapterFormatError(
            f"tensor {name!r}: {dtype} shape {shape} needs {bits / 8:g} bytes, "
            f"data_offsets {offsets} hold {end - start}"
        )
    return TensorInfo(dtype, tuple(shape), start, end)


def parse_safetensors_header(head: bytes, file_size: int) -> SafetensorsHeader:
    """Parse the header at the start of a safetensors file of ``file_size`` bytes.

    ``head`` holds at least the file's first ``8 + header length`` bytes (or the whole file).
    The checks are the safetensors library's: a JSON object of known dtypes, integer shapes,
    offsets contiguous from 0 with the last one at the end of the file, and byte counts that
    match the shapes. Raises AdapterFormatError, and nothing else, for any input.
    """
    if len(head) < 8 or file_size < 8:
        raise AdapterFormatError(f"not a safetensors file ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise AdapterFormatError(
            f"header length {header_len} exceeds the file ({file_size} bytes): truncated?"
        )
    if len(head) < 8 + header_len:
        raise AdapterFormatError(f"header needs {8 + header_len} bytes, got {len(head)}")
    try:
        header = json.loads(
            head[8 : 8 + header_len],
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except AdapterFormatError as e:
        raise AdapterFormatError(f"unreadable safetensors header: {e}") from None
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, int-digits limit, deep nesting
        raise AdapterFormatError(f"unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError("__metadata__ must map strings to strings")
    tensors = {name: _tensor_info(name, info) for name, info in header.items()}
    data_len = file_size - 8 - header_len
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else "leaves a gap before it"
            raise AdapterFormatError(
                f"tensor {name!r}: data_offsets [{t.start}, {t.end}] {what} (expected {pos})"
            )
        pos = t.end
    if pos != data_len:
        if pos > data_len:
            raise AdapterFormatError(
                f"truncated: tensors need {8 + header_len + pos} bytes, file has {file_size}"
            )
        raise AdapterFormatError(f"{data_len - pos} trailing bytes after the last tensor")
    return SafetensorsHeader(tensors, 8 + header_len)


def read_safetensors(path: Path) -> SafetensorsHeader:
    """Read and parse ``path``'s header; AdapterFormatError (naming the file) on any problem."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                head += f.read(min(n, MAX_HEADER_BYTES))
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return parse_safetensors_header(head, size)
    except AdapterFormatError as e:
        raise AdapterFormatError(f"{path}: {e}") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file; AdapterFormatError (a ValueError) if it is bad."""
    return read_safetensors(path).tensors


# -- step 1: adapter_config.json ------------------------------------------------------------
def read_adapter_config(folder: Path) -> dict[str, Any]:
    """Load ``adapter_config.json`` from an adapter folder; ValidationError says why not."""
    path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problem = f"{path}: missing; is {folder} a PEFT adapter folder?"
    except (ValueError, RecursionError) as e:
        problem = f"{path}: invalid JSON: {e}"
    except OSError as e:
        problem = f"{path}: cannot read: {e.strerror or e}"
    else:
        if isinstance(data, dict):
            return data
        problem = f"{path}: expected a JSON object"
    raise ValidationError(problem, [problem])


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive_int(x: Any) -> bool:
    return type(x) is int and x > 0


RankOf = Callable[[str], int | None]


def _compile_pattern(
    cfg: dict[str, Any], key: str, ok: Callable[[Any], bool], want: str, problems: list[str]
) -> list[tuple[re.Pattern[str], Any]]:
    """``rank_pattern``/``alpha_pattern`` compiled with PEFT's rule (suffix at a '.' boundary)."""
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict):
        problems.append(f"{key}={pattern!r} must map module patterns to values")
        return []
    out = []
    for k, v in pattern.items():
        if not ok(v):
            problems.append(f"{key}[{k!r}]={v!r}: expected {want}")
            continue
        try:
            out.append((re.compile(rf"(.*\.)?({k})"), v))
        except re.error as e:
            problems.append(f"{key}: {k!r} is not a valid pattern: {e}")
    return out


def check_adapter_config(
    cfg: dict[str, Any], report: AdapterReport, max_rank: int | None
) -> RankOf:
    """Check the config as vLLM's PEFTHelper does; return module name -> expected rank."""
    problems = report.problems
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be served")
    limit = max_rank if max_rank is not None else DEFAULT_MAX_RANK
    rank = cfg.get("r")
    if not _positive_int(rank):
        problems.append(f"adapter_config.json: r={rank!r} is not a positive integer")
    else:
        report.rank = rank
    if "lora_alpha" not in cfg:
        problems.append(
            "adapter_config.json: lora_alpha is missing; vLLM requires it (PEFT's default is 8); "
            "add the lora_alpha the adapter was trained with"
        )
    elif not _is_number(cfg["lora_alpha"]):
        problems.append(f"adapter_config.json: lora_alpha={cfg['lora_alpha']!r} is not a number")
    if "target_modules" not in cfg:
        problems.append("adapter_config.json: target_modules is missing; vLLM requires it")
    ranks = _compile_pattern(cfg, "rank_pattern", _positive_int, "a positive integer", problems)
    _compile_pattern(cfg, "alpha_pattern", _is_number, "a number", problems)
    for where, r in [("r", report.rank)] + [(f"rank_pattern {p.pattern}", v) for p, v in ranks]:
        if r is not None and r > limit:
            problems.append(
                f"rank {where}={r} exceeds the server's --max-lora-rank {limit}; retrain with "
                f"lora_r <= {limit} or restart the server with a larger --max-lora-rank"
                + ("" if max_rank is not None else " (pass --max-rank to set the limit)")
            )
    _check_refused_options(cfg, problems)

    def rank_of(module_path: str) -> int | None:
        for pattern, value in ranks:
            if pattern.fullmatch(module_path):
                return int(value)
        return report.rank

    return rank_of


def _check_refused_options(cfg: dict[str, Any], problems: list[str]) -> None:
    """PEFT options that vLLM refuses (vllm/lora/peft_helper.py), with the reason and the fix."""
    if cfg.get("modules_to_save"):
        problems.append(
            f"modules_to_save={cfg['modules_to_save']!r}: vLLM cannot serve fully trained "
            "modules; train without modules_to_save"
        )
    if cfg.get("use_dora"):
        problems.append("use_dora=true: vLLM cannot serve DoRA adapters; train with use_dora=false")
    if cfg.get("lora_bias"):
        problems.append("lora_bias=true: vLLM does not support LoRA bias; train without it")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r}: vLLM serves only bias='none'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(
            f"init_lora_weights={init!r}: inits such as PiSSA, OLoRA, CorDA and LoftQ change the "
            "base weights, which vLLM does not; convert the adapter with PEFT's "
            "path_initial_model_for_weight_conversion"
        )
    for key, what in [
        ("layer_replication", "layer_replication"),
        ("use_qalora", "QALoRA (use_qalora)"),
        ("alora_invocation_tokens", "Activated LoRA (alora_invocation_tokens)"),
        ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ]:
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]!r}: vLLM does not support {what}")


# -- step 3: tensors vs config vs base model ------------------------------------------------
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


def num_layers(base_config: dict[str, Any]) -> int | None:
    """The base model's decoder layer count, when its config says."""
    n = base_config.get("text_config", base_config).get("num_hidden_layers")
    return n if type(n) is int else None


def check_tensors(
    tensors: dict[str, TensorInfo],
    report: AdapterReport,
    rank_of: RankOf,
    allowed: set[str],
    base_config: dict[str, Any] | None,
) -> None:
    """Every tensor is a LoRA A/B weight of a servable module that exists in the base model."""
    problems = report.problems
    shapes: dict[str, tuple[int, int]] | None = None
    layers = None
    if base_config is not None:
        try:
            shapes = linear_shapes(base_config)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            problems.append(f"base model config lacks {e} needed for the shape check")
        layers = num_layers(base_config)
    modules: set[str] = set()
    halves: dict[str, set[str]] = {}
    for key, info in tensors.items():
        if "modules_to_save" in key:
            problems.append(f"tensor {key}: modules_to_save weights cannot be served")
            continue
        m = _LORA_KEY.fullmatch(key)
        if not m:
            problems.append(f"tensor {key}: not a LoRA A/B weight (embedding or full weight?)")
            continue
        module, ab, prefix = m["module"], m["ab"], m["prefix"]
        modules.add(module)
        halves.setdefault(f"{prefix}.{module}", set()).add(ab)
        if module in FORBIDDEN_MODULES or module not in allowed:
            continue  # reported once per module below
        if info.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {key}: dtype {info.dtype} is not one of {FLOAT_DTYPES}")
        if len(info.shape) != 2:
            problems.append(f"tensor {key}: expected 2 dimensions, got shape {list(info.shape)}")
            continue
        path = f"{prefix}.{module}".removeprefix(_PEFT_PREFIX)
        want_r = rank_of(path)
        r_dim = info.shape[0] if ab == "A" else info.shape[1]
        if want_r is not None and r_dim != want_r:
            problems.append(
                f"tensor {key}: shape {list(info.shape)} does not match rank r={want_r}"
            )
        if base_config is not None:
            problems.extend(_check_location(key, prefix, module, layers))
        if shapes is not None and module in shapes:
            in_f, out_f = shapes[module]
            other = info.shape[1] if ab == "A" else info.shape[0]
            if other != (in_f if ab == "A" else out_f):
                problems.append(
                    f"tensor {key}: shape {list(info.shape)} does not fit the base model "
                    f"({module} has in={in_f}, out={out_f}); was it trained on another model?"
                )
    if not tensors:
        problems.append(f"{ADAPTER_WEIGHTS}: holds no tensors")
    for path, got in sorted(halves.items()):
        if got != {"A", "B"}:
            missing = ({"A", "B"} - got).pop()
            problems.append(f"{path}: has lora_{got.pop()} but no lora_{missing} weight")
    for module in sorted(modules - allowed):
        problems.append(
            f"target module {module!r} cannot be served by vLLM; use only "
            f"{', '.join(sorted(allowed))}"
        )
    report.target_modules = sorted(modules)


def _check_location(key: str, prefix: str, module: str, layers: int | None) -> list[str]:
    """The module sits at ``layers.<i>.<parent>.<module>`` with ``i`` < the base's layer count."""
    m = _LAYER.search(prefix + ".")
    if not m:
        return [f"tensor {key}: no layers.<index> in its path; the base model has no such module"]
    out = []
    index = int(m[1])
    if layers is not None and index >= layers:
        out.append(
            f"tensor {key}: layer {index} does not exist in the base model "
            f"({layers} layers); was it trained on another model?"
        )
    parent = prefix.rsplit(".", 1)[-1]
    if module in MODULE_PARENT and parent != MODULE_PARENT[module]:
        out.append(
            f"tensor {key}: {module} sits under {parent!r}, the base model has it under "
            f"{MODULE_PARENT[module]!r}"
        )
    return out


# -- step 4: NaN / Inf -----------------------------------------------------------------------
def count_nonfinite(path: Path, header: SafetensorsHeader) -> dict[str, int]:
    """NaN/Inf count of each float tensor holding any, read straight from the file's bytes."""
    import numpy as np  # the registry's only non-stdlib import, needed only here

    # F16/BF16: NaN or Inf exactly when all exponent bits are set; F32/F64: isfinite.
    masks = {"F16": 0x7C00, "BF16": 0x7F80}
    floats: dict[str, Any] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
    bad: dict[str, int] = {}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name, t in header.tensors.items():
            if t.dtype not in FLOAT_DTYPES or t.end == t.start:
                continue
            offset = header.data_start + t.start
            if t.dtype in masks:
                mask = masks[t.dtype]
                raw = np.frombuffer(mm, np.uint16, (t.end - t.start) // 2, offset)
                n = int(np.count_nonzero((raw & mask) == mask))
            else:
                dt = floats[t.dtype]
                raw = np.frombuffer(mm, dt, (t.end - t.start) // dt.itemsize, offset)
                n = int(raw.size - np.count_nonzero(np.isfinite(raw)))
            del raw  # release the buffer before the map closes
            if n:
                bad[name] = n
    return bad


def load_base_config(base_model: str | Path) -> dict[str, Any] | None:
    """The base model's ``config.json`` when ``base_model`` is a local folder, else None."""
    path = Path(base_model) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterFormatError(f"{path}: cannot read the base model's config: {e}") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    return data


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
    scan_values: bool = True,
) -> AdapterReport:
    """Check that vLLM can serve the LoRA adapter in ``folder``; collect every problem.

    ``max_rank`` defaults to DEFAULT_MAX_RANK. ``base_config`` (a model's config.json)
    enables the shape, layer and module-path checks; ``base_model`` with ``check_base_name``
    compares the adapter's ``base_model_name_or_path``. ``scan_values`` reads every weight
    for NaN/Inf.
    """
    folder = Path(folder)
    report = AdapterReport(path=folder)
    problems = report.problems
    try:
        if not folder.is_dir():
            problems.append(f"{folder}: not a folder")
            return report
        cfg = read_adapter_config(folder)
    except ValueError as e:
        problems.append(str(e))
        return report
    rank_of = check_adapter_config(cfg, report, max_rank)
    name_or_path = cfg.get("base_model_name_or_path")
    report.base_model = name_or_path if isinstance(name_or_path, str) else None
    if (
        check_base_name
        and base_model
        and report.base_model
        and not _same_model(report.base_model, base_model)
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
        header = read_safetensors(weights)
    except AdapterFormatError as e:
        problems.append(str(e))
        return report
    check_tensors(header.tensors, report, rank_of, set(servable_modules), base_config)
    if scan_values:
        try:
            bad = count_nonfinite(weights, header)
        except (OSError, ValueError) as e:
            problems.append(f"{weights}: cannot scan the weights: {e}")
            return report
        for name, n in sorted(bad.items())[:5]:
            size = math.prod(header.tensors[name].shape)
            problems.append(
                f"tensor {name}: {n} of {size} values are NaN/Inf; training diverged "
                "(retrain with a lower learning_rate)"
            )
        if len(bad) > 5:
            problems.append(f"... and {len(bad) - 5} more tensors with NaN/Inf values")
    return report
