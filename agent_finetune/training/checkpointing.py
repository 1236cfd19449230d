"""Gradient checkpointing policy: ``gradient_checkpointing: auto | on | off | offload``.

Checkpointing trades memory for a second forward pass (its cost on the H200: BENCHMARKS.md,
"GPU training (H200)"). ``auto`` turns it off when the run's estimated peak memory without it
fits in the device's free memory with a margin, else on (Unsloth: its offloaded variant):

    peak_off = weights + LoRA state + layers * tokens * activation_bytes_per_token_layer
               + tokens * vocab * LOGIT_BYTES
    off  if  peak_off * MARGIN + RESERVE_BYTES <= free memory

``activation_bytes_per_token_layer`` counts the tensors autograd keeps per decoder layer (bf16
unless noted), from the layer's shape:

- hf (transformers + PEFT): 2 RMSNorms that keep fp32 copies (3 x 4h bytes each), the normed
  inputs of the attention and MLP LoRA branches (2h each), attention's q/k/v/out (4 x 2h: K/V
  are repeated to the query heads for the varlen kernel), the o_proj input (2h), and the MLP's
  gate, up, silu(gate) and product (4 x 2i): 38h + 8i bytes.
- unsloth: fused norm, RoPE, SwiGLU and LoRA kernels keep less: 12h + 6i bytes, an upper
  bound of what the 7B shape was measured to keep.
- hf with Liger's kernels (CUDA): its RMSNorm and SwiGLU keep no fp32 copies or intermediate
  products, and its fused linear cross-entropy never holds the whole logits tensor (no logits
  term): 20h + 6i bytes, an upper bound of the hf peak measured with Liger
  (BENCHMARKS.md, GPU training round 3).

The estimate errs high on purpose: BENCHMARKS.md ("GPU training (H200), round 2") lists each
measured peak without checkpointing beside its estimate.

An out-of-memory error with checkpointing off (as ``auto`` chose it) retries the run once with
checkpointing on; the retry is logged and recorded in metrics.json.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from agent_finetune.errors import ConfigError

log = logging.getLogger("agent_finetune")

Setting = Literal["auto", "on", "off", "offload"]
SETTINGS: tuple[Setting, ...] = ("auto", "on", "off", "offload")
GIB = 2**30
MARGIN = 1.2  # on top of an estimate that already errs high (BENCHMARKS.md, round 2 peaks)
RESERVE_BYTES = 3 * GIB  # CUDA context, allocator fragmentation, cuBLAS/cuDNN workspaces
LOGIT_BYTES = 6  # bf16 logits + one fp32 row of a (chunked) cross-entropy, per token and vocab
LORA_STATE_BYTES = 16  # fp32 weight + grad + two Adam moments per LoRA parameter


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only model's config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int
    weight_bytes: int = 2  # bf16 / fp16

    @classmethod
    def from_config(cls, cfg: Any, weight_bytes: int = 2) -> ModelShape:
        def get(key: str, default: Any = None) -> Any:
            return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)

        h, layers = int(get("hidden_size")), int(get("num_hidden_layers"))
        heads = int(get("num_attention_heads"))
        kv = int(get("num_key_value_heads") or heads)
        hd = int(get("head_dim") or h // heads)
        inter, vocab = int(get("intermediate_size")), int(get("vocab_size"))
        per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
        embeddings = vocab * h * (1 if get("tie_word_embeddings", False) else 2)
        return cls(
            h, inter, layers, heads, kv, hd, vocab, layers * per_layer + embeddings, weight_bytes
        )

    def lora_params(self, rank: int) -> int:
        """LoRA parameters on all 7 linear layers of every decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        dims = [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden),
                (self.hidden, self.intermediate), (self.hidden, self.intermediate),
                (self.intermediate, self.hidden)]  # fmt: skip
        return self.layers * rank * sum(a + b for a, b in dims)


def activation_bytes_per_token_layer(shape: ModelShape, backend: str, liger: bool = False) -> int:
    h, i = shape.hidden, shape.intermediate
    if backend == "unsloth":
        return 12 * h + 6 * i
    return 20 * h + 6 * i if liger else 38 * h + 8 * i


def estimate_peak_bytes(
    shape: ModelShape,
    tokens: int,
    backend: str,
    *,
    checkpointing: bool,
    lora_rank: int = 16,
    liger: bool = False,
) -> int:
    """Peak device memory of one training step over ``tokens`` tokens (batch x length);
    ``liger``: the hf backend with Liger's kernels."""
    liger = liger and backend == "hf"
    per_layer = activation_bytes_per_token_layer(shape, backend, liger) * tokens
    # With checkpointing: each layer keeps its input (2h per token) and one layer is live.
    acts = (
        shape.layers * 2 * shape.hidden * tokens + per_layer
        if checkpointing
        else shape.layers * per_layer
    )
    return (
        shape.params * shape.weight_bytes
        + shape.lora_params(lora_rank) * LORA_STATE_BYTES
        + acts
        + (0 if liger else tokens * shape.vocab * LOGIT_BYTES)
    )


