"""FP8 frozen base weights for LoRA training (``precision: fp8``).

LoRA never updates the base model's weights, so each one is cast to FP8 (``float8_e4m3fn``)
once, when the model is loaded, with its scale; every step then runs the base projections on
the FP8 tensor cores through ``torch._scaled_mm``:

- forward: ``x @ W.T``, the activation quantized on the fly (e4m3);
- backward: only the input gradient ``grad @ W`` (a frozen weight needs no weight gradient),
  the gradient quantized on the fly (e5m2 with per-tensor scales, e4m3 with per-row scales);
  ``W`` is kept a second time, transposed, so that both products read it in the layout the
  FP8 kernels require.

What stays in higher precision: LoRA's A/B weights, their gradients and the optimizer state
(fp32), everything outside the base projections (attention, norms, the loss, lm_head) in bf16.

Scaling: ``tensor`` (one scale per tensor: the activation's absolute maximum needs a
reduction over the whole tensor first) or ``row`` (one scale per token and per output
channel: more robust to outlier tokens). The quantization of activations and gradients is
compiled with ``torch.compile`` on CUDA (one fused pass instead of four); on the CPU it runs
eagerly, which is how the tests check the same arithmetic.

FP8 matrix multiplication needs tensor cores that have it: NVIDIA compute capability 8.9 or
newer (Ada, Hopper, Blackwell). ``unsupported_reason()`` says why it cannot run here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger("agent_finetune")

Scaling = Literal["tensor", "row"]
SCALINGS: tuple[Scaling, ...] = ("tensor", "row")
DEFAULT_SCALING: Scaling = "row"
MIN_CAPABILITY = (8, 9)
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
_MIN_AMAX = 1e-12  # an all-zero row keeps a finite scale
# _scaled_mm needs the reduction dimension and the output dimension to be multiples of 16.
ALIGNMENT = 16
# A projection with fewer outputs stays bf16: its GEMM is too small to repay quantizing its
# input (the 7B shape's GQA k_proj/v_proj ran 3x slower in FP8: BENCHMARKS.md's FP8 probe).
# Module-level so a numerics check can put every projection in FP8.
MIN_OUT_FEATURES = 1024


def unsupported_reason() -> str | None:
    """None when FP8 training can run on this machine's current CUDA device, else why not."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return f"this torch ({torch.__version__}) has no FP8 matrix multiplication"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        return (
            f"the GPU ({name}, compute capability {major}.{minor}) has no FP8 tensor cores; "
            f"they need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)"
        )
    return None


