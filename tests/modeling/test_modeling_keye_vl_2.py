"""Model package tests: layout, oracles, positions, generation, bad input. CPU, tiny configs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from keye_vl.modeling_keye import (
    KeyeVL2Config,
    KeyeVL2MoeForConditionalGeneration,
    get_rope_index,
    tiny_config,
)
from keye_vl.modeling_keye.modeling_keye_vl_2 import (
    KeyeVL2VisionRotaryEmbedding,
    output_cache,
)

REPO = Path(__file__).resolve().parents[2]
IMG, VID = 151655, 151656


def make_model(seed=0, impl="sdpa", **overrides):
    torch.manual_seed(seed)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config(**overrides)).eval()
    model.set_attn_implementation(impl)
    return model


# ----------------------------------------------------------------------------------------- 1. layout
def official_key_shapes(L=48, V=151936, vision_layers=27):
    """The state-dict table of docs/keye_vl2.md section 2, written out independently of the model code."""
    ks = {
        "model.embed_tokens.weight": (V, 2048),
        "model.norm.weight": (2048,),
        "lm_head.weight": (V, 2048),
        "visual.vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        "visual.vision_model.embeddings.patch_embedding.bias": (1152,),
        "visual.vision_model.embeddings.position_embedding.weight": (729, 1152),
        "visual.vision_model.embeddings.packing_position_embedding.weight": (32768, 1152),
        "visual.vision_model.post_layernorm.weight": (1152,),
        "visual.vision_model.post_layernorm.bias": (1152,),
        "mlp_AR.pre_norm.weight": (4608,),
        "mlp_AR.pre_norm.bias": (4608,),
        "mlp_AR.linear_1.weight": (4608, 4608),
        "mlp_AR.linear_1.bias": (4608,),
        "mlp_AR.linear_2.weight": (2048, 4608),
        "mlp_AR.linear_2.bias": (2048,),
    }
    for i in range(L):
        p = f"model.layers.{i}."
        ks.update({
            p + "input_layernorm.weight": (2048,),
            p + "post_attention_layernorm.weight": (2048,),
            p + "self_attn.q_proj.weight": (4096, 2048),
            p + "self_attn.k_proj.weight": (512, 2048),
            p + "self_attn.v_proj.weight": (512, 2048),
            p + "self_attn.o_proj.weight": (2048, 4096),
            p + "self_attn.q_norm.weight": (128,),
            p + "self_attn.k_norm.weight": (128,),
            p + "self_attn.sa_indexer.q_proj.weight": (1040, 2048),
            p + "self_attn.sa_indexer.k_proj.weight": (64, 2048),
            p + "self_attn.sa_indexer.q_norm.weight": (64,),
            p + "self_attn.sa_indexer.k_norm.weight": (64,),
            p + "self_attn.sa_indexer.k_norm.bias": (64,),
            p + "mlp.gate.weight": (128, 2048),
            p + "mlp.experts.gate_up_proj": (128, 2048, 1536),
            p + "mlp.experts.down_proj": (128, 768, 2048),
        })
    for j in range(vision_layers):
        p = f"visual.vision_model.encoder.layers.{j}."
        for n in ("layer_norm1", "layer_norm2"):
            ks[p + n + ".weight"] = (1152,)
            ks[p + n + ".bias"] = (1152,)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            ks[p + f"self_attn.{n}.weight"] = (1152, 1152)
            ks[p + f"self_attn.{n}.bias"] = (1152,)
        ks[p + "mlp.fc1.weight"], ks[p + "mlp.fc1.bias"] = (4304, 1152), (4304,)
        ks[p + "mlp.fc2.weight"], ks[p + "mlp.fc2.bias"] = (1152, 4304), (1152,)
    return ks


def test_full_size_meta_model_has_official_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = KeyeVL2MoeForConditionalGeneration(KeyeVL2Config())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_key_shapes()
    assert sum(p.numel() for p in model.parameters()) == 31_122_082_160


def test_config_defaults_are_official_and_round_trip_official_layout():
    cfg = KeyeVL2Config()
    assert cfg.sa_config == {"indexer_num_heads": 16, "indexer_head_dim": 64, "topk": 2048}
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2048, 48, 32, 4)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.head_dim) == (128, 8, 768, 128)
    assert cfg.mrope_section == [16, 24, 24] and cfg.tie_word_embeddings is False
    official = {
        "model_type": "KeyeVL2", "architectures": ["KeyeVL2MoeForConditionalGeneration"], "hidden_size": 2048,
        "rope_theta": 5000000.0, "rope_scaling": {"type": "default", "mrope_section": [16, 24, 24]},
        "sa_config": {"indexer_num_heads": 16, "indexer_head_dim": 64, "topk": 2048},
        "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27}, "attention_bias": False,
    }
    cfg = KeyeVL2Config.from_dict(official)
    assert cfg.rope_theta_value == 5e6 and cfg.mrope_section == [16, 24, 24]
    d = cfg.to_dict()
    assert d["rope_theta"] == 5e6 and d["rope_scaling"]["mrope_section"] == [16, 24, 24]
    assert d["sa_config"] == official["sa_config"] and isinstance(d["vision_config"], dict)
    again = KeyeVL2Config.from_dict(d)
    assert again.to_dict()["rope_scaling"] == d["rope_scaling"] and again.rope_theta_value == 5e6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_attention_heads": 32, "num_key_value_heads": 5}, "divisible by num_key_value_heads"),
        ({"rope_scaling": {"mrope_section": [16, 24, 23]}}, "sum to head_dim / 2"),
        ({"sa_config": {"indexer_head_dim": 48}}, "power of two"),
        ({"sa_config": {"topk": 0}}, "topk"),
        ({"moe_implementation": "fast"}, "moe_implementation"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KeyeVL2Config(**kwargs)


# ----------------------------------------------------------------------------------------- 2. oracles
def test_text_decoder_matches_transformers_qwen3_moe():
    """Text-only input (three equal M-RoPE rows) with dense attention == transformers' Qwen3MoeForCausalLM."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = make_model(seed=1, impl="eager", vocab_size=512, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    c = model.config
    qcfg = Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok, norm_topk_prob=True,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta_value}, attention_bias=False,
        output_router_logits=True, router_aux_loss_coef=c.router_aux_loss_coef, pad_token_id=0,
    )
    ref = Qwen3MoeForCausalLM(qcfg).eval()
    ref.set_attn_implementation("eager")
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith(("visual.", "mlp_AR.")) or ".sa_indexer." in k:
            continue
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            v = v.transpose(1, 2)  # official [E, in, out] -> transformers 5.x [E, out, in]
        sd[k] = v
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]

    torch.manual_seed(0)
    ids = torch.randint(2, 512, (2, 23))
    labels = ids.clone()
    with torch.no_grad():
        ours = model(input_ids=ids, labels=labels, output_router_logits=True, use_cache=False)
        theirs = ref(input_ids=ids, labels=labels, output_router_logits=True, use_cache=False)
    assert (ours.logits - theirs.logits).abs().max().item() < 2e-5
    assert torch.allclose(ours.aux_loss, theirs.aux_loss, atol=1e-6)
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)


