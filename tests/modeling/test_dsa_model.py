"""DSA inside the model: selection by attn_implementation, exactness below top-k, indexer cache with
chunked prefill + decode, and the two training stages' gradient routing. CPU, tiny configs."""

from __future__ import annotations

import sys

import pytest
import torch

from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, freeze_for_indexer_warmup, tiny_config
from keye_vl.modeling_keye.modeling_keye_vl_2 import output_cache

MODELING = sys.modules[KeyeVL2MoeForConditionalGeneration.__module__]


def make_model(seed=0, impl="dsa_torch", **overrides):
    torch.manual_seed(seed)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config(**overrides)).eval()
    model.set_attn_implementation(impl)
    return model


def test_dsa_is_the_default_and_names_resolve():
    model = KeyeVL2MoeForConditionalGeneration(tiny_config())
    assert model.config._attn_implementation == "dsa"
    assert MODELING._dsa_backend("dsa", torch.device("cpu")) is MODELING.dsa_reference
    assert MODELING._dsa_backend("dsa_torch", torch.device("cpu")) is MODELING.dsa_reference
    with pytest.raises(ValueError, match="dsa_triton"):
        MODELING._dsa_backend("dsa_triton", torch.device("cpu"))
    dense = KeyeVL2MoeForConditionalGeneration(tiny_config(sa_config=None))
    assert dense.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="sa_config"):
        dense.set_attn_implementation("dsa")


def test_dsa_generates_exactly_like_dense_below_topk():
    model = make_model(seed=1, sa_config={"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 64})
    ids = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = {}
    for impl in ("dsa_torch", "sdpa", "eager"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            outs[impl] = model.generate(input_ids=ids, max_new_tokens=20, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True)
    for impl in ("sdpa", "eager"):
        assert torch.equal(outs["dsa_torch"].sequences, outs[impl].sequences)
        for a, b in zip(outs["dsa_torch"].scores, outs[impl].scores):
            assert (a - b).abs().max().item() < 1e-4


def test_dsa_differs_from_dense_once_sparse():
    """Above top-k the sparse path must actually drop keys (guards against a silent dense fallback)."""
    model = make_model(seed=2)
    ids = torch.randint(0, 5000, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sparse = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation("sdpa")
        dense = model(input_ids=ids, use_cache=False).logits
    assert (sparse[:, :16] - dense[:, :16]).abs().max().item() < 1e-4  # <= k keys: identical
    assert (sparse[:, 17:] - dense[:, 17:]).abs().max().item() > 1e-3  # > k keys: sparse


@pytest.mark.parametrize("chunk", [5, 16, 23])
def test_chunked_prefill_and_decode_select_the_same_keys_as_one_shot(chunk, monkeypatch):
    model = make_model(seed=3)
    ids = torch.randint(0, 5000, (1, 45), generator=torch.Generator().manual_seed(2))
    calls = []
    original = MODELING.dsa_reference.dsa_topk_indices

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(MODELING.dsa_reference, "dsa_topk_indices", recording)
    with torch.no_grad():
        one_shot = model(input_ids=ids, use_cache=False).logits
        layers = model.config.num_hidden_layers
        want = [calls[i] for i in range(layers)]  # one call per layer, all 45 query rows
        calls.clear()
        model.config.prefill_chunk_size = chunk
        prefix = 40
        out = model(input_ids=ids[:, :prefix])
        cache = output_cache(out)
        logits = [out.logits]
        for t in range(prefix, 45):  # decode one token at a time against the cached indexer keys
            step = model(input_ids=ids[:, t:t + 1], past_key_values=cache)
            logits.append(step.logits)
    got = [torch.cat(calls[i::layers], dim=1) for i in range(layers)]
    for layer in range(layers):
        assert torch.equal(got[layer], want[layer]), f"layer {layer}: different top-k indices"
    assert (torch.cat(logits, dim=1) - one_shot).abs().max().item() < 1e-4


def test_sparse_stage_gradients_lm_to_model_kl_to_indexer_only():
    model = make_model(seed=4)
    model.train()
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=ids, labels=ids, indexer_loss="sparse")
    assert out.indexer_loss is not None and torch.isfinite(out.indexer_loss)
    expected = out.lm_loss + model.config.router_aux_loss_coef * out.aux_loss + model.config.indexer_loss_coef * out.indexer_loss
    assert torch.allclose(out.loss, expected)
    params = dict(model.named_parameters())
    lm_grads = torch.autograd.grad(out.lm_loss, list(params.values()), retain_graph=True, allow_unused=True)
    kl_grads = torch.autograd.grad(out.indexer_loss, list(params.values()), allow_unused=True)
    for (name, _), g_lm, g_kl in zip(params.items(), lm_grads, kl_grads):
        is_indexer = ".sa_indexer." in name
        if is_indexer:
            assert g_lm is None or g_lm.abs().max() == 0, f"LM loss reached the indexer: {name}"
            assert g_kl is not None and g_kl.abs().max() > 0, f"KL does not train {name}"
        else:
            assert g_kl is None or g_kl.abs().max() == 0, f"indexer KL reached {name}"


def test_dense_warmup_trains_only_the_indexer_and_lowers_the_kl():
    model = make_model(seed=5, impl="sdpa")
    trainable = freeze_for_indexer_warmup(model)
    assert trainable and all(".sa_indexer." in n for n in trainable)
    assert len(trainable) == 5 * model.config.num_hidden_layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 5000, (2, 40), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(25):
        out = model(input_ids=ids, indexer_loss="dense", use_cache=False)
        assert out.logits.shape[1] == 40  # the forward itself stays dense
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.indexer_loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (".sa_indexer." in n), n
