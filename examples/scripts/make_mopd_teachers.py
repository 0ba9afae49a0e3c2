"""Write random-weight teachers for trying ``examples/mopd.py`` without real checkpoints, and their routing table.

Two teachers, each a folder loadable by ``keye_vl.training.models.load_any_causal_lm``:

- ``OUT/vision``: a Keye-VL-2.0 model (this architecture; ``--vision_config tiny`` or a JSON of config fields such
  as ``examples/configs/model_1b.json``), seed ``--seed``, routed the ``image`` / ``ocr`` / ``video`` domains;
- ``OUT/text``: a text-only transformers ``Qwen3ForCausalLM`` with the Qwen3 vocabulary (``--text_config tiny`` or
  a JSON of ``Qwen3Config`` fields), seed ``--seed + 1``, routed ``math`` / ``writing``;

and ``OUT/teachers.json`` (``--teachers`` of ``mopd.py``). Random teachers only exercise the machinery: the student
learns to imitate random models. Weights are written as safetensors; nothing is downloaded.

    python examples/scripts/make_mopd_teachers.py --out outputs/mopd_teachers
"""

from __future__ import annotations

import argparse
import json
import os

import torch

TINY_QWEN3 = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=32768, tie_word_embeddings=False)
ROUTES = {"image": "vision", "ocr": "vision", "video": "vision", "math": "text", "writing": "text"}


def _fields(spec: str) -> dict:
    if os.path.isfile(spec):
        with open(spec) as f:
            return json.load(f)
    return json.loads(spec)


def make_teachers(out: str, vision_config: str = "tiny", text_config: str = "tiny", seed: int = 1,
                  dtype: torch.dtype = torch.float32, device: str = "cpu") -> str:
    """Write the two teachers and ``teachers.json`` under ``out``; returns the table's path."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from keye_vl.training.models import config_from_spec
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):
        vision = KeyeVL2MoeForConditionalGeneration(config_from_spec(vision_config)).to(dtype)
    vision.save_pretrained(os.path.join(out, "vision"))
    del vision
    torch.manual_seed(seed + 1)
    fields = dict(TINY_QWEN3) if text_config == "tiny" else {**TINY_QWEN3, **_fields(text_config)}
    with torch.device(device):
        text = Qwen3ForCausalLM(Qwen3Config(**fields)).to(dtype)
    text.save_pretrained(os.path.join(out, "text"))
    del text
    table = {"field": "domain", "teachers": {"vision": {"path": "vision"}, "text": {"path": "text"}},
             "routes": ROUTES, "default": None}
    path = os.path.join(out, "teachers.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vision_config", default="tiny")
    ap.add_argument("--text_config", default="tiny")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(make_teachers(a.out, a.vision_config, a.text_config, a.seed, getattr(torch, a.dtype), a.device))