def test_vision_tower_matches_transformers_paddleocr_vl():
    """Same SigLIP NaViT family: interpolated positions, 2D RoPE, per-image attention, post LayerNorm."""
    paddle = pytest.importorskip("transformers.models.paddleocr_vl.modeling_paddleocr_vl")
    from transformers.models.paddleocr_vl.configuration_paddleocr_vl import PaddleOCRVisionConfig

    model = make_model(seed=2)
    vc = model.config.vision_config
    pcfg = PaddleOCRVisionConfig(
        hidden_size=vc.hidden_size, intermediate_size=vc.intermediate_size, num_hidden_layers=vc.num_hidden_layers,
        num_attention_heads=vc.num_attention_heads, num_channels=3, image_size=vc.image_size,
        patch_size=vc.patch_size, hidden_act=vc.hidden_act, layer_norm_eps=vc.layer_norm_eps,
        spatial_merge_size=2, rope_parameters={"rope_type": "axial", "rope_theta": vc.rope_theta},
    )
    ref = paddle.PaddleOCRVisionModel(pcfg).eval()
    ref.set_attn_implementation("eager")
    # Keye interpolates with align_corners=False (docs/keye_vl2.md section 5); PaddleOCR-VL's default changed across
    # releases
    ref.vision_model.embeddings.interpolation_align_corners = False
    sd = {k[len("visual."):]: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    sd = {k: v for k, v in sd.items() if "packing_position" not in k}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "position_ids" not in m and "rotary" not in m]

    grid = torch.tensor([[1, 4, 6], [1, 2, 10]])  # two images, different aspect ratios
    n = int(grid.prod(-1).sum())
    torch.manual_seed(3)
    pixels = torch.randn(n, 3 * 14 * 14)
    with torch.no_grad():
        ours = model.visual(pixels, grid)
        theirs = ref(pixel_values=pixels.view(1, n, 3, 14, 14), grid_thw=grid).last_hidden_state.reshape(n, -1)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_vision_2d_rope_and_position_interpolation_rederived():
    cfg = tiny_config()
    rot = KeyeVL2VisionRotaryEmbedding(cfg.vision_config)
    h, w = 3, 5
    cos, sin = rot(h, w)
    head_dim = cfg.vision_config.hidden_size // cfg.vision_config.num_attention_heads  # 16 -> rope dim 8, 4 freqs
    nf = head_dim // 4
    for idx in range(h * w):
        r, c = divmod(idx, w)
        ang = [r * 10000 ** (-2 * i / (head_dim // 2)) for i in range(nf)] + [c * 10000 ** (-2 * i / (head_dim // 2)) for i in range(nf)]
        ang = torch.tensor(ang + ang)
        assert torch.allclose(cos[idx], ang.cos(), atol=1e-6) and torch.allclose(sin[idx], ang.sin(), atol=1e-6)
    # bilinear, align_corners=False: source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0
    model = make_model()
    emb = model.visual.vision_model.embeddings
    n = emb.num_positions_side
    table = emb.position_embedding.weight.detach().view(n, n, -1)
    got = emb.interpolated_positions(2, 7).detach().view(2, 7, -1)

    def src(d, out):
        s = max((d + 0.5) * n / out - 0.5, 0.0)
        i0 = min(int(s), n - 1)
        return i0, min(i0 + 1, n - 1), s - i0

    for y in range(2):
        y0, y1, fy = src(y, 2)
        for x in range(7):
            x0, x1, fx = src(x, 7)
            want = ((1 - fy) * ((1 - fx) * table[y0, x0] + fx * table[y0, x1]) + fy * ((1 - fx) * table[y1, x0] + fx * table[y1, x1]))
            assert torch.allclose(got[y, x], want, atol=1e-6)


def test_projector_merges_2x2_raster_neighbours():
    model = make_model()
    d = model.config.vision_config.hidden_size
    grid = torch.tensor([[1, 4, 6]])
    feats = torch.arange(24, dtype=torch.float32)[:, None].repeat(1, d)  # patch index as its feature
    seen = {}
    model.mlp_AR.pre_norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    model.mlp_AR(feats, grid)
    merged = seen["x"][:, ::d]  # first channel of each of the 4 merged patches
    # token (r, c) of the 2 x 3 LLM grid holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)
    want = torch.tensor([[6 * 2 * r + 2 * c, 6 * 2 * r + 2 * c + 1, 6 * (2 * r + 1) + 2 * c, 6 * (2 * r + 1) + 2 * c + 1]
                         for r in range(2) for c in range(3)], dtype=torch.float32)
    assert torch.equal(merged, want)


# ----------------------------------------------------------------------------------------- 3. positions
def test_get_rope_index_text_image_and_two_frame_video():
    T1, T2 = 11, 12  # arbitrary text token ids
    # text x3 | <vs> img(1,4,4)->2x2 | <ve> | <vs> <frame> "0.0" vid(2x3) <frame> "0.5" vid(2x3) <ve> | text
    ids = [T1, T2, T1, 151652] + [IMG] * 4 + [151653, 151652, 900, 901] + [VID] * 6 + [900, 902] + [VID] * 6 + [151653, T1]
    pos, delta = get_rope_index(
        torch.tensor([ids]), torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 6]]), None, IMG, VID, 2
    )
    t = [0, 1, 2, 3, 4, 4, 4, 4, 6, 7, 8, 9, 10, 10, 10, 10, 10, 10, 13, 14, 15, 15, 15, 15, 15, 15, 18, 19]
    h = [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10, 10, 10, 11, 11, 11, 13, 14, 15, 15, 15, 16, 16, 16, 18, 19]
    w = [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11, 12, 10, 11, 12, 13, 14, 15, 16, 17, 15, 16, 17, 18, 19]
    assert pos[:, 0].tolist() == [t, h, w]
    assert delta.tolist() == [[20 - len(ids)]]


