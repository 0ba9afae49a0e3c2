"""DSA lightning-indexer KL loss in Triton (both training stages); public entry ``keye_dsa_triton.indexer_kl_loss``.

Semantics = ``keye_dsa_reference.indexer_kl_loss`` (contract: ``README.md`` beside this file). For query t
let ``U_t`` be its key set: all allowed keys (dense warm-up, ``indices=None``) or the listed keys that are
allowed (sparse stage). With ``lse_h`` the log-sum-exp of head h's main-attention logits over ``U_t``,
``p_s = (1/Hq) sum_h exp(scaling * attn_q[t,h] . attn_k[s,h//G] - lse_h)`` (the head-summed, L1-normalised
main attention) and ``LSE_I`` the log-sum-exp of the indexer scores ``I_s`` over ``U_t``:

    KL_t = sum_{s in U_t} p_s log p_s  -  sum_{s in U_t} p_s I_s  +  LSE_I         (0 log 0 = 0)
    dKL_t / dI_s = softmax(I)_s - p_s

Kernels (all blockwise over keys, memory linear in the context, no [T, S] buffer):
  1. ``_kl_main_lse_kernel``: one program per (token, KV head): ``lse_h`` over ``U_t`` for the G heads.
  2. ``_kl_token_kernel``: one program per token: pass A = ``LSE_I`` and ``|U_t|``; pass B = ``p`` (all Hq
     heads, KV groups unrolled), ``I``, the KL terms and, when the indexer needs gradients, the unit
     gradient ``g_s = softmax(I)_s - p_s`` pushed into dq, dw (registers) and dk (fp32 atomics). The
     autograd backward only rescales these by the incoming gradient (no second pass).
Cost: dense warm-up recomputes the main QK^T twice (lse, then p): use it at training lengths (<= 32K).
"""
from __future__ import annotations

import torch

from .keye_dsa_triton_common import (HAS_TRITON, _INTERPRET, _check_triton, _mask_tensors, _next_pow2,  # noqa: F401
                                     _q_offsets, tl, triton)


