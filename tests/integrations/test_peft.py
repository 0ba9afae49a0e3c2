"""PEFT beyond attention: the documented LoRA target patterns each select what they say (README.md and
the model card), and LoRA on the fused experts (``target_parameters``), the DSA indexer and the vision tower
saves, reloads and merges (``merge_and_unload``) with the same logits as the merged weights."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer, ParamWrapper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
L, V = range(2), range(2)  # tiny model: 2 decoder layers, 2 vision layers

# what each documented pattern must select on the tiny model, written out by hand
EXPECTED = {
    "decoder attention only": {f"model.layers.{i}.self_attn.{p}_proj" for i in L for p in "qkvo"},
    "DSA indexer": {f"model.layers.{i}.self_attn.sa_indexer.{p}_proj" for i in L for p in "qk"},
    "fused MoE experts": {f"model.layers.{i}.mlp.experts.{p}" for i in L for p in ("gate_up_proj", "down_proj")},
    "vision tower": {f"visual.vision_model.encoder.layers.{j}.{n}" for j in V for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")},
    "projector": {"mlp_AR.linear_1", "mlp_AR.linear_2"},
    "everything Qwen-named (decoder, indexer and vision attention)": (
        {f"model.layers.{i}.self_attn.{p}_proj" for i in L for p in "qkvo"}
        | {f"model.layers.{i}.self_attn.sa_indexer.{p}_proj" for i in L for p in "qk"}
        | {f"visual.vision_model.encoder.layers.{j}.self_attn.{p}_proj" for j in V for p in "qkv"}
    ),
}


def documented_patterns(path: Path) -> dict[str, dict]:
    """``- label: `target_modules=...` `` bullets of a doc file -> {label: LoraConfig kwargs}."""
    found = {}
    for m in re.finditer(r"^- (.+?): `(target_modules|target_parameters)=(.+?)`", path.read_text(), re.M):
        found[m.group(1)] = {m.group(2): ast.literal_eval(m.group(3))}
    return found


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return KeyeVL2MoeForConditionalGeneration(tiny_config(**overrides)).eval()


def adapted(peft_model) -> set[str]:
    """Names of the modules (or, for ``target_parameters``, the parameters) that got a LoRA adapter."""
    names = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix("base_model.model.")
            if isinstance(module, ParamWrapper):
                name = name.replace(".base_layer", "") + "." + module.parameter_name
            names.add(name)
    return names


@pytest.mark.parametrize("doc", ["README.md", "keye_vl/model_card.md"])
def test_documented_target_patterns_select_what_they_say(doc):
    patterns = documented_patterns(REPO / doc)
    assert set(patterns) == set(EXPECTED)
    model = make_model()
    for label, kwargs in patterns.items():
        got = adapted(get_peft_model(copy.deepcopy(model), LoraConfig(r=2, **kwargs)))
        assert got == EXPECTED[label], label
    assert len(EXPECTED["everything Qwen-named (decoder, indexer and vision attention)"]) == 18  # not 8


def _inputs():
    """40 tokens (> top-k 16, so DSA selects) around one 4 x 4-patch image (4 placeholder tokens)."""
    g = torch.Generator().manual_seed(5)
    text = torch.randint(3, 5000, (35,), generator=g)
    ids = torch.cat([text[:10], torch.tensor([151652, 151655, 151655, 151655, 151655, 151653]), text[10:34]])[None]
    return {"input_ids": ids, "pixel_values": torch.randn(16, 588, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "use_cache": False}


def test_lora_on_experts_indexer_and_vision_saves_reloads_and_merges(tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B: the adapters change the output
        target_modules=r"model\.layers\.\d+\.self_attn\.sa_indexer\.(q_proj|k_proj)"
        r"|visual\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    base = make_model(attn_implementation="dsa_torch")
    assert base.config._attn_implementation == "dsa_torch"
    official_keys = set(base.state_dict())
    with torch.no_grad():
        base_logits = base(**_inputs()).logits
    model = get_peft_model(base, config)
    assert adapted(model) == EXPECTED["fused MoE experts"] | EXPECTED["DSA indexer"] | {
        f"visual.vision_model.encoder.layers.{j}.self_attn.{p}_proj" for j in V for p in "qv"}

    # every adapter is in the graph of the loss it trains: LM loss for experts and vision, the indexer KL for the
    # indexer (its input is detached, so the LM loss never reaches it)
    out = model(**_inputs(), labels=_inputs()["input_ids"], indexer_loss="dense")
    (out.lm_loss + out.indexer_loss).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert len(grads) == 2 * (4 + 4 + 2 * 2) and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()

    with torch.no_grad():
        lora_logits = model(**_inputs()).logits
        lora_kl = model(**_inputs(), indexer_loss="dense").indexer_loss
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    saved = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(grads) and all("lora_" in k for k in saved)

    reloaded = PeftModel.from_pretrained(make_model(attn_implementation="dsa_torch"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**_inputs()).logits, lora_logits)
    merged = reloaded.merge_and_unload()
    assert set(merged.state_dict()) == official_keys
    with torch.no_grad():
        merged_logits = merged(**_inputs()).logits
        merged_kl = merged(**_inputs(), indexer_loss="dense").indexer_loss
    # W x + B (A x) vs (W + B A) x: float rounding only (the same top-k keys are selected)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_kl, lora_kl, rtol=1e-4, atol=1e-6)

    merged.save_pretrained(tmp_path / "merged")
    fresh = KeyeVL2MoeForConditionalGeneration.from_pretrained(tmp_path / "merged", attn_implementation="dsa_torch").eval()
    with torch.no_grad():
        assert torch.equal(fresh(**_inputs()).logits, merged_logits)
