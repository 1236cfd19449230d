"""Variable-length (padding-free) causal attention for transformers and Unsloth.

A packed row holds several documents back to back; ``position_ids`` restart at 0 at each
document. Attention must stay causal *inside* each document and never cross a boundary.
``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.11) does exactly that from
``cu_seqlens`` (the documents' cumulative lengths) in one flash call, where masked SDPA over the
whole row pays for the full square and per-document SDPA pays one launch per document:

- causal inside a document: ``window_size=(-1, 0)`` (there is no ``is_causal`` argument);
- GQA: torch 2.11 has no ``enable_gqa`` there, so K/V heads are repeated to the query heads
  (``repeat_interleave``, the same grouping as transformers' ``repeat_kv``).

``register()`` adds the path to transformers' attention interface as ``ATTN_IMPLEMENTATION``
(load a model with ``attn_implementation=ATTN_IMPLEMENTATION``). The same boundaries serve padded
batches (each row one document) and right/left padding (a 2D attention mask: padding is dropped
before the call, as transformers' flash-attention path does). ``enable_in_unsloth()`` hands the
same kernel to Unsloth, whose own loader refuses torch builds without ``enable_gqa``.

Without CUDA (or without ``varlen_attn``) ``reference_varlen_attention`` runs one causal SDPA
per document: slow, exact, and what the CPU tests check the boundary logic with.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("agent_finetune")

ATTN_IMPLEMENTATION = "af_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # torch < 2.10
    _torch_varlen_attn = None

_VARLEN_PARAMS = (
    set(inspect.signature(_torch_varlen_attn).parameters) if _torch_varlen_attn else set()
)
#: torch builds whose varlen_attn can mask causally (window_size, torch >= 2.11)
HAS_TORCH_VARLEN = "window_size" in _VARLEN_PARAMS
#: torch >= 2.12 takes GQA directly; older builds get K/V repeated first
_NATIVE_GQA = "enable_gqa" in _VARLEN_PARAMS


# -- boundaries ------------------------------------------------------------------------------
def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 of shape (documents + 1,), longest document) of a (batch, length) tensor.

    A document starts at the first token of each row and wherever a position does not continue
    the previous one (``pos[i] != pos[i-1] + 1``): a reset to 0 in a packed row, but also the
    0-padding TRL appends after the last document (each pad token becomes a one-token document,
    which attends only to itself and carries no loss).
    """
    if position_ids.dim() != 2:
        raise ValueError(
            f"position_ids must be (batch, length), got shape {tuple(position_ids.shape)}"
        )
    length = position_ids.shape[1]
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::length] = True  # a document never spans two rows
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def cu_seqlens_from_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(indices of kept tokens in the flattened batch, cu_seqlens, longest row) of a 2D 0/1 mask.

    Each row's kept tokens must be contiguous (left or right padding), as the tokenizer makes them.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return indices, cu, int(lengths.max())


# -- kernels ---------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(tokens, kv_heads, dim) -> (tokens, heads, dim): query head h reads K/V head h // groups."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One causal SDPA per document: the definition varlen attention must equal.

    q: (tokens, heads, dim); k, v: (tokens, kv_heads, dim); returns (tokens, heads, dim).
    """
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in itertools.pairwise(bounds):
        qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))
        outs.append(
            F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
        )
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    window: tuple[int, int] = (-1, 0),
) -> torch.Tensor:
    """Causal attention inside each document of a flattened batch: torch's flash varlen kernel
    on CUDA, else the per-document reference. Shapes as ``reference_varlen_attention``."""
    if not (q.is_cuda and HAS_TORCH_VARLEN):
        if window != (-1, 0):
            raise NotImplementedError("the CPU reference supports full causal windows only")
        return reference_varlen_attention(q, k, v, cu_seqlens, scale)
    return gqa_varlen_attn(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        scale=scale,
        window_size=window,
        enable_gqa=k.shape[1] != q.shape[1],
    )


def gqa_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """``varlen_attn`` with torch 2.12's signature on any torch >= 2.11 (GQA by repeating K/V)."""
    assert _torch_varlen_attn is not None
    extra: dict[str, Any] = dict(kwargs)
    if enable_gqa and _NATIVE_GQA:
        extra["enable_gqa"] = True
    elif enable_gqa:
        key, value = _repeat_kv(key, query.shape[1]), _repeat_kv(value, query.shape[1])
    return _torch_varlen_attn(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        scale=scale,
        window_size=tuple(window_size),
        **extra,
    )


