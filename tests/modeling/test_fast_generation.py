"""Fast generation: the static cache (``generate(..., cache_implementation="static")``) against the default
dynamic cache, graph safety of its decode step, documented behaviour of sampling / beams / streaming / capacity, and
the GPU checks (no host sync, CUDA-graph replay, compiled generate) marked ``gpu``. Tiny random models, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config
from keye_vl.modeling_keye.cache_keye_vl_2 import KeyeVL2StaticCache
from keye_vl.modeling_keye.keye_dsa_decode import decode_topk_indices, ordered_float_keys
from keye_vl.modeling_keye.modeling_keye_vl_2 import _CACHE_FIELD, output_cache
from keye_vl.kernels import keye_dsa_reference as ref

IMG, VID, VSTART, VEND, FRAME = 151655, 151656, 151652, 151653, 151669
TOPK = 16  # tiny_config's indexer top-k: prompts below are 14-30 tokens and decode 10 more, so DSA turns sparse


def make_model(impl, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval().to(device)
    model.set_attn_implementation(impl)
    return model


def rows_for(kind: str, n_rows: int, g: torch.Generator):
    """Token rows (different lengths) + vision inputs of one kind; grids in patches (t, h, w)."""
    rows, grids = [], []
    for r in range(n_rows):
        text = torch.randint(3, 5000, (4 + 3 * r,), generator=g).tolist()
        if kind == "text":
            rows.append(text + torch.randint(3, 5000, (10,), generator=g).tolist())
        elif kind == "image":
            grid = [1, 4, 4 + 2 * r]
            grids.append(grid)
            rows.append(text[:3] + [VSTART] + [IMG] * (grid[1] * grid[2] // 4) + [VEND] + text[3:])
        else:
            grid = [2, 2, 4 + 2 * (r % 2)]
            grids.append(grid)
            frames = []
            for f in range(grid[0]):
                frames += [FRAME, 15 + f] + [VID] * (grid[1] * grid[2] // 4)
            rows.append(text[:2] + [VSTART] + frames + [VEND] + text[2:])
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    vision = {}
    if grids:
        pix = torch.randn(sum(t * h * w for t, h, w in grids), 588, generator=g)
        key = "pixel_values" if kind == "image" else "pixel_values_videos"
        vision = {key: pix, ("image_grid_thw" if kind == "image" else "video_grid_thw"): torch.tensor(grids)}
    return ids, mask, vision


def generate(model, ids, mask, vision, static: bool, **kw):
    extra = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **vision, return_dict_in_generate=True,
                              output_logits=True, **extra, **kw)


# ----------------------------------------------------------------------------- 1. static == dynamic
@pytest.mark.parametrize("impl", ["dsa_torch", "sdpa"])
@pytest.mark.parametrize("kind", ["text", "image", "video"])
@pytest.mark.parametrize("batch", [1, 3])
def test_static_cache_greedy_equals_dynamic(impl, kind, batch):
    model = make_model(impl, seed=3)
    ids, mask, vision = rows_for(kind, batch, torch.Generator().manual_seed(10 + batch))
    dyn = generate(model, ids, mask, vision, static=False, max_new_tokens=10, do_sample=False)
    sta = generate(model, ids, mask, vision, static=True, max_new_tokens=10, do_sample=False)
    assert type(output_cache(sta)) is KeyeVL2StaticCache and type(output_cache(dyn)).__name__ == "KeyeVL2Cache"
    assert torch.equal(sta.sequences, dyn.sequences)
    for a, b in zip(sta.logits, dyn.logits, strict=True):
        assert (a - b).abs().max().item() < 1e-4
    if impl == "dsa_torch":  # the longest row went past top-k: the selection was really sparse at the end
        assert int(mask.sum(1).max()) + 9 > TOPK


def test_static_cache_with_chunked_prefill_equals_dynamic():
    """model.config.prefill_chunk_size: the static cache's prefill runs in chunks (host-known offsets, padding mask
    written chunk by chunk) and decodes like the default cache (image prompt split inside the image)."""
    model = make_model("dsa_torch", seed=12)
    model.config.prefill_chunk_size = 7
    ids, mask, vision = rows_for("image", 3, torch.Generator().manual_seed(31))
    dyn = generate(model, ids, mask, vision, static=False, max_new_tokens=6, do_sample=False)
    sta = generate(model, ids, mask, vision, static=True, max_new_tokens=6, do_sample=False)
    assert torch.equal(sta.sequences, dyn.sequences)
    for a, b in zip(sta.logits, dyn.logits, strict=True):
        assert (a - b).abs().max().item() < 1e-4
    assert torch.equal(output_cache(sta).key_mask[:, : ids.shape[1]], mask.bool())


def test_static_cache_buffers_keep_their_addresses_and_hold_the_padding_mask():
    model = make_model("dsa_torch", seed=1)
    ids, mask, vision = rows_for("text", 3, torch.Generator().manual_seed(5))
    out = generate(model, ids, mask, vision, static=True, max_new_tokens=6, do_sample=False)
    cache = output_cache(out)
    L = ids.shape[1]
    assert cache.max_cache_len == L + 6 - 1  # prompt + max_new_tokens - 1 (the last token is never fed back)
    assert int(cache.get_seq_length()) == L + 5
    layer = cache.layers[0]
    assert layer._k.shape == (3, L + 5, 2, 16) and layer._ik.shape == (3, L + 5, 16)
    assert torch.equal(cache.key_mask[:, :L], mask.bool()) and bool(cache.key_mask[:, L:].all())
    # every layer's K/V and indexer keys equal the dynamic cache's (same tokens)
    dyn = output_cache(generate(model, ids, mask, vision, static=False, max_new_tokens=6, do_sample=False))
    for ls, ld in zip(cache.layers, dyn.layers, strict=True):
        torch.testing.assert_close(ls._k[:, : L + 5], ld.keys.transpose(1, 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(ls._ik[:, : L + 5], ld.indexer_keys, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "dsa_torch"])
def test_chunked_prefill_returns_whole_sequence_hidden_states_and_attentions(impl):
    model = make_model(impl, seed=4)
    ids = torch.randint(3, 5000, (2, 20), generator=torch.Generator().manual_seed(4))
    kw = dict(output_hidden_states=True, output_attentions=impl == "eager")
    with torch.no_grad():
        full = model(input_ids=ids, **kw)
        model.config.prefill_chunk_size = 7  # chunks of 7, 7, 6
        chunked = model(input_ids=ids, **kw)
    assert len(chunked.hidden_states) == 3 and chunked.hidden_states[0].shape == (2, 20, 64)
    for a, b in zip(chunked.hidden_states, full.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if impl == "eager":
        assert chunked.attentions[0].shape == (2, 4, 20, 20)
        for a, b in zip(chunked.attentions, full.attentions, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert float(chunked.attentions[1][0, 0, 3, 4:].abs().sum()) == 0.0  # causal: nothing past the query


def test_static_cache_api_in_place_writes_crop_reorder_and_memory():
    cache = KeyeVL2StaticCache(num_layers=2, max_cache_len=8)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)  # [B, H, T, D]
    for i in range(2):
        keys, values = cache.update(k, -k, i)
        ik = cache.update_indexer(k[:, 0] + 100, i)
    assert keys.shape == (2, 1, 8, 2) and ik.shape == (2, 8, 2)  # whole buffers
    assert torch.equal(keys[:, :, :3], k) and bool((keys[:, :, 3:] == 0).all())
    assert int(cache.get_seq_length()) == 3 and cache.get_max_cache_shape() == 8
    ptr = cache.layers[0]._k.data_ptr()
    cache.crop(-1)  # drop the last token: the next update overwrites position 2
    cache.update(k[:, :, :1] + 50, k[:, :, :1], 0)
    assert int(cache.get_seq_length()) == 3 and torch.equal(cache.layers[0]._k[:, 2, 0], (k[:, 0, 0] + 50))
    cache.crop(2)  # keep the first 2 (absolute convention)
    assert int(cache.layers[1].cumulative_length) == 2 and int(cache.layers[1].indexer_cumulative_length) == 2
    before = cache.layers[1]._ik.clone()
    cache.set_key_mask(torch.tensor([[0, 1], [1, 1]]), 0, 2, 2, torch.device("cpu"))
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[1]._ik, before.flip(0)) and cache.layers[0]._k.data_ptr() == ptr
    assert cache.key_mask.tolist() == [[True] * 8, [False] + [True] * 7]
    assert cache.memory_bytes() == {"kv_allocated": 2 * 2 * (2 * 8 * 1 * 2 * 4), "indexer_allocated": 2 * 2 * 8 * 2 * 4}
    cache.reset()
    assert not cache.prefilled and int(cache.get_seq_length()) == 0 and cache.layers[0]._k.data_ptr() == ptr
    with pytest.raises(ValueError, match="max_cache_len >= 1"):
        KeyeVL2StaticCache(num_layers=2, max_cache_len=0)
    half = KeyeVL2StaticCache(num_layers=1, max_cache_len=4)
    ik16 = torch.randn(1, 3, 8).to(torch.bfloat16)
    got = half.update_indexer(ik16, 0)  # stored in fp32 (exact upcast) for the fp32 decode scoring
    assert got.dtype == torch.float32 and torch.equal(got[:, :3], ik16.float())


# ----------------------------------------------------------------------------- decode top-k == reference
def test_decode_topk_equals_reference_including_ties_zeros_and_nan():
    g = torch.Generator().manual_seed(0)
    B, T, H, D, S, C, k = 2, 3, 2, 16, 40, 48, 8
    q, w, keys = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, generator=g), torch.randn(B, C, D, generator=g)
    keys[:, 5:9] = keys[:, 4:5]  # exact ties: equal keys give equal scores
    keys[0, 20:30] = 0.0  # exact zero scores (+0.0 and -0.0 after negative weights): ties too
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, :6] = False  # left padding of row 1
    off = S - T
    want = ref.dsa_topk_indices(q, w, keys[:, :S], k, q_offset=off, key_mask=key_mask)
    pos = off + torch.arange(T)
    allowed = (torch.arange(C)[None, None] <= pos[None, :, None]) & torch.cat(
        [key_mask, torch.ones(B, C - S, dtype=torch.bool)], 1)[:, None]
    got = decode_topk_indices(q, w, keys, allowed, k)
    assert torch.equal(got, want)
    # fewer allowed keys than k: all of them, ascending, then -1
    few = torch.zeros(B, T, C, dtype=torch.bool)
    few[:, :, [3, 1, 7]] = True
    assert got.shape == (B, T, k) and decode_topk_indices(q, w, keys, few, k)[0, 0].tolist() == [1, 3, 7] + [-1] * 5


def test_ordered_float_keys_hand_values():
    x = torch.tensor([float("-inf"), -2.0, -0.0, 0.0, 1e-30, 3.0, float("inf"), float("nan")])
    key = ordered_float_keys(x)
    assert key[2] == key[3] == 2**31  # -0.0 == +0.0
    assert key[7] == key[0]  # NaN counts as -inf
    assert key[0] < key[1] < key[3] < key[4] < key[5] < key[6]
    assert key[5] == 2**31 + 0x40400000  # 3.0f = 0x40400000
    # compiled (the static decode under generate's compile path): -0.0 still equals +0.0 (a "+ 0.0" did not survive)
    import torch._dynamo as dynamo

    dynamo.reset()
    compiled = torch.compile(ordered_float_keys, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(x), key)


# ----------------------------------------------------------------------------- graph safety (CPU proxy)
@pytest.mark.parametrize("impl", ["dsa_torch", "sdpa"])
def test_static_decode_step_traces_as_one_graph_without_recompiling(impl):
    """torch.compile(fullgraph=True) refuses any graph break: a host read (.item(), .tolist(), int(tensor)) or a
    data-dependent shape in the decode step would raise here. Two steps at different lengths reuse one graph."""
    import torch._dynamo

    model = make_model(impl, seed=2).to(torch.bfloat16)  # bf16: the meta kernel of grouped_mm rejects fp32
    ids = torch.randint(3, 5000, (2, 18), generator=torch.Generator().manual_seed(4))
    cache = KeyeVL2StaticCache(model.config, max_cache_len=24)
    eager_cache = KeyeVL2StaticCache(model.config, max_cache_len=24)
    torch._dynamo.reset()
    frames = []
    step = torch.compile(model, backend=lambda gm, _: frames.append(gm) or gm.forward, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for c in (cache, eager_cache):
            model(input_ids=ids, past_key_values=c, use_cache=True)
            c.check_capacity = False
        tok = ids[:, -1:].contiguous()  # generate feeds contiguous [B, 1] tokens
        for _ in range(2):
            got = step(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            want = model(input_ids=tok, past_key_values=eager_cache, use_cache=True, logits_to_keep=1).logits
            assert torch.equal(got, want)  # the same ops, traced
            tok = want[:, -1].argmax(-1, keepdim=True)
    assert len(frames) == 1, f"{len(frames)} graphs (a recompilation or a graph break)"
    assert int(cache.get_seq_length()) == int(eager_cache.get_seq_length()) == 20


def test_generate_compile_path_compiles_the_decode_step_once():
    """transformers' own compile path (the one CUDA gets by default with a static cache; forced on CPU here, with
    the graph-capturing backend replaced by one that records graphs): every decode step of a left-padded batch runs
    the same single graph (no break, no recompilation as the sequence grows), and the tokens equal the default
    cache's."""
    import torch._dynamo
    from transformers import CompileConfig

    model = make_model("dsa_torch", seed=5).to(torch.bfloat16)  # bf16: the meta kernel of grouped_mm rejects fp32
    ids, mask, vision = rows_for("image", 2, torch.Generator().manual_seed(21))
    frames = []
    cc = CompileConfig(backend=lambda gm, _: frames.append(gm) or gm.forward, fullgraph=True, dynamic=False, mode=None)
    cc._compile_all_devices = True
    torch._dynamo.reset()
    dyn = generate(model, ids, mask, vision, static=False, max_new_tokens=8, do_sample=False)
    sta = generate(model, ids, mask, vision, static=True, max_new_tokens=8, do_sample=False, compile_config=cc)
    assert hasattr(model, "_compiled_call") and len(frames) == 1
    assert torch.equal(sta.sequences, dyn.sequences)


