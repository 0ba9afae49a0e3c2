"""device_map="auto": a ``max_memory`` that forces a split across devices keeps every decoder layer and
every vision layer whole (``_no_split_modules``), checked on meta-device maps with two (absent) GPUs and the CPU,
and generation through accelerate's hooks with half the decoder offloaded to disk gives the same tokens as the
model in memory. The GPU + CPU split runs on the GPU machine (``test_gpu_cpu_split_generates_like_one_gpu``)."""

from __future__ import annotations

import re

import pytest
import torch

from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

accelerate = pytest.importorskip("accelerate")
from accelerate import init_empty_weights  # noqa: E402
from transformers.integrations.accelerate import compute_module_sizes, infer_auto_device_map  # noqa: E402

INSIDE_A_LAYER = re.compile(r"(model\.layers\.\d+|visual\.vision_model\.encoder\.layers\.\d+)\..+")
TEXT_LAYER = re.compile(r"model\.layers\.(\d+)$")
VISION_LAYER = re.compile(r"visual\.vision_model\.encoder\.layers\.(\d+)$")


def config():
    return tiny_config(num_hidden_layers=6, vision_config=dict(num_hidden_layers=4))


def module_sizes(model):
    sizes = compute_module_sizes(model)
    return sizes[0] if isinstance(sizes, tuple) else sizes  # (sizes, leaves) on newer transformers


def placement(device_map: dict, pattern: re.Pattern, n: int) -> list:
    """Device of layer 0..n-1, whether the map names the layer itself or one of its ancestors."""
    out = []
    for i in range(n):
        name = pattern.pattern.replace(r"(\d+)$", str(i)).replace("\\", "")
        owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)
        out.append(device_map[owners[0]])
    return out


def check_whole_layers(device_map: dict, n_text: int, n_vision: int):
    assert not [k for k in device_map if INSIDE_A_LAYER.fullmatch(k)], device_map
    return placement(device_map, TEXT_LAYER, n_text), placement(device_map, VISION_LAYER, n_vision)


def test_meta_device_maps_split_across_devices_but_never_inside_a_layer():
    with init_empty_weights():
        model = KeyeVL2MoeForConditionalGeneration(config())
    assert set(model._no_split_modules) == {"KeyeVL2DecoderLayer", "KeyeVL2VisionEncoderLayer"}
    s = module_sizes(model)
    L, V, R = s["model.layers.0"], s["visual.vision_model.encoder.layers.0"], s["lm_head"]  # R: accelerate's reserve
    # decoder split over GPU 0, GPU 1 and the CPU
    text_split = {0: s["visual"] + s["mlp_AR"] + s["model.embed_tokens"] + 2 * L + R, 1: 2 * L + L // 2, "cpu": 2 * L + R}
    # vision tower split over the two GPUs
    vision_split = {0: s["visual.vision_model.embeddings"] + 2 * V + R, 1: s["visual"] + s["mlp_AR"] + R, "cpu": s[""]}
    for max_memory, split_text, split_vision in ((text_split, True, False), (vision_split, False, True)):
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
        text, vision = check_whole_layers(device_map, 6, 4)
        assert (len(set(text)) >= 3) is split_text and (len(set(vision)) == 2) is split_vision, device_map
        order = {0: 0, 1: 1, "cpu": 2, "disk": 3}
        assert [order[d] for d in text] == sorted(order[d] for d in text)  # layers fill the devices in order


def _inputs():
    g = torch.Generator().manual_seed(2)
    text = torch.randint(3, 5000, (14,), generator=g)
    ids = torch.cat([text[:4], torch.tensor([151652] + [151655] * 4 + [151653]), text[4:]])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(16, 588, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]])}


def test_auto_map_with_disk_offload_generates_the_same_tokens(tmp_path):
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    s = module_sizes(model)
    cpu = s["visual"] + s["mlp_AR"] + s["model.embed_tokens"] + 3 * s["model.layers.0"] + s["lm_head"]
    split = KeyeVL2MoeForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map="auto", max_memory={"cpu": cpu}, offload_folder=tmp_path / "offload",
    ).eval()
    text, vision = check_whole_layers(split.hf_device_map, 6, 4)
    assert "cpu" in text and "disk" in text, split.hf_device_map  # the decoder is split: part of it on disk
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = model.generate(**_inputs(), **kw)
        got = split.generate(**_inputs(), **kw)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_cpu_split_generates_like_one_gpu(tmp_path):
    """GPU machine: half the decoder on GPU 0, the rest offloaded to the CPU (accelerate moves each layer's weights
    to the GPU when it runs); greedy tokens equal those of the whole model on GPU 0."""
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    s = module_sizes(model)
    gpu = s["visual"] + s["mlp_AR"] + s["model.embed_tokens"] + 3 * s["model.layers.0"] + s["lm_head"]
    split = KeyeVL2MoeForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map="auto", max_memory={0: gpu, "cpu": 10 * s[""]},
    ).eval()
    text, vision = check_whole_layers(split.hf_device_map, 6, 4)
    assert 0 in text and "cpu" in text, split.hf_device_map
    whole = KeyeVL2MoeForConditionalGeneration.from_pretrained(tmp_path / "ckpt", device_map="cuda:0").eval()
    inputs = {k: v.to("cuda:0") for k, v in _inputs().items()}
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = whole.generate(**inputs, **kw)
        got = split.generate(**inputs, **kw)
    print("device map:", split.hf_device_map)
    print("tokens:", got.tolist())
    assert torch.equal(got.cpu(), want.cpu())
