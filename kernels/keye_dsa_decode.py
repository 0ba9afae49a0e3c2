"""DSA decode over a preallocated (static) cache: top-k and sparse attention with fixed shapes, no host sync.

The prefill kernels (``keye_dsa_reference`` / ``keye_dsa_triton``) take a key count ``S`` known on the host and
check their inputs on it. A decode step against a static cache reads buffers of a fixed capacity ``C`` whose
filled length lives on the device, so this file keeps every shape a function of ``C`` and of the query count,
and every "is this key allowed" decision in a boolean tensor built by the caller (once per forward for all layers):

- :func:`decode_topk_indices`: the same selection as ``keye_dsa_reference.dsa_topk_indices`` (score descending,
  NaN as -inf, exact ties to the lower position, allowed keys ahead of disallowed ones, ascending positions,
  ``-1`` padding), computed with one ``torch.topk`` over unique int64 sort keys, so the chosen set does not
  depend on the order ``torch.topk`` visits equal values (CPU or GPU, any vector width);
- :func:`sparse_attention_decode`: ``softmax(scaling * q.k) @ v`` over the listed keys, gathered straight from the
  token-major cache (no per-step copy of the cache), fp32 inside.

Both are plain torch (``torch.compile(fullgraph=True)`` traces them; CUDA graphs capture them). Flat file, copied
into Hub checkpoints beside the modeling files; imports only torch and its sibling reference file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .keye_dsa_reference import _indexer_scores_chunk, _masked_softmax

__all__ = ["decode_topk_indices", "sparse_attention_decode", "ordered_float_keys"]

_POS_BITS = 24  # positions < 2**24 (16.7M tokens; the model's limit is 262,144)


def ordered_float_keys(scores: Tensor) -> Tensor:
    """Map fp32 scores to int64 keys in [0, 2**32) with the same order (-0.0 and +0.0 equal, NaN as -inf).

    IEEE-754 bit trick: non-negative floats keep their bit pattern shifted up by 2**31; negative ones are
    bit-inverted, so a larger magnitude gives a smaller key.
    """
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 -> +0.0 (not "+ 0.0": torch.compile removes that no-op)
    bits = s.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + 2**31, -1 - bits)


def decode_topk_indices(q: Tensor, w: Tensor, k: Tensor, allowed: Tensor, topk: int) -> Tensor:
    """Top-``topk`` allowed keys per query by the lightning-indexer score, against a full static key buffer.

    Score ``I[b, t, s] = sum_h w[b, t, h] * D_I**-0.5 * relu(q[b, t, h] . k[b, s])`` (DeepSeek-V3.2 indexer,
    without its ``H_I**-0.5`` factor; the same tiled computation as ``keye_dsa_reference``).

    Args:
        q: [B, T, H_I, D_I] indexer queries (normed, roped, Hadamard-rotated); w: [B, T, H_I] head weights.
        k: [B, C, D_I] the cache's whole indexer-key buffer (C = capacity; unfilled rows are never allowed).
        allowed: [B, T, C] bool, True where key s may be read by query t (causal, not padding, filled).
        topk: keys per query (python int >= 1).
    Returns:
        LongTensor [B, T, min(topk, C)]: positions ascending, then ``-1`` where fewer keys are allowed.
        Same set as ``keye_dsa_reference.dsa_topk_indices`` on the filled prefix with the same mask.
    Raises:
        ValueError: ``C >= 2**24`` or ranks/shapes that do not match (host-side checks on shapes only).
    """
    B, T, H, D = q.shape
    C = k.shape[1]
    if C >= 2**_POS_BITS:
        raise ValueError(f"decode_topk_indices supports at most {2**_POS_BITS - 1} cached keys, got {C}")
    if tuple(allowed.shape) != (B, T, C) or tuple(k.shape) != (B, C, D) or tuple(w.shape) != (B, T, H):
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, w {tuple(w.shape)}, k {tuple(k.shape)}, allowed {tuple(allowed.shape)}"
        )
    kk = min(int(topk), C)
    with torch.no_grad():
        scores = _indexer_scores_chunk(q.float(), w.float(), k.float(), exact=True)  # [B, T, C] fp32, exact ties
        pos = torch.arange(C, device=k.device, dtype=torch.int64)
        tie = (2**_POS_BITS - 1) - pos  # lower position = larger key
        keys = (ordered_float_keys(scores) + 1) * 2**_POS_BITS + tie  # every allowed key above every other
        keys = torch.where(allowed, keys, tie.expand_as(keys))
        top = torch.topk(keys, kk, dim=-1, sorted=False).indices  # unique keys: the set is exact
        ok = allowed.gather(-1, top)
        big = torch.full_like(top, C)
        idx = torch.sort(torch.where(ok, top, big), dim=-1).values  # ascending positions, empties last
        return torch.where(idx == C, torch.full_like(idx, -1), idx)


def sparse_attention_decode(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scaling: float) -> Tensor:
    """Sparse GQA attention over listed keys, one list per query token shared by all heads; fixed shapes.

    Args:
        q: [B, T, Hq, D]; k: [B, C, Hkv, D] and v: [B, C, Hkv, Dv] (any strides, e.g. a token-major cache
            buffer); indices: [B, T, K] int64 positions or ``-1`` (empty; never read as key 0).
        scaling: softmax scale.
    Returns:
        [B, T, Hq, Dv] in q's dtype, computed in fp32; a query with no listed key gives 0.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    valid = indices >= 0
    safe = indices.clamp(min=0)
    rows = torch.arange(B, device=q.device).view(B, 1, 1)
    ks = k[rows, safe].float()  # [B, T, K, Hkv, D]
    vs = v[rows, safe].float()
    qg = q.float().view(B, T, Hkv, G, D)
    logits = torch.einsum("btngd,btknd->btngk", qg, ks) * scaling
    p, _ = _masked_softmax(logits, valid[:, :, None, None, :])  # the reference's (empty rows: 0, no NaN)
    out = torch.einsum("btngk,btknd->btngd", p, vs)
    return out.reshape(B, T, Hq, v.shape[-1]).to(q.dtype)
