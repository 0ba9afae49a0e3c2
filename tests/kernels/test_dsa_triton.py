"""Triton DSA kernels (kernels/keye_dsa_triton*.py) == the torch reference (kernels/keye_dsa_reference.py).

CPU (CI): the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported when no CUDA device is present), at tiny sizes, in fp32/fp16 (the interpreter's bf16 is wrong).
GPU (``-m gpu``): bf16 at 4K-64K against the reference, gradients, bitwise-identical top-k across runs.
"""
import importlib
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    # triton.jit picks compiled vs interpreted kernels when a kernel module is imported, so this must
    # happen before the kernel modules load; it stays set (Triton also reads it at run time).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

ref = importlib.import_module("keye_vl.kernels.keye_dsa_reference")
_common = importlib.import_module("keye_vl.kernels.keye_dsa_triton_common")
_tri_parts = [importlib.import_module(f"keye_vl.kernels.keye_dsa_triton_{m}") for m in ("kl", "topk")]
tri = importlib.import_module("keye_vl.kernels.keye_dsa_triton")
if any(m._INTERPRET == _CUDA for m in [_common] + _tri_parts + [tri]):  # imported earlier under the other mode
    _common = importlib.reload(_common)
    _tri_parts = [importlib.reload(m) for m in _tri_parts]
    tri = importlib.reload(tri)