# ----------------------------------------------------------------------------- 3. documented behaviour
def test_sampling_and_num_return_sequences_match_dynamic():
    model = make_model("dsa_torch", seed=6)
    ids, mask, vision = rows_for("image", 2, torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8, num_return_sequences=2)
    torch.manual_seed(123)
    dyn = generate(model, ids, mask, vision, static=False, **kw)
    torch.manual_seed(123)
    sta = generate(model, ids, mask, vision, static=True, **kw)
    assert sta.sequences.shape == (4, ids.shape[1] + 8)
    assert torch.equal(sta.sequences, dyn.sequences)


def test_beam_search_reorders_the_static_cache_in_place():
    model = make_model("dsa_torch", seed=7)
    ids, mask, vision = rows_for("video", 2, torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    dyn = generate(model, ids, mask, vision, static=False, **kw)
    sta = generate(model, ids, mask, vision, static=True, **kw)
    assert torch.equal(sta.sequences, dyn.sequences)
    torch.testing.assert_close(sta.sequences_scores, dyn.sequences_scores, rtol=0, atol=1e-4)


def test_text_iterator_streamer_streams_what_static_generate_returns():
    from transformers import TextIteratorStreamer

    from keye_vl.processing import build_keye_processor

    tok = build_keye_processor().tokenizer
    model = make_model("dsa_torch", seed=8)
    ids = torch.tensor([tok("Describe the sea at night, in one sentence.")["input_ids"]])
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                             streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, ids.shape[1]:])


