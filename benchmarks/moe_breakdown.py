"""Where the time of one MoE layer goes (full size: 8,192 tokens, 128 experts top-8, hidden 2048, I 768, bf16).

Times each stage of ``KeyeVL2Experts``' grouped path on its own, the whole block, and the dense GEMMs of the
same active FLOPs; and the grouped GEMMs again with K-major expert weights (the ``[E, out, in]`` storage that
transformers' own experts use) to see what the checkpoint's ``[E, in, out]`` layout costs. JSON on stdout.

    python benchmarks/moe_breakdown.py            # CUDA
    python benchmarks/moe_breakdown.py --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import Clock, bench, build, import_keye, keye_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--tokens", type=int, default=8192)
    args = p.parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    mk = import_keye()
    from keye_vl.modeling_keye.modeling_keye_vl_2 import KeyeVL2SparseMoeBlock, _grouped_mm

    cfg = keye_config(mk, args.tiny)
    N = 64 if args.tiny else args.tokens
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    clock = Clock(device)
    reps = 2 if args.tiny else 30
    t = lambda fn: bench(fn, clock, warmup=1 if args.tiny else 5, reps=reps)  # noqa: E731
    torch.manual_seed(0)
    block = build(KeyeVL2SparseMoeBlock, cfg, device, dtype)
    with torch.no_grad():
        for prm in block.parameters():
            prm.normal_(0, 0.02)
    ex = block.experts
    x = torch.randn(1, N, H, device=device, dtype=dtype)
    flops = 2 * N * k * (H * 2 * I + I * H)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tokens": N, "active_gflop": flops / 1e9}
    with torch.inference_mode():
        xf = x.view(N, H)
        logits = block.gate(xf).float()
        w, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(dtype)
        counts = torch.bincount(idx.flatten(), minlength=E)
        res["tokens_per_expert_min_max"] = [int(counts.min()), int(counts.max())]
        a = torch.randn(N * k, H, device=device, dtype=dtype)
        hh = torch.randn(N * k, I, device=device, dtype=dtype)
        w1 = torch.randn(H, 2 * I, device=device, dtype=dtype)
        w2 = torch.randn(I, H, device=device, dtype=dtype)
        res["dense_gemms"] = t(lambda: (a @ w1, hh @ w2))
        res["block_total"] = t(lambda: block(x))
        res["router"] = t(lambda: torch.topk(torch.softmax(block.gate(xf).float(), -1), k, dim=-1))
        res["experts_total"] = t(lambda: ex(xf, idx, w))
        flat = idx.reshape(-1)
        se, order = torch.sort(flat, stable=True)
        ar = torch.arange(E, device=device, dtype=se.dtype)
        res["sort_offsets_int64_keys"] = t(lambda: torch.searchsorted(torch.sort(flat, stable=True)[0], ar, right=True, out_int32=True))
        f16, ar16 = flat.to(torch.int16), ar.to(torch.int16)
        res["sort_offsets"] = t(lambda: torch.searchsorted(torch.sort(f16, stable=True)[0], ar16, right=True, out_int32=True))
        offs = torch.searchsorted(se, ar, right=True, out_int32=True)
        res["gather"] = t(lambda: xf.index_select(0, order // k))
        xs = xf.index_select(0, order // k)
        res["grouped_gate_up"] = t(lambda: _grouped_mm(xs, ex.gate_up_proj, offs))
        g = _grouped_mm(xs, ex.gate_up_proj, offs)
        res["act"] = t(lambda: F.silu(g[:, :I]) * g[:, I:])
        h = F.silu(g[:, :I]) * g[:, I:]
        res["grouped_down"] = t(lambda: _grouped_mm(h, ex.down_proj, offs))
        y = _grouped_mm(h, ex.down_proj, offs)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=device))
        res["unpermute"] = t(lambda: y.index_select(0, inv))
        yu = y.index_select(0, inv).view(N, k, H)
        res["combine_bmm"] = t(lambda: torch.bmm(w.reshape(N, 1, k), yu))
        res["combine_mul_sum"] = t(lambda: (yu * w[..., None]).sum(1))
        ws = w.reshape(-1)[order]
        res["combine_index_add_atomic"] = t(  # one scatter pass (not deterministic: fp32 atomics)
            lambda: torch.zeros(N, H, device=device, dtype=torch.float32).index_add_(0, order // k, (y * ws[:, None]).float()))
        # K-major expert weights (same shapes as views: [E, in, out] with stride 1 along "in")
        gu_k = ex.gate_up_proj.transpose(1, 2).contiguous().transpose(1, 2)
        dn_k = ex.down_proj.transpose(1, 2).contiguous().transpose(1, 2)
        res["grouped_gate_up_kmajor"] = t(lambda: _grouped_mm(xs, gu_k, offs))
        res["grouped_down_kmajor"] = t(lambda: _grouped_mm(h, dn_k, offs))
        assert torch.allclose(_grouped_mm(xs, gu_k, offs).float(), g.float(), atol=1e-2, rtol=1e-2)
    res["ratio_block_to_dense"] = res["block_total"] / res["dense_gemms"]
    res["ratio_if_kmajor"] = (res["block_total"] - res["grouped_gate_up"] - res["grouped_down"]
                              + res["grouped_gate_up_kmajor"] + res["grouped_down_kmajor"]) / res["dense_gemms"]
    for key in list(res):
        if isinstance(res[key], float) and key not in ("active_gflop",) and not key.startswith("ratio"):
            res[key] = round(res[key] * 1e3, 4)  # ms
    res["units"] = "ms (median), ratios unitless"
    from _meta import run_meta  # beside this file (already on sys.path for the e2e import)

    res["meta"] = run_meta(argv)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
