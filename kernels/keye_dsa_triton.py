"""DSA (DeepSeek Sparse Attention on GQA) Triton kernels for Keye-VL-2.0: indexer top-k and sparse attention.

Same names, signatures and semantics as the torch oracle ``keye_dsa_reference`` (contract: ``README.md``
beside this file). Tensors follow the kernel API layout ``[B, T, H, D]``; index lists are int64 ``[B, T, K]``
with ``-1`` for an empty slot.

Design (the numbers are for the model's shapes: indexer 16 heads x 64 dims, top-k 2048):

``dsa_topk_indices`` -- two kernels per chunk of queries, memory linear in the context:
  1. ``_indexer_score_kernel``: one program per (query tile, batch, key split). The tile's ``BQ`` queries
     times ``H_I`` heads form the rows of one ``tl.dot`` against a key block ``[BK, D_I]``; ReLU, the
     per-head weight (times ``D_I**-0.5``) and the sum over heads follow in fp32. Each score becomes an
     order-preserving int32 key (NaN -> -inf, -0.0 -> +0.0) and a not-allowed key (causal / ``key_mask`` /
     ``segment_ids``) becomes the sentinel ``INT32_MIN``. Keys past a tile's causal end are never scored.
     The keys land in a bounded buffer ``[B, chunk, L]`` int32 (``chunk`` queries; at most about
     ``SCORE_BUFFER_BYTES``), never ``[S, S]``.
  2. ``_topk_select_kernel``: one program per row (or per row segment for few long rows, then a second
     pass over the segments' candidates). It streams the row once and keeps a running top-``RS`` set in
     registers: every score is packed with its position into a unique int64 key
     ``(ordered_score << 32) | (2**32 - 1 - position)``, so equal scores rank lower position first and
     the result is exact and deterministic. Keys above the current threshold (the k-th best so far) are
     compacted into a small per-program scratch list; when it fills, a bitonic merge
     (sort ascending, elementwise max with the descending running set, sort) keeps the best ``RS``.
     Finally positions are sorted ascending and padded with -1.

``sparse_attention`` -- one program per (token, KV head): the G query heads of that KV group (padded to
  16 rows for ``tl.dot``) against the token's key list gathered 64 keys a step (layout ``[S, H_kv, D]``),
  online softmax in fp32 (exp2), saving LSE. Backward recomputes P from the LSE; dQ is accumulated in
  registers, dK/dV are scattered with fp32 atomics (not bitwise deterministic; the top-k is).

``indexer_kl_loss`` -- see ``keye_dsa_triton_kl.py`` (re-exported here).

Under ``TRITON_INTERPRET=1`` (CPU) the kernels upcast every load to fp32 (the interpreter's bf16 and
fp16 ``tl.dot`` are not trustworthy) and use fp32 dots.
"""
from __future__ import annotations

import math
import os

import torch

try:  # Triton is optional: the package imports (and the reference works) without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "dsa_topk_indices", "sparse_attention", "indexer_kl_loss", "CONFIG"]

