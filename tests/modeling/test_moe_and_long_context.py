"""MoE experts, chunked long-context prefill and the growing cache. CPU, tiny configs, < 1 min.

Coverage:
- grouped experts (``torch._grouped_mm``) == the eager reference, fp32, forward and backward (input, routing
  weights, both expert weights), incl. experts with zero tokens and with one token, all tokens on one expert,
  zero-stride gradients (``sum().backward()``), no tokens at all; "auto" falls back where the grouped GEMM
  cannot run (unaligned rows) and "grouped_mm" then says why;
- chunked prefill (several chunk sizes, non-divisors included) == one-shot prefill logits and cache, with dense
  "sdpa" and sparse "dsa_torch" (top-k 16 < the 41-token prompt, so the sparsity is active);
- ``KeyeVL2Cache``: the transformers Cache API (update, get_seq_length, crop in both conventions,
  reorder_cache, batch_repeat_interleave, batch_select_indices, reset) against a plain concatenating
  reference; decode steps write in place (no copy of the whole cache per step); growth keeps generate()
  identical to generation without a cache;
- ``benchmarks/e2e.py --tiny`` runs and writes its JSON;
- GPU only (``-m gpu``, skipped on CPU): grouped == eager in bf16, forward and backward, edge routings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from keye_vl.modeling_keye import KeyeVL2Cache, KeyeVL2MoeForConditionalGeneration, tiny_config
from keye_vl.modeling_keye.modeling_keye_vl_2 import _CACHE_FIELD, KeyeVL2Experts, output_cache

REPO = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- experts
def make_experts(E=8, H=64, I=32, impl="auto", device="cpu", dtype=torch.float32, seed=0):
    cfg = SimpleNamespace(num_experts=E, moe_intermediate_size=I, hidden_size=H, hidden_act="silu", moe_implementation=impl)
    torch.manual_seed(seed)
    ex = KeyeVL2Experts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, H**-0.5)
        ex.down_proj.normal_(0, I**-0.5)
    return ex


def routing(kind: str, N: int, E: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[N, k] distinct expert ids per token."""
    if kind == "random":
        return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    if kind == "sparse":  # experts 0..k-1 get almost everything, expert k exactly one token, the rest none
        idx = torch.arange(k).repeat(N, 1)
        idx[N // 2, 0] = k
        return idx
    if kind == "single_token":
        return torch.arange(k)[None]
    raise ValueError(kind)


def run_experts(ex, x, idx, w, grad_out):
    """Forward + backward; returns output and grads of x, w, gate_up_proj, down_proj."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    ex.zero_grad(set_to_none=True)
    y = ex(x, idx, w)
    (y.float() * grad_out).sum().backward()
    return [y.detach(), x.grad, w.grad, ex.gate_up_proj.grad, ex.down_proj.grad]


@pytest.mark.parametrize("kind,N", [("random", 37), ("sparse", 23), ("single_token", 1)])
def test_grouped_experts_equal_eager_fp32(kind, N):
    E, H, I, k = 8, 64, 32, 2
    g = torch.Generator().manual_seed(1)
    ex = make_experts(E, H, I)
    if ex.grouped_mm_problem(torch.zeros(1, H)) is not None:
        pytest.skip(f"grouped_mm cannot run here: {ex.grouped_mm_problem(torch.zeros(1, H))}")
    idx = routing(kind, N, E, k, g)
    x = torch.randn(N, H, generator=g)
    w = torch.rand(N, k, generator=g)
    go = torch.randn(N, H, generator=g)
    results = {}
    for impl in ("eager", "grouped_mm"):
        ex.config.moe_implementation = impl
        assert ex.implementation(x) == impl
        results[impl] = run_experts(ex, x, idx, w, go)
    names = ["out", "dx", "dw", "d_gate_up", "d_down"]
    for name, a, b in zip(names, results["grouped_mm"], results["eager"]):
        assert a is not None and b is not None, name
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-5, f"{name}: rel {rel(a, b):.2e}"
    # experts that got no token have exactly zero weight gradients on both paths
    hit = torch.zeros(E, dtype=torch.bool)
    hit[idx.unique()] = True
    for grads in (results["grouped_mm"], results["eager"]):
        assert grads[3][~hit].abs().max().item() == 0.0 if (~hit).any() else True
        assert grads[4][~hit].abs().max().item() == 0.0 if (~hit).any() else True


def test_grouped_experts_all_on_one_expert_and_zero_stride_grad():
    E, H, I, k, N = 8, 64, 32, 1, 11
    ex = make_experts(E, H, I, impl="grouped_mm")
    if ex.grouped_mm_problem(torch.zeros(1, H)) is not None:
        pytest.skip("grouped_mm cannot run here")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, H, generator=g, requires_grad=True)
    idx = torch.full((N, k), 5)
    w = torch.ones(N, k)
    y = ex(x, idx, w)
    y.sum().backward()  # a zero-stride gradient reaches the grouped GEMM backward
    ref = (torch.nn.functional.silu(x @ ex.gate_up_proj[5, :, :I]) * (x @ ex.gate_up_proj[5, :, I:])) @ ex.down_proj[5]
    assert rel(y, ref) < 1e-5
    assert ex.gate_up_proj.grad[torch.arange(E) != 5].abs().max().item() == 0.0
    assert ex(x[:0], idx[:0], w[:0]).shape == (0, H)  # no tokens at all


def test_grouped_experts_deterministic_and_no_python_expert_loop(monkeypatch):
    ex = make_experts(impl="grouped_mm")
    if ex.grouped_mm_problem(torch.zeros(1, 64)) is not None:
        pytest.skip("grouped_mm cannot run here")
    g = torch.Generator().manual_seed(3)
    x, idx, w, go = torch.randn(50, 64, generator=g), routing("random", 50, 8, 2, g), torch.rand(50, 2, generator=g), torch.randn(50, 64, generator=g)
    # the grouped path never syncs to the host for the expert list (no unique().tolist())
    monkeypatch.setattr(torch, "unique", lambda *a, **k: (_ for _ in ()).throw(AssertionError("host sync")))
    a = run_experts(ex, x, idx, w, go)
    b = run_experts(ex, x, idx, w, go)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_auto_falls_back_where_grouped_mm_cannot_run():
    ex = make_experts(E=4, H=64, I=6)  # fp32 rows of 6 = 24 bytes: not 16-byte aligned
    x = torch.randn(5, 64)
    assert ex.grouped_mm_problem(x) is not None
    assert ex.implementation(x, 2) == "batched_mm"  # few rows: gathered weights, 5 * 2 * 3 * 64 * 6 * 4 bytes
    ex.batched_max_bytes = 5 * 2 * 3 * 64 * 6 * 4 - 1
    assert ex.implementation(x, 2) == "eager"  # one byte over the cap
    idx, w = torch.tensor([[0, 1]] * 5), torch.rand(5, 2)
    assert ex(x, idx, w).shape == (5, 64)
    ex.config.moe_implementation = "grouped_mm"
    with pytest.raises(ValueError, match="16 bytes"):
        ex(x, idx, w)


@pytest.mark.parametrize("kind,N", [("random", 9), ("sparse", 6), ("single_token", 1)])
def test_batched_experts_equal_eager_fp32_without_host_sync(kind, N, monkeypatch):
    """The batched path (auto's choice for decode where the grouped GEMM cannot run, e.g. fp32 on CUDA) == eager,
    forward and backward, and never reads the expert list on the host."""
    E, H, I, k = 8, 64, 32, 2
    g = torch.Generator().manual_seed(5)
    x, idx = torch.randn(N, H, generator=g), routing(kind, N, E, k, g)
    w, go = torch.rand(N, k, generator=g), torch.randn(N, H, generator=g)
    want = run_experts(make_experts(impl="eager"), x, idx, w, go)
    ex = make_experts()
    monkeypatch.setattr(ex, "grouped_mm_problem", lambda x: "pretend the grouped GEMM cannot run")
    assert ex.implementation(x, k) == "batched_mm"
    monkeypatch.setattr(torch, "unique", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("host sync")))
    for got, ref_ in zip(run_experts(ex, x, idx, w, go), want, strict=True):
        torch.testing.assert_close(got, ref_, rtol=1e-5, atol=1e-6)


def test_grouped_probe_works_under_inference_mode(monkeypatch):
    from keye_vl.modeling_keye import moe_keye_vl_2 as mm

    monkeypatch.setattr(mm, "_GROUPED_MM_PROBES", {})
    ex = make_experts()
    with torch.inference_mode():  # the probe builds ordinary tensors: its backward check still runs
        x = torch.randn(3, 64)
        expected = "grouped_mm" if mm._grouped_mm_fn() is not None else "eager"
        assert ex.implementation(x) == expected
        assert ex(x, torch.tensor([[0, 1]] * 3), torch.rand(3, 2)).shape == (3, 64)
    if expected == "grouped_mm":
        assert mm._GROUPED_MM_PROBES[("cpu", None, torch.float32)] == (None, None)


# ---------------------------------------------------------------------------------- chunked prefill
def make_model(impl, seed=0, **overrides):
    """Tiny model (vocabulary cut to 4096 rows to keep the LM head cheap on CPU)."""
    torch.manual_seed(seed)
    small_vocab = {"vocab_size": 4096, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model = KeyeVL2MoeForConditionalGeneration(tiny_config(**{**small_vocab, **overrides})).eval()
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("impl", ["sdpa", "dsa_torch"])
def test_chunked_prefill_equals_one_shot(impl):
    model = make_model(impl, seed=11)
    assert model.config.sa_config["topk"] == 16
    T = 41  # > top-k: sparse attention selects a strict subset for most queries
    ids = torch.randint(3, 4000, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.config.prefill_chunk_size = None
        ref = model(input_ids=ids, use_cache=True)
        ref_cache = output_cache(ref)
        for chunk in (3, 7, 16, 40):  # non-divisors of 41; 16 = top-k; 40 leaves a 1-token chunk
            model.config.prefill_chunk_size = chunk
            out = model(input_ids=ids, use_cache=True)
            assert rel(out.logits, ref.logits) < 1e-5, f"chunk {chunk}: rel {rel(out.logits, ref.logits):.2e}"
            cache = output_cache(out)
            assert cache.get_seq_length() == T
            for i in range(model.config.num_hidden_layers):
                assert rel(cache.layers[i].keys, ref_cache.layers[i].keys) < 1e-5
                if impl == "dsa_torch":
                    assert cache.indexer_keys[i].shape == (2, T, 16)
                    assert rel(cache.indexer_keys[i], ref_cache.indexer_keys[i]) < 1e-5
        # logits_to_keep=1 on a chunked prefill: only the last position, same numbers
        last = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        assert last.logits.shape[1] == 1 and rel(last.logits[:, -1], ref.logits[:, -1]) < 1e-5
    model.config.prefill_chunk_size = None


# ----------------------------------------------------------------------------------------- the cache
class CatReference:
    """Plain concatenating cache layer: the semantics ``KeyeVL2CacheLayer`` must keep."""

    def __init__(self):
        self.k = self.v = self.ik = None

    def update(self, k, v, ik):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        self.ik = ik if self.ik is None else torch.cat([self.ik, ik], 1)


def assert_same(cache: KeyeVL2Cache, refs: list[CatReference]):
    for i, ref in enumerate(refs):
        assert cache.get_seq_length(i) == ref.k.shape[2]
        assert torch.equal(cache.layers[i].keys, ref.k) and torch.equal(cache.layers[i].values, ref.v)
        assert torch.equal(cache.indexer_keys[i], ref.ik)


def test_cache_api_matches_concatenation():
    g = torch.Generator().manual_seed(5)
    B, H, D, Di, L = 3, 2, 8, 4, 2
    cache, refs = KeyeVL2Cache(growth=1.25, block=4), [CatReference() for _ in range(L)]

    def step(T):
        for i in range(L):
            k, v, ik = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g), torch.randn(B, T, Di, generator=g)
            ko, vo = cache.update(k, v, i)
            iko = cache.update_indexer(ik, i)
            refs[i].update(k, v, ik)
            assert torch.equal(ko, refs[i].k) and torch.equal(vo, refs[i].v) and torch.equal(iko, refs[i].ik)

    step(5)
    for _ in range(9):
        step(1)
    assert_same(cache, refs)
    cache.crop(-3)  # 5.18+ convention: drop the last 3
    for r in refs:
        r.k, r.v, r.ik = r.k[:, :, :-3], r.v[:, :, :-3], r.ik[:, :-3]
    assert_same(cache, refs)
    cache.crop(10)  # older convention: keep the first 10
    for r in refs:
        r.k, r.v, r.ik = r.k[:, :, :10], r.v[:, :, :10], r.ik[:, :10]
    assert_same(cache, refs)
    cache.crop(0)
    assert_same(cache, refs)
    step(2)  # appending after a crop overwrites the dropped tail
    assert_same(cache, refs)
    beam = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam)
    for r in refs:
        r.k, r.v, r.ik = r.k[beam], r.v[beam], r.ik[beam]
    assert_same(cache, refs)
    cache.batch_repeat_interleave(2)
    for r in refs:
        r.k, r.v, r.ik = (t.repeat_interleave(2, 0) for t in (r.k, r.v, r.ik))
    assert_same(cache, refs)
    sel = torch.tensor([1, 4, 5])
    cache.batch_select_indices(sel)
    for r in refs:
        r.k, r.v, r.ik = r.k[sel], r.v[sel], r.ik[sel]
    assert_same(cache, refs)
    step(1)
    assert_same(cache, refs)
    mem = cache.memory_bytes()
    assert mem["kv_allocated"] >= mem["kv_used"] == L * 3 * 13 * 2 * H * D * 4
    assert mem["indexer_used"] == L * 3 * 13 * Di * 4
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layers[0].keys.shape[2] == 0
    refs = [CatReference() for _ in range(L)]
    step(4)  # the kept buffers are reused
    assert_same(cache, refs)


def test_decode_steps_write_in_place():
    """A decode step writes its token into the buffer: no copy of the whole cache (DynamicLayer's torch.cat
    copies all S tokens every step); reallocations are geometric, O(log S)."""
    cache = KeyeVL2Cache(growth=1.25, block=16)
    B, H, D = 1, 2, 8
    cache.update(torch.randn(B, H, 100, D), torch.randn(B, H, 100, D), 0)
    cache.update_indexer(torch.randn(B, 100, 4), 0)
    ptrs, reallocs = cache.layers[0]._k.data_ptr(), 0
    for _ in range(400):
        cache.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
        cache.update_indexer(torch.randn(B, 1, 4), 0)
        p = cache.layers[0]._k.data_ptr()
        reallocs += p != ptrs
        ptrs = p
    assert cache.get_seq_length() == 500
    assert 1 <= reallocs <= 8, reallocs
    layer = cache.layers[0]
    assert layer._k.shape[1] <= 1.25 * 500 + 16 and layer._ik.shape[1] >= 500
    reserved = KeyeVL2Cache(capacity=600)
    reserved.update(torch.randn(B, H, 100, D), torch.randn(B, H, 100, D), 0)
    p0 = reserved.layers[0]._k.data_ptr()
    for _ in range(400):
        reserved.update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), 0)
    assert reserved.layers[0]._k.data_ptr() == p0  # never reallocated


def test_cache_under_autograd_is_out_of_place():
    cache = KeyeVL2Cache()
    k = torch.randn(1, 2, 3, 4, requires_grad=True)
    v = torch.randn(1, 2, 3, 4, requires_grad=True)
    ko, vo = cache.update(k, v, 0)
    k2 = torch.randn(1, 2, 1, 4, requires_grad=True)
    ko2, vo2 = cache.update(k2, k2, 0)
    (ko.sum() + ko2.sum() + vo2.sum()).backward()  # no "modified by an inplace operation" error
    assert torch.equal(k.grad, 2 * torch.ones_like(k)) and k2.grad is not None


@pytest.mark.parametrize("impl", ["sdpa", "dsa_torch"])
def test_growing_cache_keeps_generate_equal(impl):
    model = make_model(impl, seed=12)
    ids = torch.randint(3, 4000, (2, 14), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)  # 14 + 8 > top-k 16: decode is sparse
    with torch.no_grad():
        no_cache = model.generate(input_ids=ids, use_cache=False, **kw)
        default = model.generate(input_ids=ids, **kw)  # KeyeVL2Cache chosen by the model
        reserved = model.generate(input_ids=ids, **{_CACHE_FIELD: KeyeVL2Cache(capacity=40)}, **kw)
        model.config.prefill_chunk_size = 5  # chunked prefill + a cache that grows at almost every step
        grown = model.generate(input_ids=ids, **{_CACHE_FIELD: KeyeVL2Cache(growth=1.1, block=1)}, **kw)
        model.config.prefill_chunk_size = None
    assert no_cache.shape[1] == 22
    for other in (default, reserved, grown):
        assert torch.equal(other, no_cache)


# ----------------------------------------------------------------------------------------- benchmark
def test_e2e_benchmark_tiny_runs(tmp_path):
    out = tmp_path / "e2e.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "e2e.py"), "--tiny", "--output", str(out), "--no-plot"],
        capture_output=True, text=True, timeout=240, env=env, cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    models = {r["model"] for r in data["rows"]}
    assert {"keye_dsa", "keye_sdpa", "qwen3_vl_moe"} <= models
    kinds = {r["kind"] for r in data["rows"]}
    assert {"prefill", "decode", "moe_layer"} <= kinds
    assert all(r["status"] in ("ok", "oom", "skipped", "error", "timeout") for r in data["rows"])
    assert all(r["status"] == "ok" for r in data["rows"] if r["kind"] == "warmup")
    assert any(r["kind"] == "prefill" and r["status"] == "ok" and r["tokens_per_s"] > 0 for r in data["rows"])


# ----------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind,N", [("random", 515), ("sparse", 77), ("single_token", 1)])
def test_grouped_experts_equal_eager_bf16_gpu(kind, N):
    E, H, I, k = 16, 256, 128, 4
    ex = make_experts(E, H, I, device="cuda", dtype=torch.bfloat16)
    x0 = torch.zeros(1, H, device="cuda", dtype=torch.bfloat16)
    assert ex.implementation(x0) == "grouped_mm", ex.grouped_mm_problem(x0)
    g = torch.Generator().manual_seed(7)
    idx = routing(kind, N, E, k, g).cuda()
    x = torch.randn(N, H, generator=g).cuda().bfloat16()
    w = torch.rand(N, k, generator=g).cuda().bfloat16()
    go = torch.randn(N, H, generator=g).cuda()
    res = {}
    for impl in ("eager", "grouped_mm"):
        ex.config.moe_implementation = impl
        res[impl] = run_experts(ex, x, idx, w, go)
    # fp32 oracle on the same bf16 values
    ex32 = make_experts(E, H, I, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        ex32.gate_up_proj.copy_(ex.gate_up_proj.float())
        ex32.down_proj.copy_(ex.down_proj.float())
    ex32.config.moe_implementation = "eager"
    oracle = run_experts(ex32, x.float(), idx, w.float(), go)
    hit = torch.zeros(E, dtype=torch.bool, device="cuda")
    hit[idx.unique()] = True
    for name, a, b, o in zip(["out", "dx", "dw", "d_gate_up", "d_down"], res["grouped_mm"], res["eager"], oracle):
        assert torch.isfinite(a.float()).all(), name
        assert rel(a, o) < 2e-2, f"{name}: grouped vs fp32 {rel(a, o):.2e}"
        assert rel(b, o) < 2e-2, f"{name}: eager vs fp32 {rel(b, o):.2e}"
        if name.startswith("d_") and (~hit).any():
            assert a[~hit].abs().max().item() == 0.0, f"{name}: an expert with no token got a gradient"