def test_get_rope_index_left_padding_and_bad_runs():
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]])
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = get_rope_index(ids, None, None, am, IMG, VID)
    assert pos[0, 0].tolist() == [1, 1, 0, 1, 2] and pos[0, 1].tolist() == [0, 1, 2, 3, 4]
    assert delta.tolist() == [[-2], [0]]
    with pytest.raises(ValueError, match="does not match its grid"):
        get_rope_index(torch.tensor([[IMG] * 3]), torch.tensor([[1, 4, 4]]), None, None, IMG, VID)
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs"):
        get_rope_index(torch.tensor([[IMG] * 4, ]), None, None, None, IMG, VID)


# ----------------------------------------------------------------------------------------- 4. generation
def image_inputs(n_text=5, grid=(1, 4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    n_tok = grid[0] * grid[1] * grid[2] // 4
    ids = [100 + i for i in range(n_text)] + [151652] + [IMG] * n_tok + [151653, 300, 301]
    pixels = torch.randn(grid[0] * grid[1] * grid[2], 588, generator=g)
    return torch.tensor([ids]), pixels, torch.tensor([list(grid)])


@pytest.mark.parametrize("impl", ["sdpa", "eager", "dsa_torch"])
@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_generation_with_cache_equals_full_recompute(impl, with_image):
    model = make_model(seed=4, impl=impl)
    if with_image:
        ids, pixels, grid = image_inputs()
        vision = {"pixel_values": pixels, "image_grid_thw": grid}
    else:
        ids, vision = torch.randint(0, 5000, (1, 12), generator=torch.Generator().manual_seed(1)), {}
    new = 10  # with image: 17 prompt + 10 new > topk 16, so DSA is sparse for the last steps
    with torch.no_grad():
        out = model.generate(input_ids=ids, **vision, max_new_tokens=new, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        seq = ids
        for step in range(new):
            logits = model(input_ids=seq, **vision, use_cache=False).logits[:, -1]
            assert (logits - out.scores[step]).abs().max().item() < 1e-4
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("impl", ["sdpa", "dsa_torch"])
def test_batched_left_padding_equals_each_prompt_alone(impl):
    model = make_model(seed=5, impl=impl)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(3, 5000, (1, 20), generator=g), torch.randint(3, 5000, (1, 13), generator=g)
    pad = model.config.pad_token_id
    batch = torch.cat([a, torch.cat([torch.full((1, 7), pad), b], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 7), torch.ones(1, 13)], 1)]).long()
    with torch.no_grad():
        both = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone_a = model.generate(input_ids=a, max_new_tokens=6, do_sample=False)
        alone_b = model.generate(input_ids=b, max_new_tokens=6, do_sample=False)
    assert torch.equal(both[0, 20:], alone_a[0, 20:])
    assert torch.equal(both[1, 20:], alone_b[0, 13:])


def test_cache_holds_indexer_keys_and_prefill_chunking_is_exact():
    model = make_model(seed=6, impl="dsa_torch")
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids=ids)
        cache = output_cache(full)
        assert cache.get_seq_length() == 40
        assert set(cache.indexer_keys) == {0, 1} and cache.indexer_keys[0].shape == (1, 40, 16)
        model.config.prefill_chunk_size = 9
        chunked = model(input_ids=ids)
    assert (full.logits - chunked.logits).abs().max().item() < 1e-4