# Tunables (the benchmark may override them). Sizes are element counts.
CONFIG = {
    "score_buffer_bytes": 1 << 31,  # bound of the per-chunk score buffer (int32 keys)
    "score_bq": 8,                  # queries per indexer tile (rows of the dot = bq * H_I)
    "score_bk": 128,                # keys per indexer step
    "score_warps": 8,
    "score_stages": 3,
    "select_block": 1024,           # row elements per step of the top-k stream
    "select_warps": 8,
    "select_rank_sort_max": 64,     # running sets up to this size sort by an O(n^2) rank (else tl.sort)
    "attn_bk": 64,                  # gathered keys per sparse-attention step
    "attn_warps": 4,
    "attn_stages": 2,
    "attn_bwd_warps": 4,
    "attn_bwd_stages": 1,
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check_triton(*tensors: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("keye_dsa_triton needs the `triton` package; install it or use keye_dsa_reference")
    for x in tensors:
        if x is not None and x.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"keye_dsa_triton kernels run on CUDA tensors (got {x.device}); move the inputs to the GPU, "
                "use keye_dsa_reference on CPU, or set TRITON_INTERPRET=1 before importing triton (slow, tests only)"
            )


def _q_offsets(q_offset, B: int, T: int, S: int, device) -> torch.Tensor:
    """q_offset (None | int | LongTensor [B]) -> int64 tensor [B]; checks 0 <= q_offset and q_offset + T <= S."""
    if q_offset is None:
        qo = torch.full((B,), S - T, dtype=torch.int64, device=device)
    elif isinstance(q_offset, int):
        qo = torch.full((B,), q_offset, dtype=torch.int64, device=device)
    else:
        qo = torch.as_tensor(q_offset, device=device).to(torch.int64).reshape(-1)
        if qo.numel() == 1 and B != 1:
            qo = qo.expand(B).contiguous()
        if qo.numel() != B:
            raise ValueError(f"q_offset must be an int or a LongTensor [B={B}], got shape {tuple(qo.shape)}")
    lo, hi = int(qo.min()), int(qo.max())
    if lo < 0 or hi + T > S:
        raise ValueError(f"q_offset must satisfy 0 <= q_offset and q_offset + T <= S (T={T}, S={S}); got [{lo}, {hi}]")
    return qo.contiguous()


if HAS_TRITON:
    _I32_MIN = tl.constexpr(-(2**31))
    _SENT = tl.constexpr(-(2**63) + 1)  # below every packed key (smallest packed key is (-2**31 + 1) << 32)
    _POS_BIG = tl.constexpr(2**62)

    # ------------------------------------------------------------------------------------------------
    # indexer scores -> order-preserving int32 keys
    # ------------------------------------------------------------------------------------------------
    @triton.jit
    def _indexer_score_kernel(
        q_ptr, w_ptr, k_ptr, km_ptr, seg_ptr, qoff_ptr, out_ptr,
        T, S, t0, t1, L, blocks_per_split,
        sqb, sqt, sqh, swb, swt, swh, skb, sks, sob, sor,
        scale,
        H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
        HAS_KM: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # q: [B, T, H, D], w: [B, T, H], k: [B, S, D], km: [B, S] int8, seg: [B, S] int64,
        # out: [B, t1 - t0, L] int32 (row r = query t0 + r)
        pid_q = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_s = tl.program_id(2)
        qoff = tl.load(qoff_ptr + b)

        M: tl.constexpr = BQ * HP
        m = tl.arange(0, M)
        tq_m = t0 + pid_q * BQ + m // HP
        h_m = m % HP
        row_ok_m = (tq_m < t1) & (h_m < H)
        d = tl.arange(0, D)
        qv = tl.load(q_ptr + b * sqb + tq_m.to(tl.int64)[:, None] * sqt + h_m[:, None] * sqh + d[None, :],
                     mask=row_ok_m[:, None], other=0.0)
        wv = tl.load(w_ptr + b * swb + tq_m.to(tl.int64) * swt + h_m * swh, mask=row_ok_m, other=0.0)
        wv = wv.to(tl.float32) * scale
        if UPCAST:
            qv = qv.to(tl.float32)

        tq = t0 + pid_q * BQ + tl.arange(0, BQ)
        rmask = tq < t1
        qpos = qoff + tq  # int64 [BQ]
        if HAS_SEG:
            qseg = tl.load(seg_ptr + b * S + qpos, mask=rmask, other=-1)
        # causal end of this tile: keys [0, kend)
        t_last = tl.minimum(t0 + pid_q * BQ + BQ, t1) - 1
        kend = tl.minimum(qoff + t_last + 1, S)
        nkb = tl.cdiv(kend, BK)
        kb_lo = pid_s * blocks_per_split
        kb_hi = tl.minimum(kb_lo + blocks_per_split, nkb)
        out_rows = out_ptr + b * sob + (tq - t0).to(tl.int64) * sor
        for kb in range(kb_lo, kb_hi):
            s = kb * BK + tl.arange(0, BK)
            smask = s < kend
            kv = tl.load(k_ptr + b * skb + s.to(tl.int64)[:, None] * sks + d[None, :], mask=smask[:, None], other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
            qk = tl.dot(qv, tl.trans(kv), input_precision=PRECISION)  # [M, BK] fp32
            qk = tl.maximum(qk, 0.0) * wv[:, None]
            sc = tl.sum(tl.reshape(qk, (BQ, HP, BK)), axis=1)  # [BQ, BK]
            allowed = (s[None, :] <= qpos[:, None]) & smask[None, :]
            if HAS_KM:
                kmv = tl.load(km_ptr + b * S + s, mask=smask, other=0)
                allowed = allowed & (kmv != 0)[None, :]
            if HAS_SEG:
                ksg = tl.load(seg_ptr + b * S + s, mask=smask, other=-2)
                allowed = allowed & (ksg[None, :] == qseg[:, None])
            sc = tl.where(sc != sc, float("-inf"), sc)  # NaN counts as -inf
            sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 -> +0.0 (torch compares them equal)
            bits = sc.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            key = tl.where(allowed, key, _I32_MIN)
            tl.store(out_rows[:, None] + s[None, :], key, mask=rmask[:, None] & smask[None, :])

    # ------------------------------------------------------------------------------------------------
    # streaming exact top-k over a row of keys
    # ------------------------------------------------------------------------------------------------
    @triton.jit
    def _sort(x, N: tl.constexpr, DESC: tl.constexpr, BY_RANK: tl.constexpr):
        """Sort a 1-D vector of N (a power of two). BY_RANK: O(N^2) rank sort (short vectors, and fast
        under the interpreter, whose tl.sort is a Python-level reduction); else tl.sort (bitonic)."""
        if BY_RANK:
            i = tl.arange(0, N)
            xi = x[:, None]
            xj = x[None, :]
            if DESC:
                before = (xj > xi) | ((xj == xi) & (i[None, :] < i[:, None]))
            else:
                before = (xj < xi) | ((xj == xi) & (i[None, :] < i[:, None]))
            rank = tl.sum(before.to(tl.int32), axis=1)
            return tl.sum(tl.where(rank[:, None] == i[None, :], xi, 0), axis=0)
        else:
            return tl.sort(x, descending=DESC)

    @triton.jit
    def _merge_pending(R, scratch_row, count, TOPK: tl.constexpr, RS: tl.constexpr, BY_RANK: tl.constexpr):
        """R: running set, sorted descending [RS]; merge the `count` pending keys of scratch_row into it."""
        r = tl.arange(0, RS)
        tl.debug_barrier()
        P = tl.load(scratch_row + r, mask=r < count, other=_SENT)
        tl.debug_barrier()
        P = _sort(P, RS, False, BY_RANK)  # ascending
        R = tl.maximum(R, P)  # bitonic split: the RS largest of R u P
        R = _sort(R, RS, True, BY_RANK)
        thr = tl.sum(tl.where(r == TOPK - 1, R, 0))
        return R, thr

    @triton.jit
    def _topk_select_kernel(
        src_ptr, src_stride, rowlen_ptr, scratch_ptr, out_ptr,
        out_row_stride, out_b_stride, rows_per_b, seg_len, NSPLIT,
        TOPK: tl.constexpr, RS: tl.constexpr, BLOCK: tl.constexpr,
        IN_KEYS: tl.constexpr, FINAL: tl.constexpr, BY_RANK: tl.constexpr,
    ):
        # src: int32 ordered score keys [R, *] (position = column) or, IN_KEYS, packed int64 keys [R, *].
        # FINAL: out int64 positions, row r -> out + (r // rows_per_b) * out_b_stride + (r % rows_per_b) * out_row_stride
        # else:  out int64 packed keys [R * NSPLIT, RS] (candidates of each segment).
        pid = tl.program_id(0)
        row = pid // NSPLIT
        sp = pid % NSPLIT
        n = tl.load(rowlen_ptr + row)
        lo = sp * seg_len
        hi = tl.minimum(lo + seg_len, n)
        src_row = src_ptr + row.to(tl.int64) * src_stride
        scratch_row = scratch_ptr + pid.to(tl.int64) * RS
        r = tl.arange(0, RS)
        R = tl.full([RS], _SENT, tl.int64)
        thr = tl.sum(R) * 0 + _SENT  # int64 scalar tensor
        count = tl.sum(tl.zeros([BLOCK], dtype=tl.int32))
        offs = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            if count > RS - BLOCK:
                R, thr = _merge_pending(R, scratch_row, count, TOPK, RS, BY_RANK)
                count = count * 0
            idx = start + offs
            msk = idx < hi
            if IN_KEYS:
                key = tl.load(src_row + idx, mask=msk, other=_SENT)
            else:
                k32 = tl.load(src_row + idx, mask=msk, other=_I32_MIN)
                key = k32.to(tl.int64) * 4294967296 + (4294967295 - idx.to(tl.int64))
                key = tl.where(k32 == _I32_MIN, _SENT, key)
            surv = key > thr
            csum = tl.cumsum(surv.to(tl.int32), axis=0)
            tl.store(scratch_row + count + csum - 1, key, mask=surv)
            count += tl.sum(surv.to(tl.int32))
        R, thr = _merge_pending(R, scratch_row, count, TOPK, RS, BY_RANK)
        if FINAL:
            sel = (r < TOPK) & (R != _SENT)
            pos = 4294967295 - (R & 4294967295)
            pos = tl.where(sel, pos, _POS_BIG)
            pos = _sort(pos, RS, False, BY_RANK)
            pos = tl.where(pos == _POS_BIG, -1, pos)
            bi = (row // rows_per_b).to(tl.int64)
            ri = (row % rows_per_b).to(tl.int64)
            tl.store(out_ptr + bi * out_b_stride + ri * out_row_stride + r, pos, mask=r < TOPK)
        else:
            tl.store(out_ptr + pid.to(tl.int64) * RS + r, R)


def _select_topk(keys: torch.Tensor, rowlen: torch.Tensor, out: torch.Tensor, topk: int, t0: int) -> None:
    """Exact deterministic top-k of each row of ``keys`` (int32 [B, Tc, L]); writes out[:, t0:t0+Tc] (int64)."""
    B, Tc, L = keys.shape
    R = B * Tc
    # the interpreter's tl.sort is a Python-level reduction: keep its vectors short there
    BLOCK = 16 if _interpreting() else min(CONFIG["select_block"], max(16, _next_pow2(L)))
    RS = max(_next_pow2(topk), BLOCK)
    warps = CONFIG["select_warps"]
    by_rank = RS <= CONFIG["select_rank_sort_max"]
    dev = keys.device
    nsm = _num_sms(dev)
    nsplit = 1
    if R < 2 * nsm and L > 4 * RS:
        nsplit = max(1, min(-(-2 * nsm // R), L // (2 * RS)))
    seg_len = -(-(-(-L // nsplit)) // BLOCK) * BLOCK
    scratch = torch.empty((R * nsplit, RS), dtype=torch.int64, device=dev)
    out_view = out[:, t0:t0 + Tc]
    if nsplit == 1:
        _topk_select_kernel[(R,)](
            keys, L, rowlen, scratch, out_view, out.stride(1), out.stride(0), Tc, seg_len, 1,
            TOPK=topk, RS=RS, BLOCK=BLOCK, IN_KEYS=False, FINAL=True, BY_RANK=by_rank, num_warps=warps, num_stages=2)
        return
    cand = torch.empty((R * nsplit, RS), dtype=torch.int64, device=dev)
    _topk_select_kernel[(R * nsplit,)](
        keys, L, rowlen, scratch, cand, 0, 0, 1, seg_len, nsplit,
        TOPK=topk, RS=RS, BLOCK=BLOCK, IN_KEYS=False, FINAL=False, BY_RANK=by_rank, num_warps=warps, num_stages=2)
    clen = torch.full((R,), nsplit * RS, dtype=torch.int32, device=dev)
    _topk_select_kernel[(R,)](
        cand, nsplit * RS, clen, scratch, out_view, out.stride(1), out.stride(0), Tc, nsplit * RS, 1,
        TOPK=topk, RS=RS, BLOCK=BLOCK, IN_KEYS=True, FINAL=True, BY_RANK=by_rank, num_warps=warps, num_stages=2)


def dsa_topk_indices(q, w, k, topk, *, q_offset=None, key_mask=None, segment_ids=None, chunk_size=None):
    """Top-``topk`` allowed keys of each query by the lightning-indexer score, fused scoring + selection.

    Args:
        q: ``[B, T, H_I, D_I]`` bf16/fp16/fp32 indexer queries (already normed, roped, Hadamard-rotated).
        w: ``[B, T, H_I]`` per-head weights (any float dtype; used in fp32).
        k: ``[B, S, D_I]`` indexer keys (same dtype as ``q``), the whole history; queries are keys
            ``q_offset[b] + t``.
        topk: number of keys per query (``k`` of the paper, 2048 in the model), >= 1.
        q_offset: ``None`` (= ``S - T``), an int, or a LongTensor ``[B]``; ``0 <= q_offset``, ``q_offset + T <= S``.
        key_mask: optional bool ``[B, S]``, False = padding (never selected).
        segment_ids: optional int ``[B, S]``; a key is allowed only inside the query's segment.
        chunk_size: queries scored per pass (bounds the ``[B, chunk, S]`` int32 score buffer); default: as many
            as fit ``CONFIG["score_buffer_bytes"]``.

    Returns:
        int64 ``[B, T, topk]``: positions sorted ascending, ``-1`` padding at the end when fewer than ``topk``
        keys are allowed. Score ``I[t, s] = sum_h w[t, h] * D_I**-0.5 * relu(q[t, h] . k[s])`` in fp32; ties
        rank lower position first; NaN scores rank as -inf. Deterministic (bitwise identical across runs).

    Raises:
        ValueError on inconsistent shapes/dtypes or a bad ``q_offset``; RuntimeError without Triton/CUDA.
    """
    _check_triton(q, w, k)
    if q.dim() != 4 or k.dim() != 3 or w.dim() != 3:
        raise ValueError(f"expected q [B, T, H, D], w [B, T, H], k [B, S, D]; got {tuple(q.shape)}, "
                         f"{tuple(w.shape)}, {tuple(k.shape)}")
    B, T, H, D = q.shape
    S = k.shape[1]
    if k.shape[0] != B or k.shape[2] != D or tuple(w.shape) != (B, T, H):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, w {tuple(w.shape)}, k {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q and k must share a dtype among bf16/fp16/fp32; got {q.dtype}, {k.dtype}")
    if D & (D - 1) or D < 16:
        raise ValueError(f"indexer head dim must be a power of two >= 16 (got {D}); use keye_dsa_reference")
    topk = int(topk)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    dev = q.device
    out = torch.empty((B, T, topk), dtype=torch.int64, device=dev)
    if T == 0:
        return out
    if S == 0:
        return out.fill_(-1)
    qo = _q_offsets(q_offset, B, T, S, dev)
    q = q.contiguous()
    k = k.contiguous()
    w = w.contiguous()
    km = None
    if key_mask is not None:
        if tuple(key_mask.shape) != (B, S):
            raise ValueError(f"key_mask must be [B, S] = {(B, S)}, got {tuple(key_mask.shape)}")
        km = key_mask.to(device=dev, dtype=torch.int8).contiguous()
    seg = None
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, S):
            raise ValueError(f"segment_ids must be [B, S] = {(B, S)}, got {tuple(segment_ids.shape)}")
        seg = segment_ids.to(device=dev, dtype=torch.int64).contiguous()

    interp = _interpreting()
    HP = _next_pow2(H)
    BK = CONFIG["score_bk"]
    BQ = max(1, min(CONFIG["score_bq"], _next_pow2(T)))
    BQ = max(BQ, -(-16 // HP))  # the dot needs >= 16 rows
    warps = CONFIG["score_warps"] if BQ * HP >= 128 else 4
    precision = "ieee" if (q.dtype == torch.float32 or interp) else "tf32"
    max_end = int(qo.max()) + T  # exclusive end of the last query's keys
    nsm = _num_sms(dev)
    if chunk_size is None:
        L_full = min(S, max_end)
        chunk = max(BQ, CONFIG["score_buffer_bytes"] // max(1, 4 * B * L_full))
    else:
        chunk = max(1, int(chunk_size))
    chunk = min(chunk, T)
    if chunk < T:
        chunk = max(BQ, chunk // BQ * BQ)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        Tc = t1 - t0
        L = min(S, int(qo.max()) + t1)
        keys = torch.empty((B, Tc, L), dtype=torch.int32, device=dev)
        ntile = -(-Tc // BQ)
        nkb = -(-L // BK)
        nsplit = 1
        if ntile * B < 4 * nsm:
            nsplit = max(1, min(nkb, -(-4 * nsm // (ntile * B))))
        bps = -(-nkb // nsplit)
        nsplit = -(-nkb // bps)
        _indexer_score_kernel[(ntile, B, nsplit)](
            q, w, k, km if km is not None else keys, seg if seg is not None else qo, qo, keys,
            T, S, t0, t1, L, bps,
            q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), w.stride(2),
            k.stride(0), k.stride(1), keys.stride(0), keys.stride(1),
            D ** -0.5,
            H=H, HP=HP, D=D, BQ=BQ, BK=BK, HAS_KM=km is not None, HAS_SEG=seg is not None,
            UPCAST=interp, PRECISION=precision, num_warps=warps, num_stages=CONFIG["score_stages"])
        pos = qo[:, None] + torch.arange(t0, t1, device=dev, dtype=torch.int64)[None, :]
        rowlen = torch.clamp(pos + 1, max=L).to(torch.int32).contiguous()
        _select_topk(keys, rowlen, out, topk, t0)
    return out


# ----------------------------------------------------------------------------------------------------
# sparse GQA attention over one shared key list per token
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _sparse_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,
        T, S, K, HKV, scale_log2,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sib, sit, sob, sot, soh, slb, slt,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr,
        DVP: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # q: [B, T, Hq, D], k: [B, S, Hkv, D], v: [B, S, Hkv, DV], idx: [B, T, K] int64,
        # o: [B, T, Hq, DV], lse: [B, T, Hq] fp32. One program = one (b, t, kv head g): its G query heads.
        pid = tl.program_id(0)
        g = pid % HKV
        bt = pid // HKV
        t = (bt % T).to(tl.int64)
        b = (bt // T).to(tl.int64)
        rows = tl.arange(0, GP)
        rmask = rows < G
        hq = g * G + rows
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        qv = tl.load(q_ptr + b * sqb + t * sqt + hq[:, None] * sqh + d[None, :],
                     mask=rmask[:, None] & (d < D)[None, :], other=0.0)
        if UPCAST:
            qv = qv.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DVP], tl.float32)
        kbase = k_ptr + b * skb + g * skh
        vbase = v_ptr + b * svb + g * svh
        ibase = idx_ptr + b * sib + t * sit
        for j0 in range(0, K, BK):
            j = j0 + tl.arange(0, BK)
            ix = tl.load(ibase + j, mask=j < K, other=-1)
            valid = (ix >= 0) & (ix < S)
            ixs = tl.where(valid, ix, 0)
            kv = tl.load(kbase + ixs[:, None] * sks + d[None, :], mask=valid[:, None] & (d < D)[None, :], other=0.0)
            vv = tl.load(vbase + ixs[:, None] * svs + dv[None, :], mask=valid[:, None] & (dv < DV)[None, :],
                         other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
                vv = vv.to(tl.float32)
            s = tl.dot(qv, tl.trans(kv), input_precision=PRECISION) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
            m_i = m_new
        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(o_ptr + b * sob + t * sot + hq[:, None] * soh + dv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (dv < DV)[None, :])
        tl.store(lse_ptr + b * slb + t * slt + hq, lse, mask=rmask)

    @triton.jit
    def _sparse_attn_bwd_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
        T, S, K, HKV, scale,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sib, sit, sdob, sdot, sdoh, slb, slt,
        sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr,
        DVP: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # dq: [B, T, Hq, D] (q's dtype, written), dk/dv: fp32 [B, S, Hkv, D] (atomically accumulated);
        # lse, delta = rowsum(dO * O): fp32 [B, T, Hq] (lse/delta share strides). P is recomputed from lse.
        pid = tl.program_id(0)
        g = pid % HKV
        bt = pid // HKV
        t = (bt % T).to(tl.int64)
        b = (bt // T).to(tl.int64)
        rows = tl.arange(0, GP)
        rmask = rows < G
        hq = g * G + rows
        d = tl.arange(0, DP)
        dv = tl.arange(0, DVP)
        dmask = d < D
        dvmask = dv < DV
        qv = tl.load(q_ptr + b * sqb + t * sqt + hq[:, None] * sqh + d[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0)
        dov = tl.load(do_ptr + b * sdob + t * sdot + hq[:, None] * sdoh + dv[None, :],
                      mask=rmask[:, None] & dvmask[None, :], other=0.0)
        if UPCAST:
            qv = qv.to(tl.float32)
            dov = dov.to(tl.float32)
        lse = tl.load(lse_ptr + b * slb + t * slt + hq, mask=rmask, other=float("-inf"))
        delta = tl.load(delta_ptr + b * slb + t * slt + hq, mask=rmask, other=0.0)
        row_ok = lse > float("-inf")
        lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
        scale_log2 = scale * 1.4426950408889634
        dq = tl.zeros([GP, DP], tl.float32)
        kbase = k_ptr + b * skb + g * skh
        vbase = v_ptr + b * svb + g * svh
        dkbase = dk_ptr + b * sdkb + g * sdkh
        dvbase = dv_ptr + b * sdvb + g * sdvh
        ibase = idx_ptr + b * sib + t * sit
        for j0 in range(0, K, BK):
            j = j0 + tl.arange(0, BK)
            ix = tl.load(ibase + j, mask=j < K, other=-1)
            valid = (ix >= 0) & (ix < S)
            ixs = tl.where(valid, ix, 0)
            kv = tl.load(kbase + ixs[:, None] * sks + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
            vv = tl.load(vbase + ixs[:, None] * svs + dv[None, :], mask=valid[:, None] & dvmask[None, :], other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
                vv = vv.to(tl.float32)
            s = tl.dot(qv, tl.trans(kv), input_precision=PRECISION) * scale_log2
            p = tl.exp2(s - lse2[:, None])
            p = tl.where(valid[None, :] & row_ok[:, None], p, 0.0)
            dp = tl.dot(dov, tl.trans(vv), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kv.dtype), kv, input_precision=PRECISION)
            dk_blk = tl.dot(tl.trans(ds.to(qv.dtype)), qv, input_precision=PRECISION) * scale
            dv_blk = tl.dot(tl.trans(p.to(dov.dtype)), dov, input_precision=PRECISION)
            tl.atomic_add(dkbase + ixs[:, None] * sdks + d[None, :], dk_blk, mask=valid[:, None] & dmask[None, :],
                          sem="relaxed")
            tl.atomic_add(dvbase + ixs[:, None] * sdvs + dv[None, :], dv_blk, mask=valid[:, None] & dvmask[None, :],
                          sem="relaxed")
        dq = dq * scale
        tl.store(dq_ptr + b * sqb + t * sqt + hq[:, None] * sqh + d[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])


def _attn_meta(q, k, v):
    B, T, Hq, D = q.shape
    S, Hkv, DV = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    interp = _interpreting()
    return dict(G=G, GP=max(16, _next_pow2(G)), D=D, DP=max(16, _next_pow2(D)), DV=DV, DVP=max(16, _next_pow2(DV)),
                UPCAST=interp, PRECISION="ieee" if (q.dtype == torch.float32 or interp) else "tf32")


def _sparse_attn_fwd(q, k, v, indices, scaling):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    K = indices.shape[2]
    o = torch.empty((B, T, Hq, v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, Hq), dtype=torch.float32, device=q.device)
    if B * T == 0:
        return o, lse
    _sparse_attn_fwd_kernel[(B * T * Hkv,)](
        q, k, v, indices, o, lse, T, S, K, Hkv, scaling * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), indices.stride(0), indices.stride(1),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        BK=CONFIG["attn_bk"], num_warps=CONFIG["attn_warps"], num_stages=CONFIG["attn_stages"],
        **_attn_meta(q, k, v))
    return o, lse


def _sparse_attn_bwd(q, k, v, indices, o, lse, do, scaling):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    K = indices.shape[2]
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, T, Hq]
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if B * T > 0:
        _sparse_attn_bwd_kernel[(B * T * Hkv,)](
            q, k, v, indices, do, lse, delta, dq, dk, dv, T, S, K, Hkv, scaling,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), indices.stride(0), indices.stride(1),
            do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            BK=CONFIG["attn_bk"], num_warps=CONFIG["attn_bwd_warps"], num_stages=CONFIG["attn_bwd_stages"],
            **_attn_meta(q, k, v))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scaling):
        o, lse = _sparse_attn_fwd(q, k, v, indices, scaling)
        ctx.save_for_backward(q, k, v, indices, o, lse)
        ctx.scaling = scaling
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, indices, o, lse = ctx.saved_tensors
        dq, dk, dv = _sparse_attn_bwd(q, k, v, indices, o, lse, do, ctx.scaling)
        return dq, dk, dv, None, None


def sparse_attention(q, k, v, indices, *, scaling, return_lse=False):
    """Top-k sparse GQA attention, one key list per query token shared by all heads (Triton).

    ``out[b, t, h] = softmax_j(scaling * q[b, t, h] . k[b, idx_j, h // G]) @ v[b, idx_j, h // G]`` over the
    listed keys ``idx_j = indices[b, t, j]`` (``G = Hq / Hkv``).

    Args:
        q: ``[B, T, Hq, D]`` bf16/fp16/fp32; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (k's dtype).
        indices: int64 ``[B, T, K]``, positions in ``[0, S)`` or ``-1`` (empty), no duplicates in a row. Unlike
            the reference (which raises), entries outside ``[0, S)`` are treated as empty: no host sync.
        scaling: softmax scale (the model uses head_dim**-0.5).
        return_lse: also return the fp32 log-sum-exp ``[B, T, Hq]`` (natural log; not differentiable).

    Returns:
        out ``[B, T, Hq, Dv]`` in q's dtype (a query with no listed key: 0, lse -inf, no NaN), and lse if asked.
        Differentiable in q, k, v (backward: recompute from LSE, dK/dV by fp32 atomics).

    Raises:
        ValueError on bad shapes/dtypes (fp64: use keye_dsa_reference); RuntimeError without Triton/CUDA.
    """
    _check_triton(q, k, v, indices)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [B, T, Hq, D], k/v [B, S, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv}) (GQA)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name} dtype {x.dtype} unsupported by the Triton kernels (bf16/fp16/fp32); "
                             "use keye_dsa_reference")
    if k.dtype != v.dtype or q.dtype != k.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if indices.dtype != torch.long or indices.dim() != 3 or tuple(indices.shape[:2]) != (B, T):
        raise ValueError(f"indices must be int64 [B={B}, T={T}, K], got {indices.dtype} {tuple(indices.shape)}")
    q, k, v, indices = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, indices))
    out, lse = _SparseAttention.apply(q, k, v, indices, float(scaling))
    return (out, lse) if return_lse else out


def indexer_kl_loss(attn_q, attn_k, scaling, q, w, k, *, indices=None, q_offset=None, key_mask=None,
                    segment_ids=None, chunk_size=None, reduction="mean"):
    """Lightning-indexer KL loss (Triton); implemented in ``keye_dsa_triton_kl.py`` (see its docstring)."""
    from .keye_dsa_triton_kl import indexer_kl_loss as _impl

    return _impl(attn_q, attn_k, scaling, q, w, k, indices=indices, q_offset=q_offset, key_mask=key_mask,
                 segment_ids=segment_ids, chunk_size=chunk_size, reduction=reduction)
