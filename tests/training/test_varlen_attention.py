"""The varlen attention path's boundary logic, on the CPU (per-document SDPA stands in for the
flash kernel there; tests/training/test_gpu_varlen.py checks the kernel on the GPU)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_finetune.training import varlen_attention as va

lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=8)


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


@given(lengths_st)
def test_cu_seqlens_from_position_ids_are_the_document_boundaries(lengths: list[int]) -> None:
    cu, longest = va.cu_seqlens_from_position_ids(_positions(lengths))
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, *itertools.accumulate(lengths)]
    assert longest == max(lengths)


@given(st.lists(lengths_st, min_size=1, max_size=4), st.integers(0, 5))
def test_a_document_never_spans_two_rows_and_zero_padding_is_inert(
    rows: list[list[int]], pad: int
) -> None:
    """TRL pads padding-free rows with position 0: each pad token is its own document."""
    width = max(sum(r) for r in rows) + pad
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    docs: list[int] = []
    for i, r in enumerate(rows):
        pos[i, : sum(r)] = _positions(r)[0]
        docs += r + [1] * (width - sum(r))
    expected = [0, *itertools.accumulate(docs)]
    cu, _ = va.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == expected
    assert cu[-1] == pos.numel()


def test_rows_that_continue_across_a_row_break_are_still_split() -> None:
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]])  # as if one document wrapped
    cu, longest = va.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 6] and longest == 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_cu_seqlens_from_padding_mask(side: str) -> None:
    lengths = [5, 2, 7]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 7 - n :] = 1
    indices, cu, longest = va.cu_seqlens_from_mask(mask)
    assert cu.tolist() == [0, 5, 7, 14] and longest == 7
    assert indices.tolist() == torch.nonzero(mask.flatten()).flatten().tolist()


@settings(max_examples=25, deadline=None)
@given(lengths_st, st.sampled_from([(4, 4), (4, 2), (6, 1)]))
def test_reference_equals_one_causal_attention_per_document(
    lengths: list[int], heads: tuple[int, int]
) -> None:
    torch.manual_seed(sum(lengths))
    total, (h, hkv) = sum(lengths), heads
    q, k, v = torch.randn(total, h, 8), torch.randn(total, hkv, 8), torch.randn(total, hkv, 8)
    cu, longest = va.cu_seqlens_from_position_ids(_positions(lengths))
    out = va.varlen_causal_attention(q, k, v, cu, longest)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        # naive softmax attention, causal, K/V head = query head // groups
        for head in range(h):
            kv = head // (h // hkv)
            s = (q[sl, head] @ k[sl, kv].T) / 8**0.5
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            ref = s.softmax(-1) @ v[sl, kv]
            torch.testing.assert_close(out[sl, head], ref, atol=1e-5, rtol=1e-4)
        start += n


SHAPE: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _model(impl: str) -> Any:
    from agent_finetune.training.tiny_model import build_model_from_config

    va.register()
    torch.manual_seed(0)
    model = build_model_from_config(dict(SHAPE), dtype=torch.float32)
    model.set_attn_implementation(impl)
    return model


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    sdpa = _model("sdpa")
    varlen = _model(va.ATTN_IMPLEMENTATION)
    varlen.load_state_dict(sdpa.state_dict())
    return sdpa, varlen


def test_packed_row_equals_each_document_alone(models: tuple[Any, Any]) -> None:
    """Logits and gradients of a packed row == each document run on its own through SDPA."""
    sdpa, varlen = models
    lengths = [7, 1, 12, 5]
    torch.manual_seed(1)
    docs = [torch.randint(0, 256, (1, n)) for n in lengths]
    packed = varlen(input_ids=torch.cat(docs, 1), position_ids=_positions(lengths))
    packed.logits.square().mean().backward()
    g_packed = varlen.model.layers[0].self_attn.q_proj.weight.grad.clone()
    alone = [sdpa(input_ids=d).logits for d in docs]
    total = sum(alone[i].square().sum() for i in range(len(docs))) / packed.logits.numel()
    total.backward()
    torch.testing.assert_close(packed.logits, torch.cat(alone, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        g_packed, sdpa.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-6, rtol=1e-4
    )
    varlen.zero_grad()
    sdpa.zero_grad()


def test_padded_batch_with_mask_equals_sdpa(models: tuple[Any, Any]) -> None:
    sdpa, varlen = models
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        a = varlen(input_ids=ids, attention_mask=mask).logits
        b = sdpa(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-4)


def test_unpadded_batch_rows_are_independent(models: tuple[Any, Any]) -> None:
    sdpa, varlen = models
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            varlen(input_ids=ids).logits, sdpa(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )


def test_packed_ids_with_a_padding_mask_are_refused(models: tuple[Any, Any]) -> None:
    _, varlen = models
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[0, 5] = 0
    with pytest.raises(ValueError, match="padding-free batches need no attention mask"):
        varlen(
            input_ids=torch.randint(0, 256, (1, 6)),
            position_ids=_positions([3, 3]),
            attention_mask=mask,
        )
