"""DSA lightning-indexer top-k in Triton: fused scoring + exact deterministic selection (``dsa_topk_indices``).

Public entry: ``keye_dsa_triton.dsa_topk_indices`` (re-exported from here). Semantics = the reference
(``keye_dsa_reference.dsa_topk_indices``; contract ``README.md`` beside this file).

Two kernels per chunk of queries; memory is linear in the context (a ``[B, chunk, L]`` int32 buffer of at most
about ``CONFIG["score_buffer_bytes"]``, never ``[S, S]``):

1. ``_indexer_score_kernel``: one program per (query tile, batch, key split). The tile's ``BQ`` queries times
   ``H_I`` heads are the rows of one ``tl.dot`` against a key block ``[BK, D_I]``; ReLU (NaN-propagating, as
   torch), the per-head weight times ``D_I**-0.5`` and the head sum follow in fp32. Each score is stored as an
   order-preserving int32 key (NaN -> -inf, -0.0 -> +0.0); a key that is not allowed (causal, ``key_mask``,
   ``segment_ids``) is stored as ``INT32_MIN``, below every score (an allowed -inf still ranks above it).
   Key blocks past a tile's causal end are skipped.
2. ``_topk_select_kernel``: one program per row (few long rows: per row segment, then a second pass over
   the segments' candidates). Every score is packed with its position into a unique int64 key
   ``(score_key << 32) | (2**32 - 1 - position)``: larger is better and equal scores rank the lower
   position first, so the top-k is exact and deterministic. The row is streamed once against a threshold;
   keys above it go to a small scratch list, merged into a running top-``RS`` set in registers when it fills
   (bitonic: sort the list ascending, elementwise max with the descending set, bitonic merge). The first
   threshold comes from a strided sample of the row (its ``r``-th largest score, ``r`` set so that, for a row
   in random order, at least k keys of the row exceed it with overwhelming probability); if fewer than
   k keys pass, the row is streamed again without a threshold, so the result never depends on the sample.
   Finally, knowing the exact k-th key, the row is read once more and the selected positions are written
   in ascending order (stream compaction), ``-1`` after them.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # fixed at import, as triton.jit's choice

# Tunables (the benchmark may override them).
CONFIG = {
    "score_buffer_bytes": 1 << 31,  # bound of the per-chunk score buffer (int32 keys)
    "score_bq": 8,                  # queries per indexer tile (rows of the dot = bq * H_I)
    "score_bk": 128,                # keys per indexer step
    "score_warps": 8,
    "score_stages": 3,
    "select_block": 512,            # row elements per step of the top-k stream
    "select_rs_mult": 2,            # running-set size = mult * next_pow2(topk)
    "select_warps": 8,
    "select_sample": 1024,          # strided sample of a long row for the first threshold (0 = off)
    "select_rank_sort_max": 64,     # running sets up to this size sort by an O(n^2) rank (else tl.sort)
}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check_triton(*tensors) -> None:
    if not HAS_TRITON:
        raise RuntimeError("keye_dsa_triton needs the `triton` package; install it or use keye_dsa_reference")
    for x in tensors:
        if x is not None and x.device.type != "cuda" and not _INTERPRET:
            raise RuntimeError(
                f"keye_dsa_triton kernels run on CUDA tensors (got {x.device}); move the inputs to the GPU, "
                "use keye_dsa_reference on CPU, or set TRITON_INTERPRET=1 before importing triton (slow, tests only)"
            )


def _q_offsets(q_offset, B: int, T: int, S: int, device):
    """q_offset (None | int | integer tensor [B] or []) -> (int64 tensor [B], max offset as int).

    None and int need no device sync (decode); a tensor is checked on the host (one sync).
    """
    if q_offset is None or (isinstance(q_offset, int) and not isinstance(q_offset, bool)):
        off = S - T if q_offset is None else int(q_offset)
        if off < 0 or off + T > S:
            raise ValueError(f"q_offset must satisfy 0 <= q_offset and q_offset + T <= S (T={T}, S={S}); got {off}")
        return torch.full((B,), off, dtype=torch.int64, device=device), off
    if not torch.is_tensor(q_offset) or q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool:
        raise ValueError(f"q_offset must be None, an int or an integer tensor [B], got {q_offset!r}")
    qo = q_offset.to(device=device, dtype=torch.int64).reshape(-1)
    if qo.numel() == 1 and B != 1:
        qo = qo.expand(B)
    if qo.numel() != B:
        raise ValueError(f"q_offset must be an int or a LongTensor [B={B}], got shape {tuple(q_offset.shape)}")
    lo, hi = (int(v) for v in torch.stack([qo.min(), qo.max()]).tolist())
    if lo < 0 or hi + T > S:
        raise ValueError(f"q_offset must satisfy 0 <= q_offset and q_offset + T <= S (T={T}, S={S}); got [{lo}, {hi}]")
    return qo.contiguous(), hi


if HAS_TRITON:
    _I32_MIN = tl.constexpr(-(2**31))
    _SENT = tl.constexpr(-(2**63) + 1)  # below every packed key (the smallest is (-2**31 + 1) << 32)
    _POS_BIG = tl.constexpr(2**62)

    # ------------------------------------------------------------------------------------------------
    # indexer scores -> order-preserving int32 keys
    # ------------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["T", "S", "t0", "t1", "L", "blocks_per_split"])
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
            qk = tl.maximum(qk, 0.0, propagate_nan=tl.PropagateNan.ALL) * wv[:, None]  # relu(NaN) = NaN, as torch
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
    # exact top-k of a row of keys
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
    def _bitonic_merge_desc(x, LOG_N: tl.constexpr, BY_RANK: tl.constexpr):
        """Sort a bitonic vector of 2**LOG_N descending (LOG_N half-cleaner stages)."""
        if BY_RANK:
            return _sort(x, 2**LOG_N, True, True)
        else:
            for i in tl.static_range(LOG_N):
                x3 = tl.reshape(x, [2**i, 2, 2 ** (LOG_N - 1 - i)])
                hi = tl.max(x3, axis=1)
                lo = tl.min(x3, axis=1)
                x = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), [2**LOG_N])
            return x

    @triton.jit
    def _load_keys(src_row, idx, msk, IN_KEYS: tl.constexpr):
        """Packed int64 keys at row offsets idx (SENT where masked or not allowed)."""
        if IN_KEYS:
            return tl.load(src_row + idx, mask=msk, other=_SENT)
        else:
            k32 = tl.load(src_row + idx, mask=msk, other=_I32_MIN)
            key = k32.to(tl.int64) * 4294967296 + (4294967295 - idx.to(tl.int64))
            return tl.where(k32 == _I32_MIN, _SENT, key)

    @triton.jit(do_not_specialize=["src_stride", "out_row_stride", "out_b_stride", "rows_per_b", "t0", "L",
                                   "seg_len", "NSPLIT", "NPREV"])
    def _topk_select_kernel(
        src_ptr, src_stride, qoff_ptr, scratch_ptr, out_ptr,
        out_row_stride, out_b_stride, rows_per_b, t0, L, seg_len, NSPLIT, NPREV,
        TOPK: tl.constexpr, RS: tl.constexpr, LOG_RS: tl.constexpr, CAND: tl.constexpr, BLOCK: tl.constexpr,
        SAMPLE: tl.constexpr, IN_KEYS: tl.constexpr, FINAL: tl.constexpr, BY_RANK: tl.constexpr,
    ):
        # src: int32 score keys [R, src_stride] (position = column) or, IN_KEYS, packed int64 keys
        #      [R, NPREV * CAND] (NPREV segments' candidates, each sorted descending).
        # Row r = (b, i): b = r // rows_per_b, query t0 + i; its length is min(qoff[b] + t0 + i + 1, L)
        # (IN_KEYS: NPREV * CAND). Programs: R * NSPLIT, segment sp of a row covers [sp*seg_len, +seg_len).
        # FINAL: out int64 positions [*, TOPK] at out + b * out_b_stride + i * out_row_stride;
        # else:  out int64 [R * NSPLIT, CAND], each segment's best CAND keys, descending.
        pid = tl.program_id(0)
        row = pid // NSPLIT
        sp = pid % NSPLIT
        bi = (row // rows_per_b).to(tl.int64)
        ri = row % rows_per_b
        if IN_KEYS:
            n = NPREV * CAND
        else:
            n = tl.minimum(tl.load(qoff_ptr + bi) + t0 + ri + 1, L).to(tl.int32)
        lo = sp * seg_len
        hi = tl.minimum(lo + seg_len, n)
        src_row = src_ptr + row.to(tl.int64) * src_stride
        scratch_row = scratch_ptr + pid.to(tl.int64) * RS
        r = tl.arange(0, RS)
        offs = tl.arange(0, BLOCK)

        # ---- first threshold (a lower bound when IN_KEYS; an estimate from a sample otherwise)
        thr_init = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0) + _SENT
        if IN_KEYS:
            if NPREV > 1:
                jj = tl.arange(0, 64)
                kth = tl.load(src_row + jj * CAND + (TOPK - 1), mask=jj < NPREV, other=_SENT)
                best = tl.max(kth, axis=0)  # every segment with >= TOPK keys bounds the k-th best from below
                thr_init = tl.where(best == _SENT, thr_init, best - 1)
        elif SAMPLE > 0:
            n_seg = hi - lo
            if n_seg > 4 * SAMPLE:
                si = tl.arange(0, SAMPLE)
                xs = tl.load(src_row + lo + (si.to(tl.int64) * n_seg) // SAMPLE).to(tl.int64)
                mu = TOPK * SAMPLE / n_seg.to(tl.float32)
                rk = (mu + 4.0 * tl.sqrt(mu) + 2.0).to(tl.int32)
                if rk < SAMPLE:
                    # largest v with #(sample >= v) >= rk, by bisection over the int32 key range
                    blo = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0) - 2147483648
                    bhi = blo + 4294967295
                    for _ in range(32):
                        mid = (blo + bhi + 1) >> 1
                        ok = tl.sum((xs >= mid).to(tl.int32), axis=0) >= rk
                        blo = tl.where(ok, mid, blo)
                        bhi = tl.where(ok, bhi, mid - 1)
                    thr_init = tl.where(blo > -2147483648, blo * 4294967296 - 1, thr_init)

        # ---- stream (again without threshold if the sampled one let fewer than TOPK keys through)
        R = tl.full([RS], _SENT, tl.int64)
        kth = thr_init * 0 + _SENT  # TOPK-th best key so far
        done = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
        for attempt in range(2):
            if done == 0:
                R = tl.full([RS], _SENT, tl.int64)
                kth = thr_init * 0 + _SENT
                thr = thr_init
                count = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
                nb = tl.cdiv(hi - lo, BLOCK)
                for it in range(0, nb + 1):
                    if (count > RS - BLOCK) | (it == nb):
                        tl.debug_barrier()
                        P = tl.load(scratch_row + r, mask=r < count, other=_SENT)
                        tl.debug_barrier()
                        P = _sort(P, RS, False, BY_RANK)  # ascending
                        R = _bitonic_merge_desc(tl.maximum(R, P), LOG_RS, BY_RANK)  # the RS best of R u P
                        kth = tl.sum(tl.where(r == TOPK - 1, R, 0), axis=0)
                        thr = tl.maximum(kth, thr_init)
                        count = count * 0
                    idx = lo + it * BLOCK + offs
                    key = _load_keys(src_row, idx, idx < hi, IN_KEYS)
                    surv = key > thr
                    csum = tl.cumsum(surv.to(tl.int32), axis=0)
                    tl.store(scratch_row + count + csum - 1, key, mask=surv & (count + csum <= RS))  # always true
                    count += tl.sum(surv.to(tl.int32), axis=0)
                ok = (thr_init == _SENT) | (kth != _SENT)  # the first threshold let >= TOPK keys through
                done = ok.to(tl.int32)
                thr_init = thr_init * 0 + _SENT

        # ---- output
        if FINAL:
            out_row = out_ptr + bi * out_b_stride + ri.to(tl.int64) * out_row_stride
            if IN_KEYS:
                sel = (r < TOPK) & (R != _SENT)
                pos = tl.where(sel, 4294967295 - (R & 4294967295), _POS_BIG)
                pos = _sort(pos, RS, False, BY_RANK)
                tl.store(out_row + r, tl.where(pos == _POS_BIG, -1, pos), mask=r < TOPK)
            else:
                # kth is the exact TOPK-th key (SENT when fewer are allowed): write positions in order
                cnt = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
                for start in range(lo, hi, BLOCK):
                    idx = start + offs
                    key = _load_keys(src_row, idx, idx < hi, IN_KEYS)
                    sel = (key >= kth) & (key != _SENT)
                    csum = tl.cumsum(sel.to(tl.int32), axis=0)
                    tl.store(out_row + cnt + csum - 1, idx.to(tl.int64), mask=sel & (cnt + csum <= TOPK))
                    cnt += tl.sum(sel.to(tl.int32), axis=0)
                for start in range(0, TOPK, BLOCK):
                    idx = start + offs
                    tl.store(out_row + idx, tl.full([BLOCK], -1, tl.int64), mask=(idx >= cnt) & (idx < TOPK))
        else:
            tl.store(out_ptr + pid.to(tl.int64) * CAND + r, R, mask=r < CAND)


def _select_topk(keys, qo, out, topk: int, t0: int) -> None:
    """Exact deterministic top-k of the rows of ``keys`` (int32 [B, Tc, L]); writes out[:, t0:t0+Tc] (int64)."""
    B, Tc, L = keys.shape
    R = B * Tc
    dev = keys.device
    CAND = _next_pow2(topk)
    if _INTERPRET:  # the interpreter's tl.sort is a Python-level reduction: keep the vectors short there
        BLOCK = 16
        RS = max(CAND, BLOCK)
        SAMPLE = CONFIG["select_sample"] and 16
    else:
        BLOCK = min(CONFIG["select_block"], max(16, _next_pow2(L)))
        RS = max(CAND * CONFIG["select_rs_mult"], 2 * BLOCK)
        SAMPLE = CONFIG["select_sample"]
    RS = max(RS, 2 * BLOCK) if RS > CONFIG["select_rank_sort_max"] else RS
    by_rank = RS <= CONFIG["select_rank_sort_max"]
    LOG_RS = RS.bit_length() - 1
    warps = CONFIG["select_warps"]
    nsm = _num_sms(dev)
    nsplit = 1
    if R < 2 * nsm and L > 8 * RS:
        nsplit = max(1, min(-(-2 * nsm // R), L // (4 * RS), 64))
    seg_len = -(-(-(-L // nsplit)) // BLOCK) * BLOCK
    nsplit = -(-L // seg_len)
    scratch = torch.empty((R * nsplit, RS), dtype=torch.int64, device=dev)
    out_view = out[:, t0:t0 + Tc]
    meta = dict(TOPK=topk, RS=RS, LOG_RS=LOG_RS, CAND=CAND, BLOCK=BLOCK, BY_RANK=by_rank, num_warps=warps,
                num_stages=1)
    if nsplit == 1:
        _topk_select_kernel[(R,)](keys, L, qo, scratch, out_view, out.stride(1), out.stride(0), Tc, t0, L, L, 1, 1,
                                  SAMPLE=SAMPLE, IN_KEYS=False, FINAL=True, **meta)
        return
    cand = torch.empty((R * nsplit, CAND), dtype=torch.int64, device=dev)
    _topk_select_kernel[(R * nsplit,)](keys, L, qo, scratch, cand, 0, 0, Tc, t0, L, seg_len, nsplit, 1,
                                       SAMPLE=SAMPLE, IN_KEYS=False, FINAL=False, **meta)
    _topk_select_kernel[(R,)](cand, nsplit * CAND, qo, scratch, out_view, out.stride(1), out.stride(0), Tc, t0, L,
                              nsplit * CAND, 1, nsplit, SAMPLE=0, IN_KEYS=True, FINAL=True, **meta)


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
    qo, max_off = _q_offsets(q_offset, B, T, S, dev)
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

    interp = _INTERPRET
    HP = _next_pow2(H)
    BK = CONFIG["score_bk"]
    BQ = max(1, min(CONFIG["score_bq"], _next_pow2(T)))
    BQ = max(BQ, -(-16 // HP))  # the dot needs >= 16 rows
    warps = CONFIG["score_warps"] if BQ * HP >= 128 else 4
    precision = "ieee" if (q.dtype == torch.float32 or interp) else "tf32"
    max_end = max_off + T  # exclusive end of the last query's keys
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
        L = min(S, max_off + t1)
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
        _select_topk(keys, qo, out, topk, t0)
    return out
