"""DeepSeek Sparse Attention (DSA) on GQA: the plain-torch reference (the oracle for the Triton kernels).

Semantics: ``kernels/README.md`` (the contract) and ``docs/keye_vl2.md`` section 3, after
DeepSeek-V3.2 (lightning indexer, top-k sparse attention, indexer KL losses), adapted to GQA with ONE
index list per query token shared by all query heads.

Everything is computed in float32 (float64 when the inputs are float64, so that ``gradcheck`` works)
and cast back to the input dtype. Queries are processed in chunks whose working buffers stay around
``_CHUNK_BYTES``: no [S, S] (or [T, S]) tensor is ever built except by ``dsa_indexer_scores``, which
exists to return exactly that for small inputs.

This file is copied flat into Hub checkpoints: it imports only torch, math and the standard library.
"""

import math
import operator
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "hadamard_transform",
    "dsa_indexer_scores",
    "dsa_topk_indices",
    "sparse_attention",
    "indexer_kl_loss",
]

# Size of the largest single buffer of one query chunk, in bytes: [B, chunk, S] scores for the top-k
# and the dense KL, the gathered keys [B, Hkv, chunk, K, D] for the sparse attention. Kept small on
# purpose: glibc serves buffers of this size from its heap, while larger ones are fresh mmaps whose page
# faults cost more than the arithmetic on CPU (measured: sparse attention 2-3x slower at 64 MiB).
_CHUNK_BYTES = 16 * 2**20
# Indexer score tiles: 64 queries x as many keys as keep the [64 * H_I, keys] ReLU tile at 2M floats.
_TILE_Q = 64
_TILE_FLOATS = 2 * 2**20
# On an accelerator (the reference run beside the Triton kernels) launches, not page faults, dominate:
# larger chunks and tiles. Results do not depend on either.
_CHUNK_BYTES_ACCEL = 512 * 2**20
_TILE_Q_ACCEL = 1024
_TILE_FLOATS_ACCEL = 64 * 2**20

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# input checks and small helpers
# ----------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 ("fp32 inside")."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_float(name: str, x: Tensor, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")


def _elt(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _as_int(name: str, x, minimum: int) -> int:
    """int(x) for ints and int-like scalars (numpy ints, 0-dim integer tensors); not bools or floats."""
    try:
        if isinstance(x, bool):
            raise TypeError
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v}")
    return v


def _check_chunk_size(chunk_size) -> Optional[int]:
    return None if chunk_size is None else _as_int("chunk_size", chunk_size, 1)


def _check_indexer_inputs(q: Tensor, w: Tensor, k: Tensor) -> Tuple[int, int, int, int, int]:
    _check_float("q", q, 4)
    _check_float("w", w, 3)
    _check_float("k", k, 3)
    B, T, H, D = q.shape
    if tuple(w.shape) != (B, T, H):
        raise ValueError(f"w must be [B, T, H_I] = {(B, T, H)}, got {tuple(w.shape)}")
    if k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k must be [B, S, D_I] with B={B}, D_I={D}, got {tuple(k.shape)}")
    if not _is_pow2(D):
        raise ValueError(f"indexer head dim D_I must be a power of two, got {D}")
    if H < 1:
        raise ValueError("the indexer needs at least one head (H_I >= 1)")
    return B, T, H, D, k.shape[1]


def _q_offsets(q_offset, B: int, T: int, S: int, device) -> Tuple[Tensor, int]:
    """q_offset (None | int | integer tensor [B] or [] or [1]) -> (int64 tensor [B], the largest offset as an int).

    Queries are keys ``q_offset[b] .. q_offset[b] + T - 1``. None and an int need no device sync (decode); a tensor
    is checked on the host (one sync). The one definition for the reference and every Triton kernel file.

    Raises:
        ValueError: a float/bool/complex tensor, a tensor of another shape, another type, or an offset outside
            ``0 <= q_offset`` and ``q_offset + T <= S``.
    """
    if q_offset is None or (isinstance(q_offset, int) and not isinstance(q_offset, bool)):
        off = S - T if q_offset is None else int(q_offset)
        if off < 0 or off + T > S:
            raise ValueError(f"q_offset must satisfy 0 <= q_offset and q_offset + T <= S (T={T}, S={S}); got {off}")
        return torch.full((B,), off, dtype=torch.int64, device=device), off
    if not isinstance(q_offset, Tensor) or q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool \
            or q_offset.is_complex():
        raise ValueError(f"q_offset must be None, an int or an integer tensor [B], got "
                         f"{getattr(q_offset, 'dtype', type(q_offset).__name__)}")
    qo = q_offset.to(device=device, dtype=torch.int64).reshape(-1)
    if qo.numel() == 1 and B != 1:
        qo = qo.expand(B)
    if qo.numel() != B:
        raise ValueError(f"q_offset must be an int or a LongTensor [B={B}], got shape {tuple(q_offset.shape)}")
    if B == 0:
        return qo.contiguous(), 0
    lo, hi = (int(v) for v in torch.stack([qo.min(), qo.max()]).tolist())
    if lo < 0 or hi + T > S:
        raise ValueError(f"q_offset must satisfy 0 <= q_offset and q_offset + T <= S (T={T}, S={S}); got [{lo}, {hi}]")
    return qo.contiguous(), hi


