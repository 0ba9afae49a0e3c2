"""Tests of the DSA torch reference (kernels/keye_dsa_reference.py) against independent brute force.

Small k (16 or less) and odd sizes; every failure mode of docs/dsa_kernels.md that applies to the
reference has a test here (the number in brackets in a test's docstring). CPU only, about a minute.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from keye_vl.kernels.keye_dsa_reference import (
    dsa_indexer_scores,
    dsa_topk_indices,
    hadamard_transform,
    indexer_kl_loss,
    sparse_attention,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and immune to OpenMP oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# independent brute force: explicit [B, T, S] tensors, Python loops for the top-k rule
# ------------------------------------------------------------------------------------------------
def bf_allowed(B, T, S, q_offset=None, key_mask=None, segment_ids=None):
    if q_offset is None:
        q_offset = S - T
    off = torch.as_tensor(q_offset).expand(B) if not isinstance(q_offset, torch.Tensor) or q_offset.dim() == 0 \
        else q_offset
    allowed = torch.zeros(B, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            p = int(off[b]) + t
            for s in range(S):
                ok = s <= p
                if key_mask is not None:
                    ok = ok and bool(key_mask[b, s])
                if segment_ids is not None:
                    ok = ok and int(segment_ids[b, s]) == int(segment_ids[b, p])
                allowed[b, t, s] = ok
    return allowed


def bf_scores(q, w, k):
    """[B, T, S] = sum_h w * D^-1/2 * relu(q_h . k_s), in float64, no mask."""
    D = q.shape[-1]
    dots = torch.einsum("bthd,bsd->bths", q.to(F64), k.to(F64))
    return torch.einsum("bth,bths->bts", w.to(F64), torch.relu(dots)) / math.sqrt(D)


def bf_topk(scores, allowed, topk):
    """Python rule: allowed keys ordered by (score desc with NaN = -inf, position asc); first topk; sorted."""
    B, T, S = scores.shape
    out = torch.full((B, T, topk), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            cand = []
            for s in range(S):
                if allowed[b, t, s]:
                    v = float(scores[b, t, s])
                    cand.append((-(v if v == v else -math.inf), s))
            cand.sort()
            sel = sorted(s for _, s in cand[:topk])
            out[b, t, : len(sel)] = torch.tensor(sel, dtype=torch.long)
    return out


def index_mask(indices, S):
    B, T, K = indices.shape
    m = torch.zeros(B, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for j in range(K):
                s = int(indices[b, t, j])
                if s >= 0:
                    m[b, t, s] = True
    return m


def bf_attention(q, k, v, mask, scaling):
    """Dense masked attention in float64 with explicit [B, Hq, T, S] logits; empty rows give 0."""
    Hq, Hkv = q.shape[2], k.shape[2]
    G = Hq // Hkv
    kr = k.to(F64).repeat_interleave(G, dim=2)
    vr = v.to(F64).repeat_interleave(G, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q.to(F64), kr) * scaling
    logits = logits.masked_fill(~mask[:, None], -math.inf)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, vr)


def sdpa_dense(q, k, v, mask, scaling):
    G = q.shape[2] // k.shape[2]
    kr = k.repeat_interleave(G, dim=2).transpose(1, 2)
    vr = v.repeat_interleave(G, dim=2).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kr, vr, attn_mask=mask[:, None], scale=scaling)
    return out.transpose(1, 2)


def bf_kl(aq, ak, scaling, q, w, k, allowed, sel=None, reduction="mean"):
    """Explicit KL(p || softmax(I)); sel [B, T, S] restricts both distributions (sparse stage)."""
    G = aq.shape[2] // ak.shape[2]
    support = allowed if sel is None else (allowed & sel)
    logits = torch.einsum("bthd,bshd->bhts", aq.to(F64), ak.to(F64).repeat_interleave(G, dim=2)) * scaling
    pa = torch.softmax(logits.masked_fill(~support[:, None], -math.inf), dim=-1).nan_to_num(0.0).sum(1)
    p = pa / pa.sum(-1, keepdim=True).clamp_min(1e-300)
    I = bf_scores(q, w, k).masked_fill(~support, -math.inf)
    logq = torch.log_softmax(I, dim=-1)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - logq), torch.zeros_like(p)).sum(-1)
    rows = support.any(-1)
    total = kl[rows].sum()
    return total / max(int(rows.sum()), 1) if reduction == "mean" else total


def rand_indexer(B, T, S, H=3, D=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    w = torch.randn(B, T, H, generator=g, dtype=dtype)
    k = torch.randn(B, S, D, generator=g, dtype=dtype)
    return q, w, k


def rand_attn(B, T, S, Hq=4, Hkv=2, D=6, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, Hq, D, generator=g, dtype=dtype), torch.randn(B, S, Hkv, D, generator=g, dtype=dtype),
            torch.randn(B, S, Hkv, D, generator=g, dtype=dtype))


def check_index_invariants(idx, allowed, topk):
    """in range, ascending, -1 only at the end, subset of allowed, count = min(topk, #allowed)."""
    B, T, S = allowed.shape
    assert idx.dtype == torch.long and idx.shape == (B, T, topk)
    assert bool(((idx >= -1) & (idx < S)).all())
    for b in range(B):
        for t in range(T):
            row = idx[b, t].tolist()
            n = sum(1 for x in row if x >= 0)
            assert n == min(topk, int(allowed[b, t].sum()))
            assert row[n:] == [-1] * (topk - n)
            assert row[:n] == sorted(set(row[:n]))
            assert all(bool(allowed[b, t, s]) for s in row[:n])


# ------------------------------------------------------------------------------------------------
# Hadamard
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1, 2, 8, 64, 128])
def test_hadamard_orthonormal_and_sylvester(D):
    H = hadamard_transform(torch.eye(D, dtype=F64))
    assert torch.allclose(H @ H.T, torch.eye(D, dtype=F64), atol=1e-12)
    syl = torch.ones(1, 1, dtype=F64)
    while syl.shape[0] < D:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    assert torch.allclose(H, syl / math.sqrt(D), atol=1e-12)
    x = torch.randn(3, 5, D, dtype=torch.bfloat16)
    y = hadamard_transform(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.allclose(y.float(), (x.to(F64) @ syl / math.sqrt(D)).float(), atol=2e-2, rtol=2e-2)


def test_hadamard_on_q_and_k_keeps_scores():
    """[2] H applied to both q and k: (Hq).(Hk) = q.k, so the ReLU scores (and the top-k) are unchanged;
    applied to q only, they change (the shipped bug)."""
    q, w, k = rand_indexer(2, 21, 21, H=4, D=16, seed=3)
    ref = dsa_indexer_scores(q, w, k)
    rot = dsa_indexer_scores(hadamard_transform(q), w, hadamard_transform(k))
    assert torch.allclose(ref, rot, atol=1e-10)
    rq, rk = hadamard_transform(q), hadamard_transform(k)
    assert torch.equal(dsa_topk_indices(q, w, k, 5), dsa_topk_indices(rq, w, rk, 5))
    bad = dsa_indexer_scores(hadamard_transform(q), w, k)
    fin = torch.isfinite(ref)
    assert not torch.allclose(ref[fin], bad[fin], atol=1e-3)


def test_hadamard_errors():
    for bad in (torch.randn(3, 48), torch.randn(3, 3), torch.randn(2, 0)):
        with pytest.raises(ValueError):
            hadamard_transform(bad)
    with pytest.raises(ValueError):
        hadamard_transform(torch.ones(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# indexer scores and top-k
# ------------------------------------------------------------------------------------------------
def test_indexer_scores_match_bruteforce_with_masks():
    B, T, S = 2, 13, 29
    q, w, k = rand_indexer(B, T, S, seed=5)
    key_mask = torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.2
    seg = torch.tensor([[0] * 10 + [1] * 19, [3] * 25 + [4] * 4])
    off = torch.tensor([16, 9])
    got = dsa_indexer_scores(q, w, k, q_offset=off, key_mask=key_mask, segment_ids=seg)
    allowed = bf_allowed(B, T, S, off, key_mask, seg)
    ref = bf_scores(q, w, k).masked_fill(~allowed, -math.inf)
    assert got.dtype == F64 and got.shape == (B, T, S)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.allclose(got[allowed], ref[allowed], atol=1e-12)
    assert dsa_indexer_scores(q.float(), w.float(), k.float()).dtype == torch.float32


@pytest.mark.parametrize("B,T,S,topk", [(2, 37, 37, 16), (1, 50, 50, 7), (2, 23, 61, 16), (1, 33, 33, 33),
                                        (1, 40, 40, 13)])
def test_topk_matches_bruteforce(B, T, S, topk):
    """[5][11] odd sizes, k not a multiple of any block, lengths crossing k, exactly-k rows."""
    q, w, k = rand_indexer(B, T, S, seed=B * 100 + T)
    idx = dsa_topk_indices(q, w, k, topk)
    allowed = bf_allowed(B, T, S)
    assert torch.equal(idx, bf_topk(bf_scores(q, w, k), allowed, topk))
    check_index_invariants(idx, allowed, topk)


@pytest.mark.parametrize("S", [1, 2, 5, 15, 16, 17])
def test_fewer_or_exactly_k_keys_list_everything_and_match_dense(S):
    """[6][11] fewer keys than k down to 1, exactly k, just above: every allowed key is listed (pad -1),
    and then DSA == dense causal attention (torch SDPA with an explicit mask)."""
    topk = 16
    q, w, k = rand_indexer(1, S, S, seed=S)
    idx = dsa_topk_indices(q, w, k, topk)
    allowed = bf_allowed(1, S, S)
    for t in range(S):
        n = min(t + 1, topk)
        if t + 1 <= topk:
            assert idx[0, t, :n].tolist() == list(range(t + 1))
        assert idx[0, t, n:].tolist() == [-1] * (topk - n)
    aq, ak, av = rand_attn(1, S, S, dtype=torch.float32, seed=S)
    out = sparse_attention(aq, ak, av, idx, scaling=0.4)
    short = min(S, topk)  # rows whose allowed keys all fit
    ref = sdpa_dense(aq, ak, av, allowed, 0.4)
    assert torch.allclose(out[:, :short], ref[:, :short], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_dsa_equals_bruteforce_when_longer_than_k(dtype):
    """[1] explicit scores + explicit boolean top-k mask + dense softmax == indices + sparse attention."""
    B, T, S, topk = 2, 45, 53, 16
    q, w, k = rand_indexer(B, T, S, H=4, D=16, dtype=F64, seed=11)
    aq, ak, av = rand_attn(B, T, S, Hq=6, Hkv=3, D=5, dtype=F64, seed=12)
    idx = dsa_topk_indices(q, w, k, topk)
    allowed = bf_allowed(B, T, S)
    ref_idx = bf_topk(bf_scores(q, w, k), allowed, topk)
    assert torch.equal(idx, ref_idx)
    out, lse = sparse_attention(aq.to(dtype), ak.to(dtype), av.to(dtype), idx, scaling=0.3, return_lse=True)
    mask = index_mask(ref_idx, S)
    ref = bf_attention(aq, ak, av, mask, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype and torch.allclose(out.to(F64), ref, atol=tol)
    logits = torch.einsum("bthd,bshd->bths", aq, ak.repeat_interleave(2, dim=2)) * 0.3
    ref_lse = torch.logsumexp(logits.masked_fill(~mask[:, :, None], -math.inf), dim=-1)
    assert torch.allclose(lse.to(F64), ref_lse, atol=tol * 10)


def test_ties_constant_scores_lower_position_wins_every_run():
    """[5] all scores equal (q = 0): the lowest positions are taken, identically on every run and chunking."""
    B, T, S, topk = 2, 31, 31, 8
    q, w, k = rand_indexer(B, T, S, seed=2)
    q = torch.zeros_like(q)
    first = dsa_topk_indices(q, w, k, topk)
    for t in range(T):
        n = min(t + 1, topk)
        assert first[:, t, :n].tolist() == [list(range(n))] * B
    for cs in (1, 3, 8, None):
        assert torch.equal(dsa_topk_indices(q, w, k, topk, chunk_size=cs), first)
    for _ in range(3):
        assert torch.equal(dsa_topk_indices(q.float(), w.float(), k.float(), topk), first)


def test_ties_partial_and_near_ties():
    """[4][5] a block of identical keys straddles the k boundary; near-ties one ulp apart are ordered
    exactly (many scores in one coarse bin)."""
    S, topk = 40, 10
    one = torch.ones(1, S, 1, 1, dtype=F64)
    # H = 1, D = 1, q = 1, w = 1: the score of key s is relu(k[s]).
    kv = torch.linspace(0.0, 1.0, S, dtype=F64)
    kv[5:30] = 2.0  # 25 tied keys, the best ones: the last query takes the 10 lowest of them
    idx = dsa_topk_indices(one[:, -1:], one[:, -1:, 0], kv.view(1, S, 1), topk)
    assert idx[0, 0].tolist() == list(range(5, 15))
    kv[5:30] = 0.5
    kv[30:] = 0.1
    kv[35] = 3.0  # one clear winner, then 9 of the 25 tied ones (lowest first)
    idx = dsa_topk_indices(one[:, -1:], one[:, -1:, 0], kv.view(1, S, 1), topk)
    assert idx[0, 0].tolist() == list(range(5, 14)) + [35]
    # near-ties: distinct fp32 values one ulp apart around 1.0 in scrambled order
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))
    vals = torch.ones(S)
    for i in range(1, S):
        vals[i] = torch.nextafter(vals[i - 1], torch.tensor(2.0))
    kf = vals[perm].view(1, S, 1)
    idx = dsa_topk_indices(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1), kf, topk)
    assert idx[0, 0].tolist() == sorted(perm.argsort()[S - topk:].tolist())


def test_nan_and_inf_scores():
    """NaN counts as -inf; +inf first; allowed keys with -inf/NaN are still listed when fewer than k
    finite ones exist; never an out-of-range index."""
    S, topk = 24, 6
    # H = 1, D = 1, q = 1, w = -1: the score of key s is -relu(k[s]), so k = inf gives -inf.
    kv = torch.rand(S, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.1
    kv[[1, 7, 8, 20]] = float("nan")
    kv[[2, 9]] = float("inf")
    q = torch.ones(1, S, 1, 1, dtype=F64)
    w = -torch.ones(1, S, 1, dtype=F64)
    idx = dsa_topk_indices(q, w, kv.view(1, S, 1), topk)
    scores = -torch.relu(kv).view(1, 1, S).expand(1, S, S)
    allowed = bf_allowed(1, S, S)
    assert torch.equal(idx, bf_topk(scores, allowed, topk))
    check_index_invariants(idx, allowed, topk)
    assert not set(idx[0, -1].tolist()) & {1, 2, 7, 8, 9, 20}  # enough finite keys for the last query
    assert idx[0, 2].tolist() == [0, 1, 2, -1, -1, -1]  # only 3 allowed keys: all listed
    # NaN in the weights and +inf scores
    w2 = torch.ones(1, S, 1, dtype=F64)
    w2[0, 10] = float("nan")  # query 10: every score NaN -> positions 0..5
    kv2 = torch.rand(S, dtype=F64)
    kv2[3] = float("inf")
    idx2 = dsa_topk_indices(q, w2, kv2.view(1, S, 1), topk)
    assert idx2[0, 10].tolist() == list(range(topk))
    assert all(3 in idx2[0, t].tolist() for t in range(3, S) if t != 10)
    check_index_invariants(idx2, allowed, topk)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7, 16, 100])
def test_chunk_size_gives_identical_indices(chunk_size):
    """Chunking over queries never changes the result (incl. 1 and non-divisors)."""
    B, T, S = 2, 43, 59
    q, w, k = rand_indexer(B, T, S, H=4, D=16, dtype=torch.float32, seed=21)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, :9] = False
    ref = dsa_topk_indices(q, w, k, 11, key_mask=key_mask)
    assert torch.equal(dsa_topk_indices(q, w, k, 11, key_mask=key_mask, chunk_size=chunk_size), ref)


