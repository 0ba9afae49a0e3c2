"""A tiny model gives the same logits and greedy tokens with the Triton DSA kernels and the torch
reference. On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), wired
in through the model's backend switch; on a GPU through ``attn_implementation="dsa_triton"``."""

from __future__ import annotations

import sys

import pytest
import torch

from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

MODELING = sys.modules[KeyeVL2MoeForConditionalGeneration.__module__]
pytestmark = pytest.mark.skipif(MODELING.dsa_triton is None, reason="Triton DSA kernels not importable")


def run(model, ids, new_tokens):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        gen = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False)
    return logits, gen


def test_tiny_model_triton_kernels_equal_torch_reference_on_cpu(monkeypatch):
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config(num_hidden_layers=1)).eval()
    model.set_attn_implementation("dsa_torch")
    ids = torch.randint(0, 5000, (1, 24), generator=torch.Generator().manual_seed(0))  # 24 > top-k 16: sparse
    ref_logits, ref_gen = run(model, ids, 3)

    calls = []

    def triton_backend(name, device):
        calls.append(name)
        return MODELING.dsa_triton

    monkeypatch.setattr(MODELING, "_dsa_backend", triton_backend)
    tri_logits, tri_gen = run(model, ids, 3)
    assert calls, "the Triton backend was not used"
    assert (tri_logits - ref_logits).abs().max().item() < 1e-4
    assert torch.equal(tri_gen, ref_gen)


@pytest.mark.gpu
def test_tiny_model_triton_kernels_equal_torch_reference_on_gpu():
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval().cuda()
    ids = torch.randint(0, 5000, (2, 200), generator=torch.Generator().manual_seed(0)).cuda()
    model.set_attn_implementation("dsa_torch")
    ref_logits, ref_gen = run(model, ids, 16)
    model.set_attn_implementation("dsa_triton")
    tri_logits, tri_gen = run(model, ids, 16)
    assert (tri_logits - ref_logits).abs().max().item() < 1e-3
    assert torch.equal(tri_gen, ref_gen)
