"""End-to-end speed and memory of Keye-VL-2.0 on one GPU, side by side with transformers' Qwen3-VL-MoE.

Three models, one loaded at a time, random bf16 weights built directly on the GPU (no checkpoint files):

- ``keye_dsa``     this package's ``KeyeVL2MoeForConditionalGeneration`` (official full size, 31.1B parameters)
                   with DSA (``attn_implementation="dsa"``: the Triton kernels where they run, else the torch
                   reference), chunked prefill (``prefill_chunk_size``), the capacity-grown ``KeyeVL2Cache``;
- ``keye_sdpa``    the same weights with dense ``"sdpa"`` attention, one-shot prefill;
- ``qwen3_vl_moe`` transformers' ``Qwen3VLMoeForConditionalGeneration`` with the same text dimensions
                   (30B-A3B: 48 layers, 2048 wide, 32 q / 4 kv heads of 128, 128 experts top-8 of 768), its
                   default attention (sdpa), default experts implementation and default ``DynamicCache``.

Rows (``kind``): ``moe_layer`` (one MoE block at 8K tokens: grouped experts, eager experts, and a dense GEMM of the
same active FLOPs), ``prefill`` (text prompt of 8K / 32K / 128K / 256K tokens, batch 1: tokens/s, time to first
token = prefill + LM head on the last position + argmax, peak memory), ``video_prefill`` (about one hour of video
at the sampling budget of docs/keye_vl2.md section 7: 2,880 frames of 12 x 20 patches = 60 tokens each, fed as
synthetic patches through ``pixel_values_videos`` / ``video_grid_thw``), ``decode`` (batch 1 and 16 at 32K and 128K
tokens of context: a cache filled with random keys/values, then greedy steps; tokens/s = batch * steps / time; on
CUDA each Keye decode row is followed by ``decode_static_graph``, the same step on a ``KeyeVL2StaticCache`` captured
in a CUDA graph, see ``benchmarks/decode_static.py``), ``decode_generate_static`` (per model, batch 1:
``generate(cache_implementation="static")``, which transformers compiles), and
``long_generate`` (keye_dsa: a 256K-token prefill plus 256 decoded tokens, with the peak memory split into weights,
cache and the rest). "256K" is 262,144 tokens in total (``max_position_embeddings``), i.e. a 261,888-token prompt.

Each row is guarded: an out-of-memory error is recorded as ``status: "oom"``, any other error as ``"error"``,
and rows whose predicted time does not fit in the remaining ``--budget`` seconds as ``"skipped"``. The JSON
is rewritten after every row. At the end a PNG plots prefill time against context for the three models.

    python benchmarks/e2e.py --output benchmarks/results/e2e_h200.json           # full size, one H200
    python benchmarks/e2e.py --tiny --output /tmp/e2e_tiny.json                  # CPU, tiny configs, seconds
    python benchmarks/e2e.py --plot-only benchmarks/results/e2e_h200.json        # redraw the PNG from a JSON
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3


# ------------------------------------------------------------------------------------------------ imports
def import_keye():
    """``keye_vl.modeling_keye``: the installed package, else the repo's folder mounted under that name
    (never putting the repo root on sys.path, where ``kernels/`` would shadow PyPI's ``kernels``)."""
    try:
        import keye_vl.modeling_keye as mk

        return mk
    except ImportError:
        pass
    pkg = types.ModuleType("keye_vl")
    pkg.__path__ = [str(REPO / "keye_vl")]
    sys.modules["keye_vl"] = pkg
    spec = importlib.util.spec_from_file_location(
        "keye_vl.modeling_keye", REPO / "modeling_keye" / "__init__.py",
        submodule_search_locations=[str(REPO / "modeling_keye")],
    )
    mk = importlib.util.module_from_spec(spec)
    sys.modules["keye_vl.modeling_keye"] = mk
    spec.loader.exec_module(mk)
    return mk


# ------------------------------------------------------------------------------------------------ configs
def keye_config(mk, tiny: bool):
    """Official full-size KeyeVL2Config, or the package's tiny one."""
    cfg = mk.tiny_config() if tiny else mk.KeyeVL2Config()
    cfg.vision_frames_per_chunk = 8 if tiny else 128  # vision tower: frames per batch (bounded memory)
    return cfg


def qwen_config(tiny: bool):
    """Qwen3-VL-MoE with Keye's text dimensions (30B-A3B) and Qwen3-VL-30B-A3B's vision defaults."""
    from transformers import Qwen3VLMoeConfig

    if tiny:
        text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    moe_intermediate_size=32, intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                    vocab_size=151936, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                     "mrope_interleaved": True})
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0])
    else:
        text = dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                    head_dim=128, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                    num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=262144,
                    tie_word_embeddings=False, norm_topk_prob=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                     "mrope_interleaved": True})
        vision = dict(out_hidden_size=2048)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def build(cls, config, device, dtype):
    """Random-weight model created directly on ``device`` in ``dtype`` (no CPU copy, no checkpoint)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def n_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


# ------------------------------------------------------------------------------------------------ timing
class Clock:
    """Wall time with device synchronisation (CUDA) around the region."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def bench(fn, clock: Clock, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if clock.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def reset_peak(device):
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated() / GiB, 2)
    return None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ------------------------------------------------------------------------------------------------ runner