def test_tiny_internal_chunks_change_nothing(monkeypatch):
    """One query per chunk and the smallest score tiles everywhere (sparse attention has no chunk_size
    argument): same indices, same outputs and gradients, same losses."""
    import keye_vl.kernels.keye_dsa_reference as ref

    B, T, S = 2, 19, 26
    q, w, k = rand_indexer(B, T, S, seed=25)
    aq, ak, av = (x.requires_grad_() for x in rand_attn(B, T, S, seed=26))

    def run():
        idx = dsa_topk_indices(q, w, k, 6)
        out = sparse_attention(aq, ak, av, idx, scaling=0.4)
        grads = torch.autograd.grad(out.pow(2).sum(), (aq, ak, av))
        kls = [indexer_kl_loss(aq, ak, 0.4, q, w, k), indexer_kl_loss(aq, ak, 0.4, q, w, k, indices=idx)]
        return [idx, out, *grads, *kls]

    default = run()
    monkeypatch.setattr(ref, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(ref, "_TILE_Q", 1)
    monkeypatch.setattr(ref, "_TILE_FLOATS", 1)
    for a, b in zip(default, run()):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, atol=1e-12)


def test_q_offset_suffix_chunked_prefill_and_decode():
    """[10] queries that are a suffix of the keys (the indexer sees the whole history) == the same rows of
    the one-shot computation: chunked prefill (several splits) and one-token decode."""
    B, S, topk = 2, 47, 9
    q, w, k = rand_indexer(B, S, S, seed=31)
    aq, ak, av = rand_attn(B, S, S, seed=32)
    full_idx = dsa_topk_indices(q, w, k, topk)
    full_out = sparse_attention(aq, ak, av, full_idx, scaling=0.5)
    for cuts in ([0, 10, 25, 47], [0, 1, 2, 30, 46, 47], [0, 16, 17, 47]):
        for a, b in zip(cuts[:-1], cuts[1:]):  # keys: the history up to b; queries: tokens a..b-1
            idx = dsa_topk_indices(q[:, a:b], w[:, a:b], k[:, :b], topk)
            assert torch.equal(idx, full_idx[:, a:b])
            out = sparse_attention(aq[:, a:b], ak[:, :b], av[:, :b], idx, scaling=0.5)
            assert torch.allclose(out, full_out[:, a:b], atol=1e-12)
    # explicit q_offset (int and per-batch tensor), all keys present
    idx = dsa_topk_indices(q[:, 20:31], w[:, 20:31], k, topk, q_offset=20)
    assert torch.equal(idx, full_idx[:, 20:31])
    off = torch.tensor([5, 30])
    idx = dsa_topk_indices(torch.stack([q[0, 5:15], q[1, 30:40]]), torch.stack([w[0, 5:15], w[1, 30:40]]), k, topk,
                           q_offset=off)
    assert torch.equal(idx[0], full_idx[0, 5:15]) and torch.equal(idx[1], full_idx[1, 30:40])


