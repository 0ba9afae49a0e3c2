"""Self-contained Hub export: a saved folder loads with trust_remote_code=True in a clean process
where this repository is not importable, offline, with bit-identical logits; the official checkpoint layout loads
with no missing or unexpected keys and without re-initialising any loaded tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval()
    folder = tmp_path_factory.mktemp("export") / "keye-tiny"
    model.save_pretrained(folder, max_shard_size="20MB")
    return model, folder


def test_export_folder_is_flat_and_complete(exported):
    _, folder = exported
    names = {p.name for p in folder.iterdir()}
    kernel_files = {p.name for p in (Path(__file__).resolve().parents[2] / "kernels").glob("keye_dsa_*.py")}
    assert {"configuration_keye_vl_2.py", "modeling_keye_vl_2.py", "cache_keye_vl_2.py", "moe_keye_vl_2.py",
            "keye_dsa_reference.py", "keye_dsa_decode.py"} | kernel_files <= names
    assert not any(folder.joinpath(n).is_symlink() for n in names)
    assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) >= 2
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_keye_vl_2.KeyeVL2Config",
        "AutoModel": "modeling_keye_vl_2.KeyeVL2MoeModel",
        "AutoModelForCausalLM": "modeling_keye_vl_2.KeyeVL2MoeForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_keye_vl_2.KeyeVL2MoeForConditionalGeneration",
    }
    assert cfg["model_type"] == "KeyeVL2" and "rope_scaling" in cfg and "sa_config" in cfg


def test_export_loads_in_clean_process_with_identical_logits(exported, tmp_path, run_clean):
    model, folder = exported
    ids = torch.randint(0, 5000, (1, 30), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        want_gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                                  output_logits=True, return_dict_in_generate=True)
    run_clean(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
        folder = {str(folder)!r}
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        assert model.config._attn_implementation == "dsa", model.config._attn_implementation
        with torch.no_grad():
            torch.save(model(input_ids=ids, use_cache=False).logits, {str(tmp_path / 'got.pt')!r})
            gen = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                                 output_logits=True, return_dict_in_generate=True)
            assert type(gen.past_key_values if hasattr(gen, "past_key_values") else gen.cache).__name__ == "KeyeVL2StaticCache"
            torch.save((gen.sequences, torch.stack(gen.logits)), {str(tmp_path / 'gen.pt')!r})
        assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__ == "KeyeVL2MoeForConditionalGeneration"
        assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "KeyeVL2MoeModel"
        assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "KeyeVL2Config"
        assert not [m for m in sys.modules if m.startswith("keye_vl")]
        """,
        tmp_path,
    )
    got = torch.load(tmp_path / "got.pt")
    assert torch.equal(got, want)
    seq, logits = torch.load(tmp_path / "gen.pt")  # the static-cache generate path, from the exported files
    assert torch.equal(seq, want_gen.sequences) and torch.equal(logits, torch.stack(want_gen.logits))


def test_official_layout_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path):
    """Tensors written under the official key names (fused experts [E, hidden, 2I]) load exactly as written."""
    cfg = tiny_config()
    torch.manual_seed(1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in KeyeVL2MoeForConditionalGeneration(cfg).state_dict().items()}
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (E, H, 2 * I)
    assert shapes["model.layers.0.mlp.experts.down_proj"] == (E, I, H)
    tensors = {k: torch.randn(s) for k, s in shapes.items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    official = cfg.to_dict()
    official.pop("rope_parameters")  # the official file only has rope_theta + rope_scaling
    official.pop("auto_map", None)
    (tmp_path / "config.json").write_text(json.dumps(official))
    model, info = KeyeVL2MoeForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    sd = model.state_dict()
    for k, v in tensors.items():
        assert torch.equal(sd[k], v), f"{k} was not loaded as written"


def test_saved_safetensors_keys_are_the_official_names(exported):
    _, folder = exported
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and "mlp_AR.linear_1.weight" in keys
    assert "visual.vision_model.embeddings.packing_position_embedding.weight" in keys
    shard = sorted(folder.glob("*.safetensors"))[0]
    assert all(isinstance(v, torch.Tensor) for v in load_file(shard).values())
