"""TRL compatibility: SFTTrainer with a PEFT LoRA config and GRPOTrainer with text prompts train the
tiny model for a few CPU steps. TRL's fused LM head calls ``model.base_model(**inputs).last_hidden_state``; the
model answers through :class:`KeyeVL2BaseModelView` without adding or renaming any state-dict key."""

from __future__ import annotations

import pytest
import torch

from keye_vl.modeling_keye import KeyeVL2BaseModelView, KeyeVL2MoeForConditionalGeneration, tiny_config

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")


def tiny_official_keys(text_layers=2, vision_layers=2):
    """The official state-dict key names (Keye-VL-2.0 checkpoint layout) for the tiny depth, written out here."""
    keys = {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "visual.vision_model.embeddings.patch_embedding.weight", "visual.vision_model.embeddings.patch_embedding.bias",
        "visual.vision_model.embeddings.position_embedding.weight",
        "visual.vision_model.embeddings.packing_position_embedding.weight",
        "visual.vision_model.post_layernorm.weight", "visual.vision_model.post_layernorm.bias",
        "mlp_AR.pre_norm.weight", "mlp_AR.pre_norm.bias", "mlp_AR.linear_1.weight", "mlp_AR.linear_1.bias",
        "mlp_AR.linear_2.weight", "mlp_AR.linear_2.bias",
    }
    for i in range(text_layers):
        p = f"model.layers.{i}."
        keys |= {p + n for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
            "self_attn.k_norm.weight", "self_attn.sa_indexer.q_proj.weight", "self_attn.sa_indexer.k_proj.weight",
            "self_attn.sa_indexer.q_norm.weight", "self_attn.sa_indexer.k_norm.weight",
            "self_attn.sa_indexer.k_norm.bias", "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
        )}
    for j in range(vision_layers):
        p = f"visual.vision_model.encoder.layers.{j}."
        for n in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            keys |= {p + n + ".weight", p + n + ".bias"}
    return keys


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return KeyeVL2MoeForConditionalGeneration(tiny_config())


@pytest.fixture(scope="module")
def tokenizer():
    from keye_vl.processing import build_keye_tokenizer

    return build_keye_tokenizer()


def test_base_model_view_gives_last_hidden_state_and_keeps_official_keys(tiny):
    assert set(tiny.state_dict()) == tiny_official_keys()
    view = tiny.base_model
    assert isinstance(view, KeyeVL2BaseModelView) and view.config is tiny.config
    ids = torch.randint(0, 5000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = view(input_ids=ids, use_cache=False).last_hidden_state
        logits = tiny(input_ids=ids, use_cache=False).logits
    assert hidden.shape == (2, 9, 64)
    assert torch.equal(tiny.lm_head(hidden), logits)  # the same forward, stopped before the LM head
    assert set(tiny.state_dict()) == tiny_official_keys()  # the view registers nothing
    assert tiny.get_decoder() is tiny.model


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0, **kw,
    )


def test_sft_trainer_with_lora_trains_only_the_adapters(tiny, tokenizer, tmp_path):
    from peft import LoraConfig

    before = _snapshot(tiny)
    ds = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} {i} {i}"}] for i in range(4)
    ]})
    trainer = trl.SFTTrainer(
        model=tiny, args=_train_args(trl.SFTConfig, tmp_path, per_device_train_batch_size=2), train_dataset=ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)" ),
    )
    lora_start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_start and all(not p.any() for p in lora_start.values())  # LoRA starts as the identity (B = 0)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2
    model = trainer.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B), nothing in the indexer or the vision tower
    assert all(p.requires_grad for p in lora.values())
    assert all(lora[n].detach().abs().sum() > 0 for n in lora_start)  # every B moved off zero: the adapters trained
    merged = model.merge_and_unload()
    after = dict(merged.named_parameters())
    assert set(after) == set(before) and set(merged.state_dict()) == tiny_official_keys()
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in ("q", "v")}


def test_grpo_trainer_with_text_prompts_updates_the_decoder(tiny, tokenizer, tmp_path):
    before = _snapshot(tiny)
    ds = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Count to {i}."}] for i in range(4)]})

    def reward_length(completions, **kwargs):  # any reward with spread gives non-zero advantages
        return [float(len(c[0]["content"])) for c in completions]

    trainer = trl.GRPOTrainer(
        model=tiny, reward_funcs=reward_length, train_dataset=ds, processing_class=tokenizer,
        args=_train_args(trl.GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=2,
                         max_completion_length=4),
    )
    result = trainer.train()
    assert result.global_step == 2
    after = dict(tiny.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    # the decoder and head moved; the vision tower and projector (no images) and the DSA indexer (trained only by
    # its own KL, its input is detached) did not
    assert {"lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.down_proj"} <= changed
    assert not any(n.startswith(("visual.", "mlp_AR.")) or ".sa_indexer." in n for n in changed)
    assert set(tiny.state_dict()) == tiny_official_keys()
