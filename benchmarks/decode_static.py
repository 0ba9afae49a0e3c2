"""Decode speed with the static cache: ms per token for full-width decoder layers, four ways.

The model is the official width (2048 hidden, 32 q / 4 kv heads of 128, indexer 16 x 64 top-2048, 128 experts top-8
of 768) with ``--layers`` decoder layers (random bf16 weights built on the GPU; the per-token time scales with the
layer count, ``ms_per_token_48_layers`` extrapolates linearly, the LM head once). The caches are filled with random
keys (no prefill) to ``context`` tokens, then greedy steps feed the argmax back:

- ``dynamic``: the default ``KeyeVL2Cache``, eager (what ``generate()`` does without arguments);
- ``static``: ``KeyeVL2StaticCache``, eager (fixed shapes, no host sync);
- ``static_graph``: the same step captured once in a ``torch.cuda.CUDAGraph`` (argmax fed back inside the graph)
  and replayed;
- ``generate_compiled`` (one context, batch 1): ``generate(..., cache_implementation="static")``, i.e.
  transformers' compile path (``CompileConfig`` mode "reduce-overhead"), ms per token from two lengths
  (the prefill and the compilation cancel out; the compile time is reported).

    python benchmarks/decode_static.py --output /tmp/decode_static.json              # H200, about 3 minutes
    python benchmarks/decode_static.py --tiny --output /tmp/decode_static_tiny.json  # CPU smoke run (no graphs)

Each row is guarded (an error is recorded, the JSON rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build, import_keye  # noqa: E402


def config(mk, layers: int, tiny: bool):
    cfg = mk.tiny_config() if tiny else mk.KeyeVL2Config(num_hidden_layers=layers)
    return cfg


def fill(cache, model, B, ctx, device, dtype, static: bool):
    """Random K/V and indexer keys for ``ctx`` tokens in every layer of ``cache``."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    Di = int(cfg.sa_config["indexer_head_dim"])
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(B, cfg.num_key_value_heads, ctx, cfg.head_dim, device=device, dtype=dtype, generator=g)
        cache.update(k, torch.randn_like(k), i)
        cache.update_indexer(torch.randn(B, ctx, Di, device=device, dtype=dtype, generator=g), i)
        del k
    if static:
        cache.set_key_mask(None, 0, ctx, B, torch.device(device))
        cache.prefilled, cache.check_capacity = True, False
    return cache


def timed_steps(step, n_warm: int, n: int, cuda: bool) -> float:
    """Seconds per call of ``step()`` (median of 3 runs of n calls)."""
    for _ in range(n_warm):
        step()
    runs = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / n)
    return sorted(runs)[1]


def decode_row(mk, model, mode, B, ctx, steps, device, dtype):
    cuda = torch.device(device).type == "cuda"
    cap = ctx + 3 * steps + 16
    static = mode != "dynamic"
    cache = mk.KeyeVL2StaticCache(model.config, max_cache_len=cap) if static else mk.KeyeVL2Cache(capacity=cap)
    fill(cache, model, B, ctx, device, dtype, static)
    model.rope_deltas = None
    tok = torch.randint(1000, 100000, (B, 1), device=device)

    def eager_step():
        nonlocal tok
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)

    if mode != "static_graph":
        with torch.inference_mode():
            s = timed_steps(eager_step, 2, steps, cuda)
        return {"ms_per_token": round(1e3 * s, 3), "tokens_per_s": round(B / s, 1)}
    static_tok = tok.clone()
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(input_ids=static_tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.current_stream().wait_stream(side)
        cache.crop(-1)
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.graph(graph):
            out = model(input_ids=static_tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            static_tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        capture_s = time.perf_counter() - t0
        s = timed_steps(graph.replay, 2, steps, True)
    return {"ms_per_token": round(1e3 * s, 3), "tokens_per_s": round(B / s, 1), "capture_s": round(capture_s, 2)}


def compiled_row(model, ctx, device, n1=8, n2=40):
    ids = torch.randint(1000, 100000, (1, ctx), device=device)
    kw = dict(do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0)

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    model.generation_config.max_cache_len = ctx + n2  # one cache size for every call: no recompilation
    first = gen(n2)  # compiles
    t1, t2 = min(gen(n1), gen(n1)), min(gen(n2), gen(n2))
    s = (t2 - t1) / (n2 - n1)
    return {"ms_per_token": round(1e3 * s, 3), "tokens_per_s": round(1 / s, 1), "first_call_s": round(first, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--impls", default="dsa,sdpa")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--compiled-context", type=int, default=4096, help="0 = skip the generate_compiled rows")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    mk = import_keye()
    import transformers

    cfg = config(mk, args.layers, args.tiny)
    t0 = time.perf_counter()
    model = build(mk.KeyeVL2MoeForConditionalGeneration, cfg, device, dtype)
    data = {"meta": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                     "transformers": transformers.__version__, "dtype": str(dtype), "layers": cfg.num_hidden_layers,
                     "build_s": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
            "rows": []}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")] if not args.tiny else [40]
    batches = [int(b) for b in args.batches.split(",")]
    modes = ["dynamic", "static"] + (["static_graph"] if device == "cuda" else [])
    L = cfg.num_hidden_layers

    def record(row, fn):
        try:
            row.update(fn(), status="ok")
            if "ms_per_token" in row:
                row["ms_per_token_48_layers"] = round(row["ms_per_token"] * 48 / L, 2)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-1500:])
        data["rows"].append(row)
        out.write_text(json.dumps(data, indent=1))
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    impls = args.impls.split(",")
    for impl in impls:
        model.set_attn_implementation(impl if not args.tiny or impl != "dsa" else "dsa_torch")
        for ctx in contexts:
            for B in batches:
                for mode in modes:
                    record({"impl": impl, "mode": mode, "context": ctx, "batch": B},
                           lambda: decode_row(mk, model, mode, B, ctx, args.steps if not args.tiny else 2, device, dtype))
    for impl in impls if device == "cuda" and args.compiled_context else []:  # last: compiling takes a while
        model.set_attn_implementation(impl)
        record({"impl": impl, "mode": "generate_compiled", "context": args.compiled_context, "batch": 1},
               lambda: compiled_row(model, args.compiled_context, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