def _check_masks(key_mask: Optional[Tensor], segment_ids: Optional[Tensor], B: int, S: int) -> None:
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, S):
            raise ValueError(f"key_mask must be a BoolTensor [B, S] = {(B, S)}, got "
                             f"{getattr(key_mask, 'dtype', type(key_mask))} {tuple(getattr(key_mask, 'shape', ()))}")
    if segment_ids is not None:
        if (not isinstance(segment_ids, Tensor) or segment_ids.dtype.is_floating_point
                or segment_ids.dtype == torch.bool or tuple(segment_ids.shape) != (B, S)):
            raise ValueError(f"segment_ids must be an integer tensor [B, S] = {(B, S)}, got "
                             f"{getattr(segment_ids, 'dtype', type(segment_ids))} "
                             f"{tuple(getattr(segment_ids, 'shape', ()))}")


def _check_indices_tensor(indices: Tensor, B: int, T: int) -> None:
    if not isinstance(indices, Tensor) or indices.dtype != torch.long:
        raise ValueError(f"indices must be a LongTensor (int64), got {getattr(indices, 'dtype', type(indices))}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != (B, T):
        raise ValueError(f"indices must be [B, T, K] with B={B}, T={T}, got {tuple(indices.shape)}")


def _check_indices_chunk(idx: Tensor, S: int) -> Tensor:
    """Check range [-1, S) and no duplicate key in a row; return idx, trimmed of trailing all-empty columns.

    Fast path for the canonical layout of dsa_topk_indices (ascending, -1 only at the end); any other
    order is accepted too (checked by a sort) and kept as given. At least one column is kept.
    """
    if idx.numel() == 0:
        return idx
    if bool((idx < -1).any()) or bool((idx >= S).any()):
        raise ValueError(f"indices must lie in [-1, S) with S={S}; got min {int(idx.min())}, max {int(idx.max())}")
    K = idx.shape[-1]
    if K < 2:
        return idx
    a, b = idx[..., :-1], idx[..., 1:]
    # ascending with -1 only at the end <=> every adjacent pair is (x < y) with x >= 0, (x, -1) or (-1, -1)
    if bool((((b > a) & (a >= 0)) | (b == -1)).all()):
        n = int((idx >= 0).sum(dim=-1).max())
        return idx[..., :max(n, 1)]
    srt = idx.sort(dim=-1).values
    if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()):
        raise ValueError("indices must not list the same key twice in one row (duplicates are not allowed)")
    return idx


