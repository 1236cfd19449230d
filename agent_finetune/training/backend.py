"""Choosing and loading a training backend: Unsloth on CUDA, transformers + PEFT elsewhere.

Choosing is an ``if``, not a framework: ``resolve_backend`` returns "unsloth" or "hf" and
``load_for_training`` returns a PEFT model and its tokenizer for either.
"""

from __future__ import annotations

import importlib.util
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

from agent_finetune.errors import BackendError, ModelSourceError
from agent_finetune.training.checkpointing import Plan
from agent_finetune.training.config import FineTuningConfig

log = logging.getLogger("agent_finetune")
Backend = Literal["unsloth", "hf"]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def liger_usable() -> bool:
    """Liger's Triton kernels (fused RMSNorm, SwiGLU, RoPE, linear cross-entropy) need CUDA."""
    return importlib.util.find_spec("liger_kernel") is not None and cuda_available()


def resolve_backend(config: FineTuningConfig) -> Backend:
    """The backend to use; raise BackendError if ``unsloth`` or ``precision: fp8`` is asked for
    but cannot run here."""
    if config.precision == "fp8":
        check_fp8()
        if config.backend == "auto":
            log.info("backend auto -> hf (precision: fp8 runs on the hf backend)")
        return "hf"  # the config refuses backend: unsloth with fp8
    if config.backend == "hf":
        return "hf"
    can_unsloth = unsloth_installed() and cuda_available()
    if config.backend == "unsloth" and not can_unsloth:
        why = "no CUDA GPU is visible" if not cuda_available() else "Unsloth is not installed"
        raise BackendError(
            f"backend: unsloth was requested but {why}; use backend: hf (or auto), or run on a "
            "CUDA machine with `pip install 'agent-finetune[gpu]'`"
        )
    chosen: Backend = "unsloth" if can_unsloth else "hf"
    if config.backend == "auto":
        log.info("backend auto -> %s", chosen)
    if chosen == "unsloth":
        # Unsloth patches transformers/TRL on import: it must come before them.
        import unsloth  # noqa: F401
    return chosen


HUB_PROBE_TIMEOUT_S = 5.0


def _hub_reachable(endpoint: str) -> str | None:
    """None when the hub answers at all (any HTTP status), else why it cannot be reached."""
    try:
        urllib.request.urlopen(f"{endpoint}/api/status", timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def check_model_source(model_name: str) -> bool:
    """Fail fast when ``model_name`` cannot be loaded; return whether to load from cache only.

    A hub id with no network would otherwise hang for over a minute in huggingface_hub's
    retries before a traceback. A local folder is always fine; a hub id needs the hub or a
    copy in the Hugging Face cache (then it is loaded from there, with a warning).
    """
    path = Path(model_name).expanduser()
    if path.is_dir():
        return False
    if model_name.startswith((".", "/", "~")) or model_name.count("/") > 1:
        raise ModelSourceError(f"model_name {model_name!r}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model_name, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise ModelSourceError(
            f"model_name {model_name!r} is not a local folder nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE=1 forbids downloading it: pass a local model folder, or "
            "unset HF_HUB_OFFLINE on a machine with network access"
        )
    why = _hub_reachable(constants.ENDPOINT)
    if why is None:
        return False
    if cached:
        log.warning(
            "%s is unreachable (%s); loading %s from the cache", constants.ENDPOINT, why, model_name
        )
        return True
    raise ModelSourceError(
        f"model_name {model_name!r} is not a local folder and {constants.ENDPOINT} cannot be "
        f"reached ({why}): pass a local model folder, download the model where there is "
        "network, or set HF_HUB_OFFLINE=1 to use only the Hugging Face cache"
    )


def check_fp8() -> None:
    """Refuse ``precision: fp8`` where the GPU has no FP8 tensor cores (or there is no GPU)."""
    from agent_finetune.training import fp8

    why = fp8.unsupported_reason()
    if why is not None:
        raise BackendError(
            f"precision: fp8 cannot run here: {why}; use precision: default "
            "(bf16 on the GPU, fp32 on a CPU)"
        )


def check_precision(config: FineTuningConfig) -> None:
    """fp16 mixed precision needs CUDA; bf16 runs on CUDA (Ampere+) and on the CPU."""
    if config.fp16 and not cuda_available():
        raise BackendError(
            "fp16: true needs a CUDA GPU; on this machine use bf16: true (CPU bf16 works) "
            "or neither"
        )


def _dtype(config: FineTuningConfig) -> Any:
    import torch

    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return torch.float32 if not cuda_available() else "auto"


def load_for_training(
    config: FineTuningConfig, backend: Backend, checkpointing: Plan
) -> tuple[Any, Any]:
    """(PEFT model with fresh LoRA weights, tokenizer) for ``config.model_name``."""
    check_precision(config)
    if backend == "unsloth":
        return _load_unsloth(config, checkpointing)
    return _load_hf(config, checkpointing)


def _load_unsloth(config: FineTuningConfig, checkpointing: Plan) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # imported first by resolve_backend

    check_model_source(config.model_name)
    if config.packing:
        from agent_finetune.training.varlen_attention import enable_in_unsloth

        log.info("packed attention: %s", enable_in_unsloth())

    dtype = None if not (config.bf16 or config.fp16) else _dtype(config)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=config.model_name,
        max_seq_length=config.max_seq_length,
        dtype=dtype,
        load_in_4bit=config.load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora_r,
        target_modules=config.target_modules,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        bias="none",
        use_gradient_checkpointing=checkpointing.unsloth_mode,
        random_state=config.seed,
    )
    return model, _ensure_pad(tokenizer)


