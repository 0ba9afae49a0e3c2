"""Per-kernel CUDA time of the DSA Triton path (torch.profiler), to see where a DSA call spends its time.

Workloads (full-size shapes, bf16): decode top-k at 128K x batch 32, prefill top-k at ``--context``, sparse
attention forward and forward+backward at ``--context``. Prints, per workload, each kernel's total ms per call
and writes the same as JSON to ``--output``. Run on the GPU machine: ``python benchmarks/profile_dsa.py``.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dsa_attention import DI, HI, HKV, HQ, TOPK, D, _import_kernels, _topk_stats, rnd  # noqa: E402


def profile(fn, reps=3):
    """{kernel name: ms per call} over ``reps`` calls after a warm-up call."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    tot = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:80]] += ev.device_time_total / 1e3 / reps
    return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, default=65536)
    p.add_argument("--decode-context", type=int, default=131072)
    p.add_argument("--decode-batch", type=int, default=32)
    p.add_argument("--set", action="append", default=[], help="CONFIG override key=value (top-k or attention)")
    p.add_argument("--output", default="profile_dsa.json")
    a = p.parse_args(argv)
    tri = _import_kernels()
    for kv in a.set:
        key, val = kv.split("=")
        cfg = tri.TOPK_CONFIG if key in tri.TOPK_CONFIG else tri.CONFIG
        cfg[key] = type(cfg[key])(val)
    res = {}
    B, S = a.decode_batch, a.decode_context
    qd, wd, kd = rnd(B, 1, HI, DI), rnd(B, 1, HI, scale=0.25), rnd(B, S, DI)
    res["decode_topk"] = profile(lambda: tri.dsa_topk_indices(qd, wd, kd, TOPK), reps=10)
    del qd, wd, kd
    S = a.context
    qi, wi, ki = rnd(1, S, HI, DI), rnd(1, S, HI, scale=0.25), rnd(1, S, DI)
    before = dict(_topk_stats(tri))
    res["prefill_topk"] = profile(lambda: tri.dsa_topk_indices(qi, wi, ki, TOPK))
    res["prefill_topk_stats"] = {k: _topk_stats(tri)[k] - before[k] for k in before}
    idx = tri.dsa_topk_indices(qi, wi, ki, TOPK)
    del qi, wi, ki
    q, k, v = rnd(1, S, HQ, D), rnd(1, S, HKV, D), rnd(1, S, HKV, D)
    res["sparse_fwd"] = profile(lambda: tri.sparse_attention(q, k, v, idx, scaling=D ** -0.5))
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    do = torch.randn_like(q)
    res["sparse_fwd_bwd"] = profile(
        lambda: torch.autograd.grad(tri.sparse_attention(q, k, v, idx, scaling=D ** -0.5), (q, k, v), do), reps=2)
    for name, d in res.items():
        print(name)
        for kname, ms in d.items():
            print(f"  {ms:10.3f}  {kname}")
    from _meta import run_meta

    res["meta"] = run_meta()
    with open(a.output, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
