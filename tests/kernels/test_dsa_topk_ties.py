"""The top-k tie rule on every Triton path and in the reference, with inputs exact by construction.

The rule (``kernels/README.md``): scores compare as fp32 numbers, ``+0.0 == -0.0``, NaN ranks as ``-inf`` (below
every finite score, above every key that is not allowed), exact ties go to the lower position; the result is
ascending positions, ``-1`` padding. Every path must give the same indices: the buffered path (score buffer +
streaming select), the fused path (sampled threshold + candidate lists) and its exact recompute of overflowing
rows, chunked prefill, decode (one query per call, key list split across programs) and each scoring layout.

Inputs here are small integers (``q``, ``k``) and weights in ``{+-0, +-1, +-2}``, with ``D_I = 16`` (scale
``16**-0.5 = 0.25``): every dot product, weighted term and head sum is exact in fp32 (and in bf16 inputs with
fp32 accumulation) in any summation order, so ties are ties on every CPU and GPU, and the expected indices are
written out by hand. ``-0.0`` enters as query entries and head weights (``relu(-0.0)`` and ``x * -0.0``), and
rows whose head weights are all <= 0 score ``-0.0`` where the others score ``+0.0``.

``test_equal_float_keys_under_avx2_blas`` covers the failure first seen on a CPU without AVX-512: BLAS AVX2 kernels
(numpy's OpenBLAS ``Haswell`` under the interpreter's ``tl.dot``; torch's MKL in the reference) scored identical keys
1 ulp apart depending on their column in a tile; both now use column-consistent products on CPU.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules import triton (see test_dsa_triton.py)

triton = pytest.importorskip("triton")

ref = importlib.import_module("keye_vl.kernels.keye_dsa_reference")
decode_topk_indices = importlib.import_module("keye_vl.kernels.keye_dsa_decode").decode_topk_indices
common = importlib.import_module("keye_vl.kernels.keye_dsa_triton_common")
topk_mod = importlib.import_module("keye_vl.kernels.keye_dsa_triton_topk")
tri = importlib.import_module("keye_vl.kernels.keye_dsa_triton")
if common._INTERPRET == _CUDA or topk_mod._INTERPRET == _CUDA:  # imported earlier under the other mode
    common = importlib.reload(common)
    topk_mod = importlib.reload(topk_mod)
    tri = importlib.reload(tri)

cpu = pytest.mark.skipif(_CUDA, reason="interpreter tests run where there is no GPU (CI)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")

H, D = 4, 16
NEG0 = -0.0


def _padded(first, topk):
    """The expected row: ``first`` (ascending positions) then -1 up to ``topk``."""
    first = list(first)
    assert len(first) <= topk
    return first + [-1] * (topk - len(first))


# ------------------------------------------------------------------------------------------------
# cases: (q [B, T, H, D], w [B, T, H], k [B, S, D], kwargs, expected [B, T, topk]) for given S, T, topk
# ------------------------------------------------------------------------------------------------
def _equal_keys(S, T, topk, offsets):
    """Every key the same integer vector: every row's scores are all equal -> the lowest positions."""
    g = torch.Generator().manual_seed(1)
    B = len(offsets)
    q = torch.randint(-2, 3, (B, T, H, D), generator=g).float()
    w = torch.randint(-2, 3, (B, T, H), generator=g).float()
    k = torch.randint(-2, 3, (1, 1, D), generator=g).float().expand(B, S, D).contiguous()
    exp = [[_padded(range(min(o + t + 1, topk)), topk) for t in range(T)] for o in offsets]
    return q, w, k, {}, exp


HOT = {30: 1.0, 70: 3.0, 90: 2.0}  # position -> strength of the few keys that score > 0 in "P" rows