class Runner:
    """Runs guarded rows, keeps the time budget, rewrites the JSON after every row."""

    def __init__(self, args, device, meta):
        self.args, self.device = args, device
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + args.budget
        self.data = {"meta": meta, "rows": []}
        self.clock = Clock(device)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self):
        if not self.args.output:
            return
        out = Path(self.args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - self.t_start, 1)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(out)

    def row(self, base: dict, fn, est_s: float = 0.0, reserve_s: float = 0.0):
        """Run ``fn() -> dict`` as one row unless ``est_s + reserve_s`` exceeds the remaining budget."""
        rec = dict(base)
        if fn is None or est_s + reserve_s > self.remaining():
            rec.setdefault("reason", f"predicted {est_s:.0f}s (+{reserve_s:.0f}s reserved) > {self.remaining():.0f}s left")
            rec["status"] = "skipped"
        else:
            reset_peak(self.device)
            t0 = time.perf_counter()
            try:
                rec.update(fn())
                rec.setdefault("status", "ok")
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                rec.update(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e)[:400]}")
                if rec["status"] == "error":
                    traceback.print_exc()
            rec["peak_gib"] = peak_gib(self.device)
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            reset_peak(self.device)
        self.data["rows"].append(rec)
        self.save()
        shown = {k: v for k, v in rec.items() if k not in ("error",)}
        print(f"[{time.perf_counter() - self.t_start:6.1f}s] {json.dumps(shown)}" + (f"  {rec['error']}" if "error" in rec else ""), flush=True)
        return rec