def test_max_new_tokens_past_the_cache_size_is_a_clear_error():
    model = make_model("dsa_torch", seed=9)
    ids = torch.randint(3, 5000, (1, 12), generator=torch.Generator().manual_seed(9))
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    small = KeyeVL2StaticCache(model.config, max_cache_len=16)
    with pytest.raises(ValueError, match=r"12 \+ max_new_tokens - 1 = 19 tokens do not fit the KeyeVL2StaticCache|"
                                         r"prompt \+ max_new_tokens - 1 = 19 tokens do not fit"):
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, **{_CACHE_FIELD: small})
    assert not calls  # refused before the first forward
    hook.remove()
    with pytest.raises(ValueError, match="cache_implementation='offloaded_static' is not supported"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="offloaded_static")
    with pytest.raises(ValueError, match="set model.config.prefill_chunk_size instead"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static", prefill_chunk_size=4)
    with pytest.raises(ValueError, match="max_position_embeddings=32768"):
        model.generate(input_ids=ids, max_new_tokens=40000, cache_implementation="static")
    # a hand-written decode loop on a full cache: a clear error, not an index error inside index_copy_
    cache = KeyeVL2StaticCache(model.config, max_cache_len=13)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        model(input_ids=ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match=r"KeyeVL2StaticCache is full: 13 cached \+ 1 new tokens > max_cache_len=13"):
            model(input_ids=ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match=r"14 tokens do not fit the KeyeVL2StaticCache \(max_cache_len=13\)"):
            model(input_ids=torch.cat([ids, ids[:, :2]], 1), past_key_values=KeyeVL2StaticCache(model.config, max_cache_len=13))
    with pytest.raises(ValueError, match="already holds tokens; call cache.reset"):
        model.generate(input_ids=ids, max_new_tokens=1, **{_CACHE_FIELD: cache})
    with pytest.raises(ValueError, match="transformers' StaticCache"):
        from transformers import StaticCache

        model(input_ids=ids, past_key_values=StaticCache(config=model.config, max_cache_len=20))


def test_reset_static_cache_reuses_buffers_and_gives_the_same_tokens():
    model = make_model("sdpa", seed=10)
    ids = torch.randint(3, 5000, (1, 14), generator=torch.Generator().manual_seed(10))
    cache = KeyeVL2StaticCache(model.config, max_cache_len=20)
    with torch.no_grad():
        first = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **{_CACHE_FIELD: cache})
        ptr = cache.layers[0]._k.data_ptr()
        cache.reset()
        second = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, **{_CACHE_FIELD: cache})
    assert torch.equal(first, second) and cache.layers[0]._k.data_ptr() == ptr
    # after generate and reset, a hand-written loop past the capacity is a clear error again (not an index error)
    cache.reset()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        for _ in range(6):
            model(input_ids=ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match=r"KeyeVL2StaticCache is full: 20 cached \+ 1 new tokens > max_cache_len=20"):
            model(input_ids=ids[:, :1], past_key_values=cache)
        cache.reset()
        with pytest.raises(ValueError, match="buffers for batch size 1, got 2 rows"):
            model.generate(input_ids=ids.repeat(2, 1), max_new_tokens=2, do_sample=False, **{_CACHE_FIELD: cache})