def test_left_padded_batch_equals_each_sequence_alone():
    """[9] batched prefill with left padding (key_mask) == each sequence alone; pad queries get no key."""
    lens, topk = (19, 30), 8
    S = max(lens)
    seqs = [rand_indexer(1, n, n, seed=40 + n) for n in lens]
    atts = [rand_attn(1, n, n, seed=50 + n) for n in lens]
    q = torch.zeros(2, S, 3, 8, dtype=F64)
    w = torch.zeros(2, S, 3, dtype=F64)
    k = torch.zeros(2, S, 8, dtype=F64)
    aq = torch.zeros(2, S, 4, 6, dtype=F64)
    ak = torch.zeros(2, S, 2, 6, dtype=F64)
    av = torch.zeros(2, S, 2, 6, dtype=F64)
    key_mask = torch.zeros(2, S, dtype=torch.bool)
    for b, n in enumerate(lens):
        pad = S - n
        q[b, pad:], w[b, pad:], k[b, pad:] = (x[0] for x in seqs[b])
        aq[b, pad:], ak[b, pad:], av[b, pad:] = (x[0] for x in atts[b])
        k[b, :pad] = 100.0  # padding keys would win every score if they leaked through
        av[b, :pad] = 1e3
        key_mask[b, pad:] = True
    idx = dsa_topk_indices(q, w, k, topk, key_mask=key_mask)
    out = sparse_attention(aq, ak, av, idx, scaling=0.4)
    for b, n in enumerate(lens):
        pad = S - n
        alone = dsa_topk_indices(*seqs[b], topk)
        shifted = torch.where(alone >= 0, alone + pad, alone)
        assert torch.equal(idx[b, pad:], shifted[0])
        assert (idx[b, :pad] == -1).all()
        assert torch.allclose(out[b, pad:], sparse_attention(*atts[b], alone, scaling=0.4)[0], atol=1e-12)
        assert (out[b, :pad] == 0).all()