def _signed_zeros(S, T, topk, offsets):
    """Rows of exact zeros (+0.0 or -0.0) with at most three positive scores (fewer than k).

    Keys: "zero" keys ``[1]*8 + [0]*8`` everywhere, "hot" keys ``[0]*8 + [c]*8`` at the ``HOT`` positions.
    Heads of every query: h0 ``[-1]*8 + [1]*8`` (zero keys: -8 -> relu +0; hot keys: 8c > 0), h1 all ``-0.0``
    (dot -0.0 or +0.0 -> relu of a signed zero), h2 all -1 (dot < 0 -> relu +0), h3 all +1 (dot > 0).
    Even rows ("P"): w = [+1, -1, -2, -0.0] -> zero keys score +0.0, hot keys 0.25 * 8c > 0.
    Rows 1, 5, ... ("N"): w = [-1, +0.0, -2, -0.0] -> zero keys score +0.0 or -0.0 (the sign of relu(-0.0 dot)
    differs between BLAS and CPU), hot keys < 0. Rows 3, 7, ...: h1 all -1 and w = [-1, -1, -2, -0.0] -> every
    term is -0.0, zero keys score exactly -0.0, hot keys < 0.
    Expected: P rows list the hot keys they can see plus the lowest zero keys; N rows the lowest zero keys
    (hot keys rank below every zero key).
    """
    B = len(offsets)
    k = torch.zeros(B, S, D)
    k[:, :, :8] = 1.0
    for p, c in HOT.items():
        if p < S:
            k[:, p, :8] = 0.0
            k[:, p, 8:] = c
    qh = torch.stack([torch.tensor([-1.0] * 8 + [1.0] * 8), torch.full((D,), NEG0), torch.full((D,), -1.0),
                      torch.ones(D)])
    q = qh.expand(B, T, H, D).contiguous()
    q[:, 3::4, 1] = -1.0  # rows 3, 7, ...: h1 dot < 0 as well -> every term is -0.0 -> the score is -0.0
    w = torch.empty(B, T, H)
    for t in range(T):
        w[:, t] = torch.tensor([1.0, -1.0, -2.0, NEG0]) if t % 2 == 0 else \
            torch.tensor([-1.0, 0.0 if t % 4 == 1 else -1.0, -2.0, NEG0])
    exp = []
    for o in offsets:
        rows = []
        for t in range(T):
            pos = o + t
            if t % 2 == 0:
                hot = sorted(p for p in HOT if p <= pos)
            else:
                hot = []
            zeros = [s for s in range(pos + 1) if s not in HOT][: max(0, topk - len(hot))]
            rows.append(_padded(sorted(hot[:topk] + zeros), topk))
        exp.append(rows)
    return q, w, k, {}, exp


def _nan_and_masked(S, T, topk, offsets):
    """Equal keys, positions 0..4 NaN (score NaN -> -inf: after every finite key, before disallowed ones),
    positions 6 and 7 masked out by key_mask."""
    q, w, k, _, _ = _equal_keys(S, T, topk, offsets)
    w = w.abs() + 1.0  # scores finite and equal
    k = k.clone()
    k[:, :5, 0] = float("nan")
    key_mask = torch.ones(k.shape[0], S, dtype=torch.bool)
    key_mask[:, 6:8] = False
    exp = []
    for o in offsets:
        rows = []
        for t in range(T):
            allowed = [s for s in range(o + t + 1) if s not in (6, 7)]
            finite = [s for s in allowed if s >= 5]
            nan = [s for s in allowed if s < 5]
            rows.append(_padded(sorted((finite + nan)[:topk]), topk))
        exp.append(rows)
    return q, w, k, {"key_mask": key_mask}, exp


CASES = {"equal_keys": _equal_keys, "signed_zeros": _signed_zeros, "nan_and_masked": _nan_and_masked}


