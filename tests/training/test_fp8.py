"""``precision: fp8``: the refusals (no GPU, a GPU without FP8 tensor cores, conflicting
settings) and the FP8 arithmetic itself, which torch's CPU ``_scaled_mm`` runs too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from agent_finetune.errors import BackendError, ConfigError
from agent_finetune.training import backend, fp8
from agent_finetune.training.config import FineTuningConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "agent_finetune" / "assets"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp8_without_a_gpu_is_refused_before_anything_loads() -> None:
    config = FineTuningConfig(precision="fp8", bf16=True)
    with pytest.raises(BackendError, match=r"precision: fp8 cannot run here: no CUDA GPU.*default"):
        backend.resolve_backend(config)


def test_fp8_on_a_gpu_without_fp8_tensor_cores_names_the_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(BackendError, match=r"A100-SXM4-80GB, compute capability 8\.0.*8\.9"):
        backend.resolve_backend(FineTuningConfig(precision="fp8", bf16=True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert fp8.unsupported_reason() is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"precision": "fp8"}, "set bf16: true"),
        ({"precision": "fp8", "bf16": True, "backend": "unsloth"}, "set backend: hf or auto"),
        ({"precision": "fp8", "bf16": True, "load_in_4bit": True}, "choose one"),
        ({"precision": "fp4", "bf16": True}, "precision"),
    ],
)
def test_conflicting_fp8_settings_are_config_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FineTuningConfig.from_dict(fields, source="run.yaml")


def test_auto_backend_with_fp8_is_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "unsupported_reason", lambda: None)
    config = FineTuningConfig(precision="fp8", bf16=True, backend="auto")
    assert backend.resolve_backend(config) == "hf"


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_the_exact_product_to_fp8_precision(scaling: str, bias: bool) -> None:
    """Forward output and input gradient against float64, on fresh random inputs; bf16 is
    ~2e-3 here, e4m3 carries 3 mantissa bits (~4e-2 per product), e5m2 gradients 2 (~6e-2)."""
    torch.manual_seed(hash((scaling, bias)) % 1000)
    lin = torch.nn.Linear(96, 48, bias=bias).to(torch.bfloat16).requires_grad_(False)
    layer = fp8.FP8Linear.from_linear(lin, scaling)  # type: ignore[arg-type]
    assert not list(layer.parameters()) and not layer.state_dict()
    assert layer.weight.dtype == fp8.E4M3
    x = torch.randn(2, 37, 96, dtype=torch.bfloat16, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.functional.linear(
        x64, lin.weight.double(), None if lin.bias is None else lin.bias.double()
    )
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out = layer(x)
    out.backward(grad.to(out.dtype))
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert x.grad is not None and x.grad.dtype == x.dtype
    assert _rel(out, ref) < 6e-2
    assert _rel(x.grad, x64.grad) < (6e-2 if scaling == "row" else 9e-2)
    # a scale that ignored the data (or a transposed weight) would be off by far more
    assert _rel(out, ref) > 1e-3


def test_narrow_projections_stay_bf16() -> None:
    """FP8 only where the GEMM repays quantizing its input: the 7B shape's q/o, MLP and
    down projections convert, its GQA k/v (512 outputs) stay bf16."""
    lin = torch.nn.Linear
    assert fp8.convertible(lin(3584, 3584)) and fp8.convertible(lin(3584, 18944))
    assert fp8.convertible(lin(18944, 3584))
    assert not fp8.convertible(lin(3584, 512))
    assert not fp8.convertible(lin(3584, 3584 - 8))  # not a multiple of 16


def test_quantize_keeps_zeros_finite_and_outlier_rows_apart() -> None:
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-1, 1, 32)
    x[2] = 1000 * torch.linspace(-1, 1, 32)
    q, s = fp8.quantize(x, fp8.E4M3, rowwise=True)
    assert torch.isfinite(s).all() and s.shape == (3, 1)
    back = q.float() * s
    assert torch.equal(back[0], torch.zeros(32))
    assert _rel(back[1], x[1]) < 4e-2  # a per-tensor scale would flush most of row 1
    q, s = fp8.quantize(x, fp8.E4M3, rowwise=False)
    assert s.dim() == 0


def _hf_model(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, precision: str) -> Any:
    from agent_finetune.training.checkpointing import decide

    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    monkeypatch.setattr(fp8, "MIN_OUT_FEATURES", 0)  # the tiny model's projections are narrow
    config = FineTuningConfig(
        model_name=str(tiny_model), backend="hf", bf16=True, precision=precision
    )
    plan = decide("off", None, tokens=1, backend="hf", free_bytes=None)
    model, _ = backend.load_for_training(config, "hf", plan)
    return model


def test_hf_backend_with_fp8_trains_lora_on_fp8_base_layers(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    model = _hf_model(tiny_model, monkeypatch, "fp8")
    ref = _hf_model(tiny_model, monkeypatch, "default")
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert lora and all(isinstance(m.base_layer, fp8.FP8Linear) for m in lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
        base = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in lora)
    # LoRA B starts at zero, so both are the base model, equal to FP8 precision (errors of
    # ~4e-2 per product compound through this random model's layers; a wrong scale or layout
    # would give a relative error near 1)
    assert _rel(out.logits.float(), base.logits.float()) < 0.3
    loss, base_loss = float(out.loss.detach()), float(base.loss.detach())
    assert abs(loss - base_loss) / base_loss < 0.02


def test_train_with_fp8_publishes_an_adapter_like_bf16(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole train() path with precision: fp8 (CPU _scaled_mm standing in for the GPU's):
    the saved adapter holds LoRA weights only, in the same files as a bf16 run."""
    from agent_finetune.training.train import train

    monkeypatch.setattr(fp8, "unsupported_reason", lambda: None)
    monkeypatch.setattr(fp8, "MIN_OUT_FEATURES", 0)
    config = FineTuningConfig(
        model_name=str(tiny_model),
        precision="fp8",
        bf16=True,
        max_seq_length=64,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=3,
        logging_steps=1,
        output_dir=str(tmp_path / "run"),
    )
    result = train(config, EXAMPLES / "support_v1.json", train_test_split=0.0)
    assert result.backend == "hf"
    files = sorted(p.name for p in result.adapter_dir.iterdir())
    assert "adapter_model.safetensors" in files
    from safetensors import safe_open

    with safe_open(result.adapter_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["global_steps"] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_fp8_linear_on_cuda_matches_the_exact_product(scaling: str) -> None:
    """The CUDA path: cuBLAS/CUTLASS FP8 kernels, the compiled quantization, a token count
    that is no multiple of 16, a 3-D input."""
    torch.manual_seed(7)
    lin = torch.nn.Linear(512, 1536, bias=True, device="cuda", dtype=torch.bfloat16)
    lin.requires_grad_(False)
    layer = fp8.FP8Linear.from_linear(lin, scaling)  # type: ignore[arg-type]
    x = torch.randn(3, 333, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    ref = torch.nn.functional.linear(x32, lin.weight.float(), lin.bias.float())
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out = layer(x)
    out.backward(grad.to(out.dtype))
    assert x.grad is not None and torch.isfinite(out).all()
    assert 1e-3 < _rel(out, ref) < 6e-2
    assert _rel(x.grad, x32.grad) < (6e-2 if scaling == "row" else 9e-2)