def test_packed_segments_equal_separate_sequences():
    """[8] packed varlen (segment_ids) == each sequence alone; no index aliases into another segment."""
    lens, topk = (13, 20, 7), 6
    S = sum(lens)
    parts = [rand_indexer(1, n, n, seed=60 + n) for n in lens]
    atts = [rand_attn(1, n, n, seed=70 + n) for n in lens]
    q, w, k = (torch.cat([p[i] for p in parts], 1) for i in range(3))
    aq, ak, av = (torch.cat([a[i] for a in atts], 1) for i in range(3))
    seg = torch.cat([torch.full((n,), j) for j, n in enumerate(lens)]).view(1, S)
    idx = dsa_topk_indices(q, w, k, topk, segment_ids=seg)
    out = sparse_attention(aq, ak, av, idx, scaling=0.4)
    start = 0
    for j, n in enumerate(lens):
        alone = dsa_topk_indices(*parts[j], topk)
        got = idx[0, start:start + n]
        assert torch.equal(got, torch.where(alone[0] >= 0, alone[0] + start, alone[0]))
        assert bool((got[got >= 0] >= start).all()) and bool((got < start + n).all())
        assert torch.allclose(out[0, start:start + n], sparse_attention(*atts[j], alone, scaling=0.4)[0], atol=1e-12)
        start += n


