"""Keye-VL-2.0 config and model (``keye_vl.modeling_keye``).

Importing this package registers the classes with transformers' Auto classes (in-process) and marks them for
remote-code export, so ``save_pretrained`` writes a flat, self-contained folder (config.json with ``auto_map``,
the modeling files, safetensors shards) that loads with ``trust_remote_code=True`` where this package is not
installed. This ``__init__`` is not part of the export.
"""

import importlib as _importlib
import pkgutil as _pkgutil
import sys as _sys

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText


def _share_kernel_modules() -> None:
    """Make each DSA kernel file ONE module object, whether reached as ``keye_vl.kernels.X`` or as
    ``keye_vl.modeling_keye.X`` (the modeling folder carries the kernel files too, as links, so that
    ``save_pretrained`` exports them beside the model; imported twice they were two modules, and a tuning set in
    ``CONFIG``/``STATS`` through one route never reached the model). The model's relative imports then find the
    ``keye_vl.kernels`` module in ``sys.modules``. An exported Hub folder has one copy of each file anyway."""
    from .. import kernels as _kernels

    here = {m.name for m in _pkgutil.iter_modules(__path__)}
    for info in _pkgutil.iter_modules(_kernels.__path__):
        if info.name in here and f"{__name__}.{info.name}" not in _sys.modules:
            _sys.modules[f"{__name__}.{info.name}"] = _importlib.import_module(f"{_kernels.__name__}.{info.name}")


_share_kernel_modules()

from .configuration_keye_vl_2 import (
    DSA_ATTN_IMPLEMENTATIONS,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    KeyeVL2Config,
    KEYE_VL2_GENERATION_DEFAULTS,
    KeyeVL2VisionConfig,
    keye_generation_config,
)
from .cache_keye_vl_2 import KeyeVL2StaticCache
from .modeling_keye_vl_2 import (
    KeyeVL2BaseModelView,
    KeyeVL2Cache,
    KeyeVL2MoeForConditionalGeneration,
    KeyeVL2MoeModel,
    KeyeVL2PreTrainedModel,
    freeze_for_indexer_warmup,
    get_rope_index,
    load_balancing_loss,
)

KeyeVL2Config.register_for_auto_class("AutoConfig")
KeyeVL2MoeModel.register_for_auto_class("AutoModel")
KeyeVL2MoeForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

AutoConfig.register(KeyeVL2Config.model_type, KeyeVL2Config, exist_ok=True)
AutoModel.register(KeyeVL2Config, KeyeVL2MoeModel, exist_ok=True)
AutoModelForCausalLM.register(KeyeVL2Config, KeyeVL2MoeForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(KeyeVL2Config, KeyeVL2MoeForConditionalGeneration, exist_ok=True)


def tiny_config(**overrides) -> KeyeVL2Config:
    """A tiny random-weight configuration of the same architecture (tests, examples, CI).

    Text: hidden 64, 2 layers, 4 query / 2 kv heads of 16 dims, M-RoPE sections [2, 3, 3], 8 experts top-2
    (moe_intermediate 32), the full Qwen3 vocabulary (151,936 rows) so the real tokenizer works; DSA indexer
    2 heads x 16 dims with top-k 16 (so sparsity turns on after 16 tokens). Vision: hidden 32, 2 layers,
    2 heads, a 4 x 4 position table. 19,642,176 parameters. ``overrides`` replace any field.
    """
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=56, patch_size=14, num_packing_positions=64,
    )
    vision.update(overrides.pop("vision_config", {}))
    kw = dict(
        vocab_size=151936, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_scaling={"type": "default", "mrope_section": [2, 3, 3]},
        sa_config={"indexer_num_heads": 2, "indexer_head_dim": 16, "topk": 16},
        vision_config=vision,
    )
    kw.update(overrides)
    return KeyeVL2Config(**kw)


__all__ = [
    "DSA_ATTN_IMPLEMENTATIONS",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "KeyeVL2BaseModelView",
    "KeyeVL2Cache",
    "KeyeVL2Config",
    "KeyeVL2MoeForConditionalGeneration",
    "KeyeVL2MoeModel",
    "KeyeVL2PreTrainedModel",
    "KeyeVL2StaticCache",
    "KeyeVL2VisionConfig",
    "KEYE_VL2_GENERATION_DEFAULTS",
    "freeze_for_indexer_warmup",
    "get_rope_index",
    "load_balancing_loss",
    "keye_generation_config",
    "tiny_config",
]
