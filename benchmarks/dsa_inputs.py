"""Benchmark inputs for DSA that look like real selections, beside random ones.

Random indexer inputs give top-k lists with almost no structure: neighbouring queries share a few percent of
their keys and 16 adjacent queries together list ~24K distinct keys at 128K. Real selections are not like that:
attention sinks, a local window and clusters of contiguous keys that stay selected for several consecutive queries
(the Keye-VL-2.0 report gives about 8K distinct keys for 16 adjacent queries; GLM-5 / LiteDSA report 6-7x
deduplication). A kernel that exploits that overlap has to be judged on both kinds.

* :func:`structured_indices`: exact lists, ``n_sink`` sink keys + the ``n_local`` most recent keys + clusters of
  ``cluster`` contiguous keys whose anchors persist for ``persist`` consecutive queries (P). The clusters are
  distinct aligned blocks drawn at random between the sinks and the local window (sorted, disjoint from both). With the defaults (64 + 512 +
  23 x 64 = 2048) and P = 4, neighbours share ~82% of their keys (3 of 4 neighbour pairs share all clusters) and a
  16-query block lists ~6.5K distinct keys.
* :func:`structured_indexer_inputs`: indexer ``q, w, k`` whose scores have that shape (a sink head, a locality head,
  cluster heads whose queries repeat for P consecutive positions), so the top-k kernels see score rows with sinks,
  recency, persistent clusters and many exact ReLU zeros; their top-k is not exactly :func:`structured_indices`
  (measure it with :func:`list_stats`).
* :func:`list_stats`: neighbour overlap and the distinct keys of query blocks, measured on a sample of rows.
"""
from __future__ import annotations

import math

import torch

__all__ = ["structured_indices", "structured_indexer_inputs", "list_stats"]