def test_bf16_inputs_computed_in_fp32():
    q, w, k = rand_indexer(1, 29, 29, H=4, D=32, dtype=torch.bfloat16, seed=80)
    assert torch.equal(dsa_topk_indices(q, w, k, 7), dsa_topk_indices(q.float(), w.float(), k.float(), 7))
    aq, ak, av = rand_attn(1, 29, 29, dtype=torch.bfloat16, seed=81)
    idx = dsa_topk_indices(q, w, k, 7)
    out, lse = sparse_attention(aq, ak, av, idx, scaling=0.4, return_lse=True)
    ref, ref_lse = sparse_attention(aq.float(), ak.float(), av.float(), idx, scaling=0.4, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out, ref.to(torch.bfloat16)) and torch.equal(lse, ref_lse)


def test_no_quadratic_buffer():
    """[12] no op allocates anything near an [S, S] fp32 buffer (S = 1024: 4 MiB) for top-k and attention."""
    S = 1024
    q, w, k = rand_indexer(1, S, S, H=2, D=8, dtype=torch.float32, seed=90)
    aq, ak, av = rand_attn(1, S, S, Hq=2, Hkv=1, D=8, dtype=torch.float32, seed=91)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        idx = dsa_topk_indices(q, w, k, 16, chunk_size=32)
        sparse_attention(aq, ak, av, idx, scaling=0.3)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < S * S * 4 // 4, biggest