def test_gradient_checkpointing_gives_same_gradients():
    model = make_model(seed=7)
    model.train()
    ids, pixels, grid = image_inputs()
    grads = []
    for gc in (False, True):
        model.zero_grad()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=ids)
        out.loss.backward()
        assert out.aux_loss is not None  # router load-balancing loss is part of training
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


# ----------------------------------------------------------------------------------------- 6. bad input
def test_tie_word_embeddings_is_honoured(tmp_path):
    """Untied by default (the official layout: both matrices saved); tied with tie_word_embeddings=True, through a
    save / load round trip (transformers 5.x saves the tied matrix once)."""
    from safetensors import safe_open

    for tie in (False, True):
        torch.manual_seed(0)
        model = KeyeVL2MoeForConditionalGeneration(tiny_config(tie_word_embeddings=tie))
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tie
        model.save_pretrained(tmp_path / str(tie))
        keys = set()
        for f in (tmp_path / str(tie)).glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                keys |= set(fh.keys())
        assert ("lm_head.weight" in keys) is not tie
        back = KeyeVL2MoeForConditionalGeneration.from_pretrained(tmp_path / str(tie))
        assert (back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()) is tie
        assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_bad_inputs_raise_clear_value_errors():
    model = make_model()
    ids, pixels, grid = image_inputs()
    with pytest.raises(ValueError, match="pixel_values has 21 patches but image_grid_thw"):
        model(input_ids=ids, pixel_values=pixels[:-3], image_grid_thw=grid)
    # the same checks name the video inputs when the input is a video
    with pytest.raises(ValueError, match="pixel_values_videos has 21 patches but video_grid_thw"):
        model.get_video_features(pixels[:-3], grid)
    for bad in (float("nan"), float("inf")):  # would give NaN logits
        p2 = pixels.clone()
        p2[3, 5] = bad
        with pytest.raises(ValueError, match="pixel_values has NaN or inf"):
            model(input_ids=ids, pixel_values=p2, image_grid_thw=grid)
        with pytest.raises(ValueError, match="pixel_values_videos has NaN or inf"):
            model.get_video_features(p2, grid)
    two_images = torch.cat([ids, ids], dim=1)
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model(input_ids=two_images, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="not supported"):
        model.set_attn_implementation("flash_sparse_magic")
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        KeyeVL2MoeForConditionalGeneration(tiny_config(max_position_embeddings=8))(input_ids=torch.zeros(1, 9, dtype=torch.long))