def _chunk_len(chunk_size: Optional[int], T: int, bytes_per_query: int, device: torch.device) -> int:
    if chunk_size is not None:
        return chunk_size
    budget = _CHUNK_BYTES if device.type == "cpu" else _CHUNK_BYTES_ACCEL
    return max(1, min(max(T, 1), budget // max(1, bytes_per_query)))


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _allowed_dense(pos_q: Tensor, S_c: int, key_mask: Optional[Tensor], segment_ids: Optional[Tensor]) -> Tensor:
    """Allowed-key mask [B, Tc, S_c] for query positions pos_q [B, Tc] (causal, key_mask, segments)."""
    keys = torch.arange(S_c, device=pos_q.device)
    allowed = keys.view(1, 1, S_c) <= pos_q.unsqueeze(-1)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :S_c]
    if segment_ids is not None:
        seg_q = segment_ids.gather(1, pos_q)
        allowed = allowed & (segment_ids[:, None, :S_c] == seg_q.unsqueeze(-1))
    return allowed


def _allowed_at(idx: Tensor, pos_q: Tensor, key_mask: Optional[Tensor], segment_ids: Optional[Tensor]) -> Tensor:
    """Whether each listed key idx [B, Tc, K] is non-empty (>= 0) and allowed for its query."""
    B, Tc, K = idx.shape
    safe = idx.clamp(min=0)
    ok = (idx >= 0) & (idx <= pos_q.unsqueeze(-1))
    if key_mask is not None:
        ok = ok & key_mask.gather(1, safe.reshape(B, Tc * K)).view(B, Tc, K)
    if segment_ids is not None:
        seg_q = segment_ids.gather(1, pos_q)
        ok = ok & (segment_ids.gather(1, safe.reshape(B, Tc * K)).view(B, Tc, K) == seg_q.unsqueeze(-1))
    return ok


def _heads_flat(x: Tensor, cd: torch.dtype) -> Tensor:
    """[B, S, Hkv, D] -> [B*Hkv*S, D] in cd (row (b*Hkv + n)*S + s = key s of kv head n): one copy per call."""
    B, S, Hkv, D = x.shape
    return x.to(cd).permute(0, 2, 1, 3).reshape(B * Hkv * S, D)


def _gather_heads(x_flat: Tensor, idx_safe: Tensor, S: int, Hkv: int) -> Tensor:
    """Gather the listed keys of every kv head.

    x_flat from _heads_flat; idx_safe [B, Tc, K] >= 0. Returns [B, Hkv, Tc, K, D].
    """
    B, Tc, K = idx_safe.shape
    base = torch.arange(B * Hkv, device=idx_safe.device).view(B, Hkv, 1, 1) * S
    rows = x_flat.index_select(0, (idx_safe.unsqueeze(1) + base).reshape(-1))
    return rows.view(B, Hkv, Tc, K, x_flat.shape[-1])


def _masked_softmax(logits: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """softmax over the last dim restricted to valid; rows with no valid entry give p = 0, lse = -inf.

    No NaN in forward or backward for empty rows (the row max is replaced by 0 there).
    """
    logits = logits.masked_fill(~valid, _NEG_INF)
    m = logits.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    e = torch.exp(logits - m)
    denom = e.sum(dim=-1, keepdim=True)
    has = denom > 0
    denom_safe = torch.where(has, denom, torch.ones_like(denom))
    p = e / denom_safe
    lse = torch.where(has, m + torch.log(denom_safe), torch.full_like(denom, _NEG_INF))
    return p, lse.squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Hadamard
# ----------------------------------------------------------------------------------------------
def hadamard_transform(x: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim: ``x @ H_D / sqrt(D)``.

    ``H_D`` is the Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``), which is
    symmetric, so ``H_D / sqrt(D)`` is orthonormal and its own inverse. Computed as log2(D) butterfly
    steps in torch (no ``fast_hadamard_transform`` dependency). Used on the indexer q and k
    (docs/keye_vl2.md section 3 step 2; DeepSeek-V3.2 ``rotate_activation``): applied to BOTH, it leaves every
    dot product q.k unchanged.

    Args:
        x: [..., D] floating tensor, D a power of two (D = 1 is the identity).
    Returns:
        [..., D] in ``x.dtype`` (computed in fp32, fp64 for fp64 input).
    Raises:
        ValueError: x is not a floating tensor, has no dims, or D is not a power of two.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"hadamard_transform needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dim")
    D = x.shape[-1]
    if not _is_pow2(D):
        raise ValueError(f"hadamard_transform: last dim must be a power of two, got {D}")
    lead = x.shape[:-1]
    y = x.to(_compute_dtype(x)).reshape(-1, D)
    n = y.shape[0]
    h = 1
    while h < D:
        y = y.view(n, D // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(*lead, D) * (1.0 / math.sqrt(D))
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# indexer scores and top-k
# ----------------------------------------------------------------------------------------------
def _indexer_scores_chunk(q_c: Tensor, w_c: Tensor, k_c: Tensor, key_limit: Optional[int] = None,
                          exact: bool = False) -> Tensor:
    """I [B, Tc, S_c] = sum_h w * D^-1/2 * relu(q_h . k_s), unmasked; inputs already in the compute dtype.

    Tiled (_TILE_Q queries x a block of keys): one matmul for all heads of the tile, ReLU, then the head
    sum as a batched [1, H] @ [H, keys]. With ``key_limit`` given, query i of the chunk only needs keys
    s < key_limit + i + 1 (causal); keys past its tile's limit are left at 0 (the caller masks them).

    ``exact=True`` on CPU (the top-k selections): the products are an elementwise multiply and a sum over D, and
    the head sum explicit adds in head order, instead of BLAS, which is not column-consistent on every CPU (MKL's or
    OpenBLAS' AVX2 / SSE paths, e.g. on CPUs without AVX-512, round a tile's edge columns differently), so
    identical keys would score 1 ulp apart and exact ties would be broken by tile position. The exact form does
    the same operations, in the same order, for every key, on any CPU (its tiles hold D x fewer keys; several
    times slower than BLAS). Scores that need no exact ties (the KL loss, materialised scores) keep BLAS.
    """
    B, Tc, H, D = q_c.shape
    S_c = k_c.shape[1]
    grad = _needs_grad(q_c, w_c, k_c)
    ws_all = w_c * (D ** -0.5)
    cpu = q_c.device.type == "cpu"
    tq = max(1, min(Tc, _TILE_Q if cpu else _TILE_Q_ACCEL))
    exact = exact and cpu
    if exact:  # the [.., keys, D] product tile stays at 1/16 of the usual budget (no buffer near [S, S])
        ts = max(16, (_TILE_FLOATS // 16) // max(1, B * tq * H * D))
    else:
        ts = max(16, (_TILE_FLOATS if cpu else _TILE_FLOATS_ACCEL) // max(1, B * tq * H))
    out = None if grad else torch.zeros((B, Tc, S_c), dtype=q_c.dtype, device=q_c.device)
    rows = []
    for a in range(0, Tc, tq):
        b = min(Tc, a + tq)
        n = b - a
        lim = S_c if key_limit is None else max(0, min(S_c, key_limit + b))
        qf = q_c[:, a:b].reshape(B, n * H, D)
        ws = ws_all[:, a:b].reshape(B * n, 1, H)
        pieces = []
        for s0 in range(0, lim, ts):
            s1 = min(lim, s0 + ts)
            if exact:  # column-consistent: no BLAS (docstring)
                y = (qf[:, :, None, :] * k_c[:, None, s0:s1, :]).sum(-1)  # [B, n*H, s1-s0]
                y = torch.relu(y).view(B * n, H, s1 - s0)
                wv = ws.view(B * n, H, 1)
                piece = wv[:, 0] * y[:, 0]
                for h in range(1, H):
                    piece = piece + wv[:, h] * y[:, h]
                piece = piece.view(B, n, s1 - s0)
            else:
                y = torch.matmul(qf, k_c[:, s0:s1].transpose(1, 2))  # [B, n*H, s1-s0]
                y = torch.relu(y) if grad else y.relu_()
                piece = torch.matmul(ws, y.view(B * n, H, s1 - s0)).view(B, n, s1 - s0)
            if grad:
                pieces.append(piece)
            else:
                out[:, a:b, s0:s1] = piece
        if grad:
            if lim < S_c:
                pieces.append(q_c.new_zeros((B, n, S_c - lim)))
            rows.append(torch.cat(pieces, dim=-1))
    if grad:
        return torch.cat(rows, dim=1) if rows else q_c.new_zeros((B, Tc, S_c))
    return out


def dsa_indexer_scores(q: Tensor, w: Tensor, k: Tensor, *, q_offset: Union[int, Tensor, None] = None,
                       key_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None) -> Tensor:
    """Lightning-indexer scores, materialised in full ([B, T, S]): for tests and small inputs only.

    ``I[b, t, s] = sum_h w[b, t, h] * D_I**-0.5 * relu(q[b, t, h] . k[b, s])`` (docs/keye_vl2.md section 3 step 2;
    DeepSeek-V3.2 eq. 1 without its n_heads**-0.5 factor on w), and ``-inf`` where key s is not allowed
    for query t: causal ``s <= q_offset[b] + t``, ``key_mask[b, s]``, same ``segment_ids`` (see README).

    Args:
        q: [B, T, H_I, D_I] indexer queries (already normed, roped, rotated), any float dtype.
        w: [B, T, H_I] per-head weights.
        k: [B, S, D_I] indexer keys (one key head).
        q_offset: None (default S - T: queries are the last T keys), int, or LongTensor [B].
        key_mask: optional BoolTensor [B, S], False = padding.
        segment_ids: optional integer tensor [B, S] (packed sequences).
    Returns:
        [B, T, S] float32 (float64 for float64 inputs). Differentiable in q, w, k.
    Raises:
        ValueError: wrong ranks/shapes/dtypes, D_I not a power of two, q_offset out of [0, S - T].
    """
    B, T, H, D, S = _check_indexer_inputs(q, w, k)
    _check_masks(key_mask, segment_ids, B, S)
    off, _ = _q_offsets(q_offset, B, T, S, q.device)
    cd = _compute_dtype(q, w, k)
    kf = k.to(cd)
    chunk = _chunk_len(None, T, _elt(cd) * B * max(S, 1), q.device)
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        pos_q = off.unsqueeze(1) + torch.arange(t0, t1, device=q.device).unsqueeze(0)
        s = _indexer_scores_chunk(q[:, t0:t1].to(cd), w[:, t0:t1].to(cd), kf)
        outs.append(s.masked_fill(~_allowed_dense(pos_q, S, key_mask, segment_ids), _NEG_INF))
    if not outs:
        return q.new_zeros((B, 0, S), dtype=cd)
    return torch.cat(outs, dim=1)


def _select_topk(s: Tensor, allowed: Tensor, topk: int) -> Tensor:
    """Deterministic top-k of each row of s [B, Tc, S_c] (modified in place) among the allowed keys.

    Order: score descending, NaN counted as -inf, exact ties -> lower position first. Allowed keys
    with a -inf/NaN score still rank above keys that are not allowed (so a query with <= topk allowed
    keys lists all of them). Returns [B, Tc, topk] int64, ascending positions, -1 padding at the end.

    Exact whatever order torch uses internally: the topk-th largest value is a threshold; every key
    strictly above it is taken, and the slots left go to the lowest positions equal to it.
    """
    B, Tc, S_c = s.shape
    out = torch.full((B, Tc, topk), -1, dtype=torch.long, device=s.device)
    if S_c == 0 or Tc == 0 or B == 0:
        return out
    s.masked_fill_(torch.isnan(s) | ~allowed, _NEG_INF)
    n_allowed = allowed.sum(dim=-1)  # [B, Tc]
    m = n_allowed.clamp(max=topk)  # keys listed for each query
    full = n_allowed > topk  # rows that must drop keys
    if S_c > topk and bool(full.any()):
        # topk-th largest of the row = its (S_c - topk + 1)-th smallest; for a full row it is the topk-th
        # largest allowed score (the -inf of disallowed keys cannot rise above it).
        thr = torch.kthvalue(s, S_c - topk + 1, dim=-1, keepdim=True).values
        thr = thr.masked_fill(~full.unsqueeze(-1), _NEG_INF)  # other rows: take every allowed key
        sel = s > thr  # only allowed keys can be > thr >= -inf
        eq = (s == thr) & allowed
        need = (m - sel.sum(dim=-1)).unsqueeze(-1)  # slots left for keys equal to the threshold
        if bool((eq.sum(dim=-1, keepdim=True) > need).any()):
            eq &= eq.cumsum(dim=-1, dtype=torch.int32) <= need  # ties: lowest positions first
        sel |= eq
    else:
        sel = allowed
    pos = sel.nonzero()  # row-major: rows in order, positions ascending within a row
    if pos.shape[0] != int(m.sum()):
        raise RuntimeError("internal error in _select_topk: selected count differs from the expected count")
    out[torch.arange(topk, device=s.device) < m.unsqueeze(-1)] = pos[:, 2]
    return out


def dsa_topk_indices(q: Tensor, w: Tensor, k: Tensor, topk: int, *, q_offset: Union[int, Tensor, None] = None,
                     key_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                     chunk_size: Optional[int] = None) -> Tensor:
    """The top-``topk`` allowed keys of each query by the lightning-indexer score (docs/keye_vl2.md section 3 step 2).

    Score as in :func:`dsa_indexer_scores`. Deterministic: exact ties go to the lower position; NaN
    scores count as -inf (never ahead of a finite score); allowed keys are always listed before
    anything else, so a query with at most ``topk`` allowed keys lists all of them (sparse == dense).
    Queries are processed ``chunk_size`` at a time against the causally needed key prefix only; the
    buffers are the chunk's scores [B, chunk, S] fp32 (default chunk: about 16 MiB of them on CPU,
    512 MiB on an accelerator) and ReLU tiles of 2M floats, so memory is O(chunk * S), never O(T * S).
    The result does not depend on ``chunk_size``. No gradient.

    Args:
        q: [B, T, H_I, D_I], w: [B, T, H_I], k: [B, S, D_I] (any float dtype; scored in fp32).
        topk: int >= 1 (the model uses 2048).
        q_offset, key_mask, segment_ids: allowed keys, see :func:`dsa_indexer_scores`.
        chunk_size: queries per chunk (None = automatic).
    Returns:
        LongTensor [B, T, topk]: key positions in [0, S) sorted ascending, then -1 padding when fewer
        than ``topk`` keys are allowed.
    Raises:
        ValueError: wrong shapes/dtypes, D_I not a power of two, topk < 1, chunk_size < 1, bad q_offset.
    """
    B, T, H, D, S = _check_indexer_inputs(q, w, k)
    topk = _as_int("topk", topk, 1)
    chunk_size = _check_chunk_size(chunk_size)
    _check_masks(key_mask, segment_ids, B, S)
    off, _ = _q_offsets(q_offset, B, T, S, q.device)
    out = torch.full((B, T, topk), -1, dtype=torch.long, device=q.device)
    if B == 0 or T == 0:
        return out
    cd = _compute_dtype(q, w, k)
    max_off = int(off.max())
    chunk = _chunk_len(chunk_size, T, _elt(cd) * B * max(S, 1), q.device)
    with torch.no_grad():
        kf = k.to(cd)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            S_c = min(S, max_off + t1)  # keys past the last query of the chunk are never allowed
            pos_q = off.unsqueeze(1) + torch.arange(t0, t1, device=q.device).unsqueeze(0)
            s = _indexer_scores_chunk(q[:, t0:t1].to(cd), w[:, t0:t1].to(cd), kf[:, :S_c], key_limit=max_off + t0,
                                      exact=True)  # a selection: exact ties on any CPU
            allowed = _allowed_dense(pos_q, S_c, key_mask, segment_ids)
            out[:, t0:t1] = _select_topk(s, allowed, topk)
    return out


# ----------------------------------------------------------------------------------------------
# sparse attention
# ----------------------------------------------------------------------------------------------
def _sparse_probs(q_c: Tensor, k_flat: Tensor, idx: Tensor, valid: Tensor, S: int, Hkv: int,
                  scaling: float) -> Tuple[Tensor, Tensor]:
    """Per-head softmax of scaling * q.k over the listed keys (GQA: head h reads kv head h // G).

    q_c [B, Tc, Hq, D]; k_flat from _heads_flat; idx [B, Tc, K] (any value where not valid);
    valid [B, Tc, K]. Returns p [B, Hkv, Tc, G, K] and lse [B, Hkv, Tc, G] in k_flat's dtype.
    """
    B, Tc, Hq, D = q_c.shape
    G = Hq // Hkv
    k_sel = _gather_heads(k_flat, idx.clamp(min=0), S, Hkv)  # [B, Hkv, Tc, K, D]
    qg = q_c.to(k_flat.dtype).view(B, Tc, Hkv, G, D).permute(0, 2, 1, 3, 4)  # [B, Hkv, Tc, G, D]
    logits = torch.matmul(qg, k_sel.transpose(-1, -2)) * scaling  # [B, Hkv, Tc, G, K]
    return _masked_softmax(logits, valid[:, None, :, None, :])


def _sparse_attention_chunk(q_c: Tensor, k_flat: Tensor, v_flat: Tensor, idx: Tensor, S: int, Hkv: int,
                            scaling: float) -> Tuple[Tensor, Tensor]:
    """out [B, Tc, Hq, Dv] and lse [B, Tc, Hq] (compute dtype) for one query chunk."""
    B, Tc, Hq, _ = q_c.shape
    p, lse = _sparse_probs(q_c, k_flat, idx, idx >= 0, S, Hkv, scaling)
    v_sel = _gather_heads(v_flat, idx.clamp(min=0), S, Hkv)  # [B, Hkv, Tc, K, Dv]
    o = torch.matmul(p, v_sel)  # [B, Hkv, Tc, G, Dv]
    o = o.permute(0, 2, 1, 3, 4).reshape(B, Tc, Hq, v_flat.shape[-1])
    lse = lse.permute(0, 2, 1, 3).reshape(B, Tc, Hq)
    return o, lse


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scaling: float,
                     return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Top-k sparse GQA attention with one key list per query token (docs/keye_vl2.md section 3 step 3).

    ``out[b, t, h] = softmax_j(scaling * q[b, t, h] . k[b, idx_j, h // G]) @ v[b, idx_j, h // G]`` over the
    listed keys ``idx_j = indices[b, t, j] >= 0`` only (``G = Hq / Hkv``; the list is shared by all heads).
    ``-1`` slots are masked (never read as key 0). The list is taken as given (no causal check): the
    caller lists allowed keys (:func:`dsa_topk_indices` does). Queries are processed in small chunks
    (gathered keys of one chunk about 16 MiB); when gradients are needed each chunk runs under
    activation checkpointing (plain torch autograd through the gather, recomputed in backward), so
    training memory stays bounded too.

    Args:
        q: [B, T, Hq, D] float; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv] (same dtype as k; Dv usually = D).
        indices: LongTensor [B, T, K]: key positions in [0, S) or -1 (empty); no duplicates in a row.
        scaling: softmax scale (the model uses head_dim**-0.5).
        return_lse: also return the log-sum-exp of the scaled logits (natural log).
    Returns:
        out [B, T, Hq, Dv] in q.dtype; with return_lse also lse [B, T, Hq] float32 (float64 for float64
        inputs). A query with no listed key: out 0, lse -inf, no NaN (forward and backward).
        Differentiable in q, k, v.
    Raises:
        ValueError: wrong ranks/shapes/dtypes, Hq % Hkv != 0, indices not int64 [B, T, K], an index
        outside [-1, S), a duplicate key in a row.
    """
    _check_float("q", q, 4)
    _check_float("k", k, 4)
    _check_float("v", v, 4)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, S, Hkv, D] with B={B}, D={D}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"v must be [B, S, Hkv, Dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must have the same dtype, got {k.dtype} and {v.dtype}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv}) (GQA)")
    _check_indices_tensor(indices, B, T)
    scaling = float(scaling)
    Dv = v.shape[-1]
    cd = _compute_dtype(q, k, v)
    if indices.shape[-1] == 0:  # no key listed anywhere: same as one empty slot
        indices = indices.new_full((B, T, 1), -1)
    K = indices.shape[-1]
    grad = _needs_grad(q, k, v)
    k_flat, v_flat = _heads_flat(k, cd), _heads_flat(v, cd)
    chunk = _chunk_len(None, T, _elt(cd) * B * K * Hkv * max(D, Dv), q.device)
    out = q.new_empty((B, T, Hq, Dv))
    lse = torch.empty((B, T, Hq), dtype=cd, device=q.device)
    outs, lses = [], []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        idx = _check_indices_chunk(indices[:, t0:t1], S)
        if grad:
            o_c, l_c = checkpoint(_sparse_attention_chunk, q[:, t0:t1], k_flat, v_flat, idx, S, Hkv, scaling,
                                  use_reentrant=False, preserve_rng_state=False)
            outs.append(o_c.to(q.dtype))
            lses.append(l_c)
        else:
            o_c, l_c = _sparse_attention_chunk(q[:, t0:t1], k_flat, v_flat, idx, S, Hkv, scaling)
            out[:, t0:t1] = o_c
            lse[:, t0:t1] = l_c
    if grad and outs:
        out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# indexer KL losses
# ----------------------------------------------------------------------------------------------
def _kl_rows(p: Tensor, scores: Tensor, valid: Tensor, row_has: Tensor) -> Tensor:
    """sum over rows of KL(p || softmax(scores over valid)) with 0 log 0 = 0; rows without a key give 0."""
    scores = scores.masked_fill(~valid, _NEG_INF)
    scores = torch.where(row_has.unsqueeze(-1), scores, torch.zeros_like(scores))
    logq = torch.log_softmax(scores, dim=-1)
    pos = p > 0
    logp = torch.log(torch.where(pos, p, torch.ones_like(p)))
    kl = torch.where(pos, p * (logp - logq), torch.zeros_like(p))
    return kl.sum()


def _l1_normalise(x: Tensor) -> Tensor:
    tot = x.sum(dim=-1, keepdim=True)
    return x / torch.where(tot > 0, tot, torch.ones_like(tot))


def _kl_dense_chunk(aq_c: Tensor, ak: Tensor, q_c: Tensor, w_c: Tensor, k: Tensor, pos_q: Tensor, S_c: int,
                    key_limit: int, key_mask: Optional[Tensor], segment_ids: Optional[Tensor],
                    scaling: float) -> Tensor:
    """Sum over the chunk's queries of KL(p || softmax(I)) over all allowed keys s < S_c."""
    B, Tc, Hq, _ = aq_c.shape
    Hkv = ak.shape[2]
    G = Hq // Hkv
    cd = _compute_dtype(aq_c, ak, q_c, w_c, k)
    allowed = _allowed_dense(pos_q, S_c, key_mask, segment_ids)  # [B, Tc, S_c]
    row_has = allowed.any(dim=-1)
    with torch.no_grad():  # target p: main attention per head over allowed keys, summed, L1-normalised
        acc = torch.zeros((B, Tc, S_c), dtype=cd, device=aq_c.device)
        for n in range(Hkv):
            kn_t = ak[:, :S_c, n, :].to(cd).transpose(1, 2)  # [B, Da, S_c]
            for g in range(G):
                logits = torch.matmul(aq_c[:, :, n * G + g, :].to(cd), kn_t) * scaling
                acc += _masked_softmax(logits, allowed)[0]
        p = _l1_normalise(acc)
    scores = _indexer_scores_chunk(q_c.to(cd), w_c.to(cd), k[:, :S_c].to(cd), key_limit=key_limit)
    return _kl_rows(p, scores, allowed, row_has)


def _kl_sparse_chunk(aq_c: Tensor, ak_flat: Tensor, q_c: Tensor, w_c: Tensor, k_flat: Tensor, idx: Tensor,
                     pos_q: Tensor, key_mask: Optional[Tensor], segment_ids: Optional[Tensor], S: int, Hkv: int,
                     scaling: float) -> Tensor:
    """Sum over the chunk's queries of KL(p || softmax(I)) over the listed allowed keys."""
    B, Tc, H, D = q_c.shape
    cd = k_flat.dtype
    valid = _allowed_at(idx, pos_q, key_mask, segment_ids)  # [B, Tc, K]
    row_has = valid.any(dim=-1)
    with torch.no_grad():  # per-head softmax over the listed keys, summed over heads, L1-normalised
        p_heads, _ = _sparse_probs(aq_c, ak_flat, idx, valid, S, Hkv, scaling)  # [B, Hkv, Tc, G, K]
        p = _l1_normalise(p_heads.sum(dim=(1, 3)))  # [B, Tc, K]
    k_sel = _gather_heads(k_flat, idx.clamp(min=0), S, 1)[:, 0]  # [B, Tc, K, D]
    y = torch.relu(torch.matmul(q_c.to(cd), k_sel.transpose(-1, -2)))  # [B, Tc, H, K]
    ws = (w_c.to(cd) * (D ** -0.5)).unsqueeze(-2)  # [B, Tc, 1, H]
    scores = torch.matmul(ws, y).squeeze(-2)  # [B, Tc, K]
    return _kl_rows(p, scores, valid, row_has)


def indexer_kl_loss(attn_q: Tensor, attn_k: Tensor, scaling: float, q: Tensor, w: Tensor, k: Tensor, *,
                    indices: Optional[Tensor] = None, q_offset: Union[int, Tensor, None] = None,
                    key_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                    chunk_size: Optional[int] = None, reduction: str = "mean") -> Tensor:
    """Lightning-indexer training loss (DeepSeek-V3.2 recipe; docs/keye_vl2.md section 3 "Training").

    ``p_t`` = the main attention probabilities of query t (softmax of ``scaling * attn_q . attn_k`` per
    head over the allowed keys; GQA head h uses kv head h // G), summed over the Hq heads and
    L1-normalised, computed under no_grad. The loss per query is ``KL(p_t || softmax(I_t))`` with the
    indexer scores ``I`` of :func:`dsa_indexer_scores`, ``0 log 0 = 0``:

    * ``indices is None`` (dense warm-up): over all allowed keys.
    * ``indices`` given (sparse stage): over the listed keys that are allowed; the per-head softmax is
      taken over that set (as the sparse attention computes it), then summed and L1-normalised, and
      ``softmax(I_t)`` is renormalised over the same set (as Megatron-LM's DSA indexer loss).

    Computed one query chunk at a time (largest buffer about 16 MiB, H_I times that for the saved
    ReLU tiles of one chunk in backward) and, when gradients are needed, under activation
    checkpointing, so no [T, S] tensor lives at once. Gradient flows only into ``q``, ``w``, ``k``;
    ``attn_q``/``attn_k`` are detached and get none.

    Args:
        attn_q: [B, T, Hq, Da] main-attention queries (roped); attn_k: [B, S, Hkv, Da] (roped).
        scaling: main-attention softmax scale (head_dim**-0.5).
        q: [B, T, H_I, D_I], w: [B, T, H_I], k: [B, S, D_I]: indexer inputs as in dsa_indexer_scores.
        indices: optional LongTensor [B, T, K] (-1 = empty; no duplicates) selecting the sparse stage.
        q_offset, key_mask, segment_ids: allowed keys (README "Allowed keys").
        chunk_size: queries per chunk (None = automatic); the value does not depend on it.
        reduction: "mean" (over query tokens with >= 1 allowed key, resp. >= 1 listed allowed key in
            the sparse stage; 0 when there is none) or "sum".
    Returns:
        scalar tensor, float32 (float64 for float64 inputs), in nats.
    Raises:
        ValueError: wrong shapes/dtypes, Hq % Hkv != 0, D_I not a power of two, bad indices, bad
        reduction, chunk_size < 1, bad q_offset.
    """
    B, T, H, D, S = _check_indexer_inputs(q, w, k)
    _check_float("attn_q", attn_q, 4)
    _check_float("attn_k", attn_k, 4)
    if tuple(attn_q.shape[:2]) != (B, T):
        raise ValueError(f"attn_q must be [B, T, Hq, Da] with B={B}, T={T}, got {tuple(attn_q.shape)}")
    Hq, Da = attn_q.shape[2], attn_q.shape[3]
    if attn_k.shape[0] != B or attn_k.shape[1] != S or attn_k.shape[3] != Da:
        raise ValueError(f"attn_k must be [B, S, Hkv, Da] with B={B}, S={S}, Da={Da}, got {tuple(attn_k.shape)}")
    Hkv = attn_k.shape[2]
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv}) (GQA)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk_size = _check_chunk_size(chunk_size)
    _check_masks(key_mask, segment_ids, B, S)
    if indices is not None:
        _check_indices_tensor(indices, B, T)
    off, _ = _q_offsets(q_offset, B, T, S, q.device)
    scaling = float(scaling)
    cd = _compute_dtype(attn_q, attn_k, q, w, k)
    grad = _needs_grad(q, w, k)
    max_off = int(off.max()) if B > 0 else 0
    attn_q, attn_k = attn_q.detach(), attn_k.detach()

    if indices is None:
        chunk = _chunk_len(chunk_size, T, _elt(cd) * B * max(S, 1), q.device)
    else:
        if indices.shape[-1] == 0:
            indices = indices.new_full((B, T, 1), -1)
        Kn = indices.shape[-1]
        chunk = _chunk_len(chunk_size, T, _elt(cd) * B * Kn * max(Hkv * Da, H * D), q.device)
        ak_flat = _heads_flat(attn_k, cd)
        k_flat = k.to(cd).reshape(B * S, D)

    total = torch.zeros((), dtype=cd, device=q.device)
    count = 0
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        pos_q = off.unsqueeze(1) + torch.arange(t0, t1, device=q.device).unsqueeze(0)
        if indices is None:
            S_c = min(S, max_off + t1)
            args = (attn_q[:, t0:t1], attn_k, q[:, t0:t1], w[:, t0:t1], k, pos_q, S_c, max_off + t0,
                    key_mask, segment_ids, scaling)
            fn = _kl_dense_chunk
            count += int(_allowed_dense(pos_q, S_c, key_mask, segment_ids).any(dim=-1).sum())
        else:
            idx = _check_indices_chunk(indices[:, t0:t1], S)
            args = (attn_q[:, t0:t1], ak_flat, q[:, t0:t1], w[:, t0:t1], k_flat, idx, pos_q,
                    key_mask, segment_ids, S, Hkv, scaling)
            fn = _kl_sparse_chunk
            count += int(_allowed_at(idx, pos_q, key_mask, segment_ids).any(dim=-1).sum())
        part = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False) if grad else fn(*args)
        total = total + part
    if reduction == "mean":
        total = total / max(count, 1)
    return total
