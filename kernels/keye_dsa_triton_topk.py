"""DSA lightning-indexer top-k in Triton: fused scoring + exact deterministic selection (``dsa_topk_indices``).

Public entry: ``keye_dsa_triton.dsa_topk_indices`` (re-exported from here). Semantics = the reference
(``keye_dsa_reference.dsa_topk_indices``; contract ``README.md`` beside this file).

Memory is linear in the context (per chunk of queries a bounded buffer, never ``[S, S]``). Every score is
packed with its position into a unique int64 key ``(score_key << 32) | (2**32 - 1 - position)`` (score_key:
the fp32 score mapped to an order-preserving int32, NaN -> -inf, -0.0 -> +0.0): larger is better and equal
scores rank the lower position first, so the top-k is exact and deterministic (bitwise reproducible). A key
that is not allowed (causal, ``key_mask``, ``segment_ids``) is a sentinel below every score (an allowed -inf
still ranks above it). Finding the k-th key never sorts: ``_kth_key`` bisects (32 steps on the score half,
32 more on the position half only when equal scores straddle the k-th place), and positions are written in
ascending order by stream compaction (cumsum), ``-1`` after them.

Fused path (prefill, the default when a chunk has >= 2 x SMs rows):
1. ``_sample_thr_kernel``: per query, score ``select_sample`` (1024) keys spread evenly over its allowed range
   and take their ``r``-th best key, ``r ~ mu + 4 sqrt(mu)`` with ``mu = k * sample / n``: for a row in
   random order at least k keys of the row exceed it with overwhelming probability, and only ~1.5-2.5 k do.
2. ``_indexer_score_kernel`` (``CAND_OUT``): one program per (query tile, batch, key split); for each key
   block ``[BK, D_I]`` the scores of the tile (``MODE`` 2: one ``[BQ, D_I] x [D_I, BK]`` dot per indexer head,
   ReLU (NaN-propagating, as torch), times ``w * D_I**-0.5``, summed in fp32) are compared with the row's
   threshold and the keys above it appended to the row's candidate list (position order); no score buffer.
3. ``_cand_select_kernel``: per row, the exact k-th key among the candidates, then the positions.
   A row whose list overflowed (``cand_cap_mult`` x k) or where fewer than k keys passed the sampled
   threshold is flagged and recomputed on the buffered path, batched per sequence (one host sync per chunk, a few
   more per sequence that has such rows; ``STATS`` counts).
Buffered path (decode / few rows, fallback rows, ``fused_candidates=False``):
1. ``_indexer_score_kernel`` writes every score key into an int32 buffer ``[B, chunk, L]``
   (``score_buffer_bytes`` bounds it).
2. ``_topk_select_kernel``: per row (few long rows: per row segment, then a pass over the segments'
   candidates), the row is streamed against a threshold (first from a strided sample, then the running
   k-th key); keys above it go to a scratch list that is shrunk to its k best when full; if the sampled
   threshold let fewer than k keys pass, the row is streamed again without it. Then the positions.
"""
from __future__ import annotations

import torch

from .keye_dsa_reference import _as_int
from .keye_dsa_triton_common import (  # noqa: F401  (re-exported: older code imports them from here)
    _I32_MIN, _INTERPRET, _SENT, CONFIG, HAS_TRITON, STATS, _check_triton, _dot_nt, _mask_tensors, _next_pow2, _num_sms,
    _q_offsets, tl, triton)


