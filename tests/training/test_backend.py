from __future__ import annotations

from typing import Any

import pytest

from agent_finetune.errors import BackendError, ConfigError
from agent_finetune.training.backend import cuda_available, fuse_lora_add, resolve_backend
from agent_finetune.training.config import FineTuningConfig


def _rel(a: Any, b: Any) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_hf_is_always_available_and_auto_falls_back() -> None:
    assert resolve_backend(FineTuningConfig(backend="hf")) == "hf"
    if not cuda_available():
        assert resolve_backend(FineTuningConfig(backend="auto")) == "hf"


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only error")
def test_unsloth_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match=r"no CUDA GPU.*backend: hf"):
        resolve_backend(FineTuningConfig(backend="unsloth"))


def test_unservable_target_modules_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="wte"):
        FineTuningConfig.from_dict({"target_modules": ["q_proj", "wte"]}, source="test")
    FineTuningConfig()


def _hf_model(tiny_model: Any, monkeypatch: pytest.MonkeyPatch, *, cuda: bool, bf16: bool) -> Any:
    from agent_finetune.training import backend
    from agent_finetune.training.checkpointing import decide

    monkeypatch.setattr(backend, "cuda_available", lambda: cuda)
    config = FineTuningConfig(model_name=str(tiny_model), backend="hf", bf16=bf16)
    plan = decide("off", None, tokens=1, backend="hf", free_bytes=None)
    model, _ = backend.load_for_training(config, "hf", plan)
    return model


def test_hf_backend_takes_varlen_attention_where_cuda_is(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the hf backend loads the varlen path (here its CPU reference runs it)."""
    import torch

    from agent_finetune.training.varlen_attention import ATTN_IMPLEMENTATION

    model = _hf_model(tiny_model, monkeypatch, cuda=True, bf16=False)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = torch.randint(3, 100, (1, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    packed = model(input_ids=ids, position_ids=pos).logits
    second = model(input_ids=ids[:, 5:]).logits
    torch.testing.assert_close(packed[:, 5:], second, atol=1e-4, rtol=1e-4)
    assert _hf_model(
        tiny_model, monkeypatch, cuda=False, bf16=False
    ).config._attn_implementation in (
        "sdpa",
        "eager",
    )


def test_hf_backend_keeps_lora_inputs_in_bf16_and_trains_under_autocast(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fp32 copy of each LoRA input; the fp32 LoRA weights (the optimizer's master copy)
    stay fp32 and autocast runs the matmul in bf16, as the Trainer's bf16 mode does."""
    import torch
    from peft.tuners.lora import LoraLayer

    model = _hf_model(tiny_model, monkeypatch, cuda=False, bf16=True)
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert lora and all(not m.cast_input_dtype_enabled for m in lora)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in lora)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=torch.randint(3, 100, (2, 9)), labels=torch.randint(3, 100, (2, 9)))
    out.loss.backward()
    assert all(m.lora_B["default"].weight.grad is not None for m in lora)


def test_fused_lora_add_equals_peft_forward_and_backward(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 on the CPU: the addmm forward is PEFT's ``result + lora_B(lora_A(x)) * s``."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    model = _hf_model(tiny_model, monkeypatch, cuda=False, bf16=False)
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert lora and all("forward" in vars(m) for m in lora)
    for m in lora:  # a non-zero B, so the LoRA branch counts
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), [m.lora_A["default"].weight.grad.clone() for m in lora]

    fused_logits, fused_grads = run()
    for m in lora:
        del m.forward  # PEFT's own forward again
    peft_logits, peft_grads = run()
    torch.testing.assert_close(fused_logits, peft_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, peft_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    with model.disable_adapter():  # falls back to PEFT's path, which skips LoRA
        assert fuse_lora_add(model) == len(lora)
        base_logits = model(input_ids=ids).logits
    assert _rel(base_logits, peft_logits) > 1e-3
