"""GPU-only: torch's varlen flash kernel against per-document SDPA, and packed training against
padded training over the same documents. Skipped without CUDA (conftest).

With ``AF_GPU_RESULTS=<dir>`` the measured errors and loss curves are written there as JSON.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from agent_finetune.training import varlen_attention as va

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
# bf16 against an fp32 reference: ||out - ref|| / ||ref|| lands near 3e-3 for both kernels.
MAX_REL = 1.5e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _save(name: str, data: dict[str, Any]) -> None:
    out = os.environ.get("AF_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"{name}.json").write_text(json.dumps(data, indent=2))


def _positions(lengths: list[int], device: str = "cuda") -> torch.Tensor:
    return torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)


@pytest.mark.parametrize("lengths", [[1000, 37, 2048, 513, 1, 3000], [4096], [64] * 40])
def test_kernel_matches_per_document_sdpa_outputs_and_grads(lengths: list[int]) -> None:
    """7B attention shape: 28 query heads, 4 KV heads, head_dim 128, bf16."""
    assert va.HAS_TORCH_VARLEN, "torch on the GPU machine has no causal varlen_attn"
    torch.manual_seed(len(lengths))
    total = sum(lengths)
    q = torch.randn(total, 28, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(total, 28, 128, device="cuda", dtype=torch.bfloat16)
    cu, longest = va.cu_seqlens_from_position_ids(_positions(lengths))
    results: dict[str, Any] = {"lengths": lengths}

    def run(fn: Any, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        out = fn(*inputs)
        gq, gk, gv = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        return [out, gq, gk, gv]

    ref32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = run(lambda *t: va.reference_varlen_attention(*t, cu), tuple(ref32))
    fast = run(lambda *t: va.varlen_causal_attention(*t, cu, longest), (q, k, v))
    sdpa = run(lambda *t: va.reference_varlen_attention(*t, cu), (q, k, v))
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], fast, sdpa, ref, strict=True):
        results[name] = {"varlen_vs_fp32": _rel(a, c), "sdpa_bf16_vs_fp32": _rel(b, c)}
        assert torch.isfinite(a).all()
        assert _rel(a, c) < MAX_REL, (name, results[name])
    _save(f"varlen_kernel_{len(lengths)}docs", results)


def _tiny_qwen(impl: str) -> Any:
    from agent_finetune.training.tiny_model import build_model_from_config

    va.register()
    shape = {
        "model_type": "qwen2",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    model = build_model_from_config(shape, dtype=torch.bfloat16, device="cuda")
    model.set_attn_implementation(impl)
    return model


def _documents(n: int, seed: int) -> list[list[int]]:
    """Learnable rows: each follows t -> (a t + b) mod 512 from a random start."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b, t = rng.choice([3, 5, 7]), rng.randrange(512), rng.randrange(512)
        row = []
        for _ in range(rng.randint(16, 300)):
            row.append(t)
            t = (a * t + b) % 512
        docs.append(row)
    return docs


def test_packed_loss_curve_equals_padded_over_50_steps() -> None:
    """The same documents, the same initial weights and optimizer: padded rows through SDPA
    (attention mask) vs one packed row through varlen attention (position_ids)."""
    padded_model, packed_model = _tiny_qwen("sdpa"), _tiny_qwen(va.ATTN_IMPLEMENTATION)
    packed_model.load_state_dict(padded_model.state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (padded_model, packed_model)]
    curves: dict[str, list[float]] = {"padded_sdpa": [], "packed_varlen": []}
    for step in range(50):
        docs = _documents(8, seed=step)
        width = max(map(len, docs))
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, d in enumerate(docs):
            ids[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        flat = torch.tensor([t for d in docs for t in d]).unsqueeze(0)
        # the first token of a document is never the target of the one before it
        flat_labels = torch.cat([torch.tensor([-100, *d[1:]]) for d in docs]).unsqueeze(0)
        batches = [
            {"input_ids": ids, "attention_mask": mask, "labels": labels},
            {
                "input_ids": flat,
                "position_ids": _positions([len(d) for d in docs], "cpu"),
                "labels": flat_labels,
            },
        ]
        for model, opt, batch, name in zip(
            (padded_model, packed_model), opts, batches, curves, strict=True
        ):
            loss = model(**{k: v.cuda() for k, v in batch.items()}).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[name].append(round(float(loss), 5))
    diffs = [abs(a - b) / a for a, b in zip(*curves.values(), strict=True)]
    _save("loss_curve_packed_vs_padded", {**curves, "max_rel_diff": max(diffs)})
    # it learns: 6.31 -> 5.43 measured on the H200 (bench/gpu_results/gpu_tests_round2.json)
    assert curves["packed_varlen"][-1] < curves["packed_varlen"][0] * 0.9
    assert max(diffs) < 2e-2, curves