cpu = pytest.mark.skipif(_CUDA, reason="interpreter tests run where there is no GPU (CI)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _CUDA, reason="needs a CUDA GPU")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _indexer_inputs(B, T, S, H, D, seed=0, dtype=torch.float32, device="cpu"):
    g = _gen(seed)
    q = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(B, T, H, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)
    return q, w, k


def _check_layout(out, S, topk):
    """In [-1, S), ascending, -1 only at the end, no duplicate."""
    assert out.dtype == torch.long and out.shape[-1] == topk
    assert bool(((out >= -1) & (out < S)).all())
    valid = out >= 0
    # -1 only after the valid prefix
    assert bool((valid[..., 1:] <= valid[..., :-1]).all())
    a, b = out[..., :-1], out[..., 1:]
    assert bool(((b > a) | (b == -1)).all())


# ------------------------------------------------------------------------------------------------
# CPU: top-k
# ------------------------------------------------------------------------------------------------
TOPK_CASES = [
    # B, T, S, H, D, topk      (what it covers)
    (2, 9, 40, 4, 16, 8),      # prefill of the last T keys, k not a multiple of anything
    (1, 24, 24, 4, 16, 5),     # T == S: rows with fewer, exactly and more than k keys
    (1, 6, 10, 4, 16, 16),     # fewer keys than k everywhere (-1 padding)
    (1, 3, 300, 16, 64, 13),   # model head shape, few long rows: the row-split path
    (3, 1, 150, 4, 32, 7),     # decode, batch 3
    (1, 40, 64, 2, 16, 1),     # k = 1, H padded to the dot's 16 rows
]


@cpu
@pytest.mark.parametrize("B,T,S,H,D,topk", TOPK_CASES, ids=[f"B{c[0]}-T{c[1]}-S{c[2]}-H{c[3]}-D{c[4]}-k{c[5]}"
                                                              for c in TOPK_CASES])
def test_topk_matches_reference(B, T, S, H, D, topk):
    q, w, k = _indexer_inputs(B, T, S, H, D, seed=B * 1000 + T * 10 + S)
    out = tri.dsa_topk_indices(q, w, k, topk)
    _check_layout(out, S, topk)
    assert torch.equal(out, ref.dsa_topk_indices(q, w, k, topk))


@cpu
def test_topk_small_capacity_and_chunks(monkeypatch):
    """Many shrinks of the pending set (capacity 2 x k with k >= the block) and chunking change nothing."""
    q, w, k = _indexer_inputs(1, 4, 90, 4, 16, seed=3)
    expect = ref.dsa_topk_indices(q, w, k, 20)
    assert torch.equal(tri.dsa_topk_indices(q, w, k, 20), expect)
    assert torch.equal(tri.dsa_topk_indices(q, w, k, 20, chunk_size=1), expect)
    monkeypatch.setitem(tri.TOPK_CONFIG, "select_sample", 0)
    assert torch.equal(tri.dsa_topk_indices(q, w, k, 20), expect)


@cpu
@pytest.mark.parametrize("mode", [1, 2])
def test_topk_score_modes(monkeypatch, mode):
    """The alternative scoring layouts (transposed dot; one dot per head) give the same top-k."""
    monkeypatch.setitem(tri.TOPK_CONFIG, "score_mode", mode)
    q, w, k = _indexer_inputs(2, 20, 70, 4, 16, seed=23)
    k[0, 5] = float("nan")
    assert torch.equal(tri.dsa_topk_indices(q, w, k, 9), ref.dsa_topk_indices(q, w, k, 9))


@cpu
def test_topk_fused_equals_buffered_and_overflow_fallback(monkeypatch):
    """>= 8 rows take the fused path (sampled threshold + candidate lists); it equals the buffered path, and
    rows whose candidate list overflows (all scores equal: everything up to the sampled key passes) are
    recomputed exactly."""
    topk_mod = _tri_parts[1]
    q, w, k = _indexer_inputs(1, 8, 200, 4, 16, seed=29)
    before = dict(topk_mod.STATS)
    fused = tri.dsa_topk_indices(q, w, k, 13)
    assert topk_mod.STATS["fused_rows"] == before["fused_rows"] + 8
    monkeypatch.setitem(tri.TOPK_CONFIG, "fused_candidates", False)
    assert torch.equal(fused, tri.dsa_topk_indices(q, w, k, 13))
    assert torch.equal(fused, ref.dsa_topk_indices(q, w, k, 13))
    monkeypatch.setitem(tri.TOPK_CONFIG, "fused_candidates", True)
    k[:] = k[:, :1]
    before = dict(topk_mod.STATS)
    out = tri.dsa_topk_indices(q, w, k, 13)
    assert topk_mod.STATS["fallback_rows"] > before["fallback_rows"]
    assert torch.equal(out, ref.dsa_topk_indices(q, w, k, 13))
    assert torch.equal(out[0, -1], torch.arange(13))


@cpu
def test_topk_fallback_rows_batched_with_masks():
    """Overflowing rows of several batch elements, with key_mask, segment_ids and per-sequence offsets, are
    recomputed together (one batched exact pass per batch element) and equal the reference."""
    topk_mod = _tri_parts[1]
    B, T, S, H, D, topk = 2, 8, 240, 4, 16, 13
    q, w, k = _indexer_inputs(B, T, S, H, D, seed=31)
    k[0, :] = k[0, :1]  # batch 0: all scores equal in every row -> candidate lists overflow
    k[1, 40:] = k[1, 40:41]  # batch 1: a long run of equal keys
    g = torch.Generator().manual_seed(5)
    key_mask = torch.rand(B, S, generator=g) > 0.15
    segment_ids = torch.zeros(B, S, dtype=torch.long)
    segment_ids[1, 100:] = 1
    qo = torch.tensor([S - T, 180])
    before = dict(topk_mod.STATS)
    out = tri.dsa_topk_indices(q, w, k, topk, q_offset=qo, key_mask=key_mask, segment_ids=segment_ids)
    assert topk_mod.STATS["fused_rows"] == before["fused_rows"] + B * T
    assert topk_mod.STATS["fallback_rows"] - before["fallback_rows"] >= T  # every row of batch 0 at least
    expect = ref.dsa_topk_indices(q, w, k, topk, q_offset=qo, key_mask=key_mask, segment_ids=segment_ids)
    assert torch.equal(out, expect)


@cpu
def test_topk_sampled_threshold_fallback():
    """A row whose sampled keys are its best ones: the sampled threshold lets too few keys through and the
    row is streamed again without it (exactness never depends on the sample)."""
    assert tri.TOPK_CONFIG["select_sample"] > 0
    B, T, S, H, D, topk = 1, 8, 200, 4, 16, 13  # 8 rows: no row split; rows of 193..200 keys (> 4 * 16 sampled)
    q, w, k = _indexer_inputs(B, T, S, H, D, seed=17)
    w = w.abs()
    sampled = [(i * S) // 16 for i in range(16)]  # the interpreter samples 16 keys of the last row (n = S)
    u = q[0, -1].mean(0) / q[0, -1].mean(0).norm()
    k[0, sampled] = (50.0 + torch.arange(16.0))[:, None] * u  # distinct, the row's 16 best scores
    topk_mod = _tri_parts[1]
    before = topk_mod.STATS["fallback_rows"]
    out = tri.dsa_topk_indices(q, w, k, topk)
    assert torch.equal(out, ref.dsa_topk_indices(q, w, k, topk))
    assert topk_mod.STATS["fallback_rows"] > before  # fused path: the misled rows (the last at least) are redone
    # the buffered path's own fallback (stream again without the sampled threshold)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tri.TOPK_CONFIG, "fused_candidates", False)
        assert torch.equal(tri.dsa_topk_indices(q, w, k, topk), ref.dsa_topk_indices(q, w, k, topk))


@cpu
def test_topk_ties_lower_position_first():
    # small integers: many exactly equal scores
    g = _gen(7)
    q = torch.randint(-1, 2, (2, 12, 4, 16), generator=g).float()
    w = torch.randint(1, 3, (2, 12, 4), generator=g).float()
    k = torch.randint(-1, 2, (2, 30, 16), generator=g).float()
    k[:, 10:20] = k[:, 0:1]  # repeated keys: identical scores
    out = tri.dsa_topk_indices(q, w, k, 6)
    _check_layout(out, 30, 6)
    assert torch.equal(out, ref.dsa_topk_indices(q, w, k, 6))


@cpu
@pytest.mark.parametrize("mode", ["all_equal", "signed_zeros"])
def test_topk_low_contrast_rows(mode):
    """All scores of a row equal (or all +-0.0 from ReLU with negative weights): lowest positions win."""
    B, T, S, H, D = 1, 5, 70, 4, 16
    q, w, k = _indexer_inputs(B, T, S, H, D, seed=11)
    if mode == "all_equal":
        k[:] = k[:, :1]
    else:
        k = q[:, :1, :1, :].reshape(B, 1, D).expand(B, S, D).abs().contiguous()
        q = -q.abs()  # q . k < 0 -> relu 0; w of mixed sign -> scores are +0.0 or -0.0
    out = tri.dsa_topk_indices(q, w, k, 9)
    assert torch.equal(out, ref.dsa_topk_indices(q, w, k, 9))
    assert torch.equal(out[0], torch.arange(9).expand(T, 9))


@cpu
def test_topk_masks_offsets_and_empty_rows():
    B, T, S, H, D, topk = 2, 6, 48, 4, 16, 7
    q, w, k = _indexer_inputs(B, T, S, H, D, seed=5)
    key_mask = torch.rand(B, S, generator=_gen(1)) > 0.3
    key_mask[1, :20] = False  # batch 1: queries at positions < 20 see no key
    q_offset = torch.tensor([30, 10])
    seg = torch.zeros(B, S, dtype=torch.long)
    seg[0, 33:] = 1
    seg[1, 12:] = 2
    for kw in (dict(key_mask=key_mask, q_offset=q_offset), dict(segment_ids=seg, q_offset=q_offset),
               dict(key_mask=key_mask, segment_ids=seg, q_offset=21)):
        out = tri.dsa_topk_indices(q, w, k, topk, **kw)
        _check_layout(out, S, topk)
        assert torch.equal(out, ref.dsa_topk_indices(q, w, k, topk, **kw)), kw
    out = tri.dsa_topk_indices(q, w, k, topk, key_mask=key_mask, q_offset=q_offset)
    assert bool((out[1, :, 0] == -1).all())  # no allowed key at all -> all -1


@cpu
def test_topk_nan_inf_never_out_of_range():
    B, T, S, H, D, topk = 2, 5, 60, 4, 16, 9
    q, w, k = _indexer_inputs(B, T, S, H, D, seed=9)
    k[0, 3] = float("nan")
    k[0, 7, 0] = float("inf")
    k[1, 50:] = float("-inf")
    q[1, 2, 1] = float("nan")
    w[0, 4, 0] = float("inf")
    out = tri.dsa_topk_indices(q, w, k, topk)
    _check_layout(out, S, topk)
    assert torch.equal(out, ref.dsa_topk_indices(q, w, k, topk))
    # an all-NaN query still lists allowed keys (NaN ranks as -inf, above not-allowed keys)
    q2 = torch.full_like(q, float("nan"))
    out2 = tri.dsa_topk_indices(q2, w, k, topk)
    _check_layout(out2, S, topk)
    assert torch.equal(out2, ref.dsa_topk_indices(q2, w, k, topk))


@cpu
def test_topk_fp16():
    q, w, k = _indexer_inputs(2, 4, 80, 4, 32, seed=13, dtype=torch.float16)
    assert torch.equal(tri.dsa_topk_indices(q, w, k, 11), ref.dsa_topk_indices(q, w, k, 11))


@cpu
def test_topk_bad_inputs():
    q, w, k = _indexer_inputs(1, 4, 16, 4, 16)
    with pytest.raises(ValueError, match="q_offset"):
        tri.dsa_topk_indices(q, w, k, 3, q_offset=14)
    with pytest.raises(ValueError, match="shape"):
        tri.dsa_topk_indices(q, w[:, :2], k, 3)
    with pytest.raises(ValueError, match="dtype"):
        tri.dsa_topk_indices(q.double(), w, k.double(), 3)
    # same checks as the reference: a non-bool mask, float segment ids or a non-integer topk would otherwise be
    # cast silently (0.5 -> masked, 2.5 -> 2)
    for bad in (dict(key_mask=torch.full((1, 16), 0.5)), dict(segment_ids=torch.zeros(1, 16))):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            tri.dsa_topk_indices(q, w, k, 3, **bad)
        with pytest.raises(ValueError, match=name):
            ref.dsa_topk_indices(q, w, k, 3, **bad)
        aq, ak = torch.randn(1, 4, 2, 8), torch.randn(1, 16, 1, 8)
        with pytest.raises(ValueError, match=name):
            tri.indexer_kl_loss(aq, ak, 0.3, q, w, k, **bad)
    for topk in (0, 2.5, True):
        with pytest.raises(ValueError, match="topk must be an int"):
            tri.dsa_topk_indices(q, w, k, topk)


@cpu
def test_hadamard_transform_in_both_implementations():
    """The contract (kernels/README.md) lists hadamard_transform for both modules; the Triton module's is the
    reference's torch version (it runs on any device)."""
    x = torch.randn(3, 64, generator=_gen(2))
    torch.testing.assert_close(tri.hadamard_transform(x), ref.hadamard_transform(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# CPU: sparse attention
# ------------------------------------------------------------------------------------------------
def _attn_inputs(B, T, S, Hq, Hkv, D, Dv, K, seed=0, dtype=torch.float32, device="cpu", causal=True):
    g = _gen(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv, Dv, generator=g).to(device=device, dtype=dtype)
    idx = torch.full((B, T, K), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            n = min(K, S - T + t + 1) if causal else K
            idx[b, t, :n] = torch.randperm(S - T + t + 1 if causal else S, generator=g)[:n].sort().values
    return q, k, v, idx.to(device)


ATTN_CASES = [
    # B, T, S, Hq, Hkv, D, Dv, K
    (2, 5, 50, 8, 2, 32, 32, 24),    # G = 4 (rows padded to 16), lists shorter than K (-1 padding)
    (1, 3, 200, 4, 4, 16, 32, 70),   # MHA, Dv != D, K over one key block
    (1, 4, 40, 32, 4, 64, 64, 16),   # the model's head ratio (G = 8)
]


@cpu
@pytest.mark.parametrize("B,T,S,Hq,Hkv,D,Dv,K", ATTN_CASES, ids=[f"B{c[0]}-T{c[1]}-S{c[2]}-Hq{c[3]}-Hkv{c[4]}-D{c[5]}"
                                                                   f"-Dv{c[6]}-K{c[7]}" for c in ATTN_CASES])
def test_sparse_attention_matches_reference(B, T, S, Hq, Hkv, D, Dv, K):
    q, k, v, idx = _attn_inputs(B, T, S, Hq, Hkv, D, Dv, K, seed=S)
    idx[0, 1] = -1  # a query with no key
    if T > 2:
        idx[-1, 2] = idx[-1, 2].flip(-1)  # unsorted list (-1 first): allowed
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    scaling = D ** -0.5
    o, lse = tri.sparse_attention(qs, ks, vs, idx, scaling=scaling, return_lse=True)
    o_r, lse_r = ref.sparse_attention(qr, kr, vr, idx, scaling=scaling, return_lse=True)
    torch.testing.assert_close(o, o_r, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, lse_r.float(), atol=2e-5, rtol=2e-5)
    assert bool((o[0, 1] == 0).all()) and bool(torch.isneginf(lse[0, 1]).all())
    do = torch.randn(o.shape, generator=_gen(1))
    g = torch.autograd.grad(o, (qs, ks, vs), do)
    g_r = torch.autograd.grad(o_r, (qr, kr, vr), do)
    for a, b in zip(g, g_r):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


@cpu
def test_sparse_attention_fp16_and_out_of_range_indices():
    q, k, v, idx = _attn_inputs(1, 4, 30, 8, 2, 32, 32, 12, seed=4, dtype=torch.float16)
    o = tri.sparse_attention(q, k, v, idx, scaling=0.2)
    torch.testing.assert_close(o, ref.sparse_attention(q, k, v, idx, scaling=0.2), atol=2e-3, rtol=2e-3)
    bad = idx.clone()
    bad[0, 0, -1] = 10**6  # outside [0, S): treated as an empty slot (the reference raises)
    fixed = idx.clone()
    fixed[0, 0, -1] = -1
    torch.testing.assert_close(tri.sparse_attention(q, k, v, bad, scaling=0.2),
                               ref.sparse_attention(q, k, v, fixed, scaling=0.2), atol=2e-3, rtol=2e-3)


@cpu
def test_sparse_attention_debug_mode_checks_indices(monkeypatch):
    """KEYE_DSA_DEBUG=1: out-of-range and repeated keys raise as in the reference (off: not checked, no sync)."""
    q, k, v, idx = _attn_inputs(1, 4, 30, 8, 2, 32, 32, 12, seed=4)
    dup = idx.clone()
    dup[0, 1, 1] = dup[0, 1, 0] if int(dup[0, 1, 0]) >= 0 else 3
    dup[0, 1, 0] = dup[0, 1, 1]
    monkeypatch.setenv("KEYE_DSA_DEBUG", "1")
    with pytest.raises(ValueError, match="same key twice"):
        tri.sparse_attention(q, k, v, dup, scaling=0.2)
    oob = idx.clone()
    oob[0, 0, 0] = 30  # S = 30
    with pytest.raises(ValueError, match=r"\[-1, S\) with S=30"):
        tri.sparse_attention(q, k, v, oob, scaling=0.2)
    with pytest.raises(ValueError, match="same key twice"):
        ref.sparse_attention(q, k, v, dup, scaling=0.2)


@cpu
def test_sparse_attention_fixed_over_a_static_buffer_equals_the_reference_and_the_torch_decode_path():
    """Decode against a static cache: k / v are the whole token-major buffer (rows past the filled length hold
    junk, -1 slots are empty); the forward-only Triton launch == the reference on the filled prefix == the plain
    torch decode path."""
    dec = importlib.import_module("keye_vl.kernels.keye_dsa_decode")
    B, Hq, Hkv, D, S, C, K = 2, 8, 2, 32, 20, 32, 12
    q, k, v, idx = _attn_inputs(B, 1, S, Hq, Hkv, D, D, K, seed=7)
    kb, vb = torch.full((B, C, Hkv, D), 1e4), torch.full((B, C, Hkv, D), 1e4)  # unfilled rows: never read
    kb[:, :S], vb[:, :S] = k, v
    idx[1, 0, 5:] = -1
    want = ref.sparse_attention(q, k, v, idx, scaling=0.125)
    torch.testing.assert_close(tri.sparse_attention_fixed(q, kb.transpose(1, 2).transpose(1, 2), vb, idx, scaling=0.125),
                               want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dec.sparse_attention_decode(q, kb, vb, idx, scaling=0.125), want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# CPU: indexer KL loss
# ------------------------------------------------------------------------------------------------
def _kl_inputs(B, T, S, Hq, Hkv, Da, HI, DI, seed=0, dtype=torch.float32, device="cpu"):
    g = _gen(seed)
    aq = torch.randn(B, T, Hq, Da, generator=g).to(device=device, dtype=dtype)
    ak = torch.randn(B, S, Hkv, Da, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(B, T, HI, DI, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(B, T, HI, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, S, DI, generator=g).to(device=device, dtype=dtype)
    return aq, ak, q, w, k


@cpu
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_kl_loss_matches_reference(stage):
    B, T, S = 2, 6, 40
    aq, ak, q, w, k = _kl_inputs(B, T, S, 8, 2, 32, 4, 16, seed=21)
    key_mask = torch.rand(B, S, generator=_gen(2)) > 0.25
    key_mask[1, :30] = False  # batch 1: the first queries have no key (excluded from the mean)
    seg = torch.zeros(B, S, dtype=torch.long)
    seg[0, 37:] = 1
    cases = [dict(), dict(key_mask=key_mask, q_offset=torch.tensor([34, 31])), dict(segment_ids=seg, reduction="sum")]
    for kw in cases:
        if stage == "sparse":
            sel = {k_: v_ for k_, v_ in kw.items() if k_ != "reduction"}
            kw = dict(kw, indices=ref.dsa_topk_indices(q, w, k, 5, **sel))
        leaves = [x.clone().requires_grad_() for x in (q, w, k)]
        leaves_r = [x.clone().requires_grad_() for x in (q, w, k)]
        loss = tri.indexer_kl_loss(aq, ak, 32 ** -0.5, *leaves, **kw)
        loss_r = ref.indexer_kl_loss(aq, ak, 32 ** -0.5, *leaves_r, **kw)
        torch.testing.assert_close(loss, loss_r.float(), atol=1e-5, rtol=1e-5)
        g = torch.autograd.grad(loss * 3.0, leaves)
        g_r = torch.autograd.grad(loss_r * 3.0, leaves_r)
        for a, b in zip(g, g_r):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# GPU (H200): bf16 at 4K-64K
# ------------------------------------------------------------------------------------------------
def _row_scores(q, w, k, b, t, pos):
    """fp32 indexer scores of one query against keys [0, pos]."""
    qf = q[b, t].float()
    kf = k[b, : pos + 1].float()
    return (torch.relu(qf @ kf.T) * w[b, t].float()[:, None]).sum(0) * q.shape[-1] ** -0.5


def _assert_topk_equal_up_to_near_ties(out, expect, q, w, k, q_offset, rel=1e-4, max_rows=256):
    """Identical sets, except where every differing key's score is within fp32 rounding of the row's threshold
    (the kernel sums the bf16 products in another order than torch's fp32 matmul)."""
    diff_rows = (out != expect).any(-1).nonzero().tolist()
    assert len(diff_rows) <= max(8, out.shape[0] * out.shape[1] // 20), f"{len(diff_rows)} rows differ"
    for b, t in diff_rows[:max_rows]:
        pos = int(q_offset[b]) + t if torch.is_tensor(q_offset) else q_offset + t
        sc = _row_scores(q, w, k, b, t, pos)
        a, e = set(out[b, t].tolist()) - {-1}, set(expect[b, t].tolist()) - {-1}
        assert len(a) == len(e), (b, t)
        thr = sc[sorted(e)].min()
        tol = rel * (float(sc.abs().max()) + 1.0)
        for s in a ^ e:
            assert abs(float(sc[s] - thr)) <= tol, (b, t, s, float(sc[s]), float(thr))


@gpu
@needs_cuda
@pytest.mark.parametrize("T,S,B", [(4096, 4096, 1), (16384, 16384, 1), (65536, 65536, 1), (2, 65536, 4)],
                         ids=["prefill-4K", "prefill-16K", "prefill-64K", "decode-64K-B4"])
def test_gpu_topk_bf16_matches_reference(T, S, B, monkeypatch):
    q, w, k = _indexer_inputs(B, T, S, 16, 64, seed=T + S, dtype=torch.bfloat16, device="cuda")
    topk_mod = _tri_parts[1]
    before = dict(topk_mod.STATS)
    out = tri.dsa_topk_indices(q, w, k, 2048)
    _check_layout(out, S, 2048)
    fell_back = topk_mod.STATS["fallback_rows"] - before["fallback_rows"]
    assert fell_back <= max(2, B * T // 1000), f"{fell_back} rows fell back to the buffered path"
    if T <= 16384:  # fused (candidate lists) == buffered (score buffer) bitwise: same scores, exact selection
        with monkeypatch.context() as mp:
            mp.setitem(tri.TOPK_CONFIG, "fused_candidates", False)
            assert torch.equal(out, tri.dsa_topk_indices(q, w, k, 2048))
    expect = ref.dsa_topk_indices(q, w, k, 2048, chunk_size=256 if B * T > 256 else None)
    _assert_topk_equal_up_to_near_ties(out, expect, q, w, k, S - T)
    assert torch.equal(out, tri.dsa_topk_indices(q, w, k, 2048)), "top-k not bitwise reproducible"


@gpu
@needs_cuda
def test_gpu_topk_masks_and_ties():
    B, T, S = 2, 3000, 5000
    q, w, k = _indexer_inputs(B, T, S, 16, 64, seed=3, dtype=torch.bfloat16, device="cuda")
    k[:, 1000:3000] = k[:, 999:1000]  # 2000 identical keys: exact ties across the k-th place
    key_mask = torch.rand(B, S, device="cuda") > 0.1
    qo = torch.tensor([2000, 1000], device="cuda")
    out = tri.dsa_topk_indices(q, w, k, 2048, key_mask=key_mask, q_offset=qo)
    _check_layout(out, S, 2048)
    expect = ref.dsa_topk_indices(q, w, k, 2048, key_mask=key_mask, q_offset=qo, chunk_size=256)
    assert not bool(((out >= 0) & ~key_mask.gather(1, out.clamp(min=0).view(B, -1)).view(out.shape)).any())
    _assert_topk_equal_up_to_near_ties(out, expect, q, w, k * key_mask[..., None], qo)


@gpu
@needs_cuda
def test_gpu_sparse_attention_bf16_fwd_bwd():
    B, T, S, Hq, Hkv, D, K = 1, 1024, 8192, 32, 4, 128, 2048
    q, w, k = _indexer_inputs(B, T, S, 16, 64, seed=1, dtype=torch.bfloat16, device="cuda")
    idx = tri.dsa_topk_indices(q, w, k, K)
    g = torch.Generator(device="cuda").manual_seed(0)
    aq = torch.randn(B, T, Hq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    ak = torch.randn(B, S, Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
    av = torch.randn(B, S, Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
    idx[0, 5] = -1
    leaves = [x.clone().requires_grad_() for x in (aq, ak, av)]
    leaves_r = [x.float().requires_grad_() for x in (aq, ak, av)]
    o, lse = tri.sparse_attention(*leaves, idx, scaling=D ** -0.5, return_lse=True)
    o_r, lse_r = ref.sparse_attention(*leaves_r, idx, scaling=D ** -0.5, return_lse=True)
    assert not torch.isnan(o).any() and bool((o[0, 5] == 0).all())
    rel = lambda a, b: float((a.float() - b).norm() / b.norm().clamp_min(1e-12))  # noqa: E731
    assert rel(o, o_r) < 1e-2
    fin = torch.isfinite(lse_r)
    assert float((lse[fin] - lse_r[fin]).abs().max()) < 2e-2
    do = torch.randn(o.shape, device="cuda", generator=g, dtype=torch.bfloat16)
    grads = torch.autograd.grad(o, leaves, do)
    grads_r = torch.autograd.grad(o_r, leaves_r, do.float())
    for a, b in zip(grads, grads_r):
        assert not torch.isnan(a).any()
        assert rel(a, b) < 2e-2


def _assert_gpu_kl_matches_reference(aq, ak, q, w, k, **kw):
    """bf16 Triton indexer KL (value and gradients in q, w, k) against the fp32 reference, head_dim 128."""
    leaves = [x.clone().requires_grad_() for x in (q, w, k)]
    leaves_r = [x.float().requires_grad_() for x in (q, w, k)]
    loss = tri.indexer_kl_loss(aq, ak, 128 ** -0.5, *leaves, **kw)
    loss_r = ref.indexer_kl_loss(aq.float(), ak.float(), 128 ** -0.5, *leaves_r, **kw)
    assert abs(float(loss) - float(loss_r)) <= 2e-2 * abs(float(loss_r)) + 1e-4
    g = torch.autograd.grad(loss, leaves)
    g_r = torch.autograd.grad(loss_r, leaves_r)
    for a, b in zip(g, g_r):
        assert float((a.float() - b).norm() / b.norm().clamp_min(1e-12)) < 3e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_gpu_indexer_kl_bf16(stage):
    B, T, S = 1, 1024, 2048
    aq, ak, q, w, k = _kl_inputs(B, T, S, 32, 4, 128, 16, 64, seed=5, dtype=torch.bfloat16, device="cuda")
    kw = {} if stage == "dense" else dict(indices=tri.dsa_topk_indices(q, w, k, 512))
    _assert_gpu_kl_matches_reference(aq, ak, q, w, k, **kw)


@gpu
@needs_cuda
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_gpu_indexer_kl_bf16_packed_sequences(stage):
    """Packed sequences (segment_ids) and padding (key_mask) on the GPU build: this combination once failed to
    compile with Triton 3.6 (TritonGPURemoveLayoutConversions); both stages equal the reference."""
    B, T, S = 2, 1024, 1024
    aq, ak, q, w, k = _kl_inputs(B, T, S, 32, 4, 128, 16, 64, seed=9, dtype=torch.bfloat16, device="cuda")
    seg = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([300, 500, 224], device="cuda"))
    seg = torch.stack([seg, seg.flip(0)])
    key_mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
    key_mask[1, -100:] = False
    kw = dict(segment_ids=seg, key_mask=key_mask)
    if stage == "sparse":
        kw["indices"] = tri.dsa_topk_indices(q, w, k, 256, **kw)
    _assert_gpu_kl_matches_reference(aq, ak, q, w, k, **kw)


# ------------------------------------------------------------------------------------------------
# CPU, slow: every main kernel variant compiles for sm_90 (Hopper) without a GPU (ahead-of-time)
# ------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from keye_vl.kernels import keye_dsa_triton as K, keye_dsa_triton_topk as TK, keye_dsa_triton_kl as KL
bad = []
def comp(fn, types, consts, warps, stages):
    sig = {a: types.get(a, "i32") for a in fn.arg_names if a not in consts}
    sig.update({c: "constexpr" for c in consts})
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    except Exception as e:
        bad.append(f"{fn.__name__} {consts}: {str(e)[:300]}")
t = {"q_ptr": "*bf16", "w_ptr": "*fp32", "k_ptr": "*bf16", "km_ptr": "*i8", "seg_ptr": "*i64", "qoff_ptr": "*i64",
     "out_ptr": "*i32", "thr_ptr": "*i64", "cand_ptr": "*i64", "cnt_ptr": "*i32", "scale": "fp32", "smp_ptr": "*i64"}
for mode, cand in itertools.product([0, 2], [False, True]):
    comp(TK._indexer_score_kernel, t, dict(H=16, HP=16, D=64, BQ=16 if mode == 2 else 1, BK=64 if mode == 2 else 128,
         HAS_KM=True, HAS_SEG=True, UPCAST=False, PRECISION="tf32", MODE=mode, CAND_OUT=cand, CAPS=8192), 4, 3)
comp(TK._sample_thr_kernel, t, dict(H=16, HP=16, D=64, SAMPLE=1024, SB=128, TOPK=2048, HAS_KM=True, HAS_SEG=True,
     UPCAST=False, PRECISION="tf32"), 4, 2)
for inkeys, final in [(False, True), (False, False), (True, True)]:
    comp(TK._topk_select_kernel, {"src_ptr": "*i64" if inkeys else "*i32", "qoff_ptr": "*i64", "scratch_ptr": "*i64",
         "out_ptr": "*i64", "kth_ptr": "*i64"}, dict(TOPK=2048, CAND=2048, CAP=4096, BLOCK=1024,
         SAMPLE=0 if inkeys else 1024, IN_KEYS=inkeys, FINAL=final), 4, 1)
comp(TK._cand_select_kernel, {"cand_ptr": "*i64", "cnt_ptr": "*i32", "thr_ptr": "*i64", "scratch_ptr": "*i64",
     "out_ptr": "*i64", "fail_ptr": "*i8"}, dict(TOPK=2048, CAPS=8192, CAPC=8192, BLOCK=1024), 8, 1)
ta = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "idx_ptr": "*i64", "o_ptr": "*bf16", "lse_ptr": "*fp32",
      "scale_log2": "fp32", "do_ptr": "*bf16", "delta_ptr": "*fp32", "dq_ptr": "*bf16", "dk_ptr": "*fp32",
      "dv_ptr": "*fp32", "scale": "fp32"}
meta = dict(G=8, GP=16, D=128, DP=128, DV=128, DVP=128, UPCAST=False, PRECISION="tf32")
comp(K._sparse_attn_fwd_kernel, ta, dict(meta, BK=128), 4, 2)
comp(K._sparse_attn_bwd_kernel, ta, dict(meta, BK=32), 4, 1)
t1 = {"aq_ptr": "*bf16", "ak_ptr": "*bf16", "idx_ptr": "*i64", "km_ptr": "*i8", "seg_ptr": "*i64", "qoff_ptr": "*i64",
      "lse_ptr": "*fp32", "scale_log2": "fp32", "q_ptr": "*bf16", "w_ptr": "*fp32", "k_ptr": "*bf16", "kl_ptr": "*fp32",
      "cnt_ptr": "*i32", "dq_ptr": "*fp32", "dw_ptr": "*fp32", "dk_ptr": "*fp32", "ci": "fp32", "inv_hq": "fp32"}
for sparse in (False, True):
    c = dict(G=8, GP=16, DA=128, DAP=128, BK=64, SPARSE=sparse, HAS_KM=True, HAS_SEG=True, UPCAST=False,
             PRECISION="tf32")
    comp(KL._kl_main_lse_kernel, t1, c, 4, 2)
    comp(KL._kl_token_kernel, t1, dict(c, HKV=4, HI=16, HIP=16, DI=64, GRAD=True), 4, 2)
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


@pytest.mark.slow
@cpu
def test_kernels_compile_for_hopper_ahead_of_time():
    """The GPU build of every main kernel (bf16, all masks, both top-k paths) compiles for sm_90 here, without
    a GPU, in a subprocess without the interpreter (catches Triton compile errors before a device run)."""
    import subprocess
    import sys

    env = {k_: v_ for k_, v_ in os.environ.items() if k_ != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
