"""What every DSA Triton kernel file shares: the guarded triton import, the interpreter flag, the tunables, the
counters, input checks and the small launch and ``tl`` helpers. Flat file, copied into Hub checkpoints beside the
kernels (it imports only torch, triton and the reference file).
"""
from __future__ import annotations

import os

import torch

from .keye_dsa_reference import _check_masks, _q_offsets  # noqa: F401  (one _q_offsets: the reference's)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # fixed at import, as triton.jit's choice

# The kernels' tunables, ONE dict for every kernel file (the benchmarks override entries). They set speed, not the
# contract (tie rule, masks, NaN); scores equal only up to rounding may rank differently between scoring layouts
# (score_mode). Top-k scoring and selection first, then sparse attention.
CONFIG = {
    "score_buffer_bytes": 1 << 31,  # bound of the per-chunk score buffer (int32 keys)
    "score_mode": 2,                # 0: [bq*H, D] x [D, bk] dot; 1: transposed; 2: one dot per head (bq >= 16)
    "score_bq": 16,                 # queries per indexer tile
    "score_bk": 64,                 # keys per indexer step (mode 2: tiles of >= 16 queries, prefill)
    "score_bk_few_queries": 128,    # keys per step of the other modes (fewer than 16 queries: decode, fallback)
    "score_warps": 4,               # (8 for 0/1 with bq * H >= 128, or mode 2 with bq >= 64)
    "score_stages": 3,
    "select_block": 1024,           # row elements per step of the top-k stream (buffered path)
    "select_cap_mult": 2,           # pending-set capacity = mult * next_pow2(topk)
    "select_warps": 4,
    "select_block_few_rows": 1024,  # block / warps when a chunk has few rows (decode: rows are split)
    "select_warps_few_rows": 4,
    "select_sample": 1024,          # strided sample of a long row for the first threshold (0 = off)
    "fused_candidates": True,       # prefill: sampled threshold + candidate lists instead of a score buffer
    "cand_cap_mult": 4,             # candidate capacity per row = mult * next_pow2(topk)
    "cand_select_warps": 8,
    # sparse attention (keye_dsa_triton.sparse_attention)
    "attn_bk": 128,                 # gathered keys per sparse-attention step
    "attn_warps": 4,
    "attn_stages": 2,
    "attn_bwd_bk": 32,
    "attn_bwd_warps": 4,
    "attn_bwd_stages": 1,
}


# Counters for tests and benchmarks (rows of the fused path that were recomputed on the exact buffered path).
STATS = {"fused_rows": 0, "fallback_rows": 0}


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


def _mask_tensors(key_mask, segment_ids, B: int, S: int, device):
    """key_mask (bool [B, S]) / segment_ids (integer [B, S]), or None -> the kernels' int8 mask and int64 segment
    ids (contiguous, on ``device``). Raises ValueError as the reference does (its ``_check_masks``)."""
    _check_masks(key_mask, segment_ids, B, S)
    km = None if key_mask is None else key_mask.to(device=device, dtype=torch.int8).contiguous()
    seg = None if segment_ids is None else segment_ids.to(device=device, dtype=torch.int64).contiguous()
    return km, seg


if HAS_TRITON:
    _I32_MIN = tl.constexpr(-(2**31))
    _SENT = tl.constexpr(-(2**63) + 1)  # below every packed key (the smallest is (-2**31 + 1) << 32)
    _POS_BIG = tl.constexpr(2**62)
    _INTERP_DOT = tl.constexpr(_INTERPRET)

    @triton.jit
    def _dot_nt(a, b, PRECISION: tl.constexpr):
        """``a [M, D] @ b [N, D]^T`` in fp32, the same value for equal rows of ``b`` (and of ``a``) wherever they sit.

        Compiled, this is ``tl.dot`` (an MMA computes every output element the same way, so equal keys get
        bitwise-equal scores). Under ``TRITON_INTERPRET=1``, ``tl.dot`` is numpy's BLAS ``matmul``, which is not
        column-consistent on every CPU: OpenBLAS' AVX2 sgemm kernel (the one it runs on CPUs without AVX-512,
        e.g. AMD EPYC; ``OPENBLAS_CORETYPE=Haswell`` forces it elsewhere) rounds the edge columns of a tile
        differently, so identical keys scored 1 ulp apart and exact ties were broken by tile position. There
        the product is an elementwise multiply and a sum over D, the same operation for every output element.
        """
        if _INTERP_DOT:
            return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
        else:
            return tl.dot(a, tl.trans(b), input_precision=PRECISION)