if HAS_TRITON:
    # ------------------------------------------------------------------------------------------------
    # indexer scores -> order-preserving int32 keys
    # ------------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["T", "S", "t0", "t1", "L", "blocks_per_split"])
    def _indexer_score_kernel(
        q_ptr, w_ptr, k_ptr, km_ptr, seg_ptr, qoff_ptr, out_ptr, thr_ptr, cand_ptr, cnt_ptr,
        T, S, t0, t1, L, blocks_per_split,
        sqb, sqt, sqh, swb, swt, swh, skb, sks, sob, sor,
        scale,
        H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
        HAS_KM: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        MODE: tl.constexpr, CAND_OUT: tl.constexpr, CAPS: tl.constexpr,
    ):
        # q: [B, T, H, D], w: [B, T, H], k: [B, S, D], km: [B, S] int8, seg: [B, S] int64,
        # out: [B, t1 - t0, L] int32 (row r = query t0 + r), or, CAND_OUT, per row r and key split j the packed
        # keys above thr[r] in position order: cand [R, NSPLIT, CAPS] int64 and their number cnt [R, NSPLIT]
        # (may exceed CAPS: overflow, detected by the caller).
        # MODE 0: one dot [BQ*HP, D] x [D, BK], head sum over a reshape; MODE 1: the transposed dot
        # [BK, D] x [D, BQ*HP] (heads on the minor axis); MODE 2: one [BQ, D] x [D, BK] dot per head (BQ >= 16),
        # the tile's queries held in registers across the key loop.
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
        if MODE < 2:
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
        if CAND_OUT:
            nsp = tl.num_programs(2)
            crow = (b * (t1 - t0) + (tq - t0)).to(tl.int64)  # row index in the chunk, [BQ]
            thr = tl.load(thr_ptr + crow, mask=rmask, other=_SENT)
            thr_hi = (thr >> 32).to(tl.int32)  # key64 > thr as (int32 score key, then the low word on equal scores)
            thr_lo = thr & 4294967295
            cand_rows = cand_ptr + (crow * nsp + pid_s) * CAPS
            cnt = tl.zeros([BQ], tl.int32)
        if MODE == 2:  # the tile's per-head queries and weights, loaded once (tuples indexed by the unrolled head)
            qs = ()
            ws = ()
            for h in tl.static_range(H):
                qh = tl.load(q_ptr + b * sqb + tq.to(tl.int64)[:, None] * sqt + h * sqh + d[None, :],
                             mask=rmask[:, None], other=0.0)
                if UPCAST:
                    qh = qh.to(tl.float32)
                qs = qs + (qh,)
                wh = tl.load(w_ptr + b * swb + tq.to(tl.int64) * swt + h * swh, mask=rmask, other=0.0)
                ws = ws + (wh.to(tl.float32) * scale,)
        for kb in range(kb_lo, kb_hi):
            s = kb * BK + tl.arange(0, BK)
            smask = s < kend
            kv = tl.load(k_ptr + b * skb + s.to(tl.int64)[:, None] * sks + d[None, :], mask=smask[:, None], other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
            if MODE == 0:
                qk = _dot_nt(qv, kv, PRECISION)  # [M, BK] fp32
                qk = tl.maximum(qk, 0.0, propagate_nan=tl.PropagateNan.ALL) * wv[:, None]  # relu(NaN) = NaN (torch)
                sc = tl.sum(tl.reshape(qk, (BQ, HP, BK)), axis=1)  # [BQ, BK]
            elif MODE == 1:
                kq = _dot_nt(kv, qv, PRECISION)  # [BK, M] fp32
                kq = tl.maximum(kq, 0.0, propagate_nan=tl.PropagateNan.ALL) * wv[None, :]
                sc = tl.trans(tl.sum(tl.reshape(kq, (BK, BQ, HP)), axis=2))  # [BQ, BK]
            else:
                sc = tl.zeros([BQ, BK], tl.float32)
                for h in tl.static_range(H):
                    qk = _dot_nt(qs[h], kv, PRECISION)
                    sc += tl.maximum(qk, 0.0, propagate_nan=tl.PropagateNan.ALL) * ws[h][:, None]
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
            if CAND_OUT:
                low = (4294967295 - s.to(tl.int64))[None, :]
                surv = allowed & rmask[:, None] & ((key > thr_hi[:, None]) |
                                                   ((key == thr_hi[:, None]) & (low > thr_lo[:, None])))
                key64 = key.to(tl.int64) * 4294967296 + low
                cs = tl.cumsum(surv.to(tl.int32), axis=1)
                slot = cnt[:, None] + cs - 1
                tl.store(cand_rows[:, None] + slot, key64, mask=surv & (slot < CAPS))
                cnt += tl.sum(surv.to(tl.int32), axis=1)
            else:
                tl.store(out_rows[:, None] + s[None, :], key, mask=rmask[:, None] & smask[None, :])
        if CAND_OUT:
            tl.store(cnt_ptr + crow * nsp + pid_s, cnt, mask=rmask)

    # ------------------------------------------------------------------------------------------------
    # exact top-k of a row of keys (no sort: bisection for the k-th key, stream compaction for the rest)
    # ------------------------------------------------------------------------------------------------
    @triton.jit
    def _kth_key(X, k):
        """The k-th largest of the packed int64 keys X (1-D; SENT = empty), or SENT if fewer than k are valid.

        Two 32-step bisections: the score half (largest v with #(X >> 32 >= v) >= k), then, when equal scores
        straddle the k-th place, the position half among them (larger = lower position)."""
        hi32 = X >> 32
        blo = tl.sum(tl.zeros([16], tl.int64), axis=0) - 2147483648
        bhi = blo + 4294967295
        for _ in range(32):
            mid = (blo + bhi + 1) >> 1
            ok = tl.sum((hi32 >= mid).to(tl.int32), axis=0) >= k
            blo = tl.where(ok, mid, blo)
            bhi = tl.where(ok, bhi, mid - 1)
        kth = blo * 0 + _SENT
        if blo > -2147483648:
            eq = hi32 == blo
            need = k - tl.sum((hi32 > blo).to(tl.int32), axis=0)
            low = X & 4294967295
            ulo = tl.min(tl.where(eq, low, 4294967296), axis=0)
            if tl.sum(eq.to(tl.int32), axis=0) > need:
                uhi = ulo * 0 + 4294967295
                for _ in range(32):
                    mid = (ulo + uhi + 1) >> 1
                    ok = tl.sum((eq & (low >= mid)).to(tl.int32), axis=0) >= need
                    ulo = tl.where(ok, mid, ulo)
                    uhi = tl.where(ok, uhi, mid - 1)
            kth = blo * 4294967296 + ulo
        return kth

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
        src_ptr, src_stride, qoff_ptr, scratch_ptr, out_ptr, kth_ptr,
        out_row_stride, out_b_stride, rows_per_b, t0, L, seg_len, NSPLIT, NPREV,
        TOPK: tl.constexpr, CAND: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, SAMPLE: tl.constexpr,
        IN_KEYS: tl.constexpr, FINAL: tl.constexpr,
    ):
        # src: int32 score keys [R, src_stride] (position = column) or, IN_KEYS, packed int64 keys
        #      [R, NPREV * CAND]: NPREV segments' candidates, each list in position order, SENT-padded.
        # Row r = (b, i): b = r // rows_per_b, query t0 + i; its length is min(qoff[b] + t0 + i + 1, L)
        # (IN_KEYS: NPREV * CAND). Programs: R * NSPLIT; segment sp of a row covers [sp*seg_len, +seg_len).
        # FINAL: out int64 positions [*, TOPK] at out + b * out_b_stride + i * out_row_stride, ascending, -1 pad;
        # else:  out int64 [R * NSPLIT, CAND]: the segment's best min(TOPK, n) keys in position order, SENT pad,
        #        and kth [R * NSPLIT]: the segment's TOPK-th key (SENT if fewer).
        # scratch: int64 [R * NSPLIT, CAP], the pending keys of the running set.
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
        scratch_row = scratch_ptr + pid.to(tl.int64) * CAP
        c = tl.arange(0, CAP)
        offs = tl.arange(0, BLOCK)
        zero64 = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)

        # ---- first threshold: keys <= thr_init are dropped
        thr_init = zero64 + _SENT
        if IN_KEYS:
            if NPREV > 1:
                jj = tl.arange(0, 64)
                kth_seg = tl.load(kth_ptr + row.to(tl.int64) * NPREV + jj, mask=jj < NPREV, other=_SENT)
                best = tl.max(kth_seg, axis=0)  # a segment with >= TOPK keys bounds the k-th best from below
                thr_init = tl.where(best == _SENT, thr_init, best - 1)
        elif SAMPLE > 0:
            n_seg = hi - lo
            if n_seg > 4 * SAMPLE:
                # estimate from a strided sample: its rk-th best, rk ~ mu + 4 sqrt(mu) with mu = TOPK * SAMPLE / n
                si = tl.arange(0, SAMPLE)
                xs = _load_keys(src_row, lo + (si.to(tl.int64) * n_seg) // SAMPLE, si < SAMPLE, False)
                mu = TOPK * SAMPLE / n_seg.to(tl.float32)
                rk = (mu + 4.0 * tl.sqrt(mu) + 2.0).to(tl.int32)
                if rk < SAMPLE:
                    ks = _kth_key(xs, rk)
                    thr_init = tl.where(ks == _SENT, thr_init, ks - 1)

        # ---- stream; again without threshold if the sampled one let fewer than TOPK keys through
        kth = zero64 + _SENT  # TOPK-th best key of the row so far
        done = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
        for attempt in range(2):
            if done == 0:
                kth = zero64 + _SENT
                thr = thr_init
                count = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
                nb = tl.cdiv(hi - lo, BLOCK)
                for it in range(0, nb + 1):
                    if (count > CAP - BLOCK) | (it == nb):
                        # shrink the pending set to its TOPK best (exact), raise the threshold
                        tl.debug_barrier()
                        X = tl.load(scratch_row + c, mask=c < count, other=_SENT)
                        tl.debug_barrier()
                        kth = _kth_key(X, TOPK)
                        thr = tl.maximum(kth, thr_init)
                        keep = (X >= kth) & (X != _SENT)
                        ks = tl.cumsum(keep.to(tl.int32), axis=0)
                        tl.store(scratch_row + ks - 1, X, mask=keep)
                        count = tl.sum(keep.to(tl.int32), axis=0)
                    idx = lo + it * BLOCK + offs
                    key = _load_keys(src_row, idx, idx < hi, IN_KEYS)
                    surv = key > thr
                    csum = tl.cumsum(surv.to(tl.int32), axis=0)
                    tl.store(scratch_row + count + csum - 1, key, mask=surv & (count + csum <= CAP))  # always true
                    count += tl.sum(surv.to(tl.int32), axis=0)
                ok = (thr_init == _SENT) | (kth != _SENT)  # the first threshold let >= TOPK keys through
                done = ok.to(tl.int32)
                thr_init = zero64 + _SENT

        # ---- output: the keys >= kth (exactly TOPK of them, or all valid ones) in position order
        if FINAL:
            out_row = out_ptr + bi * out_b_stride + ri.to(tl.int64) * out_row_stride
        else:
            out_row = out_ptr + pid.to(tl.int64) * CAND
            tl.store(kth_ptr + pid, kth)
        cnt = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
        for start in range(lo, hi, BLOCK):
            idx = start + offs
            key = _load_keys(src_row, idx, idx < hi, IN_KEYS)
            sel = (key >= kth) & (key != _SENT)
            csum = tl.cumsum(sel.to(tl.int32), axis=0)
            if FINAL:
                if IN_KEYS:
                    val = 4294967295 - (key & 4294967295)
                else:
                    val = idx.to(tl.int64)
            else:
                val = key
            tl.store(out_row + cnt + csum - 1, val, mask=sel & (cnt + csum <= TOPK))
            cnt += tl.sum(sel.to(tl.int32), axis=0)
        if FINAL:
            NOUT: tl.constexpr = TOPK
            pad = -1
        else:
            NOUT: tl.constexpr = CAND
            pad = _SENT
        for start in range(0, NOUT, BLOCK):
            idx = start + offs
            tl.store(out_row + idx, tl.full([BLOCK], pad, tl.int64), mask=(idx >= cnt) & (idx < NOUT))


if HAS_TRITON:

    @triton.jit(do_not_specialize=["T", "S", "t0", "t1", "L"])
    def _sample_thr_kernel(
        q_ptr, w_ptr, k_ptr, km_ptr, seg_ptr, qoff_ptr, smp_ptr, thr_ptr,
        T, S, t0, t1, L,
        sqb, sqt, sqh, swb, swt, swh, skb, sks,
        scale,
        H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, SAMPLE: tl.constexpr, SB: tl.constexpr,
        TOPK: tl.constexpr, HAS_KM: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program per row r = (b, t0 + i) of the chunk: score the query against SAMPLE keys spread evenly
        # over its allowed range, take their rk-th best key (rk ~ mu + 4 sqrt(mu), mu = TOPK * SAMPLE / n) and
        # store thr[r] = that key - 1 (SENT: no threshold, for short rows). smp: int64 scratch [R, SAMPLE].
        pid = tl.program_id(0)
        Tc = t1 - t0
        b = (pid // Tc).to(tl.int64)
        t = (t0 + pid % Tc).to(tl.int64)
        pos = tl.load(qoff_ptr + b) + t
        n = tl.minimum(pos + 1, L)
        thr = n * 0 + _SENT
        if n > 4 * SAMPLE:
            mu = TOPK * SAMPLE / n.to(tl.float32)
            rk = (mu + 4.0 * tl.sqrt(mu) + 2.0).to(tl.int32)
            if rk < SAMPLE:
                h = tl.arange(0, HP)
                d = tl.arange(0, D)
                qv = tl.load(q_ptr + b * sqb + t * sqt + h[:, None] * sqh + d[None, :], mask=(h < H)[:, None],
                             other=0.0)
                wv = tl.load(w_ptr + b * swb + t * swt + h * swh, mask=h < H, other=0.0).to(tl.float32) * scale
                if UPCAST:
                    qv = qv.to(tl.float32)
                if HAS_SEG:
                    qseg = tl.load(seg_ptr + b * S + pos)
                smp_row = smp_ptr + pid.to(tl.int64) * SAMPLE
                for c0 in range(0, SAMPLE, SB):
                    si = c0 + tl.arange(0, SB)
                    sp = (si.to(tl.int64) * n) // SAMPLE
                    kv = tl.load(k_ptr + b * skb + sp[:, None] * sks + d[None, :])
                    if UPCAST:
                        kv = kv.to(tl.float32)
                    qk = _dot_nt(qv, kv, PRECISION)  # [HP, SB]
                    sc = tl.sum(tl.maximum(qk, 0.0, propagate_nan=tl.PropagateNan.ALL) * wv[:, None], axis=0)
                    allowed = sp <= pos
                    if HAS_KM:
                        allowed = allowed & (tl.load(km_ptr + b * S + sp) != 0)
                    if HAS_SEG:
                        allowed = allowed & (tl.load(seg_ptr + b * S + sp) == qseg)
                    sc = tl.where(sc != sc, float("-inf"), sc)
                    sc = tl.where(sc == 0.0, 0.0, sc)
                    bits = sc.to(tl.int32, bitcast=True)
                    k32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
                    key = k32.to(tl.int64) * 4294967296 + (4294967295 - sp)
                    tl.store(smp_row + si, tl.where(allowed, key, _SENT))
                tl.debug_barrier()
                xs = tl.load(smp_row + tl.arange(0, SAMPLE))
                ks = _kth_key(xs, rk)
                thr = tl.where(ks == _SENT, thr, ks - 1)
        tl.store(thr_ptr + pid, thr)

    @triton.jit(do_not_specialize=["out_row_stride", "out_b_stride", "rows_per_b", "NSPLIT"])
    def _cand_select_kernel(
        cand_ptr, cnt_ptr, thr_ptr, scratch_ptr, out_ptr, fail_ptr,
        out_row_stride, out_b_stride, rows_per_b, NSPLIT,
        TOPK: tl.constexpr, CAPS: tl.constexpr, CAPC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per row: gather the NSPLIT candidate lists (each in position order) into scratch [R, CAPC],
        # find the exact TOPK-th key, write the selected positions ascending (-1 pad). fail[r] = 1 when the row
        # must be recomputed exactly: a list overflowed, or the sampled threshold let fewer than TOPK keys pass.
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        c = tl.arange(0, CAPC)
        scratch_row = scratch_ptr + row.to(tl.int64) * CAPC
        total = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
        over = total
        for j in range(NSPLIT):
            cj = tl.load(cnt_ptr + row.to(tl.int64) * NSPLIT + j)
            over += (cj > CAPS).to(tl.int32)
            cj = tl.minimum(cj, CAPS)
            src = cand_ptr + (row.to(tl.int64) * NSPLIT + j) * CAPS
            for start in range(0, cj, BLOCK):
                idx = start + offs
                m = (idx < cj) & (total + idx < CAPC)
                tl.store(scratch_row + total + idx, tl.load(src + idx, mask=m), mask=m)
            total += cj
        over += (total > CAPC).to(tl.int32)
        tl.debug_barrier()
        thr = tl.load(thr_ptr + row)
        out_row = (out_ptr + (row // rows_per_b).to(tl.int64) * out_b_stride
                   + (row % rows_per_b).to(tl.int64) * out_row_stride)
        if total <= CAPC // 2:  # rows up to ~64K keys (~1.8 x TOPK candidates): half the work per bisection step
            c2 = tl.arange(0, CAPC // 2)
            Xh = tl.load(scratch_row + c2, mask=c2 < total, other=_SENT)
            fail = _cand_finish(Xh, over, thr, out_row, TOPK, BLOCK)
        else:
            X = tl.load(scratch_row + c, mask=c < total, other=_SENT)
            fail = _cand_finish(X, over, thr, out_row, TOPK, BLOCK)
        tl.store(fail_ptr + row, fail.to(tl.int8))

    @triton.jit
    def _cand_finish(X, over, thr, out_row, TOPK: tl.constexpr, BLOCK: tl.constexpr):
        """Exact TOPK-th key of the candidates X, the selected positions ascending at out_row (-1 pad); returns
        the fail flag (list overflowed, or the sampled threshold let fewer than TOPK keys pass)."""
        offs = tl.arange(0, BLOCK)
        kth = _kth_key(X, TOPK)
        fail = (over > 0) | ((thr != _SENT) & (kth == _SENT))
        sel = (X >= kth) & (X != _SENT) & (fail == 0)
        cs = tl.cumsum(sel.to(tl.int32), axis=0)
        tl.store(out_row + cs - 1, 4294967295 - (X & 4294967295), mask=sel & (cs <= TOPK))
        ns = tl.sum(sel.to(tl.int32), axis=0)
        for start in range(0, TOPK, BLOCK):
            idx = start + offs
            tl.store(out_row + idx, tl.full([BLOCK], -1, tl.int64), mask=(idx >= ns) & (idx < TOPK))
        return fail


def _select_topk(keys, qo, out, topk: int, t0: int) -> None:
    """Exact deterministic top-k of the rows of ``keys`` (int32 [B, Tc, L]); writes out[:, t0:t0+Tc] (int64)."""
    B, Tc, L = keys.shape
    R = B * Tc
    dev = keys.device
    CAND = _next_pow2(topk)
    BLOCK, SAMPLE = 16, (16 if CONFIG["select_sample"] else 0)  # the interpreter's (small vectors: fast there)
    nsm = _num_sms(dev)
    few = R < 2 * nsm
    warps = CONFIG["select_warps_few_rows" if few else "select_warps"]
    if not _INTERPRET:
        BLOCK = min(CONFIG["select_block_few_rows" if few else "select_block"], max(16, _next_pow2(L)))
        SAMPLE = CONFIG["select_sample"]
    CAP = max(CAND * CONFIG["select_cap_mult"], 2 * BLOCK)
    meta = dict(TOPK=topk, CAND=CAND, CAP=CAP, BLOCK=BLOCK, num_warps=warps, num_stages=1)
    nsplit = 1
    if R < 2 * nsm and L > 8 * CAND:
        nsplit = max(1, min(-(-2 * nsm // R), L // (4 * CAND), 64))
    seg_len = -(-(-(-L // nsplit)) // BLOCK) * BLOCK
    nsplit = -(-L // seg_len)
    scratch = torch.empty((R * nsplit, CAP), dtype=torch.int64, device=dev)
    out_view = out[:, t0:t0 + Tc]
    if nsplit == 1:
        _topk_select_kernel[(R,)](keys, L, qo, scratch, out_view, scratch, out.stride(1), out.stride(0), Tc, t0, L, L,
                                  1, 1, SAMPLE=SAMPLE, IN_KEYS=False, FINAL=True, **meta)
        return
    cand = torch.empty((R * nsplit, CAND), dtype=torch.int64, device=dev)
    kth = torch.empty((R * nsplit,), dtype=torch.int64, device=dev)
    _topk_select_kernel[(R * nsplit,)](keys, L, qo, scratch, cand, kth, 0, 0, Tc, t0, L, seg_len, nsplit, 1,
                                       SAMPLE=SAMPLE, IN_KEYS=False, FINAL=False, **meta)
    _topk_select_kernel[(R,)](cand, nsplit * CAND, qo, scratch, out_view, kth, out.stride(1), out.stride(0), Tc, t0, L,
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
        chunk_size: queries per pass; default: as many as fit ``CONFIG["score_buffer_bytes"]`` (2 GiB) of
            working memory (buffered path: an int32 ``[B, chunk, L]`` score buffer; fused path: about 140 KiB
            of candidate lists per query at k = 2048). The result does not depend on it.

    Host syncs: none for an int/None ``q_offset`` on the buffered path (decode: fewer than 2 x SMs queries, CUDA
    graph capture works); a tensor ``q_offset`` costs one, and the fused path (prefill) one per chunk (to
    recompute the rare rows whose sampled threshold misled, exactly), plus a few per sequence that has such rows.

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
    topk = _as_int("topk", topk, 1)
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
    km, seg = _mask_tensors(key_mask, segment_ids, B, S, dev)

    meta = _score_meta(H, D, T, q.dtype)
    nsm = _num_sms(dev)
    fused = (CONFIG["fused_candidates"] and B * T >= 2 * nsm and CONFIG["select_sample"] > 0
             and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()))
    if fused:
        CAND = _next_pow2(topk)
        CAPC = max(CAND * CONFIG["cand_cap_mult"], 64)
        per_row = 8 * (2 * CAPC + CONFIG["select_sample"]) + 16
    else:
        per_row = 4 * min(S, max_off + T)
    if chunk_size is None:
        chunk = max(meta["BQ"], CONFIG["score_buffer_bytes"] // max(1, B * per_row))
    else:
        chunk = max(1, int(chunk_size))
    chunk = min(chunk, T)
    if chunk < T:
        chunk = max(meta["BQ"], chunk // meta["BQ"] * meta["BQ"])
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        if fused:
            _topk_fused_chunk(q, w, k, km, seg, qo, max_off, out, topk, t0, t1, meta, CAPC)
        else:
            _topk_buffered_chunk(q, w, k, km, seg, qo, max_off, out, topk, t0, t1, meta)
    return out


def _score_meta(H, D, T, dtype):
    """Scoring-kernel launch parameters (tile, layout mode, warps, dot precision)."""
    HP = _next_pow2(H)
    mode = CONFIG["score_mode"] if T >= 16 else 0  # one dot per head needs >= 16 queries per tile
    BQ = max(1, min(CONFIG["score_bq"], _next_pow2(T)))
    BQ = max(BQ, 16 if mode == 2 else -(-16 // HP))  # the dots need >= 16 rows
    warps = CONFIG["score_warps"] if (BQ * HP >= 128 if mode < 2 else True) else 4
    precision = "ieee" if (dtype == torch.float32 or _INTERPRET) else "tf32"
    BK = CONFIG["score_bk"] if mode == 2 else CONFIG["score_bk_few_queries"]
    return dict(H=H, HP=HP, D=D, BQ=BQ, BK=BK, MODE=mode, warps=warps, PRECISION=precision)


def _score_split(B, Tc, L, meta, dev):
    """(number of key splits, key blocks per split): split the keys when there are too few query tiles."""
    ntile = -(-Tc // meta["BQ"])
    nkb = -(-L // meta["BK"])
    nsplit = 1
    if ntile * B < 4 * _num_sms(dev):
        nsplit = max(1, min(nkb, -(-4 * _num_sms(dev) // (ntile * B))))
    bps = -(-nkb // nsplit)
    return -(-nkb // bps), bps


def _launch_score(q, w, k, km, seg, qo, t0, t1, L, meta, out, thr=None, cand=None, cnt=None, caps=16):
    """Run _indexer_score_kernel on queries [t0, t1): into the int32 key buffer ``out`` [B, t1-t0, L], or, with
    ``cand``, into per-row candidate lists above ``thr``. Returns the number of key splits used."""
    B, T = q.shape[0], q.shape[1]
    S = k.shape[1]
    Tc = t1 - t0
    ntile = -(-Tc // meta["BQ"])
    nsplit, bps = _score_split(B, Tc, L, meta, q.device)
    dummy = out if out is not None else cand
    _indexer_score_kernel[(ntile, B, nsplit)](
        q, w, k, km if km is not None else dummy, seg if seg is not None else qo, qo, dummy,
        thr if thr is not None else dummy, cand if cand is not None else dummy, cnt if cnt is not None else dummy,
        T, S, t0, t1, L, bps,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), w.stride(2),
        k.stride(0), k.stride(1), Tc * L, L,
        meta["D"] ** -0.5,
        H=meta["H"], HP=meta["HP"], D=meta["D"], BQ=meta["BQ"], BK=meta["BK"], HAS_KM=km is not None,
        HAS_SEG=seg is not None, UPCAST=_INTERPRET, PRECISION=meta["PRECISION"], MODE=meta["MODE"],
        CAND_OUT=cand is not None, CAPS=caps, num_warps=meta["warps"], num_stages=CONFIG["score_stages"])
    return nsplit


def _topk_buffered_chunk(q, w, k, km, seg, qo, max_off, out, topk, t0, t1, meta):
    """Queries [t0, t1): all scores into an int32 buffer [B, t1-t0, L], then the streaming selection."""
    B = q.shape[0]
    L = min(k.shape[1], max_off + t1)
    keys = torch.empty((B, t1 - t0, L), dtype=torch.int32, device=q.device)
    _launch_score(q, w, k, km, seg, qo, t0, t1, L, meta, keys)
    _select_topk(keys, qo, out, topk, t0)


def _topk_fused_chunk(q, w, k, km, seg, qo, max_off, out, topk, t0, t1, meta, CAPC):
    """Queries [t0, t1): a sampled threshold per row, scoring that keeps only the keys above it (in position
    order, no score buffer), exact selection among them; rows where the sample misled are redone exactly."""
    B = q.shape[0]
    S = k.shape[1]
    dev = q.device
    Tc = t1 - t0
    R = B * Tc
    L = min(S, max_off + t1)
    SAMPLE = 16 if _INTERPRET else CONFIG["select_sample"]
    thr = torch.empty((R,), dtype=torch.int64, device=dev)
    smp = torch.empty((R, SAMPLE), dtype=torch.int64, device=dev)
    _sample_thr_kernel[(R,)](
        q, w, k, km if km is not None else thr, seg if seg is not None else qo, qo, smp, thr,
        q.shape[1], S, t0, t1, L,
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), w.stride(2), k.stride(0), k.stride(1),
        meta["D"] ** -0.5,
        H=meta["H"], HP=meta["HP"], D=meta["D"], SAMPLE=SAMPLE, SB=min(SAMPLE, 128), TOPK=topk,
        HAS_KM=km is not None, HAS_SEG=seg is not None, UPCAST=_INTERPRET, PRECISION=meta["PRECISION"],
        num_warps=4, num_stages=2)
    del smp
    nsplit, _ = _score_split(B, Tc, L, meta, dev)
    caps = CAPC if nsplit == 1 else max(64, _next_pow2(-(-CAPC // nsplit)) * 2)
    cand = torch.empty((R, nsplit, caps), dtype=torch.int64, device=dev)
    cnt = torch.empty((R, nsplit), dtype=torch.int32, device=dev)
    _launch_score(q, w, k, km, seg, qo, t0, t1, L, meta, None, thr=thr, cand=cand, cnt=cnt, caps=caps)
    scratch = torch.empty((R, CAPC), dtype=torch.int64, device=dev)
    fail = torch.empty((R,), dtype=torch.int8, device=dev)
    _cand_select_kernel[(R,)](
        cand, cnt, thr, scratch, out[:, t0:t1], fail, out.stride(1), out.stride(0), Tc, nsplit,
        TOPK=topk, CAPS=caps, CAPC=CAPC, BLOCK=16 if _INTERPRET else 1024,
        num_warps=4 if _INTERPRET else CONFIG["cand_select_warps"], num_stages=1)
    del cand, scratch
    bad = fail.nonzero().flatten()
    nbad = int(bad.numel())  # one host sync per chunk (a few more per sequence with fallback rows)
    STATS["fused_rows"] += R
    STATS["fallback_rows"] += nbad
    if nbad:
        _topk_rows_exact(q, w, k, km, seg, qo, out, topk, bad // Tc, bad % Tc + t0, meta)


def _topk_rows_exact(q, w, k, km, seg, qo, out, topk, rb, rt, meta):
    """Recompute the rows (rb[i], rt[i]) (LongTensors [n]) on the exact buffered path, batched: the rows of one
    batch element become a batch of single-query rows over the same keys (k broadcast with stride 0)."""
    S = k.shape[1]
    m1 = _score_meta(meta["H"], meta["D"], 1, q.dtype)
    for b in rb.unique().tolist():
        ts = rt[rb == b]
        pos = qo[b] + ts  # [n] positions of the queries
        L = min(S, int(pos.max()) + 1)
        per_row = 4 * L + S * ((1 if km is not None else 0) + (8 if seg is not None else 0))  # keys + mask copies
        step = max(1, CONFIG["score_buffer_bytes"] // per_row)
        for i in range(0, ts.numel(), step):
            tt, pp = ts[i:i + step], pos[i:i + step]
            n = tt.numel()
            o = torch.empty((n, 1, topk), dtype=torch.int64, device=q.device)
            _topk_buffered_chunk(q[b, tt][:, None], w[b, tt][:, None], k[b:b + 1].expand(n, S, k.shape[2]),
                                 None if km is None else km[b:b + 1].expand(n, S).contiguous(),
                                 None if seg is None else seg[b:b + 1].expand(n, S).contiguous(),
                                 pp.contiguous(), L - 1, o, topk, 0, 1, m1)
            out[b, tt] = o[:, 0]