if HAS_TRITON:

    @triton.jit
    def _kl_keys(idx_row, j0, K, S, pos, km_row, seg_row, qseg,
                 BK: tl.constexpr, SPARSE: tl.constexpr, HAS_KM: tl.constexpr, HAS_SEG: tl.constexpr):
        """Keys of block j0: (positions clamped to >= 0 [BK] int64, valid [BK] bool) of the set U_t."""
        j = j0 + tl.arange(0, BK)
        if SPARSE:
            ix = tl.load(idx_row + j, mask=j < K, other=-1)
        else:
            ix = j.to(tl.int64)
        valid = (ix >= 0) & (ix < S) & (ix <= pos)
        ixs = tl.where(valid, ix, 0)
        if HAS_KM:
            valid = valid & (tl.load(km_row + ixs, mask=valid, other=0) != 0)
        if HAS_SEG:
            valid = valid & (tl.load(seg_row + ixs, mask=valid, other=-2) == qseg)
        return ixs, valid  # ixs: clamped to 0 where not in range (loads are masked by valid anyway)

    @triton.jit(do_not_specialize=["T", "S", "K"])
    def _kl_main_lse_kernel(
        aq_ptr, ak_ptr, idx_ptr, km_ptr, seg_ptr, qoff_ptr, lse_ptr,
        T, S, K, HKV, scale_log2,
        saqb, saqt, saqh, sakb, saks, sakh, sib, sit, slb, slt,
        G: tl.constexpr, GP: tl.constexpr, DA: tl.constexpr, DAP: tl.constexpr, BK: tl.constexpr,
        SPARSE: tl.constexpr, HAS_KM: tl.constexpr, HAS_SEG: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # aq: [B, T, Hq, DA], ak: [B, S, Hkv, DA], idx: [B, T, K], km: [B, S] int8, seg: [B, S] int64,
        # lse: [B, T, Hq] fp32 (natural log; -inf for an empty U_t)
        pid = tl.program_id(0)
        g = pid % HKV
        bt = pid // HKV
        t = (bt % T).to(tl.int64)
        b = (bt // T).to(tl.int64)
        pos = tl.load(qoff_ptr + b) + t
        qseg = 0
        if HAS_SEG:
            qseg = tl.load(seg_ptr + b * S + pos)
        rows = tl.arange(0, GP)
        rmask = rows < G
        hq = g * G + rows
        d = tl.arange(0, DAP)
        qv = tl.load(aq_ptr + b * saqb + t * saqt + hq[:, None] * saqh + d[None, :],
                     mask=rmask[:, None] & (d < DA)[None, :], other=0.0)
        if UPCAST:
            qv = qv.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        if SPARSE:
            n = K
        else:
            n = pos + 1
        for j0 in range(0, n, BK):
            ixs, valid = _kl_keys(idx_ptr + b * sib + t * sit, j0, K, S, pos, km_ptr + b * S, seg_ptr + b * S, qseg,
                                  BK, SPARSE, HAS_KM, HAS_SEG)
            kv = tl.load(ak_ptr + b * sakb + g * sakh + ixs[:, None] * saks + d[None, :],
                         mask=valid[:, None] & (d < DA)[None, :], other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
            s = tl.dot(qv, tl.trans(kv), input_precision=PRECISION) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            m_i = m_new
        has = l_i > 0
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b * slb + t * slt + hq, lse, mask=rmask)

    @triton.jit(do_not_specialize=["T", "S", "K"])
    def _kl_token_kernel(
        aq_ptr, ak_ptr, q_ptr, w_ptr, k_ptr, idx_ptr, km_ptr, seg_ptr, qoff_ptr, lse_ptr,
        kl_ptr, cnt_ptr, dq_ptr, dw_ptr, dk_ptr,
        T, S, K, scale_log2, ci, inv_hq,
        saqb, saqt, saqh, sakb, saks, sakh, sqb, sqt, sqh, swb, swt, swh, skb, sks, sib, sit, slb, slt,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DA: tl.constexpr, DAP: tl.constexpr,
        HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, BK: tl.constexpr,
        SPARSE: tl.constexpr, HAS_KM: tl.constexpr, HAS_SEG: tl.constexpr, GRAD: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # q: [B, T, HI, DI], w: [B, T, HI], k: [B, S, DI]; kl, cnt: [B * T] fp32 / int32;
        # dq: [B, T, HI, DI] fp32, dw: [B, T, HI] fp32 (contiguous), dk: [B, S, DI] fp32 (atomics).
        pid = tl.program_id(0)
        t = (pid % T).to(tl.int64)
        b = (pid // T).to(tl.int64)
        pos = tl.load(qoff_ptr + b) + t
        qseg = 0
        if HAS_SEG:
            qseg = tl.load(seg_ptr + b * S + pos)
        h = tl.arange(0, HIP)
        hmask = h < HI
        di = tl.arange(0, DI)
        qi = tl.load(q_ptr + b * sqb + t * sqt + h[:, None] * sqh + di[None, :], mask=hmask[:, None], other=0.0)
        wv = tl.load(w_ptr + b * swb + t * swt + h * swh, mask=hmask, other=0.0).to(tl.float32) * ci
        if UPCAST:
            qi = qi.to(tl.float32)
        idx_row = idx_ptr + b * sib + t * sit
        km_row = km_ptr + b * S
        seg_row = seg_ptr + b * S
        if SPARSE:
            n = K
        else:
            n = pos + 1
        # pass A: LSE of the indexer scores over U_t, and |U_t|
        m_i = tl.max(tl.full([BK], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BK], tl.float32), axis=0)
        cnt = tl.sum(tl.zeros([BK], tl.int32), axis=0)
        for j0 in range(0, n, BK):
            ixs, valid = _kl_keys(idx_row, j0, K, S, pos, km_row, seg_row, qseg, BK, SPARSE, HAS_KM, HAS_SEG)
            kv = tl.load(k_ptr + b * skb + ixs[:, None] * sks + di[None, :], mask=valid[:, None], other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
            qk = tl.dot(qi, tl.trans(kv), input_precision=PRECISION)
            sc = tl.sum(tl.maximum(qk, 0.0) * wv[:, None], axis=0)
            sc = tl.where(valid, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sc - m_safe), axis=0)
            m_i = m_new
            cnt += tl.sum(valid.to(tl.int32), axis=0)
        lse_i = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
        # pass B: p, I, KL terms, unit gradient
        rows = tl.arange(0, GP)
        rmask = rows < G
        da = tl.arange(0, DAP)
        damask = da < DA
        a_acc = tl.zeros([BK], tl.float32)
        b_acc = tl.zeros([BK], tl.float32)
        dq = tl.zeros([HIP, DI], tl.float32)
        dw = tl.zeros([HIP], tl.float32)
        for j0 in range(0, n, BK):
            ixs, valid = _kl_keys(idx_row, j0, K, S, pos, km_row, seg_row, qseg, BK, SPARSE, HAS_KM, HAS_SEG)
            p = tl.zeros([BK], tl.float32)
            for g in tl.static_range(HKV):
                hq = g * G + rows
                qg = tl.load(aq_ptr + b * saqb + t * saqt + hq[:, None] * saqh + da[None, :],
                             mask=rmask[:, None] & damask[None, :], other=0.0)
                kg = tl.load(ak_ptr + b * sakb + g * sakh + ixs[:, None] * saks + da[None, :],
                             mask=valid[:, None] & damask[None, :], other=0.0)
                if UPCAST:
                    qg = qg.to(tl.float32)
                    kg = kg.to(tl.float32)
                s = tl.dot(qg, tl.trans(kg), input_precision=PRECISION) * scale_log2
                lg = tl.load(lse_ptr + b * slb + t * slt + hq, mask=rmask, other=float("inf")) * 1.4426950408889634
                lg = tl.where(lg == float("-inf"), float("inf"), lg)
                p += tl.sum(tl.exp2(s - lg[:, None]), axis=0)
            p = tl.where(valid, p * inv_hq, 0.0)
            kv = tl.load(k_ptr + b * skb + ixs[:, None] * sks + di[None, :], mask=valid[:, None], other=0.0)
            if UPCAST:
                kv = kv.to(tl.float32)
            qk = tl.dot(qi, tl.trans(kv), input_precision=PRECISION)
            rl = tl.maximum(qk, 0.0)
            sc = tl.sum(rl * wv[:, None], axis=0)
            a_acc += tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
            b_acc += tl.where(valid, p * sc, 0.0)
            if GRAD:
                gs = tl.where(valid, tl.exp(sc - lse_i) - p, 0.0)
                gm = tl.where(qk > 0, gs[None, :] * wv[:, None], 0.0)  # dI/d(q.k) per head [HIP, BK]
                dw += tl.sum(rl * gs[None, :], axis=1)
                dq += tl.dot(gm.to(kv.dtype), kv, input_precision=PRECISION)
                dk = tl.dot(tl.trans(gm.to(qi.dtype)), qi, input_precision=PRECISION)
                tl.atomic_add(dk_ptr + b * S * DI + ixs[:, None] * DI + di[None, :], dk, mask=valid[:, None],
                              sem="relaxed")
        kl = tl.sum(a_acc, axis=0) - tl.sum(b_acc, axis=0) + lse_i
        kl = tl.where(cnt > 0, kl, 0.0)
        tl.store(kl_ptr + pid, kl)
        tl.store(cnt_ptr + pid, cnt)
        if GRAD:
            tl.store(dq_ptr + pid.to(tl.int64) * HI * DI + h[:, None] * DI + di[None, :], dq, mask=hmask[:, None])
            tl.store(dw_ptr + pid.to(tl.int64) * HI + h, dw * ci, mask=hmask)


def _kl_forward(attn_q, attn_k, scaling, q, w, k, indices, qo, km, seg, grad):
    """Per-token KL [B*T] fp32, per-token |U_t| [B*T] int32 and, if grad, unit gradients (fp32) of sum_t KL_t."""
    B, T, Hq, Da = attn_q.shape
    S, Hkv = attn_k.shape[1], attn_k.shape[2]
    HI, DI = q.shape[2], q.shape[3]
    G = Hq // Hkv
    dev = q.device
    interp = _INTERPRET
    sparse = indices is not None
    K = indices.shape[2] if sparse else 0
    idx = indices if sparse else qo  # placeholder pointer when dense
    kmp = km if km is not None else qo
    segp = seg if seg is not None else qo
    precision = "ieee" if (interp or q.dtype == torch.float32 or attn_q.dtype == torch.float32) else "tf32"
    common = dict(G=G, GP=max(16, _next_pow2(G)), DA=Da, DAP=max(16, _next_pow2(Da)), BK=64 if not interp else 32,
                  SPARSE=sparse, HAS_KM=km is not None, HAS_SEG=seg is not None, UPCAST=interp, PRECISION=precision)
    lse = torch.empty((B, T, Hq), dtype=torch.float32, device=dev)
    sib, sit = (indices.stride(0), indices.stride(1)) if sparse else (0, 0)
    _kl_main_lse_kernel[(B * T * Hkv,)](
        attn_q, attn_k, idx, kmp, segp, qo, lse, T, S, K, Hkv, scaling * 1.4426950408889634,
        attn_q.stride(0), attn_q.stride(1), attn_q.stride(2), attn_k.stride(0), attn_k.stride(1), attn_k.stride(2),
        sib, sit, lse.stride(0), lse.stride(1), num_warps=4, num_stages=2, **common)
    kl = torch.empty((B * T,), dtype=torch.float32, device=dev)
    cnt = torch.empty((B * T,), dtype=torch.int32, device=dev)
    if grad:
        dq = torch.empty((B, T, HI, DI), dtype=torch.float32, device=dev)
        dw = torch.empty((B, T, HI), dtype=torch.float32, device=dev)
        dk = torch.zeros((B, S, DI), dtype=torch.float32, device=dev)
    else:
        dq = dw = dk = kl
    _kl_token_kernel[(B * T,)](
        attn_q, attn_k, q, w, k, idx, kmp, segp, qo, lse, kl, cnt, dq, dw, dk,
        T, S, K, scaling * 1.4426950408889634, DI ** -0.5, 1.0 / Hq,
        attn_q.stride(0), attn_q.stride(1), attn_q.stride(2), attn_k.stride(0), attn_k.stride(1), attn_k.stride(2),
        q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), w.stride(2), k.stride(0), k.stride(1),
        sib, sit, lse.stride(0), lse.stride(1),
        HKV=Hkv, HI=HI, HIP=max(16, _next_pow2(HI)), DI=DI, GRAD=grad, num_warps=4, num_stages=2, **common)
    return kl, cnt, (dq, dw, dk) if grad else None


class _IndexerKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, w, k, attn_q, attn_k, scaling, indices, qo, km, seg, reduction):
        grad = any(ctx.needs_input_grad[:3])
        kl, cnt, grads = _kl_forward(attn_q, attn_k, scaling, q, w, k, indices, qo, km, seg, grad)
        has = cnt > 0
        total = (kl * has).sum()
        factor = 1.0
        if reduction == "mean":
            factor = 1.0 / max(int(has.sum()), 1)
            total = total * factor
        if grad:
            ctx.save_for_backward(*grads)
            ctx.factor = factor
            ctx.dtypes = (q.dtype, w.dtype, k.dtype)
        return total

    @staticmethod
    def backward(ctx, gout):
        dq, dw, dk = ctx.saved_tensors
        s = gout * ctx.factor
        return ((dq * s).to(ctx.dtypes[0]), (dw * s).to(ctx.dtypes[1]), (dk * s).to(ctx.dtypes[2]),
                None, None, None, None, None, None, None, None)


def indexer_kl_loss(attn_q, attn_k, scaling, q, w, k, *, indices=None, q_offset=None, key_mask=None,
                    segment_ids=None, chunk_size=None, reduction="mean"):
    """Lightning-indexer KL loss (dense warm-up when ``indices is None``, sparse stage otherwise), Triton.

    Same semantics as ``keye_dsa_reference.indexer_kl_loss``; see this module's docstring for the math.

    Args:
        attn_q: ``[B, T, Hq, Da]`` main-attention queries (roped), attn_k: ``[B, S, Hkv, Da]``; detached here.
        scaling: main-attention softmax scale.
        q: ``[B, T, H_I, D_I]``, w: ``[B, T, H_I]``, k: ``[B, S, D_I]``: indexer inputs (bf16/fp16/fp32).
        indices: optional int64 ``[B, T, K]`` (``-1`` empty); listed keys that are not allowed are ignored.
        q_offset, key_mask, segment_ids: allowed keys (README "Allowed keys").
        chunk_size: accepted for signature parity; unused (the kernels keep no per-chunk buffer).
        reduction: ``"mean"`` over query tokens with a non-empty key set (0 if none) or ``"sum"``.

    Returns:
        scalar fp32 tensor (nats); differentiable in q, w, k only.

    Raises:
        ValueError on bad shapes/dtypes/reduction (fp64: use keye_dsa_reference); RuntimeError without Triton/CUDA.
    """
    _check_triton(attn_q, attn_k, q, w, k)
    if q.dim() != 4 or w.dim() != 3 or k.dim() != 3 or attn_q.dim() != 4 or attn_k.dim() != 4:
        raise ValueError("expected attn_q [B, T, Hq, Da], attn_k [B, S, Hkv, Da], q [B, T, H_I, D_I], w [B, T, H_I], "
                         "k [B, S, D_I]")
    B, T, HI, DI = q.shape
    S = k.shape[1]
    Hq, Da = attn_q.shape[2], attn_q.shape[3]
    Hkv = attn_k.shape[2]
    if (tuple(w.shape) != (B, T, HI) or tuple(k.shape) != (B, S, DI) or tuple(attn_q.shape[:2]) != (B, T)
            or tuple(attn_k.shape) != (B, S, Hkv, Da)):
        raise ValueError(f"shape mismatch: attn_q {tuple(attn_q.shape)}, attn_k {tuple(attn_k.shape)}, "
                         f"q {tuple(q.shape)}, "
                         f"w {tuple(w.shape)}, k {tuple(k.shape)}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv}) (GQA)")
    if DI & (DI - 1) or DI < 16:
        raise ValueError(f"indexer head dim must be a power of two >= 16 (got {DI}); use keye_dsa_reference")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    for name, x in (("attn_q", attn_q), ("attn_k", attn_k), ("q", q), ("k", k)):
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name} dtype {x.dtype} unsupported by the Triton kernels; use keye_dsa_reference")
    if attn_q.dtype != attn_k.dtype or q.dtype != k.dtype:
        raise ValueError("attn_q/attn_k and q/k must share dtypes")
    if indices is not None and (indices.dtype != torch.long or indices.dim() != 3
                                or tuple(indices.shape[:2]) != (B, T)):
        raise ValueError(f"indices must be int64 [B, T, K], got {indices.dtype} {tuple(indices.shape)}")
    if B * T == 0 or S == 0:
        return (q.sum() + w.sum() + k.sum()).float() * 0.0
    dev = q.device
    qo, _ = _q_offsets(q_offset, B, T, S, dev)
    km, seg = _mask_tensors(key_mask, segment_ids, B, S, dev)
    attn_q, attn_k = attn_q.detach().contiguous(), attn_k.detach().contiguous()
    q, w, k = q.contiguous(), w.contiguous(), k.contiguous()
    if indices is not None:
        indices = indices.contiguous()
    return _IndexerKL.apply(q, w, k, attn_q, attn_k, float(scaling), indices, qo, km, seg, reduction)