# -- transformers' attention interface --------------------------------------------------------
class _Boundaries:
    """The last batch's boundaries: every layer (and checkpointing's recompute) gets the same
    ``position_ids`` / mask tensor, so they are computed, and synced to the host, once a step."""

    def __init__(self) -> None:
        self._key: tuple[Any, Any] | None = None
        self._value: tuple[torch.Tensor | None, torch.Tensor, int] | None = None

    def get(
        self, position_ids: torch.Tensor | None, mask: torch.Tensor | None, batch: int, length: int
    ) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        key = (_ref(position_ids), _ref(mask))
        if self._key is not None and self._value is not None and _same(self._key, key):
            return self._value
        anchor = mask if mask is not None else position_ids
        device = anchor.device if anchor is not None else torch.device("cpu")
        indices: torch.Tensor | None = None
        if mask is not None and not bool(mask.all()):
            if position_ids is not None and batch == 1 and _is_packed(position_ids):
                raise ValueError(
                    "packed position_ids together with a padding attention mask: pass one of them "
                    "(padding-free batches need no attention mask)"
                )
            indices, cu, longest = cu_seqlens_from_mask(mask)
        elif position_ids is not None and position_ids.shape == (batch, length):
            cu, longest = cu_seqlens_from_position_ids(position_ids)
        else:  # no positions given: each row is one document
            cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
            longest = length
        self._key, self._value = key, (indices, cu, longest)
        return self._value


def _ref(t: torch.Tensor | None) -> Any:
    return weakref.ref(t) if t is not None else None


def _same(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and x() is not None and x() is y())
        for x, y in zip(a, b, strict=True)
    )


def _is_packed(position_ids: torch.Tensor) -> bool:
    return bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())


_BOUNDARIES = _Boundaries()


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (batch, heads, length, dim), key/value (batch,
    kv_heads, length, dim) -> ((batch, length, heads, dim), None)."""
    if dropout:
        raise NotImplementedError(
            f"{ATTN_IMPLEMENTATION}: attention dropout {dropout} is not supported"
        )
    if softcap:
        raise NotImplementedError(
            f"{ATTN_IMPLEMENTATION}: attention logit softcapping is not supported"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} takes a 2D padding mask or none, got a {attention_mask.dim()}D "
            "mask; load the model with attn_implementation='sdpa' for custom masks"
        )
    batch, heads, length, dim = query.shape
    if key.shape[2] != length:
        raise NotImplementedError(f"{ATTN_IMPLEMENTATION} is a training path: no KV cache")
    indices, cu, longest = _BOUNDARIES.get(position_ids, attention_mask, batch, length)
    q, k, v = (
        x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value)
    )
    if indices is not None:
        q, k, v = q[indices], k[indices], v[indices]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    out = varlen_causal_attention(q, k, v, cu, longest, scale=scaling, window=window)
    if indices is not None:
        full = out.new_zeros(batch * length, heads, dim)
        full[indices] = out
        out = full
    return out.view(batch, length, heads, dim), None


def register() -> str:
    """Add the path to transformers' attention (and mask) interfaces; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    # flash attention's mask function: None for causal batches, the 2D mask when padded.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION


def enable_in_unsloth() -> str:
    """Give Unsloth's packed path torch's varlen kernel; returns what happened, for the log.

    Unsloth 2026.10 loads ``varlen_attn`` only when it has ``enable_gqa`` (torch >= 2.12:
    ``_load_torch_varlen_attn`` in ``unsloth/utils/attention_dispatch.py``); on torch 2.11 it
    runs one SDPA per packed document per layer. Its dispatcher reads the module global
    ``_TORCH_VARLEN_ATTN`` at call time, so the GQA-capable wrapper can stand in for it.
    """
    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError as e:
        return f"unsloth attention dispatch not importable ({e}); per-document SDPA stays"
    if not hasattr(dispatch, "_TORCH_VARLEN_ATTN"):
        return "this Unsloth has no _TORCH_VARLEN_ATTN hook; its own packed path stays"
    if dispatch._TORCH_VARLEN_ATTN is not None:
        return "Unsloth already uses torch's varlen_attn"
    if not HAS_TORCH_VARLEN or not torch.backends.cuda.is_flash_attention_available():
        return "torch has no causal varlen_attn (needs torch >= 2.11 with flash); unchanged"
    dispatch._TORCH_VARLEN_ATTN = gqa_varlen_attn
    return "Unsloth packed attention -> torch varlen_attn (K/V repeated for GQA)"