# ------------------------------------------------------------------------------------------------
# sparse attention: masking, empty rows, gradients
# ------------------------------------------------------------------------------------------------
def test_minus_one_never_unmasks_key0():
    """[7] -1 slots (clamped for the gather) must stay masked: key 0 is a huge outlier here."""
    B, T, S = 1, 6, 12
    aq, ak, av = rand_attn(B, T, S, seed=100)
    ak[:, 0] = 50.0
    av[:, 0] = 1e4
    aq = aq.abs()
    idx = torch.tensor([[[3, 5, -1, -1], [-1, -1, -1, -1], [11, -1, -1, -1], [4, -1, 7, -1], [2, 3, 4, 6],
                         [0, 1, -1, -1]]])
    out, lse = sparse_attention(aq, ak, av, idx, scaling=0.3, return_lse=True)
    ref = bf_attention(aq, ak, av, index_mask(idx, S), 0.3)
    assert torch.allclose(out, ref, atol=1e-10)
    assert (out[0, :5].abs() < 100).all()  # only the last row lists key 0
    assert (out[0, 1] == 0).all() and torch.isneginf(lse[0, 1]).all()


def test_query_without_keys_zero_output_finite_grads():
    """[13] a query with no valid key: output 0, lse -inf, no NaN forward or backward (both via -1 lists
    and via key_mask in the top-k)."""
    B, T, S = 2, 7, 7
    q, w, k = rand_indexer(B, T, S, seed=110)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[0, :3] = False  # queries 0..2 of batch 0 have no allowed key
    idx = dsa_topk_indices(q, w, k, 4, key_mask=key_mask)
    assert (idx[0, :3] == -1).all()
    aq, ak, av = (x.requires_grad_() for x in rand_attn(B, T, S, seed=111))
    out, lse = sparse_attention(aq, ak, av, idx, scaling=0.5, return_lse=True)
    assert (out[0, :3] == 0).all() and torch.isneginf(lse[0, :3]).all()
    assert torch.isfinite(out).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for g in (aq.grad, ak.grad, av.grad):
        assert torch.isfinite(g).all()
    assert (aq.grad[0, :3] == 0).all()
    empty = torch.full((1, 3, 0), -1, dtype=torch.long)
    out0 = sparse_attention(aq[:1, :3], ak[:1], av[:1], empty, scaling=0.5)
    assert (out0 == 0).all()


def test_sparse_grads_equal_dense_grads_when_short():
    S = 11
    q, w, k = rand_indexer(1, S, S, seed=120)
    idx = dsa_topk_indices(q, w, k, 16)
    leaves = [x.requires_grad_() for x in rand_attn(1, S, S, dtype=torch.float32, seed=121)]
    sparse_attention(*leaves, idx, scaling=0.4).pow(2).sum().backward()
    g1 = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    sdpa_dense(*leaves, bf_allowed(1, S, S), 0.4).pow(2).sum().backward()
    for a, b in zip(g1, [x.grad for x in leaves]):
        assert torch.allclose(a, b, atol=1e-5)