# ------------------------------------------------------------------------------------------------ model glue
def cache_kw(model) -> str:
    """The forward kwarg that takes the cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    for key in ("cache", "past_key_values"):
        c = out.get(key) if hasattr(out, "get") else None
        if c is not None:
            return c
    return None


class Family:
    """How to make caches and positions for one model family."""

    def __init__(self, mk, model, name: str):
        self.mk, self.model, self.name = mk, model, name
        self.keye = name.startswith("keye")
        self.ckw = cache_kw(model)
        tc = model.config.get_text_config() if not self.keye else model.config
        self.layers, self.kv_heads, self.head_dim = tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim
        self.dsa = name == "keye_dsa"
        self.d_i = int(model.config.sa_config["indexer_head_dim"]) if self.keye and model.config.sa_config else None

    def new_cache(self, capacity: int | None):
        if self.keye:
            return self.mk.KeyeVL2Cache(capacity=capacity)
        from transformers import DynamicCache

        return DynamicCache()

    def filled_cache(self, B: int, ctx: int, capacity: int, device, dtype, seed=0):
        """A cache holding ``ctx`` tokens of random keys/values (and indexer keys for DSA) per layer."""
        g = torch.Generator(device=device).manual_seed(seed)
        cache = self.new_cache(capacity)
        for i in range(self.layers):
            k = torch.randn(B, self.kv_heads, ctx, self.head_dim, device=device, dtype=dtype, generator=g)
            v = torch.randn(B, self.kv_heads, ctx, self.head_dim, device=device, dtype=dtype, generator=g)
            cache.update(k, v, i)
            del k, v
            if self.dsa:
                cache.update_indexer(torch.randn(B, ctx, self.d_i, device=device, dtype=dtype, generator=g), i)
        return cache

    def step_kwargs(self, B: int, pos: int, device) -> dict:
        """Decode positions: explicit for Keye (text continues at ``pos`` on all three axes); Qwen derives
        them from the cache length."""
        if self.keye:
            return {"position_ids": torch.full((3, B, 1), pos, dtype=torch.long, device=device)}
        return {}

    def forward(self, input_ids, cache, **kw):
        return self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self.ckw: cache}, **kw)


def random_ids(B: int, T: int, device, seed: int, vocab: int = 150000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab, (B, T), generator=g).to(device)


def do_prefill(fam: Family, ids, clock: Clock, capacity: int | None, **vision):
    """One prefill: returns (seconds to the first token, output, cache)."""
    cache = fam.new_cache(capacity)
    t0 = clock.now()
    out = fam.forward(ids, cache, **vision)
    tok = out.logits[:, -1].argmax(-1)
    tok.cpu()
    return time.perf_counter() - t0, out, out_cache(out) or cache


def best_prefill(fam: Family, ids, clock: Clock, capacity: int | None, repeat: bool) -> float:
    """Seconds to the first token: one prefill, or the faster of two when ``repeat`` (short prompts)."""
    with torch.inference_mode():
        s, out, cache = do_prefill(fam, ids, clock, capacity)
        if not repeat:
            return s
        del out, cache
        return min(s, do_prefill(fam, ids, clock, capacity)[0])


def prefill_fields(T: int, s: float) -> dict:
    """The timing fields of a prefill row of T tokens that took s seconds."""
    return {"ttft_s": round(s, 4), "tokens_per_s": round(T / s, 1), "prefill_s": round(s, 4)}


def do_decode(fam: Family, cache, B: int, start: int, steps: int, warmup: int, clock: Clock, device, seed=1):
    """Greedy decode ``warmup + steps`` tokens from ``cache`` (which holds ``start`` tokens); seconds of the
    timed ``steps``."""
    tok = random_ids(B, 1, device, seed)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = clock.now()
        out = fam.forward(tok, cache, **fam.step_kwargs(B, start + i, device))
        tok = out.logits[:, -1:].argmax(-1)
    tok.cpu()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ rows
def moe_layer_rows(run: Runner, mk, tiny: bool, device, dtype):
    """One MoE block at 8K tokens (tiny: 256): grouped experts, eager experts, the dense GEMMs of the same
    active FLOPs (``[N*k, H] @ [H, 2I]`` then ``[N*k, I] @ [I, H]``)."""
    from keye_vl.modeling_keye.modeling_keye_vl_2 import KeyeVL2SparseMoeBlock

    cfg = keye_config(mk, tiny)
    N = 64 if tiny else 8192
    H, I, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    flops = 2 * N * k * (H * 2 * I + I * H)
    torch.manual_seed(0)
    block = build(KeyeVL2SparseMoeBlock, cfg, device, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(1, N, H, device=device, dtype=dtype)
    a = torch.randn(N * k, H, device=device, dtype=dtype)
    w1 = torch.randn(H, 2 * I, device=device, dtype=dtype) * 0.02
    w2 = torch.randn(I, H, device=device, dtype=dtype) * 0.02
    h = torch.randn(N * k, I, device=device, dtype=dtype)
    reps = 1 if tiny else 20
    res = {}

    def dense():
        return (a @ w1, h @ w2)

    def one(impl):
        cfg.moe_implementation = impl
        impl_used = block.experts.implementation(x.view(-1, H))
        with torch.inference_mode():
            t = bench(lambda: block(x), run.clock, warmup=1 if tiny else 3, reps=reps)
        return {"seconds": t, "tflops": flops / t / 1e12, "experts_impl": impl_used}

    base = {"kind": "moe_layer", "model": "keye_moe_block", "tokens": N, "active_gflop": round(flops / 1e9, 1)}
    rd = run.row({**base, "variant": "dense_gemm_same_flops"}, lambda: {
        "seconds": (t := bench(dense, run.clock, warmup=1 if tiny else 3, reps=reps)), "tflops": flops / t / 1e12})
    res["dense"] = rd.get("seconds")
    for impl in ("grouped_mm", "eager"):
        r = run.row({**base, "variant": f"moe_block_{impl}"}, lambda impl=impl: one(impl))
        if r.get("status") == "ok" and res["dense"]:
            r["ratio_to_dense_gemm"] = round(r["seconds"] / res["dense"], 3)
            run.save()
            print(f"    moe_block_{impl}: {r['ratio_to_dense_gemm']}x the dense GEMM time (target <= 2x)", flush=True)
    cfg.moe_implementation = "auto"


def predict(prev: dict, ctx: int, power: float) -> float:
    """Seconds predicted for ``ctx`` from the largest measured context (``prev``: ctx -> seconds)."""
    if not prev:
        return 0.0
    c0 = max(prev)
    return prev[c0] * (ctx / c0) ** power


def video_inputs(B_frames: int, h: int, w: int, device, dtype, vocab_text: int, mk_cfg, seed=3):
    """input_ids with one ``<|video_pad|>`` run per frame, each after 4 timestamp-like text tokens, plus the
    synthetic patches [frames * h * w, 3 * 14 * 14] and ``video_grid_thw`` [[frames, h, w]]."""
    g = torch.Generator().manual_seed(seed)
    per = (h // 2) * (w // 2)
    ids = [mk_cfg.vision_start_token_id]
    for _ in range(B_frames):
        ids += torch.randint(1000, vocab_text, (4,), generator=g).tolist()
        ids += [mk_cfg.video_token_id] * per
    ids += [mk_cfg.vision_end_token_id] + torch.randint(1000, vocab_text, (32,), generator=g).tolist()
    input_ids = torch.tensor([ids], device=device)
    gd = torch.Generator(device=device).manual_seed(seed)
    patches = torch.randn(B_frames * h * w, 3 * 14 * 14, generator=gd, device=device, dtype=dtype)
    grid = torch.tensor([[B_frames, h, w]], device=device)
    return input_ids, {"pixel_values_videos": patches, "video_grid_thw": grid}


def keye_rows(run: Runner, mk, args, device, dtype, plan, name: str):
    """Rows of one Keye phase. ``keye_dsa``: prefill 8K/32K/128K, decode, the 256K prompt + 256 tokens (with
    the memory split), the one-hour video. ``keye_sdpa``: prefill, decode, the video, the dense 256K prompt."""
    tiny = args.tiny
    cfg = keye_config(mk, tiny)
    t0 = time.perf_counter()
    model = build(mk.KeyeVL2MoeForConditionalGeneration, cfg, device, dtype)
    run.clock.sync()
    run.data["meta"]["keye_build_s"] = round(time.perf_counter() - t0, 1)
    run.data["meta"]["keye_params"] = sum(p.numel() for p in model.parameters())
    weights = n_bytes(model)
    print(f"keye built in {time.perf_counter() - t0:.1f}s: {run.data['meta']['keye_params'] / 1e9:.2f}B params, "
          f"{weights / GiB:.1f} GiB", flush=True)
    from keye_vl.modeling_keye import modeling_keye_vl_2 as mm

    impl = args.dsa if name == "keye_dsa" else "sdpa"
    model.set_attn_implementation(impl)
    fam = Family(mk, model, name)
    chunk = plan["chunk"] if name == "keye_dsa" else None
    backend = mm._dsa_backend(impl, torch.device(device)).__name__.rsplit(".", 1)[-1] if name == "keye_dsa" else "sdpa"
    run.data["meta"][f"{name}_attention"] = {"attn_implementation": impl, "backend": backend, "prefill_chunk_size": chunk}
    run.save()
    measured: dict[int, float] = {}
    power = 1.5 if name == "keye_dsa" else 2.0
    max_ctx = plan["max_ctx_torch_dsa"] if impl == "dsa_torch" else plan["max_pos"]

    # warm-up (kernel loads / JIT), recorded as its own row so a hang or failure here is visible
    def warm():
        model.config.prefill_chunk_size = chunk
        w = plan["warm"]
        with torch.inference_mode():
            s, out, cache = do_prefill(fam, random_ids(1, w, device, 99), run.clock, w + 4)
            d = do_decode(fam, cache, 1, w, 2, 1, run.clock, device)
        return {"prefill_s": round(s, 3), "decode_2_steps_s": round(d, 3), "backend": backend}

    r = run.row({"kind": "warmup", "model": name, "context": plan["warm"], "attn": impl}, warm)
    if r["status"] != "ok":
        return

    for T in plan["prefill"]:  # the "256K" prompt comes later (long_generate / dense long row)
        base = {"kind": "prefill", "model": name, "context": T, "batch": 1, "attn": impl}
        if T > max_ctx:
            run.row({**base, "reason": f"{impl} limited to {max_ctx} tokens in this run"}, None, est_s=float("inf"))
            continue

        def fn(T=T):
            model.config.prefill_chunk_size = chunk if (chunk and T > chunk) else None
            measured[T] = s = best_prefill(fam, random_ids(1, T, device, T), run.clock, T, T <= plan["repeat_below"])
            return prefill_fields(T, s)

        run.row(base, fn, est_s=predict(measured, T, power) * 1.2 + plan["overhead"])

    for ctx in plan["decode_ctx"]:  # decode rows (synthetic caches)
        for B in plan["decode_batch"]:
            if ctx > max_ctx:
                continue
            kv_gib = B * ctx * fam.layers * fam.kv_heads * fam.head_dim * 2 * 2 / GiB

            def fn(ctx=ctx, B=B):
                steps, warm_steps = plan["decode_steps"], 2
                with torch.inference_mode():
                    cache = fam.filled_cache(B, ctx, ctx + steps + warm_steps, device, dtype)
                    s = do_decode(fam, cache, B, ctx, steps, warm_steps, run.clock, device)
                return {"tokens_per_s": round(B * steps / s, 2), "ms_per_step": round(1e3 * s / steps, 2),
                        "steps": steps, "kv_cache_gib": round(kv_gib, 1), "cache": "synthetic random K/V"}

            run.row({"kind": "decode", "model": name, "context": ctx, "batch": B, "attn": impl}, fn,
                    est_s=plan["decode_est"])
            if run.clock.cuda:  # the same step on the static cache, captured once in a CUDA graph and replayed

                def fn_graph(ctx=ctx, B=B):
                    from decode_static import decode_row

                    r = decode_row(mk, model, "static_graph", B, ctx, plan["decode_steps"], device, dtype)
                    return {"tokens_per_s": r["tokens_per_s"], "ms_per_step": r["ms_per_token"],
                            "capture_s": r["capture_s"], "cache": "KeyeVL2StaticCache (synthetic random K/V), CUDA graph"}

                run.row({"kind": "decode_static_graph", "model": name, "context": ctx, "batch": B, "attn": impl},
                        fn_graph, est_s=plan["decode_est"] + 2.0)

    T_long, G = plan["max_pos"] - plan["gen"], plan["gen"]
    if name == "keye_dsa":  # the 256K prompt + 256 greedy tokens; peak memory split
        base = {"kind": "long_generate", "model": name, "context": T_long, "generated": G, "batch": 1, "attn": impl}

        def long_fn():
            model.config.prefill_chunk_size = chunk
            ids = random_ids(1, T_long, device, 7)
            with torch.inference_mode():
                s, out, cache = do_prefill(fam, ids, run.clock, T_long + G)
                del out
                d = do_decode(fam, cache, 1, T_long, G - 2, 1, run.clock, device)  # + the prefill's token = G tokens
                peak = torch.cuda.max_memory_allocated() if run.clock.cuda else 0
                mem = cache.memory_bytes()
            rest = peak - weights - mem["kv_allocated"] - mem["indexer_allocated"]
            return {"ttft_s": round(s, 3), "prefill_tokens_per_s": round(T_long / s, 1),
                    "decode_tokens_per_s": round((G - 2) / d, 2),
                    "memory_gib": {"weights": round(weights / GiB, 2),
                                   "kv_cache_allocated": round(mem["kv_allocated"] / GiB, 2),
                                   "kv_cache_used": round(mem["kv_used"] / GiB, 2),
                                   "indexer_cache_allocated": round(mem["indexer_allocated"] / GiB, 3),
                                   "activations_workspace_peak": round(rest / GiB, 2) if peak else None,
                                   "peak_allocated": round(peak / GiB, 2) if peak else None,
                                   "peak_reserved": round(torch.cuda.max_memory_reserved() / GiB, 2) if run.clock.cuda else None}}

        if T_long > max_ctx:
            run.row({**base, "reason": f"{impl} limited to {max_ctx} tokens in this run"}, None, est_s=float("inf"))
        else:
            est = predict(measured, T_long, power) * 1.2 + G * plan["step_est"] + plan["overhead"]
            r = run.row(base, long_fn, est_s=est)
            pre = {"kind": "prefill", "model": name, "context": T_long, "batch": 1, "attn": impl,
                   "from": "long_generate row (same prefill)", "status": r.get("status")}
            if r.get("status") == "ok":
                measured[T_long] = r["ttft_s"]
                pre.update(ttft_s=r["ttft_s"], tokens_per_s=r["prefill_tokens_per_s"], prefill_s=r["ttft_s"],
                           peak_gib=r["peak_gib"])
            else:
                pre["reason"] = r.get("reason") or r.get("error")
            run.data["rows"].append(pre)
            run.save()

    generate_static_row(run, model, name, impl, plan, device)

    # video of about one hour at the sampling budget (docs/keye_vl2.md section 7)
    F, h, w = plan["video"]
    ids, vis = video_inputs(F, h, w, device, dtype, 150000, cfg)
    T = ids.shape[1]
    base = {"kind": "video_prefill", "model": name, "context": T, "frames": F, "tokens_per_frame": (h // 2) * (w // 2),
            "patches": F * h * w, "batch": 1, "attn": impl}
    if T > max_ctx:
        run.row({**base, "reason": f"{impl} limited to {max_ctx} tokens in this run"}, None, est_s=float("inf"))
    else:
        def vfn():
            model.config.prefill_chunk_size = chunk
            with torch.inference_mode():
                s, out, cache = do_prefill(fam, ids, run.clock, T + 4, **vis)
            return {"ttft_s": round(s, 3), "tokens_per_s": round(T / s, 1)}

        run.row(base, vfn, est_s=predict(measured, T, power) * 1.3 + plan["overhead"] + plan["vit_est"])

    if name == "keye_sdpa":  # dense 256K prompt, one shot
        def dense_long():
            model.config.prefill_chunk_size = None
            with torch.inference_mode():
                s, out, cache = do_prefill(fam, random_ids(1, T_long, device, T_long), run.clock, T_long)
            return {"ttft_s": round(s, 3), "tokens_per_s": round(T_long / s, 1), "prefill_s": round(s, 3)}

        run.row({"kind": "prefill", "model": name, "context": T_long, "batch": 1, "attn": impl}, dense_long,
                est_s=predict(measured, T_long, power) * 1.2 + plan["overhead"])
    reset_peak(device)  # the model is freed when this function returns


def qwen_rows(run: Runner, args, device, dtype, plan):
    from transformers import Qwen3VLMoeForConditionalGeneration

    cfg = qwen_config(args.tiny)
    t0 = time.perf_counter()
    model = build(Qwen3VLMoeForConditionalGeneration, cfg, device, dtype)
    run.data["meta"]["qwen_build_s"] = round(time.perf_counter() - t0, 1)
    run.data["meta"]["qwen_params"] = sum(p.numel() for p in model.parameters())
    run.data["meta"]["qwen3_vl_moe_attention"] = {
        "attn_implementation": model.config._attn_implementation,
        "experts_implementation": getattr(model.config.get_text_config(), "_experts_implementation", None),
    }
    print(f"qwen built in {time.perf_counter() - t0:.1f}s: {run.data['meta']['qwen_params'] / 1e9:.2f}B params", flush=True)
    fam = Family(None, model, "qwen3_vl_moe")

    def warm():
        w = plan["warm"]
        with torch.inference_mode():
            s, out, cache = do_prefill(fam, random_ids(1, w, device, 99), run.clock, None)
            d = do_decode(fam, cache, 1, w, 2, 1, run.clock, device)
        return {"prefill_s": round(s, 3), "decode_2_steps_s": round(d, 3)}

    if run.row({"kind": "warmup", "model": "qwen3_vl_moe", "context": plan["warm"], "attn": "sdpa"}, warm)["status"] != "ok":
        return
    measured = {}
    for T in plan["prefill"]:  # the "256K" prompt after the decode rows
        est = predict(measured, T, 2.0) * 1.2 + plan["overhead"]

        def fn(T=T):
            measured[T] = s = best_prefill(fam, random_ids(1, T, device, T), run.clock, None,
                                           T <= plan["repeat_below"])
            return prefill_fields(T, s)

        run.row({"kind": "prefill", "model": "qwen3_vl_moe", "context": T, "batch": 1, "attn": "sdpa"}, fn, est_s=est)
    for ctx in plan["decode_ctx"]:
        for B in plan["decode_batch"]:
            kv_gib = B * ctx * fam.layers * fam.kv_heads * fam.head_dim * 2 * 2 / GiB

            def fn(ctx=ctx, B=B):
                steps, warm = plan["decode_steps"], 2
                with torch.inference_mode():
                    cache = fam.filled_cache(B, ctx, None, device, dtype)
                    s = do_decode(fam, cache, B, ctx, steps, warm, run.clock, device)
                return {"tokens_per_s": round(B * steps / s, 2), "ms_per_step": round(1e3 * s / steps, 2), "steps": steps,
                        "kv_cache_gib": round(kv_gib, 1), "cache": "synthetic random K/V (DynamicCache)"}

            run.row({"kind": "decode", "model": "qwen3_vl_moe", "context": ctx, "batch": B, "attn": "sdpa"}, fn,
                    est_s=plan["decode_est"])
    T = plan["max_pos"] - plan["gen"]
    est = predict(measured, T, 2.0) * 1.2 + plan["overhead"]

    def long_fn(T=T):
        with torch.inference_mode():
            s, out, cache = do_prefill(fam, random_ids(1, T, device, T), run.clock, None)
        return {"ttft_s": round(s, 3), "tokens_per_s": round(T / s, 1), "prefill_s": round(s, 3)}

    run.row({"kind": "prefill", "model": "qwen3_vl_moe", "context": T, "batch": 1, "attn": "sdpa"}, long_fn, est_s=est)
    generate_static_row(run, model, "qwen3_vl_moe", "sdpa", plan, device)
    reset_peak(device)  # the model is freed when this function returns


def generate_static_row(run: Runner, model, name: str, attn: str, plan, device) -> None:
    """``generate(cache_implementation="static")`` at batch 1 (transformers' compile path on CUDA): ms per token
    from two generation lengths (the prefill and the one-off compilation cancel out), and the first call's time."""
    if not run.clock.cuda:
        return

    def fn():
        from decode_static import compiled_row

        r = compiled_row(model, plan["warm"], device)
        return {"ms_per_step": r["ms_per_token"], "tokens_per_s": r["tokens_per_s"], "first_call_s": r["first_call_s"]}

    run.row({"kind": "decode_generate_static", "model": name, "context": plan["warm"], "batch": 1, "attn": attn}, fn,
            est_s=90.0)


# ------------------------------------------------------------------------------------------------ report
def summarize(data: dict) -> dict:
    """The end-to-end targets (README benchmark section) from the rows (None where a row is missing)."""
    rows = [r for r in data["rows"] if r.get("status") == "ok"]

    def get(kind, model, **kw):
        for r in rows:
            if r["kind"] == kind and r["model"] == model and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    out = {}
    ctx128 = 131072
    a, c = get("prefill", "keye_dsa", context=ctx128), get("prefill", "qwen3_vl_moe", context=ctx128)
    out["prefill_128k_speedup_vs_qwen (target >= 2.5)"] = round(c["ttft_s"] / a["ttft_s"], 2) if a and c else None
    for ctx in (32768, 131072):
        a, c = get("decode", "keye_dsa", context=ctx, batch=16), get("decode", "qwen3_vl_moe", context=ctx, batch=16)
        out[f"decode_b16_{ctx // 1024}k_speedup_vs_qwen (target >= 3 at 128K)"] = (
            round(a["tokens_per_s"] / c["tokens_per_s"], 2) if a and c else None)
        a, c = get("decode", "keye_dsa", context=ctx, batch=1), get("decode", "qwen3_vl_moe", context=ctx, batch=1)
        out[f"decode_b1_{ctx // 1024}k_speedup_vs_qwen"] = round(a["tokens_per_s"] / c["tokens_per_s"], 2) if a and c else None
        g = get("decode_static_graph", "keye_dsa", context=ctx, batch=1)
        out[f"decode_b1_{ctx // 1024}k_static_graph_ms_per_token (target <= 8)"] = g["ms_per_step"] if g else None
        g = get("decode_static_graph", "keye_dsa", context=ctx, batch=16)
        out[f"decode_b16_{ctx // 1024}k_static_graph_tokens_per_s (target >= 600 at 32K)"] = g["tokens_per_s"] if g else None
    lg = get("long_generate", "keye_dsa")
    out["256k_prefill_plus_256_tokens_fits (peak GiB)"] = lg["peak_gib"] if lg else None
    m = get("moe_layer", "keye_moe_block", variant="moe_block_grouped_mm")
    out["moe_layer_time_over_dense_gemm (target <= 2)"] = m.get("ratio_to_dense_gemm") if m else None
    return out


def merge_runs(runs: list) -> dict:
    """Several result files -> one: rows keyed by (model, kind, context, batch), a later run's row replacing an
    earlier one's; ``meta`` is the first run's, with ``merged_from`` listing each run's date and phases."""
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[(r.get("model"), r.get("kind"), r.get("context"), r.get("batch"))] = r
    meta = dict(runs[0].get("meta", {}))
    meta["merged_from"] = [{"date": r.get("meta", {}).get("date"), "models": sorted({x.get("model") for x in r["rows"]})}
                           for r in runs]
    return {"meta": meta, "rows": list(rows.values())}


def make_plot(data: dict, png: str) -> bool:
    """Prefill time (TTFT) against context for the three models, log-log; OOM / skipped marked. Returns
    False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"keye_dsa": ("tab:green", "o", "Keye-VL-2.0, DSA"), "keye_sdpa": ("tab:blue", "s", "Keye-VL-2.0, dense sdpa"),
              "qwen3_vl_moe": ("tab:red", "^", "transformers Qwen3-VL-MoE (sdpa)")}
    for model, (color, marker, label) in styles.items():
        pts = sorted((r["context"], r["ttft_s"]) for r in data["rows"]
                     if r["kind"] in ("prefill", "long_generate") and r["model"] == model and r.get("status") == "ok")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
        for r in data["rows"]:
            if r["kind"] == "prefill" and r["model"] == model and r.get("status") in ("oom", "skipped", "error"):
                ax.axvline(r["context"], color=color, ls=":", lw=1)
                ax.text(r["context"], ax.get_ylim()[1] if ax.has_data() else 1, f" {r['status']}", color=color,
                        rotation=90, va="top", fontsize=7)
    vids = [r for r in data["rows"] if r["kind"] == "video_prefill" and r.get("status") == "ok"]
    for r in vids:
        color = styles[r["model"]][0]
        ax.scatter([r["context"]], [r["ttft_s"]], marker="*", s=120, color=color,
                   label=f"{styles[r['model']][2]}: 1 h video ({r['frames']} frames)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens (batch 1)")
    ax.set_ylabel("prefill time = time to first token (s)")
    meta = data.get("meta", {})
    ax.set_title(f"Prefill time vs context, {meta.get('device', '?')}, bf16 random weights", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def print_table(data: dict):
    print("\nkind           model          ctx     B  status   ttft_s   tok/s      peak_GiB")
    for r in data["rows"]:
        if r["kind"] == "moe_layer":
            print(f"moe_layer      {r['variant']:<28} {r.get('status'):<7} {r.get('seconds', 0) * 1e3 if r.get('seconds') else 0:8.3f} ms "
                  f"{r.get('tflops', 0) or 0:7.1f} TFLOP/s  ratio {r.get('ratio_to_dense_gemm')}")
            continue
        tps = r.get("tokens_per_s", r.get("prefill_tokens_per_s"))
        print(f"{r['kind']:<14} {r['model']:<13} {r.get('context', 0):>7} {r.get('batch', 1):>3}  {r.get('status'):<7} "
              f"{r.get('ttft_s', '')!s:>8} {tps!s:>9} {r.get('peak_gib')!s:>9}")
    print("\nsummary:", json.dumps(data.get("summary", {}), indent=1))


# ------------------------------------------------------------------------------------------------ main
def make_plan(tiny: bool) -> dict:
    if tiny:
        return dict(prefill=[32, 64], decode_ctx=[48], decode_batch=[1, 2], decode_steps=2, chunk=24,
                    warm=16, max_pos=96, gen=4, video=(3, 4, 4), repeat_below=0, overhead=0.0,
                    decode_est=0.0, step_est=0.0, vit_est=0.0, max_ctx_torch_dsa=1 << 30)
    # "256K" = max_pos tokens in all: a (max_pos - gen)-token prompt, then gen decoded tokens
    return dict(prefill=[8192, 32768, 131072], decode_ctx=[32768, 131072], decode_batch=[1, 16],
                decode_steps=16, chunk=16384, warm=4096, max_pos=262144, gen=256, video=(2880, 12, 20),
                repeat_below=8192, overhead=3.0, decode_est=6.0, step_est=0.06, vit_est=10.0,
                max_ctx_torch_dsa=32768)


PHASES = ("moe", "keye_sdpa", "qwen3_vl_moe", "keye_dsa")
# seconds per phase in full mode (each phase is a child process killed at its limit); None = what is left
PHASE_SHARE = {"moe": 30.0, "keye_sdpa": 120.0, "qwen3_vl_moe": 110.0, "keye_dsa": None}


def environment(device, dtype, args) -> dict:
    from _meta import run_meta  # beside this file (the benchmarks folder is on sys.path)

    meta = run_meta(device=device)
    meta.update({"dtype": str(dtype), "tiny": args.tiny, "budget_s": args.budget, "plan": make_plan(args.tiny)})
    return meta


def run_phase(phase: str, args, device, dtype) -> None:
    """One phase in this process, appending its rows to ``args.output``."""
    mk = import_keye()
    run = Runner(args, device, environment(device, dtype, args))
    if args.output and Path(args.output).exists():  # rows of the earlier phases
        old = json.loads(Path(args.output).read_text())
        run.data["rows"] = old.get("rows", [])
        run.data["meta"] = {**old.get("meta", {}), **{k: v for k, v in run.data["meta"].items() if k not in ("budget_s", "date")}}
    plan = make_plan(args.tiny)
    if phase == "moe":
        moe_layer_rows(run, mk, args.tiny, device, dtype)
    elif phase in ("keye_dsa", "keye_sdpa"):
        keye_rows(run, mk, args, device, dtype, plan, phase)
    elif phase == "qwen3_vl_moe":
        qwen_rows(run, args, device, dtype, plan)
    else:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    run.save()


def append_row(path: str, row: dict) -> None:
    data = json.loads(Path(path).read_text())
    data["rows"].append(row)
    Path(path).write_text(json.dumps(data, indent=1))
    print(json.dumps(row), flush=True)


def orchestrate(args, device, dtype, phases: list[str]) -> None:
    """Run the phases one after the other, each in a child process killed at its share of the budget (a GPU
    kernel that hangs cannot be interrupted from inside the process), so one phase cannot sink the others.
    If the DSA phase fails with the Triton kernels, it runs again with the torch reference (short contexts)."""
    import subprocess

    t0 = time.perf_counter()
    deadline = t0 + args.budget
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"meta": environment(device, dtype, args), "rows": []}, indent=1))
    queue = list(phases)
    while queue:
        phase, dsa = queue.pop(0), args.dsa
        if phase.endswith("@dsa_torch"):
            phase, dsa = phase.split("@")[0], "dsa_torch"
        left = deadline - time.perf_counter()
        share = PHASE_SHARE.get(phase) or left
        share = min(share, left) if not args.tiny else left
        if share < (20 if not args.tiny else 1):
            append_row(args.output, {"kind": "phase", "model": phase, "status": "skipped", "reason": f"{left:.0f}s left"})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--output", args.output,
               "--budget", str(max(5.0, share - 12.0)), "--dsa", dsa] + (["--tiny"] if args.tiny else [])
        print(f"=== phase {phase} (dsa={dsa}), {share:.0f}s", flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.run(cmd, timeout=share).returncode
            status = "ok" if rc == 0 else "error"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
        row = {"kind": "phase", "model": phase, "attn": dsa if phase == "keye_dsa" else None, "status": status,
               "returncode": rc, "wall_s": round(time.perf_counter() - start, 1), "limit_s": round(share, 1)}
        append_row(args.output, row)
        if phase == "keye_dsa" and dsa != "dsa_torch":
            rows = json.loads(Path(args.output).read_text())["rows"]
            warm = [r for r in rows if r["kind"] == "warmup" and r["model"] == "keye_dsa"]
            if status != "ok" or (warm and warm[-1]["status"] != "ok"):
                queue.append("keye_dsa@dsa_torch")  # the reference, limited to short contexts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny configs, a few seconds (CI smoke test)")
    p.add_argument("--output", default=None, help="JSON path (rewritten after every row)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-only", default=None, nargs="+", metavar="JSON",
                   help="only redraw the PNG (and table) from these JSON files (a later file's rows replace an earlier "
                        "file's rows of the same model, kind, context and batch; the PNG goes beside the first)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run; rows that would not fit are skipped")
    p.add_argument("--dsa", default="dsa", choices=["dsa", "dsa_triton", "dsa_torch"], help="attn_implementation of the DSA rows")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list out of {PHASES} (run in this order)")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in this process
    p.add_argument("--subprocess", action="store_true", help="child process per phase in --tiny mode too")
    args = p.parse_args(argv)

    if args.plot_only:
        data = merge_runs([json.loads(Path(f).read_text()) for f in args.plot_only])
        data["summary"] = summarize(data)
        make_plot(data, args.plot or str(Path(args.plot_only[0]).with_suffix(".png")))
        print_table(data)
        return 0

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if not args.tiny and device == "cpu":
        raise SystemExit("full-size mode needs a CUDA GPU (31B bf16 parameters); use --tiny on CPU")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if args.phase:
        run_phase(args.phase, args, device, dtype)
        return 0
    if args.output is None:
        args.output = str(Path(os.environ.get("TMPDIR", "/tmp")) / "keye_e2e.json")
    phases = [ph for ph in args.phases.split(",") if ph]
    if args.tiny and not args.subprocess:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).unlink(missing_ok=True)
        for ph in phases:
            run_phase(ph, args, device, dtype)
    else:
        orchestrate(args, device, dtype, phases)
    data = json.loads(Path(args.output).read_text())
    data["summary"] = summarize(data)
    Path(args.output).write_text(json.dumps(data, indent=1))
    if not args.no_plot:
        make_plot(data, args.plot or str(Path(args.output).with_suffix(".png")))
    print_table(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
