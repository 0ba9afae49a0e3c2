"""benchmarks/dsa_inputs.py: structured top-k lists (exact layout, hand-derived overlap) and the indexer inputs
that give score rows of that shape."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "dsa_inputs", Path(__file__).resolve().parents[2] / "benchmarks" / "dsa_inputs.py")
dsa_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dsa_inputs)
ref = pytest.importorskip("keye_vl.kernels.keye_dsa_reference")


def test_structured_indices_layout():
    S, topk, P = 600, 112, 4  # 16 sinks + 32 local + 4 clusters of 16
    idx = dsa_inputs.structured_indices(S, topk=topk, persist=P, n_sink=16, n_local=32, cluster=16, seed=3)
    assert idx.shape == (1, S, topk) and idx.dtype == torch.int64
    x = idx[0]
    assert x[0].tolist() == [0] + [-1] * (topk - 1)
    assert x[111].tolist() == list(range(112))  # 112 visible keys: all of them
    for t in range(112, S):
        row = x[t]
        assert bool((row[1:] > row[:-1]).all()) and int(row[-1]) == t  # ascending, distinct, ends at the query
        assert row[:16].tolist() == list(range(16)) and row[-32:].tolist() == list(range(t - 31, t + 1))
        mid = row[16:-32]
        if t >= 16 + 32 + 64 + 32:  # room for 4 disjoint aligned clusters below the group's first window
            blocks = mid.view(4, 16)
            assert bool((blocks[:, 0] % 16 == 0).all()) and bool((blocks == blocks[:, :1] + torch.arange(16)).all())
    for g0 in range(200, S - P, P):  # the P queries of a group share their clusters
        assert all(torch.equal(x[g0][16:-32], x[g0 + j][16:-32]) for j in range(1, P)), g0
    assert not torch.equal(x[200][16:-32], x[204][16:-32])  # the next group draws new anchors


def test_list_stats_hand_computed():
    K, T = 8, 40
    idx = (torch.arange(T)[:, None] + torch.arange(K))[None]  # list t = [t, t + K): neighbours share K - 1 keys
    st = dsa_inputs.list_stats(idx, block=16, samples=4, start=0)
    assert st["neighbour_overlap"] == round((K - 1) / K, 4)
    assert st["union16"] == K + 15 and st["keys_per_list"] == K


def test_structured_indices_overlap_matches_the_derivation():
    # same-group neighbours share 64 sinks + 1472 cluster keys + 511 local = 2047 of 2048; group boundaries share
    # the sinks and the local window (575) plus the rare coincident cluster: (3 * 2047 + 575) / 4 / 2048 = 0.8197
    idx = dsa_inputs.structured_indices(131072, T=512, persist=4, seed=1)  # the last 512 queries of 128K
    st = dsa_inputs.list_stats(idx, samples=16, start=0)
    assert 0.815 <= st["neighbour_overlap"] <= 0.84
    x = idx[0]
    for t0 in range(0, 512 - 16, 48):  # blocks aligned to the groups: 64 + (512 + 15) + 4 x 1472 = 6479 keys, fewer
        n = int(torch.unique(x[t0:t0 + 16]).numel())  # only where two groups drew the same of ~2K blocks (rare)
        assert 6479 - 6 * 64 <= n <= 6479, (t0, n)


def test_structured_indexer_inputs_give_structured_rows():
    S, T = 8192, 48
    res = {}
    for P in (1, 4):
        q, w, k = dsa_inputs.structured_indexer_inputs(S, persist=P, seed=2)
        assert q.shape == (1, S, 16, 64) and w.shape == (1, S, 16) and k.shape == (1, S, 64)
        out = ref.dsa_topk_indices(q[:, -T:], w[:, -T:], k, 2048, q_offset=S - T)
        assert bool(((out[0] < 64).sum(1) == 64).all())  # every row keeps the 64 sinks
        res[P] = dsa_inputs.list_stats(out, start=0, samples=2)["neighbour_overlap"]
        s = ref.dsa_indexer_scores(q[:, -1:], w[:, -1:], k, q_offset=S - 1)[0, 0]
        assert int((s == 0).sum()) > S // 2  # ReLU zeros: exact ties in most of the row
    assert res[4] > res[1] + 0.3, res