def test_package_uses_no_removed_transformers_cache_api():
    """User reports (hf_ecosystem.md section 6, #2/#3/#6): remote code broken by removed cache helpers."""
    banned = re.compile(r"seen_tokens|get_max_length\(|from_legacy_cache|to_legacy_cache|\.key_cache\b|\.value_cache\b|is_torch_fx_available")
    for path in list((REPO / "modeling_keye").glob("*.py")) + list((REPO / "kernels").glob("*.py")):
        assert not banned.search(path.read_text()), path


# ----------------------------------------------------------------------------------------- regressions
def test_aux_loss_with_logits_to_keep_and_attention_mask():
    model = make_model(seed=8).train()
    ids = torch.randint(0, 5000, (2, 40), generator=torch.Generator().manual_seed(5))
    full = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    kept = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
    assert kept.logits.shape[1] == 1
    assert torch.allclose(full.aux_loss, kept.aux_loss)


def test_bf16_autocast_with_fp32_weights_runs_dsa_and_its_loss():
    model = make_model(seed=9, impl="dsa_torch").train()
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, indexer_loss="sparse")
    assert torch.isfinite(out.loss) and torch.isfinite(out.indexer_loss)
    out.loss.backward()


def test_non_reentrant_checkpointing_when_the_grouped_mm_probe_runs_inside_a_layer():
    moe = sys.modules[KeyeVL2MoeForConditionalGeneration.__module__.replace("modeling_keye_vl_2", "moe_keye_vl_2")]
    moe._GROUPED_MM_PROBES.clear()  # the probe first runs inside the first checkpointed layer
    model = make_model(seed=10).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids, labels=ids, segment_ids=torch.zeros_like(ids)).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_beam_search_repeats_each_samples_whole_vision_input(kind):
    model = make_model(seed=11, impl="dsa_torch")
    g = torch.Generator().manual_seed(8)
    if kind == "image":
        grids = [[1, 4, 6], [1, 2, 4]]
        tok, pix_key, grid_key = IMG, "pixel_values", "image_grid_thw"
        rows = [[5, 6, 151652] + [tok] * (t * h * w // 4) + [151653, 7] for t, h, w in grids]
    else:
        grids = [[2, 2, 4], [1, 4, 2]]
        tok, pix_key, grid_key = VID, "pixel_values_videos", "video_grid_thw"
        rows = []
        for t, h, w in grids:
            frames = []
            for _ in range(t):
                frames += [151669, 15] + [tok] * (h * w // 4)
            rows.append([5, 151652] + frames + [151653, 7])
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    parts = [torch.randn(t * h * w, 588, generator=g) for t, h, w in grids]
    vision = {pix_key: torch.cat(parts), grid_key: torch.tensor(grids)}
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get(pix_key)), with_kwargs=True)
    with torch.no_grad():
        beams = model.generate(input_ids=ids, attention_mask=mask, **vision, max_new_tokens=4, num_beams=2,
                               num_return_sequences=2, do_sample=False)
    want = torch.cat([parts[0], parts[0], parts[1], parts[1]])
    assert torch.equal(seen[0], want)
    assert all(s is None for s in seen[1:])  # vision inputs only at the first step
    assert beams.shape[0] == 4


def test_generate_beyond_max_position_embeddings_fails_before_generating():
    model = KeyeVL2MoeForConditionalGeneration(tiny_config(max_position_embeddings=64)).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens - 1 = 69 positions .* exceeds "
                                         "max_position_embeddings=64"):
        model.generate(input_ids=torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10, do_sample=False)
    assert not calls


def test_prefill_chunk_size_set_on_a_loaded_model_is_checked():
    """Set after loading (as the README shows), a bad value names itself instead of failing deep in the forward."""
    model = make_model()
    ids = torch.zeros(1, 12, dtype=torch.long)
    for bad in (-3, 0, "8", 2.5, True):
        model.config.prefill_chunk_size = bad
        with pytest.raises(ValueError, match="prefill_chunk_size must be a positive int or None"):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        tiny_config(prefill_chunk_size=2.5)


def test_malformed_patches_and_grids_name_the_problem():
    model = make_model()
    ids, pixels, grid = image_inputs()
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 588\]"):
        model(input_ids=ids, pixel_values=pixels[:, :583], image_grid_thw=grid)
    with pytest.raises(ValueError, match="multiples of the merge size"):
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 1, 24]]))