def _run_path(path, q, w, k, topk, offsets, kw, monkeypatch):
    """Top-k of every row through one path; offsets are the per-sequence positions of query 0."""
    qo = torch.tensor(offsets, device=q.device)
    if path == "static_decode":  # the static cache's fixed-shape top-k over the whole key buffer (plain torch)
        T, S = q.shape[1], k.shape[1]
        pos = qo[:, None] + torch.arange(T, device=q.device)  # [B, T] query positions
        allowed = torch.arange(S, device=q.device)[None, None, :] <= pos[..., None]
        if "key_mask" in kw:
            allowed = allowed & kw["key_mask"][:, None, :]
        return decode_topk_indices(q.float(), w.float(), k.float(), allowed, topk)
    if path == "decode":  # one query per call at its own offset: few rows, key list split across programs
        rows = [tri.dsa_topk_indices(q[:, t:t + 1], w[:, t:t + 1], k, topk, q_offset=qo + t, **kw)
                for t in DECODE_ROWS]
        return torch.cat(rows, dim=1)
    chunk = None
    if path == "buffered":
        monkeypatch.setitem(tri.TOPK_CONFIG, "fused_candidates", False)
    elif path == "chunked":  # 4-query tiles, 4 chunks of 2 x 4 rows (each still takes the fused path)
        monkeypatch.setitem(tri.TOPK_CONFIG, "score_mode", 0)
        monkeypatch.setitem(tri.TOPK_CONFIG, "score_bq", 4)
        chunk = 4
    elif path.startswith("mode"):
        monkeypatch.setitem(tri.TOPK_CONFIG, "score_mode", int(path[-1]))
    before = dict(topk_mod.STATS)
    out = tri.dsa_topk_indices(q, w, k, topk, q_offset=qo, chunk_size=chunk, **kw)
    if path in ("fused", "fallback"):
        assert topk_mod.STATS["fused_rows"] > before["fused_rows"], "the fused path did not run"
    if path == "fallback":
        assert topk_mod.STATS["fallback_rows"] > before["fallback_rows"], "no row was recomputed"
    return out


PATHS = ["fused", "fallback", "buffered", "chunked", "decode", "mode0", "mode1", "static_decode"]
DECODE_ROWS = [0, 5, 10, 15]  # the rows the decode path recomputes one call each (interpreter time)


@cpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_tie_rule_every_path(case, path, monkeypatch):
    # 2 sequences x 16 queries: rows of sequence 1 start at position 0 (fewer keys than k), sequence 0 sees
    # 85..100 keys; 32 rows >= 2 x the interpreter's 4 "SMs" -> the fused path. "fallback": 185..200 keys, so that
    # the candidates above the sampled threshold (about half of the tied keys) overflow the 64-slot lists and those
    # rows are recomputed on the buffered path.
    S, T, topk, offsets = (200, 16, 13, [184, 0]) if path == "fallback" else (100, 16, 13, [84, 0])
    q, w, k, kw, exp = CASES[case](S, T, topk, offsets)
    out = _run_path(path, q, w, k, topk, offsets, kw, monkeypatch)
    expect = ref.dsa_topk_indices(q, w, k, topk, q_offset=torch.tensor(offsets), **kw)
    assert expect.tolist() == exp
    if path == "decode":
        exp, expect = [rows[t] for rows in exp for t in DECODE_ROWS], expect[:, DECODE_ROWS]
        exp = [exp[:len(DECODE_ROWS)], exp[len(DECODE_ROWS):]]
    assert out.tolist() == exp
    assert torch.equal(out, expect)


@cpu
def test_signed_zero_rows_literal():
    """The hand-written rows of the signed-zeros case (guards the case builder itself)."""
    q, w, k, _, exp = _signed_zeros(100, 4, 13, [92])
    assert exp[0][0] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 70, 90]  # P row: three hot keys + 10 zeros
    assert exp[0][1] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # N row: hot keys score < 0
    s = ref.dsa_indexer_scores(q, w, k, q_offset=92)
    assert float(s[0, 0, 30]) == 2.0 and float(s[0, 0, 70]) == 6.0 and float(s[0, 0, 90]) == 4.0
    assert float(s[0, 0, 0]) == 0.0 and float(s[0, 1, 30]) == -2.0
    terms = torch.relu(q[0, 3] @ k[0, 0]) * w[0, 3] * 0.25  # row 3, zero key: every head's term is -0.0
    assert terms.tolist() == [0.0] * 4 and bool(torch.signbit(terms).all())