def structured_indices(S: int, T: int | None = None, topk: int = 2048, persist: int = 4, *, n_sink: int = 64,
                       n_local: int = 512, cluster: int = 64, seed: int = 0, device="cpu") -> torch.Tensor:
    """Structured top-k lists for the last ``T`` queries of a causal sequence of ``S`` tokens.

    Args:
        S: keys (= the sequence length); query ``t`` sits at position ``S - T + t`` and sees keys ``[0, pos]``.
        T: queries (default ``S``).
        topk: list length. Rows with at most ``topk`` visible keys list all of them (as DSA does).
        persist: P, consecutive queries that share their cluster anchors (query groups ``t // P``).
        n_sink, n_local, cluster: sizes of the parts; ``(topk - n_sink - n_local)`` must be a multiple of
            ``cluster``. Rows too short for that many disjoint clusters list the clusters that fit and fill up
            with the keys just below the local window (still exactly ``topk`` distinct keys).
        seed: anchors are drawn from ``torch.Generator().manual_seed(seed)`` (CPU), the same on every device.

    Returns:
        int64 ``[1, T, topk]``: positions ascending, ``-1`` padding at the end for rows with fewer keys.

    Raises:
        ValueError: on sizes that do not add up (e.g. ``n_sink + n_local > topk``, a non-multiple remainder).
    """
    T = S if T is None else int(T)
    if not (0 < T <= S) or topk < 1 or persist < 1:
        raise ValueError(f"need 0 < T <= S, topk >= 1, persist >= 1; got S={S}, T={T}, topk={topk}, P={persist}")
    rest = topk - n_sink - n_local
    if n_sink < 0 or n_local < 1 or cluster < 1 or rest < 0 or rest % cluster or n_sink % cluster:
        raise ValueError(f"topk - n_sink - n_local must be a non-negative multiple of cluster, and n_sink a multiple "
                         f"of cluster (got topk={topk}, n_sink={n_sink}, n_local={n_local}, cluster={cluster})")
    n_clu = rest // cluster
    pos = torch.arange(S - T, S, dtype=torch.int64)  # [T]
    out = torch.full((T, topk), -1, dtype=torch.int64)
    # group anchors: the region below the local window of the group's FIRST query holds aligned blocks
    # [n_sink / c, hi_g) with hi_g = floor((p_g - n_local + 1) / c); valid for every later query of the group.
    G = -(-T // persist)
    g_first = pos[::persist]  # [G]
    lo_blk = n_sink // cluster
    hi_blk = torch.div(g_first - n_local + 1, cluster, rounding_mode="floor")
    avail = hi_blk - lo_blk  # [G] blocks available
    gen = torch.Generator().manual_seed(seed)
    # n distinct sorted blocks out of avail: j_i = i + s_i with s sorted in [0, avail - n] (strictly increasing)
    u = torch.rand(G, max(n_clu, 1), generator=gen, dtype=torch.float64)
    slack = (avail - n_clu + 1).clamp(min=1).double()[:, None]
    s_sorted = torch.floor(u * slack).long().sort(dim=1).values
    blk = lo_blk + torch.arange(max(n_clu, 1)) + s_sorted  # [G, n]
    full = (pos + 1 > topk) & (avail.repeat_interleave(persist)[:T] >= n_clu)
    out = out.to(device)
    if bool(full.any()):  # the bulk of the rows, built on ``device``
        rows = full.nonzero().flatten().to(device)
        p = pos.to(device)[rows]
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        parts = [ar(n_sink).expand(rows.numel(), n_sink)]
        if n_clu:
            b = blk.to(device)[rows // persist]  # [R, n_clu]
            parts.append((b[:, :, None] * cluster + ar(cluster)).reshape(rows.numel(), -1))
        parts.append(p[:, None] - n_local + 1 + ar(n_local))
        out[rows] = torch.cat(parts, 1)
    for r in (~full).nonzero().flatten().tolist():  # short rows (near the start): dense, or a partial structure
        p = int(pos[r])
        if p + 1 <= topk:
            out[r, :p + 1] = torch.arange(p + 1, device=device)
            continue
        chosen = torch.zeros(p + 1, dtype=torch.bool)
        chosen[:n_sink] = True
        chosen[p - n_local + 1:] = True
        a = int(avail[r // persist])
        for j in range(lo_blk, lo_blk + max(0, min(n_clu, a))):
            chosen[j * cluster:(j + 1) * cluster] = True
        need = topk - int(chosen.sum())
        free = (~chosen).nonzero().flatten().flip(0)[:need]  # the keys just below the local window
        chosen[free] = True
        out[r] = chosen.nonzero().flatten().to(device)
    return out.unsqueeze(0)


def list_stats(idx: torch.Tensor, block: int = 16, samples: int = 64, start: int | None = None) -> dict:
    """Overlap statistics of top-k lists ``idx`` ``[1, T, K]`` (``-1`` = empty), on ``samples`` query blocks spread
    evenly over rows ``[start, T)`` (default: the second half, where rows are full).

    Returns a dict: ``neighbour_overlap`` (mean of ``|L_t & L_t+1| / |L_t|``), ``union{block}`` (mean number of
    distinct keys listed by ``block`` adjacent queries), ``union{block}_over_k`` (that / K: 1 = identical lists,
    ``block`` = disjoint ones), ``keys_per_list`` (mean listed keys).
    """
    x = idx[0]
    T, K = x.shape
    start = T // 2 if start is None else start
    if T - start < block + 1:
        raise ValueError(f"need at least {block + 1} rows after row {start} (T={T})")
    firsts = torch.linspace(start, T - block - 1, samples).long().unique()
    ov, un, nk = [], [], []
    for f in firsts.tolist():
        rows = x[f:f + block + 1]
        for t in range(block):
            a, b = rows[t][rows[t] >= 0], rows[t + 1][rows[t + 1] >= 0]
            if a.numel():
                ov.append(float(torch.isin(a, b).sum()) / a.numel())
        blk = rows[:block]
        un.append(int(torch.unique(blk[blk >= 0]).numel()))
        nk.append(float((blk >= 0).sum()) / block)
    mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
    return {"neighbour_overlap": round(mean(ov), 4), f"union{block}": round(mean(un), 1),
            f"union{block}_over_k": round(mean(un) / K, 3), "keys_per_list": round(mean(nk), 1), "rows_sampled": len(un)}


def structured_indexer_inputs(S: int, persist: int = 4, H: int = 16, D: int = 64, *, n_sink: int = 64,
                              window: int = 512, cluster: int = 64, anchors_per_head: int = 2, seed: int = 0,
                              device="cpu", dtype=torch.float32):
    """Indexer inputs (queries = keys = ``S`` tokens) whose score rows have sinks, recency and persistent clusters.

    Key ``s`` (one key head, ``D`` dims): a sink flag (dim 0, keys ``< n_sink``), 15 frequency pairs of its position
    (dims 2-31, periods from ``window`` up, geometric: a recency kernel peaked at distance 0), and the random unit
    code of its block of ``cluster`` keys (dims 32 on). Query heads: head 0 reads the sink flag, head 1 the recency
    features at the query's position, heads 2.. the codes of ``anchors_per_head`` anchor blocks each (anchors drawn
    below the query and shared by ``persist`` consecutive queries) minus a bias (dim 1 of every key is 1), so that
    ReLU zeroes their products with other blocks: rows carry many exact zeros, as real ones do. Weights: 1.

    Returns ``q [1, S, H, D]``, ``w [1, S, H]``, ``k [1, S, D]`` in ``dtype`` on ``device``.
    Raises ValueError for ``H < 3`` or ``D < 48``.
    """
    if H < 3 or D < 48:
        raise ValueError(f"need H >= 3 heads and D >= 48 dims (sink, recency, codes); got H={H}, D={D}")
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(S, dtype=torch.float64)
    nf = 15
    periods = 2 * window * (8.0 ** (torch.arange(nf, dtype=torch.float64) / (nf - 1)))  # 2 .. 16 windows
    ang = 2 * math.pi * pos[:, None] / periods  # [S, nf]
    rec = torch.cat([torch.cos(ang), torch.sin(ang)], 1) / math.sqrt(nf)  # q.k = mean_f cos(w_f (p - s))
    dc = D - 32
    nblk = -(-S // cluster)
    codes = torch.randn(nblk, dc, generator=gen, dtype=torch.float64)
    codes /= codes.norm(dim=1, keepdim=True)
    k = torch.zeros(S, D, dtype=torch.float64)
    k[:n_sink, 0] = 1.0
    k[:, 1] = 1.0  # bias: cluster heads subtract 1.2, so ReLU zeroes their products with non-anchor blocks
    k[:, 2:32] = rec
    k[:, 32:] = codes[torch.arange(S) // cluster]
    q = torch.zeros(S, H, D, dtype=torch.float64)
    q[:, 0, 0] = 8.0  # sinks: score 8
    q[:, 1, 2:32] = rec * 4.0  # recency: 4 * mean_f cos(w_f (p - s)) - 2.2: > 0 only near the query
    q[:, 1, 1] = -2.2
    G = -(-S // persist)
    na = (H - 2) * anchors_per_head
    first = torch.arange(G) * persist
    hi = torch.clamp(torch.div(first - window, cluster, rounding_mode="floor"), min=1)  # blocks below the window
    a = (torch.rand(G, na, generator=gen, dtype=torch.float64) * hi[:, None]).long()  # [G, na] anchor blocks
    qa = codes[a].view(G, H - 2, anchors_per_head, dc).sum(2) * 2.0  # [G, H-2, dc]: 2 on an anchor's keys
    q[:, 2:, 32:] = qa.repeat_interleave(persist, 0)[:S]
    q[:, 2:, 1] = -1.2
    w = torch.ones(S, H, dtype=torch.float64)
    cast = dict(device=device, dtype=dtype)
    return q[None].to(**cast), w[None].to(device=device, dtype=torch.float32), k[None].to(**cast)