# ----------------------------------------------------------------------------- GPU (H200)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prefilled(model, ids, cap):
    cache = KeyeVL2StaticCache(model.config, max_cache_len=cap)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
    cache.check_capacity = False
    return cache, logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["dsa_triton", "sdpa"])
def test_gpu_static_decode_step_has_no_host_sync(impl):
    model = make_model(impl, seed=11, device="cuda").to(torch.bfloat16)  # the inference dtype (grouped experts)
    ids = torch.randint(3, 5000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cache, tok = _prefilled(model, ids, 64)
    with torch.no_grad():
        model(input_ids=tok, past_key_values=cache, logits_to_keep=1)  # first decode step: lazy init done
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                tok = model(input_ids=tok, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(cache.get_seq_length()) == 44


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["dsa_triton", "sdpa"])
def test_gpu_cuda_graph_replay_of_a_decode_step_equals_eager(impl):
    model = make_model(impl, seed=12, device="cuda").to(torch.bfloat16)
    ids = torch.randint(3, 5000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    eager_cache, tok = _prefilled(model, ids, 64)
    graph_cache, _ = _prefilled(model, ids, 64)
    static_tok = tok.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compilation, cuBLAS handles), then undo its token
            model(input_ids=static_tok, past_key_values=graph_cache, logits_to_keep=1)
        torch.cuda.current_stream().wait_stream(side)
        graph_cache.crop(-1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(input_ids=static_tok, past_key_values=graph_cache, logits_to_keep=1).logits
        for _ in range(4):
            want = model(input_ids=tok, past_key_values=eager_cache, logits_to_keep=1).logits
            static_tok.copy_(tok)
            graph.replay()
            torch.testing.assert_close(static_out, want, rtol=0, atol=1e-2)  # the same kernels, replayed
            tok = want[:, -1].argmax(-1, keepdim=True)
    assert int(graph_cache.get_seq_length()) == int(eager_cache.get_seq_length()) == 44


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl,kind", [("dsa_triton", "video"), ("dsa_triton", "text"), ("sdpa", "image")])
def test_gpu_compiled_static_generate_equals_dynamic(impl, kind):
    """generate(cache_implementation='static') on CUDA compiles the decode step (transformers' CompileConfig,
    mode 'reduce-overhead': CUDA graphs); tokens equal the dynamic cache's, logits within fp32 tolerance."""
    model = make_model(impl, seed=13, device="cuda")
    ids, mask, vision = rows_for(kind, 3, torch.Generator().manual_seed(13))
    ids, mask = ids.cuda(), mask.cuda()
    vision = {k: v.cuda() for k, v in vision.items()}
    dyn = generate(model, ids, mask, vision, static=False, max_new_tokens=12, do_sample=False)
    sta = generate(model, ids, mask, vision, static=True, max_new_tokens=12, do_sample=False)
    assert torch.equal(sta.sequences, dyn.sequences)
    for a, b in zip(sta.logits, dyn.logits, strict=True):
        assert (a - b).abs().max().item() < 1e-3
    assert hasattr(model, "_compiled_call")  # generate took its compile path


def test_decode_benchmark_tiny_runs(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_static.py"
    spec = importlib.util.spec_from_file_location("decode_static_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "d.json"
    assert bench.main(["--tiny", "--impls", "sdpa", "--batches", "2", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(x["mode"], x["status"]) for x in rows] == [("dynamic", "ok"), ("static", "ok")]
    assert all(x["ms_per_token"] > 0 and x["tokens_per_s"] > 0 for x in rows)
