"""Configuration of Keye-VL-2.0 (Kwai-Keye/Keye-VL-2.0-30B-A3B).

The official ``config.json`` keeps the text (Qwen3-MoE decoder) fields at the TOP level, beside a nested
``vision_config`` (SigLIP NaViT) and ``sa_config`` (the DSA lightning indexer). This file reads and writes that
layout unchanged; its defaults are the official 30B-A3B values (``docs/keye_vl2.md`` sections 1-2):
with them the model has exactly 31,122,082,160 parameters.

Flat remote-code file: imports only transformers' public API (it is copied beside ``config.json``).
"""

from __future__ import annotations

import copy

from transformers import GenerationConfig, PreTrainedConfig

# Names accepted by ``attn_implementation`` (docs/keye_vl2.md section 3). "dsa" = Triton kernels when available on the
# device, the torch reference otherwise; the explicit variants force one of them.
DSA_ATTN_IMPLEMENTATIONS = ("dsa", "dsa_torch", "dsa_triton")
DENSE_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
SUPPORTED_ATTN_IMPLEMENTATIONS = DENSE_ATTN_IMPLEMENTATIONS + DSA_ATTN_IMPLEMENTATIONS

DEFAULT_SA_CONFIG = {"indexer_num_heads": 16, "indexer_head_dim": 64, "topk": 2048}



# Generation defaults of the model family (the Qwen3 decoder's `generation_config.json`, e.g. the Hub repo
# Qwen/Qwen3-30B-A3B, whose model card recommends temperature 0.6, top_p 0.95, top_k 20 in thinking mode): sample,
# stop at <|im_end|> (151645) or <|endoftext|> (151643), pad with <|endoftext|>.
KEYE_VL2_GENERATION_DEFAULTS = {
    "bos_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
}


def keye_generation_config(**overrides) -> GenerationConfig:
    """The ``GenerationConfig`` a new :class:`KeyeVL2MoeForConditionalGeneration` carries and ``save_pretrained``
    writes as ``generation_config.json``: :data:`KEYE_VL2_GENERATION_DEFAULTS` updated with ``overrides`` (any
    ``GenerationConfig`` field). ``generate(do_sample=False)`` (or any other argument) overrides it per call;
    ``model.generation_config = keye_generation_config(temperature=0.7)`` changes what is saved."""
    return GenerationConfig(**{**KEYE_VL2_GENERATION_DEFAULTS, **overrides})


