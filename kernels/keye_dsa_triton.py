"""DSA (DeepSeek Sparse Attention on GQA) Triton kernels for Keye-VL-2.0: the public entry points.

Same names, signatures and semantics as the torch oracle ``keye_dsa_reference`` (contract: ``README.md``
beside this file). Tensors follow the kernel API layout ``[B, T, H, D]``; index lists are int64 ``[B, T, K]``
with ``-1`` for an empty slot. Three flat files (copied side by side into Hub checkpoints):

* ``keye_dsa_triton_topk.py``: ``dsa_topk_indices`` (fused indexer scoring + exact deterministic top-k,
  memory linear in the context); design notes in its docstring.
* this file: ``sparse_attention``: one program per (token, KV head): the G query heads of that KV group
  (padded to 16 rows for ``tl.dot``) against the token's key list gathered ``CONFIG["attn_bk"]`` keys a step
  (layout ``[S, H_kv, D]``), online softmax in fp32 (exp2), saving the LSE. Backward recomputes P from the
  LSE; dQ is accumulated in registers, dK/dV are scattered with fp32 atomics (so gradients are not
  bitwise reproducible; the top-k is).
* ``keye_dsa_triton_kl.py``: ``indexer_kl_loss`` (dense warm-up and sparse stage, fused unit gradient).

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels upcast every load to fp32 (the interpreter's bf16 and
fp16 ``tl.dot`` are not trustworthy) and use fp32 dots. Kernels run on CUDA tensors otherwise.
"""
from __future__ import annotations

import os

import torch

# Triton is optional (the package imports, and the reference works, without it): the guarded import, the
# interpreter flag, the tunables and the small launch helpers live in keye_dsa_triton_common.
from .keye_dsa_triton_common import CONFIG, HAS_TRITON, _INTERPRET, _check_triton, _next_pow2, tl, triton  # noqa: F401
from .keye_dsa_reference import _check_indices_chunk  # noqa: E402  (debug-mode index check)
from .keye_dsa_reference import hadamard_transform  # noqa: E402  (torch; runs on any device)
from .keye_dsa_triton_kl import indexer_kl_loss  # noqa: E402
TOPK_CONFIG = CONFIG  # the same dict (older name of the top-k entries)
from .keye_dsa_triton_topk import dsa_topk_indices  # noqa: E402

__all__ = ["HAS_TRITON", "hadamard_transform", "dsa_topk_indices", "sparse_attention", "indexer_kl_loss", "CONFIG",
           "TOPK_CONFIG"]



# ----------------------------------------------------------------------------------------------------
# sparse GQA attention over one shared key list per token
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit(do_not_specialize=["T", "S", "K"])
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

    @triton.jit(do_not_specialize=["T", "S", "K"])
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
    Hq, D = q.shape[2], q.shape[3]
    Hkv, DV = k.shape[2], v.shape[3]
    G = Hq // Hkv
    interp = _INTERPRET
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
            BK=CONFIG["attn_bwd_bk"], num_warps=CONFIG["attn_bwd_warps"], num_stages=CONFIG["attn_bwd_stages"],
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
            the reference (which raises), entries outside ``[0, S)`` are treated as empty and duplicates are not
            detected (a repeated key counts twice): checking either costs a host sync. With the environment
            variable ``KEYE_DSA_DEBUG=1`` they are checked as the reference does (ValueError).
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
    if os.environ.get("KEYE_DSA_DEBUG", "0") not in ("", "0"):  # debug mode: the reference's range / duplicate check
        _check_indices_chunk(indices, k.shape[1])
    q, k, v, indices = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, indices))
    out, lse = _SparseAttention.apply(q, k, v, indices, float(scaling))
    return (out, lse) if return_lse else out



def _sparse_attention_fixed_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                                 scaling: float) -> torch.Tensor:
    q, k, v, indices = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, indices))
    return _sparse_attn_fwd(q, k, v, indices, float(scaling))[0]


_FIXED_OP = None
if HAS_TRITON and hasattr(torch, "library") and hasattr(torch.library, "custom_op"):
    # An opaque custom op: torch.compile keeps the launch as one node (no tracing into the Triton wrapper) and
    # CUDA graphs capture it. Registered once per process (this file may be imported under two module names).
    _OP_NAME = "keye_vl::dsa_sparse_attention_fixed"
    try:
        _FIXED_OP = torch.library.custom_op(_OP_NAME, mutates_args=())(_sparse_attention_fixed_impl)

        @_FIXED_OP.register_fake
        def _(q, k, v, indices, scaling):
            return q.new_empty((*q.shape[:3], v.shape[3]))
    except Exception:  # noqa: BLE001 - already registered by the other import route, or an older torch
        _FIXED_OP = getattr(getattr(torch.ops, "keye_vl", None), "dsa_sparse_attention_fixed", None)


def sparse_attention_fixed(q, k, v, indices, *, scaling):
    """Forward-only :func:`sparse_attention` for a decode step on a static cache: shapes are checked by the
    caller once per generate call, nothing is read back to the host, so the launch can be captured in a CUDA graph
    (a ``torch.library`` custom op under ``torch.compile``).

    Args: as :func:`sparse_attention` (k / v may be the whole cache buffer; entries outside ``[0, S)`` and ``-1``
    are empty). Returns out ``[B, T, Hq, Dv]`` in q's dtype (no autograd).
    """
    if _FIXED_OP is not None and torch.compiler.is_compiling():
        return _FIXED_OP(q, k, v, indices, float(scaling))
    return _sparse_attention_fixed_impl(q, k, v, indices, float(scaling))