def _aot_cases():
    """(kernel, arg types, constexprs, warps, stages, name) for ahead-of-time compile checks (dev tool)."""
    out = []
    for sparse in (True, False):
        common = dict(G=8, GP=16, DA=128, DAP=128, BK=64, SPARSE=sparse, HAS_KM=True, HAS_SEG=False, UPCAST=False,
                      PRECISION="tf32")
        t1 = {"aq_ptr": "*bf16", "ak_ptr": "*bf16", "idx_ptr": "*i64", "km_ptr": "*i8", "seg_ptr": "*i64",
              "qoff_ptr": "*i64", "lse_ptr": "*fp32", "scale_log2": "fp32"}
        out.append((_kl_main_lse_kernel, t1, common, 4, 2, f"kl lse sparse={sparse}"))
        t2 = dict(t1, q_ptr="*bf16", w_ptr="*fp32", k_ptr="*bf16", kl_ptr="*fp32", cnt_ptr="*i32", dq_ptr="*fp32",
                  dw_ptr="*fp32", dk_ptr="*fp32", ci="fp32", inv_hq="fp32")
        out.append((_kl_token_kernel, t2, dict(common, HKV=4, HI=16, HIP=16, DI=64, GRAD=True), 4, 2,
                    f"kl token sparse={sparse}"))
    return out