def check_prefill_chunk_size(value):
    """``prefill_chunk_size`` must be None (no chunking) or a positive int; returns it, raises ValueError otherwise.

    Checked when the config is built and again when a forward reads it (users set it on a loaded model)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"prefill_chunk_size must be a positive int or None, got {value!r}")
    return value

class KeyeVL2VisionConfig(PreTrainedConfig):
    r"""SigLIP-400M NaViT vision tower of Keye-VL-2.0 (docs/keye_vl2.md section 5).

    Args:
        hidden_size (`int`, 1152), intermediate_size (`int`, 4304), num_hidden_layers (`int`, 27),
        num_attention_heads (`int`, 16): transformer sizes (head_dim = 1152 / 16 = 72).
        num_channels (`int`, 3), patch_size (`int`, 14): pixels per patch side.
        image_size (`int`, 384): size of the learned absolute-position table, ``(image_size // patch_size)**2``
            = 729 rows (27 x 27), bilinearly interpolated to each image's patch grid.
        num_packing_positions (`int`, 32768): rows of ``packing_position_embedding`` (kept for checkpoint
            compatibility; unused because positions are interpolated).
        hidden_act (`str`, "gelu_pytorch_tanh"), layer_norm_eps (`float`, 1e-6), attention_dropout (`float`, 0.0).
        spatial_merge_size (`int`, 2): the projector merges 2 x 2 neighbouring patches into one LLM token.
        rope_theta (`float`, 10000.0): base of the 2D rotary embedding (36 dims: 18 frequencies).
    """

    model_type = "KeyeVL2_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = 4304,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 384,
        patch_size: int = 14,
        num_packing_positions: int = 32768,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        spatial_merge_size: int = 2,
        temporal_patch_size: int = 1,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_packing_positions = num_packing_positions
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.spatial_merge_size = spatial_merge_size
        self.temporal_patch_size = temporal_patch_size
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})"
            )
        if (hidden_size // num_attention_heads) % 4:
            raise ValueError(
                f"vision head_dim {hidden_size // num_attention_heads} must be a multiple of 4 for the 2D rotary embedding"
            )


class KeyeVL2Config(PreTrainedConfig):
    r"""Keye-VL-2.0-30B-A3B: SigLIP NaViT + ``mlp_AR`` projector + Qwen3-MoE decoder with DSA in every layer.

    Text fields live at the top level (official layout). Only the non-standard ones are described here; the
    rest follow transformers' Qwen3-MoE names (``hidden_size``, ``num_experts_per_tok``, ...).

    Args:
        vision_config (`dict` or `KeyeVL2VisionConfig`): the vision tower.
        sa_config (`dict`): the DSA lightning indexer, ``{"indexer_num_heads": 16, "indexer_head_dim": 64,
            "topk": 2048}`` (docs/keye_vl2.md section 1: the only values that give the published parameter count).
            ``None`` removes the indexer (plain dense model).
        rope_theta (`float`): base of the decoder's M-RoPE (and of the indexer's); not stated publicly:
            read from config.json, 1e6 when absent (the authors' fallback; docs/keye_vl2.md section 1).
        rope_scaling (`dict`): must contain ``mrope_section`` (3 ints summing to head_dim / 2, default
            [16, 24, 24]); ``mrope_interleaved`` (default False = chunked sections). Stored in the 5.x
            ``rope_parameters`` attribute as well and written back as ``rope_scaling`` for the official loader.
        indexer_loss_coef (`float`, 1.0): lambda in ``loss = LM + lambda * KL(indexer)`` (not public;
            docs/keye_vl2.md section 3).
        prefill_chunk_size (`int` or None): when set, prompts longer than this run through the decoder in
            chunks of this many tokens (bounded activation memory for 256K contexts).
        moe_implementation (`str`, "auto"): "eager" (loop over the experts that received tokens), "grouped_mm"
            (``torch._grouped_mm``, no host syncs), or "auto" (grouped_mm on CUDA when available, else eager).
        router_aux_loss_coef (`float`, 0.001): weight of the Qwen3-MoE load-balancing loss added in training.
        image_token_id, video_token_id, vision_start_token_id, vision_end_token_id, fast_video_token_id (`int`):
            special token ids (Qwen3 vocabulary; docs/keye_vl2.md section 7).

    Raises:
        ValueError: inconsistent sizes (heads not divisible by kv heads, mrope sections that do not sum to
            head_dim / 2, indexer head dim not a power of two, top-k < 1, ...).
    """

    model_type = "KeyeVL2"
    keys_to_ignore_at_inference = ["past_key_values"]
    ignore_keys_at_rope_validation = {"mrope_section", "mrope_interleaved"}

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 2048,
        intermediate_size: int = 6144,
        moe_intermediate_size: int = 768,
        num_hidden_layers: int = 48,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 4,
        head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 262144,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        num_experts: int = 128,
        num_experts_per_tok: int = 8,
        norm_topk_prob: bool = True,
        decoder_sparse_step: int = 1,
        mlp_only_layers: list | None = None,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.001,
        vision_config: dict | KeyeVL2VisionConfig | None = None,
        sa_config: dict | None = "default",
        indexer_loss_coef: float = 1.0,
        prefill_chunk_size: int | None = None,
        moe_implementation: str = "auto",
        projector_layer_norm_eps: float = 1e-5,
        image_token_id: int = 151655,
        video_token_id: int = 151656,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        fast_video_token_id: int = 151678,
        pad_token_id: int | None = 151643,
        bos_token_id: int | None = 151643,
        eos_token_id: int | list | None = 151645,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.decoder_sparse_step = decoder_sparse_step
        self.mlp_only_layers = list(mlp_only_layers) if mlp_only_layers is not None else []
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.indexer_loss_coef = indexer_loss_coef
        self.prefill_chunk_size = prefill_chunk_size
        self.moe_implementation = moe_implementation
        self.projector_layer_norm_eps = projector_layer_norm_eps
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.fast_video_token_id = fast_video_token_id

        if isinstance(vision_config, KeyeVL2VisionConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = KeyeVL2VisionConfig(**(vision_config or {}))
        if isinstance(sa_config, str) and sa_config == "default":
            sa_config = dict(DEFAULT_SA_CONFIG)
        self.sa_config = None if sa_config is None else {**DEFAULT_SA_CONFIG, **dict(sa_config)}

        # RoPE: the official file has `rope_theta` + `rope_scaling`; transformers 5.x names it
        # `rope_parameters`. Accept all three, keep one dict, write the official keys back in `to_dict`.
        rope = dict(rope_parameters or rope_scaling or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if rope_theta is None:
            rope_theta = rope.get("rope_theta", 1_000_000.0)  # the authors' fallback (docs/keye_vl2.md section 1)
        rope["rope_theta"] = float(rope_theta)
        rope.setdefault("mrope_section", [16, 24, 24])
        rope["mrope_section"] = [int(s) for s in rope["mrope_section"]]
        rope.setdefault("mrope_interleaved", False)
        self.rope_parameters = rope

        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        self._validate()

    # ------------------------------------------------------------------ helpers
    @property
    def rope_theta_value(self) -> float:
        """Decoder (and indexer) RoPE base."""
        return float(self.rope_parameters["rope_theta"])

    @property
    def mrope_section(self) -> list[int]:
        """M-RoPE frequency sections (t, h, w) over head_dim / 2 slots."""
        return list(self.rope_parameters["mrope_section"])

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        sec = self.mrope_section
        if len(sec) != 3 or sum(sec) != self.head_dim // 2:
            raise ValueError(
                f"rope_scaling['mrope_section'] = {sec} must be 3 ints that sum to head_dim / 2 = {self.head_dim // 2}"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})"
            )
        if self.moe_implementation not in ("auto", "eager", "grouped_mm"):
            raise ValueError(
                f"moe_implementation={self.moe_implementation!r}: expected 'auto', 'eager' or 'grouped_mm'"
            )
        check_prefill_chunk_size(self.prefill_chunk_size)
        if self.sa_config is not None:
            d_i = int(self.sa_config["indexer_head_dim"])
            if d_i < 1 or d_i & (d_i - 1):
                raise ValueError(f"sa_config['indexer_head_dim'] = {d_i} must be a power of two (Hadamard transform)")
            if d_i % 2 or any((s * d_i) % self.head_dim for s in sec):
                raise ValueError(
                    f"indexer M-RoPE sections int(s * {d_i} / {self.head_dim}) for mrope_section {sec} are not whole"
                )
            if int(self.sa_config["topk"]) < 1 or int(self.sa_config["indexer_num_heads"]) < 1:
                raise ValueError(f"sa_config {self.sa_config}: topk and indexer_num_heads must be >= 1")

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict() if hasattr(self.vision_config, "to_dict") else self.vision_config
        rope = copy.deepcopy(self.rope_parameters)
        output["rope_parameters"] = rope
        # the official layout (read by the authors' loader)
        output["rope_theta"] = rope["rope_theta"]
        output["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_theta"}}
        return output


__all__ = [
    "DSA_ATTN_IMPLEMENTATIONS",
    "KEYE_VL2_GENERATION_DEFAULTS",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "KeyeVL2Config",
    "KeyeVL2VisionConfig",
    "keye_generation_config",
]