def _load_hf(config: FineTuningConfig, checkpointing: Plan) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = check_model_source(config.model_name)
    kwargs: dict[str, Any] = {"dtype": _dtype(config), "local_files_only": local_only}
    if cuda_available():
        from agent_finetune.training import varlen_attention

        if varlen_attention.HAS_TORCH_VARLEN:
            # one flash call per layer over all documents of a packed (or padded) batch
            kwargs["attn_implementation"] = varlen_attention.register()
    if config.load_in_4bit:
        if not cuda_available():
            raise BackendError(
                "load_in_4bit needs a CUDA GPU (bitsandbytes); set load_in_4bit: false"
            )
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if config.bf16 else torch.float16,
        )
    model = AutoModelForCausalLM.from_pretrained(config.model_name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name, local_files_only=local_only)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing.recompute
        )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.bf16 or config.fp16:
        _keep_lora_inputs_in_half(model)
    if config.precision == "fp8":
        from agent_finetune.training import fp8

        fp8.convert_lora_base_layers(model)
    fuse_lora_add(model)
    return model, _ensure_pad(tokenizer)


def fuse_lora_add(model: Any) -> int:
    """Give every plain LoRA linear (one adapter, no dropout, no DoRA) a forward that adds the
    scaled LoRA product to the base output inside one GEMM (``addmm``, as Unsloth does), instead
    of PEFT's ``result + lora_B(lora_A(x)) * scaling``: two elementwise passes over the output
    in the forward and one in the backward saved, per projection. Returns how many it changed;
    anything else (adapters disabled or merged, several adapters, extra arguments) still goes
    through PEFT's own forward."""
    import types

    from peft.tuners.lora import Linear as LoraLinear
    from torch import nn

    changed = 0
    for module in model.modules():
        if type(module) is not LoraLinear or len(module.lora_A) != 1:
            continue
        name = next(iter(module.lora_A))
        plain = (
            isinstance(module.lora_dropout[name], nn.Identity)
            and not module.use_dora.get(name, False)
            and not getattr(module, "lora_bias", {}).get(name, False)
            and getattr(module, "lora_variant", {}).get(name) is None
        )
        if plain:
            module.forward = types.MethodType(_lora_addmm_forward, module)
            changed += 1
    return changed


def _lora_addmm_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch
    import torch.nn.functional as F

    adapters = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    result = self.base_layer(x)
    dtype = result.dtype
    xa = F.linear(x.to(dtype), self.lora_A[name].weight.to(dtype))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        xa.reshape(-1, xa.shape[-1]),
        self.lora_B[name].weight.to(dtype).t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def _keep_lora_inputs_in_half(model: Any) -> None:
    """PEFT keeps LoRA weights in fp32 (the optimizer's master copy) and casts every LoRA input
    to fp32 to match: a full copy of each projection's input, then autocast casts it back to
    bf16 for the matmul. Under the Trainer's autocast (bf16/fp16) the cast buys nothing: the
    matmul runs in half precision either way, and only the small weights need casting."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def _ensure_pad(tokenizer: Any) -> Any:
    # Reuse EOS as padding: adding a pad token would resize embeddings, which vLLM cannot serve.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