def test_gradcheck_sparse_attention():
    B, T, S = 1, 5, 7
    aq, ak, av = (x.requires_grad_() for x in rand_attn(B, T, S, Hq=4, Hkv=2, D=3, seed=130))
    idx = torch.tensor([[[0, 2, 4, -1], [1, 6, -1, -1], [-1, -1, -1, -1], [3, 0, 5, 2], [6, -1, -1, -1]]])
    assert torch.autograd.gradcheck(lambda a, b, c: sparse_attention(a, b, c, idx, scaling=0.7), (aq, ak, av))
    assert torch.autograd.gradcheck(
        lambda a, b, c: sparse_attention(a, b, c, idx, scaling=0.7, return_lse=True)[1].clamp_min(-1e9),
        (aq, ak, av))


# ------------------------------------------------------------------------------------------------
# KL losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_dense_and_sparse_match_bruteforce(reduction):
    B, T, S, topk = 2, 17, 23, 5
    q, w, k = rand_indexer(B, T, S, seed=140)
    aq, ak, _ = rand_attn(B, T, S, Hq=6, Hkv=2, seed=141)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, :10] = False  # some queries of batch 1 have no key at all
    seg = torch.tensor([[0] * 12 + [1] * 11, [0] * 23])
    kw = dict(key_mask=key_mask, segment_ids=seg)
    allowed = bf_allowed(B, T, S, None, key_mask, seg)
    got = indexer_kl_loss(aq, ak, 0.3, q, w, k, reduction=reduction, **kw)
    assert torch.allclose(got, bf_kl(aq, ak, 0.3, q, w, k, allowed, reduction=reduction), atol=1e-12)
    idx = dsa_topk_indices(q, w, k, topk, **kw)
    got = indexer_kl_loss(aq, ak, 0.3, q, w, k, indices=idx, reduction=reduction, **kw)
    ref = bf_kl(aq, ak, 0.3, q, w, k, allowed, sel=index_mask(idx, S), reduction=reduction)
    assert torch.allclose(got, ref, atol=1e-12)
    # the sparse stage with a random (non-top-k, unsorted) subset
    g = torch.Generator().manual_seed(3)
    rnd = torch.stack([torch.stack([torch.randperm(S, generator=g)[:7] for _ in range(T)]) for _ in range(B)])
    rnd[0, 3, 2:] = -1
    got = indexer_kl_loss(aq, ak, 0.3, q, w, k, indices=rnd, reduction=reduction, **kw)
    ref = bf_kl(aq, ak, 0.3, q, w, k, allowed, sel=index_mask(rnd, S), reduction=reduction)
    assert torch.allclose(got, ref, atol=1e-12)