_HASWELL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from keye_vl.kernels import keye_dsa_triton as tri
    g = torch.Generator().manual_seed(29)
    q = torch.randn(1, 16, 4, 16, generator=g)
    w = torch.randn(1, 16, 4, generator=g)
    k = torch.randn(1, 1, 16, generator=g).expand(1, 150, 16).contiguous()  # identical (non-integer) keys
    expect = torch.arange(13).expand(1, 16, 13)
    bad = []
    for name, cfg in [("fused", {}), ("buffered", {"fused_candidates": False}), ("mode0", {"score_mode": 0}),
                      ("mode1", {"score_mode": 1})]:
        saved = dict(tri.TOPK_CONFIG)
        tri.TOPK_CONFIG.update(cfg)
        if not torch.equal(tri.dsa_topk_indices(q, w, k, 13), expect):
            bad.append(name)
        tri.TOPK_CONFIG.clear(); tri.TOPK_CONFIG.update(saved)
    dec = torch.cat([tri.dsa_topk_indices(q[:, t:t + 1], w[:, t:t + 1], k, 13, q_offset=134 + t) for t in (0, 15)], 1)
    if not torch.equal(dec, expect[:, :2]):
        bad.append("decode")
    from keye_vl.kernels import keye_dsa_reference as ref
    from keye_vl.kernels.keye_dsa_decode import decode_topk_indices
    if not torch.equal(ref.dsa_topk_indices(q, w, k, 13), expect):
        bad.append("reference")
    allowed = torch.arange(150)[None, None, :] <= (134 + torch.arange(16))[None, :, None]
    if not torch.equal(decode_topk_indices(q, w, k, allowed, 13), expect):
        bad.append("static_decode")
    print("BAD", bad)
    sys.exit(1 if bad else 0)
""")


@cpu
def test_equal_float_keys_under_avx2_blas():
    """Identical float keys tie on every path (Triton under the interpreter, the torch reference, the static-cache
    decode) also where the BLAS runs its AVX2 kernels (CPUs without AVX-512, e.g. AMD EPYC): a subprocess with
    numpy's OpenBLAS forced to ``OPENBLAS_CORETYPE=Haswell`` and torch's MKL to ``MKL_ENABLE_INSTRUCTIONS=AVX2``
    (each ignored, harmlessly, by a BLAS without the switch). Before the fixes this returned rows such as
    ``[0..7, 120..124]`` (Triton) and ``[0..4, 192..199]`` (reference)."""
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", MKL_ENABLE_INSTRUCTIONS="AVX2", TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _HASWELL_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# GPU (H200): the same cases, bf16 and fp32, at sizes where the fused path, the sampled threshold and the
# row split all run (>= 2 x SMs rows, rows of > 4 x 1024 keys).
# ------------------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", PATHS)
def test_gpu_tie_rule_every_path(case, path, dtype, monkeypatch):
    # "fallback": rows of ~20K tied keys put ~10K candidates above the sampled threshold, past the 8K-slot lists
    S, T, topk, offsets = (20000, 320, 2048, [19680, 0]) if path == "fallback" else (6000, 320, 2048, [5680, 0])
    q, w, k, kw, exp = CASES[case](S, T, topk, offsets)
    if path == "decode":  # 320 single-query calls are slow to launch one by one: every 16th query
        q, w = q[:, ::16], w[:, ::16]
        exp = [rows[::16] for rows in exp]
        outs = [tri.dsa_topk_indices(q[:, i:i + 1].to("cuda", dtype), w[:, i:i + 1].cuda(), k.to("cuda", dtype),
                                     topk, q_offset=torch.tensor(offsets, device="cuda") + 16 * i,
                                     **{n: v.cuda() for n, v in kw.items()})
                for i in range(q.shape[1])]
        assert torch.cat(outs, 1).tolist() == exp
        return
    kw = {n: v.cuda() for n, v in kw.items()}
    out = _run_path(path, q.to("cuda", dtype), w.cuda(), k.to("cuda", dtype), topk, offsets, kw, monkeypatch)
    assert out.tolist() == exp


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_equal_float_keys(dtype):
    """Identical random-float keys: compiled tl.dot scores them bitwise-equal on every path."""
    g = torch.Generator().manual_seed(29)
    q = torch.randn(1, 300, 16, 64, generator=g).to("cuda", dtype)
    w = torch.randn(1, 300, 16, generator=g).cuda()
    k = torch.randn(1, 1, 64, generator=g).expand(1, 8192, 64).contiguous().to("cuda", dtype)
    expect = torch.arange(2048, device="cuda").expand(1, 300, 2048)
    assert torch.equal(tri.dsa_topk_indices(q, w, k, 2048), expect)
    dec = torch.cat([tri.dsa_topk_indices(q[:, t:t + 1], w[:, t:t + 1], k, 2048, q_offset=7892 + t)
                     for t in range(0, 300, 37)], 1)
    assert torch.equal(dec, expect[:, :dec.shape[1]])