def quantize(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with ``x ~= q * scale``: q in ``dtype``, scale fp32 of shape (rows, 1) when
    ``rowwise`` else a 0-dim tensor. ``x`` is 2-D."""
    fp8_max = _FP8_MAX[dtype]
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if rowwise else x32.abs().amax()
    scale = amax.clamp(min=_MIN_AMAX) / fp8_max
    return (x32 / scale).clamp(-fp8_max, fp8_max).to(dtype), scale


_compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def _quantize_fast(
    x: torch.Tensor, dtype: torch.dtype, rowwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize``, compiled into one or two fused kernels on CUDA (eager elsewhere)."""
    global _compiled
    if not x.is_cuda:
        return quantize(x, dtype, rowwise)
    if _compiled is None:
        # dynamic: packed batches change the token count every step; one graph serves them all
        _compiled = torch.compile(quantize, dynamic=True)
    # detached and outside autocast, so that the forward's activations (which require grad,
    # under autocast) and the backward's gradients share one compiled graph per dtype
    with torch.autocast("cuda", enabled=False):
        return _compiled(x.detach(), dtype, rowwise)


class _FP8Matmul(torch.autograd.Function):  # type: ignore[misc]
    """``x @ W.T + b`` with a frozen FP8 ``W``; returns the input gradient only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: FP8Linear) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        xq, xs = _quantize_fast(x2, E4M3, layer.rowwise)
        out = torch._scaled_mm(
            xq,
            layer.weight_fp8.t(),
            scale_a=xs,
            scale_b=layer.scale_b_forward,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        if layer.bias is not None:
            out = out + layer.bias
        return out.view(*shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer: FP8Linear = ctx.layer
        shape = grad.shape
        g2 = grad.reshape(-1, shape[-1])
        if not g2.is_contiguous():
            g2 = g2.contiguous()
        # e5m2's range for per-tensor scales; a per-row scale already spans the range, and the
        # row-scaled kernels take e4m3 operands only
        gq, gs = _quantize_fast(g2, E4M3 if layer.rowwise else E5M2, layer.rowwise)
        grad_x = torch._scaled_mm(
            gq,
            layer.weight_t_fp8.t(),
            scale_a=gs,
            scale_b=layer.scale_b_backward,
            out_dtype=torch.bfloat16,
        )
        return grad_x.view(*shape[:-1], layer.in_features).to(ctx.x_dtype), None


class FP8Linear(nn.Module):  # type: ignore[misc]
    """A frozen ``nn.Linear`` whose weight lives in FP8 (twice: as is and transposed).

    Buffers only (no parameters, nothing saved in a state dict): the adapter is what gets saved.
    """

    weight_fp8: torch.Tensor
    weight_t_fp8: torch.Tensor
    scale_b_forward: torch.Tensor
    scale_b_backward: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scaling: Scaling) -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.out_features, self.in_features = weight.shape
        self.rowwise = scaling == "row"
        w = weight.detach()
        if self.rowwise:
            # forward: one scale per output channel; backward reads W per input channel
            wq, ws = quantize(w, E4M3, rowwise=True)
            wtq, wts = quantize(w.t(), E4M3, rowwise=True)
            forward_scale, backward_scale = ws.reshape(1, -1), wts.reshape(1, -1)
        else:
            wq, ws = quantize(w, E4M3, rowwise=False)
            wtq, forward_scale, backward_scale = wq.t(), ws, ws
        self.register_buffer("weight_fp8", wq.contiguous(), persistent=False)
        self.register_buffer("weight_t_fp8", wtq.contiguous(), persistent=False)
        self.register_buffer("scale_b_forward", forward_scale.contiguous(), persistent=False)
        self.register_buffer("scale_b_backward", backward_scale.contiguous(), persistent=False)
        b = None if bias is None else bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", b, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scaling: Scaling = DEFAULT_SCALING) -> FP8Linear:
        return cls(linear.weight, linear.bias, scaling)

    @property
    def weight(self) -> torch.Tensor:
        """The FP8 weight (for code that inspects a base layer's weight dtype, shape or device)."""
        return self.weight_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _FP8Matmul.apply(x, self)
        return out

    def extra_repr(self) -> str:
        scaling = "row" if self.rowwise else "tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scaling={scaling}"
        )


def convertible(linear: nn.Module) -> bool:
    """A plain nn.Linear whose shapes the FP8 kernels take and whose GEMM repays FP8."""
    return (
        type(linear) is nn.Linear
        and linear.in_features % ALIGNMENT == 0
        and linear.out_features % ALIGNMENT == 0
        and linear.out_features >= MIN_OUT_FEATURES
    )


def convert_lora_base_layers(model: nn.Module, scaling: Scaling | None = None) -> dict[str, int]:
    """Swap the frozen base layer of every PEFT LoRA linear for an FP8Linear, in place.

    ``scaling``: None reads ``DEFAULT_SCALING`` at call time. Returns counts: ``converted`` and
    ``kept`` (shapes the FP8 kernels refuse, and narrow projections, stay bf16). The bf16
    weights are released as each layer is swapped.
    """
    from peft.tuners.lora import Linear as LoraLinear

    scaling = scaling or DEFAULT_SCALING
    counts = {"converted": 0, "kept": 0}
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.base_layer
        if not convertible(base) or base.weight.requires_grad:
            counts["kept"] += 1
            continue
        module.base_layer = FP8Linear.from_linear(base, scaling)
        counts["converted"] += 1
    log.info(
        "precision fp8: %d base projections in FP8 (%s scaling), %d kept in bf16",
        counts["converted"],
        scaling,
        counts["kept"],
    )
    return counts