def test_kl_sparse_with_all_keys_equals_dense_and_chunking():
    B, T, S = 1, 14, 14
    q, w, k = rand_indexer(B, T, S, seed=150)
    aq, ak, _ = rand_attn(B, T, S, seed=151)
    dense = indexer_kl_loss(aq, ak, 0.5, q, w, k)
    idx = dsa_topk_indices(q, w, k, 16)  # T <= k: every key listed
    assert torch.allclose(indexer_kl_loss(aq, ak, 0.5, q, w, k, indices=idx), dense, atol=1e-12)
    for cs in (1, 3, 5, 100):
        assert torch.allclose(indexer_kl_loss(aq, ak, 0.5, q, w, k, chunk_size=cs), dense, atol=1e-12)
        assert torch.allclose(indexer_kl_loss(aq, ak, 0.5, q, w, k, indices=idx, chunk_size=cs), dense, atol=1e-12)
    # explicit q_offset over the full key set == the matching rows' share of the full "sum"
    rows = [indexer_kl_loss(aq[:, t:t + 1], ak[:, :t + 1], 0.5, q[:, t:t + 1], w[:, t:t + 1], k[:, :t + 1],
                            reduction="sum") for t in range(T)]
    part = indexer_kl_loss(aq[:, 4:9], ak, 0.5, q[:, 4:9], w[:, 4:9], k, q_offset=4, reduction="sum")
    assert torch.allclose(part, sum(rows[4:9]), atol=1e-12)
    # decode-style rows (queries the last keys of a growing history) add up to the one-shot "sum"
    full = sum(indexer_kl_loss(aq[:, t:t + 1], ak[:, :t + 1], 0.5, q[:, t:t + 1], w[:, t:t + 1], k[:, :t + 1],
                               reduction="sum") for t in range(T))
    assert torch.allclose(full, indexer_kl_loss(aq, ak, 0.5, q, w, k, reduction="sum"), atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_kl_gradients_only_reach_the_indexer_and_gradcheck(sparse):
    B, T, S = 1, 5, 7
    q, w, k = (x.requires_grad_() for x in rand_indexer(B, T, S, H=2, D=2, seed=160))
    aq, ak, _ = (x.requires_grad_() for x in rand_attn(B, T, S, Hq=4, Hkv=2, D=3, seed=161))
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[0, 1] = False
    idx = dsa_topk_indices(q, w, k, 3, key_mask=key_mask) if sparse else None
    loss = indexer_kl_loss(aq, ak, 0.6, q, w, k, indices=idx, key_mask=key_mask, chunk_size=3)
    loss.backward()
    assert aq.grad is None and ak.grad is None
    for x in (q, w, k):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda a, b, c: indexer_kl_loss(aq, ak, 0.6, a, b, c, indices=idx, key_mask=key_mask, chunk_size=3),
        (q, w, k))


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_errors():
    q, w, k = rand_indexer(1, 5, 5, seed=170)
    aq, ak, av = rand_attn(1, 5, 5, seed=171)
    idx = dsa_topk_indices(q, w, k, 3)
    bad_calls = [
        lambda: dsa_topk_indices(q, w, k, 0),
        lambda: dsa_topk_indices(q, w, k, 2.5),
        lambda: dsa_topk_indices(q, w, k, 3, chunk_size=0),
        lambda: dsa_topk_indices(q[..., :6], w, k[..., :6], 3),  # D_I = 6 not a power of two
        lambda: dsa_topk_indices(q, w[..., :2], k, 3),
        lambda: dsa_topk_indices(q, w, k[:, :, :4], 3),
        lambda: dsa_topk_indices(q[0], w, k, 3),
        lambda: dsa_topk_indices(q, w, k, 3, q_offset=1),  # T + offset > S
        lambda: dsa_topk_indices(q, w, k, 3, q_offset=-1),
        lambda: dsa_topk_indices(q, w, k, 3, key_mask=torch.ones(1, 5)),
        lambda: dsa_topk_indices(q, w, k, 3, segment_ids=torch.zeros(1, 4, dtype=torch.long)),
        lambda: dsa_indexer_scores(q.long(), w, k),
        lambda: sparse_attention(aq, ak[:, :, :1].expand(1, 5, 3, 6), av[:, :, :1].expand(1, 5, 3, 6), idx,
                                 scaling=1.0),  # Hq 4 % Hkv 3
        lambda: sparse_attention(aq, ak, av, idx.int(), scaling=1.0),
        lambda: sparse_attention(aq, ak, av, idx[:, :4], scaling=1.0),
        lambda: sparse_attention(aq, ak, av, torch.full_like(idx, 5), scaling=1.0),
        lambda: sparse_attention(aq, ak, av, torch.full_like(idx, -2), scaling=1.0),
        lambda: sparse_attention(aq, ak, av, torch.tensor([[[1, 1, -1]] * 5]), scaling=1.0),
        lambda: sparse_attention(aq, ak, av, torch.tensor([[[2, -1, 2]] * 5]), scaling=1.0),
        lambda: sparse_attention(aq, ak, av.float(), idx, scaling=1.0),
        lambda: sparse_attention(aq, ak[..., :4], av, idx, scaling=1.0),
        lambda: indexer_kl_loss(aq, ak, 1.0, q, w, k, reduction="max"),
        lambda: indexer_kl_loss(aq[:, :4], ak, 1.0, q, w, k),
        lambda: indexer_kl_loss(aq, ak[:, :4], 1.0, q, w, k),
        lambda: indexer_kl_loss(aq, ak, 1.0, q, w, k, indices=idx[..., None]),
        lambda: indexer_kl_loss(aq, ak, 1.0, q, w, k, chunk_size=-3),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad call #{i} did not raise")
    # unsorted but valid lists are accepted
    perm = torch.tensor([[[2, 0, -1]] * 5])
    perm[0, :2] = torch.tensor([0, -1, -1])
    sparse_attention(aq, ak, av, perm, scaling=1.0)