@dataclass(frozen=True)
class Plan:
    """The decision, and why; ``as_metrics()`` goes into metrics.json."""

    setting: str
    recompute: bool  # checkpointing on
    offload: bool  # Unsloth's offloaded variant (activations parked in host memory)
    reason: str
    estimate_off_gib: float | None = None
    free_gib: float | None = None
    retried_after_oom: bool = False

    @property
    def unsloth_mode(self) -> bool | str:
        """``use_gradient_checkpointing`` for Unsloth's get_peft_model."""
        return "unsloth" if self.offload else self.recompute

    def as_metrics(self) -> dict[str, Any]:
        return asdict(self)

    def after_oom(self, error: BaseException) -> Plan:
        return replace(
            self,
            recompute=True,
            retried_after_oom=True,
            reason=f"{self.reason}; out of memory without checkpointing "
            f"({str(error).splitlines()[0][:160]}), retried with it on",
        )


def decide(
    setting: str,
    shape: ModelShape | None,
    *,
    tokens: int,
    backend: str,
    free_bytes: int | None,
    lora_rank: int = 16,
    liger: bool = False,
) -> Plan:
    """The pure decision: no device, no files. ``free_bytes`` None means unknown."""
    if setting not in SETTINGS:
        raise ConfigError(f"gradient_checkpointing must be one of {SETTINGS}, got {setting!r}")
    offload_ok = backend == "unsloth"
    if setting == "on":
        return Plan(setting, True, False, "gradient_checkpointing: on")
    if setting == "off":
        return Plan(setting, False, False, "gradient_checkpointing: off")
    if setting == "offload":
        why = "gradient_checkpointing: offload"
        if not offload_ok:
            why += " (the hf backend has no offloaded variant: plain recompute)"
        return Plan(setting, True, offload_ok, why)
    if shape is None or free_bytes is None:
        what = "model shape" if shape is None else "free device memory"
        return Plan(setting, True, offload_ok, f"auto: {what} unknown, so checkpointing on")
    need = estimate_peak_bytes(
        shape, tokens, backend, checkpointing=False, lora_rank=lora_rank, liger=liger
    )
    fits = need * MARGIN + RESERVE_BYTES <= free_bytes
    need_gib, free_gib = round(need / GIB, 2), round(free_bytes / GIB, 2)
    verdict = "fits, so checkpointing off" if fits else "does not fit, so checkpointing on"
    reason = (
        f"auto: estimated peak without checkpointing {need_gib} GiB x {MARGIN} + "
        f"{RESERVE_BYTES // GIB} GiB vs {free_gib} GiB free ({tokens} tokens a step): {verdict}"
    )
    return Plan(setting, not fits, offload_ok and not fits, reason, need_gib, free_gib)


def plan_for(config: Any, backend: str, *, liger: bool = False) -> Plan:
    """Decide for a FineTuningConfig before its model is loaded; logs the decision. ``liger``:
    the hf backend will use Liger's kernels."""
    setting = config.gradient_checkpointing
    shape = None
    free = None
    if setting == "auto":
        shape = _read_shape(config.model_name, 1 if config.load_in_4bit else 2)
        free = free_memory_bytes()
    plan = decide(
        setting,
        shape,
        tokens=config.batch_size * config.max_seq_length,
        backend=backend,
        free_bytes=free,
        lora_rank=config.lora_r,
        liger=liger,
    )
    log.info("gradient checkpointing %s: %s", "on" if plan.recompute else "off", plan.reason)
    return plan


def free_memory_bytes() -> int | None:
    """Free memory of the training device: the current CUDA device, else host RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except (ImportError, RuntimeError):
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _read_shape(model_name: str, weight_bytes: int) -> ModelShape | None:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_name)
        cfg = getattr(cfg, "text_config", None) or cfg
        return ModelShape.from_config(cfg, weight_bytes)
    except Exception as e:  # a shape we cannot read only costs the optimisation
        log.warning("gradient_checkpointing auto: cannot read the shape of %s (%s)", model_name, e)
        return None


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def may_retry(plan: Plan, error: BaseException) -> bool:
    """Retry once, and only a decision ``auto`` made: an explicit ``off`` is the user's."""
    return (
        plan.setting == "auto"
        and not plan.recompute
        and not plan.retried_after_oom
        and is_out_of_memory(error)
    )


def release_memory() -> None:
    """Free what a failed attempt left on the device before the retry."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
