"""Keye-VL-2.0-30B-A3B for transformers 5.x (Kwai-Keye/Keye-VL-2.0-30B-A3B).

One file, read top to bottom from leaf modules to glue (``docs/keye_vl2.md``):

- rotary helpers: chunked M-RoPE for the decoder (sections [16, 24, 24]) and the indexer (scaled sections),
  the vision tower's 2D RoPE;
- the DSA lightning indexer (``sa_indexer``) and GQA attention with dense (eager / sdpa) or sparse (DSA)
  cores, selected by ``attn_implementation``;
- the SigLIP NaViT vision tower (per-frame attention, interpolated absolute positions, 2D RoPE) and the
  ``mlp_AR`` projector (2 x 2 merge);
- ``get_rope_index`` (positions for text, images and per-frame video blocks) and
  ``KeyeVL2MoeForConditionalGeneration``.

Siblings: ``cache_keye_vl_2`` (the dynamic cache and the static one of ``cache_implementation="static"``, both with
the indexer keys), ``moe_keye_vl_2`` (router and fused experts), ``keye_dsa_*`` (DSA kernels).

Deviations from the authors' remote code: no monkey-patches, no ``fast_hadamard_transform`` (a torch
Walsh-Hadamard), DSA on every device (Triton kernels where available, a chunked torch reference otherwise),
deterministic top-k (lower position first on exact ties).

Flat remote-code file: it imports only torch, the public transformers API and its siblings
(``configuration_keye_vl_2``, ``cache_keye_vl_2``, ``moe_keye_vl_2``, ``keye_dsa_*``), so a saved checkpoint folder
is self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_keye_vl_2 import (
    DSA_ATTN_IMPLEMENTATIONS,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    KeyeVL2Config,
    KeyeVL2VisionConfig,
    check_prefill_chunk_size,
    keye_generation_config,
)
from .cache_keye_vl_2 import KeyeVL2Cache, KeyeVL2CacheLayer, KeyeVL2StaticCache, update_indexer_cache
from .moe_keye_vl_2 import KeyeVL2Experts, KeyeVL2SparseMoeBlock, _grouped_mm  # noqa: F401  (re-exported)
from . import keye_dsa_reference as dsa_reference  # noqa: E402  (plain-torch DSA, always available)
from .keye_dsa_decode import decode_topk_indices, sparse_attention_decode
from .keye_dsa_reference import hadamard_transform

try:  # Triton kernels: optional (no GPU, no triton, or an old triton)
    from . import keye_dsa_triton as dsa_triton
    from .keye_dsa_triton import HAS_TRITON as _HAS_TRITON
except Exception:  # pragma: no cover - depends on the machine
    dsa_triton = None
    _HAS_TRITON = False

logger = logging.get_logger(__name__)


# transformers 5.2x renamed the cache field of model outputs from `past_key_values` to `cache` (and turned
# `past_key_values` into a deprecated read-only alias); declare whichever this version expects.
_CACHE_FIELD = "cache" if hasattr(ModelOutput, "_replace_old_cache_name") else "past_key_values"


# ======================================================================================================
# Output types
# ======================================================================================================
@dataclass
class KeyeVL2ModelOutput(ModelOutput):
    """Output of :class:`KeyeVL2MoeModel`.

    Attributes:
        last_hidden_state: [B, L, hidden] decoder output.
        cache / past_key_values: the cache (K/V and indexer keys), or None (the field is ``cache`` on
            transformers versions that renamed it, ``past_key_values`` before; :func:`output_cache` reads either).
        hidden_states / attentions: optional per-layer tuples.
        router_logits: tuple (one per MoE layer) of [B*L, num_experts] fp32 router logits, or None.
        indexer_loss: scalar fp32 DSA indexer KL (mean over layers) when requested, else None.
        rope_deltas: [B, 1] int64, decode position offset (M-RoPE max position + 1 - sequence length).
    """

    last_hidden_state: torch.FloatTensor | None = None
    if _CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    indexer_loss: torch.FloatTensor | None = None
    rope_deltas: torch.LongTensor | None = None


@dataclass
class KeyeVL2CausalLMOutput(ModelOutput):
    """Output of :class:`KeyeVL2MoeForConditionalGeneration`.

    Attributes:
        loss: scalar, ``LM + router_aux_loss_coef * aux_loss + indexer_loss_coef * indexer_loss`` (the last two
            only when computed), or None without labels.
        logits: [B, L_kept, vocab] (``logits_to_keep`` selects the trailing positions).
        aux_loss: Qwen3-MoE load-balancing loss (scalar) when router logits were collected.
        lm_loss: the plain next-token cross entropy (mean over non-ignored labels).
        Others as :class:`KeyeVL2ModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if _CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    indexer_loss: torch.FloatTensor | None = None
    rope_deltas: torch.LongTensor | None = None


def _with_cache(output: ModelOutput, cache: Cache | None) -> ModelOutput:
    """Attach the cache under this transformers version's field name (see ``_CACHE_FIELD``)."""
    if cache is not None:
        output[_CACHE_FIELD] = cache
    return output


def output_cache(output: ModelOutput) -> Cache | None:
    """The cache of a model output, whatever this transformers version calls it."""
    return output.get(_CACHE_FIELD)


# ======================================================================================================
# Rotary embeddings
# ======================================================================================================
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Neox half-split rotation: (x1, x2) -> (-x2, x1) over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE in fp32: ``x * cos + rotate_half(x) * sin``; cos/sin broadcast to x. Returns x.dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int], attention_scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked M-RoPE angles (docs/keye_vl2.md section 6).

    Args:
        position_ids: [3, B, L] int64, (t, h, w) positions.
        inv_freq: [F] fp32 inverse frequencies, F = rotary dim / 2 = sum(mrope_section).
        mrope_section: frequency slots per axis, chunked: t takes the first ``s[0]`` slots, h the next
            ``s[1]``, w the last ``s[2]``.
    Returns:
        cos, sin: [B, L, 2F] fp32 (neox layout: the F angles repeated twice).
    """
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"M-RoPE position_ids must have shape [3, B, L], got {tuple(position_ids.shape)}")
    freqs = position_ids.float()[..., None] * inv_freq.float()  # [3, B, L, F]
    slot = torch.arange(inv_freq.shape[0], device=inv_freq.device)
    s0, s1 = int(mrope_section[0]), int(mrope_section[0]) + int(mrope_section[1])
    axis = (slot >= s0).long() + (slot >= s1).long()  # [F]: axis of each slot (no host-to-device copy)
    freqs = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)  # [B, L, F]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """``theta ** (-2i / dim)`` for i in [0, dim/2): [dim/2] fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class KeyeVL2TextRotaryEmbedding(nn.Module):
    """Decoder M-RoPE over head_dim (default type; YaRN etc. through transformers' rope functions)."""

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        self.mrope_section = config.mrope_section
        self.interleaved = bool(config.rope_parameters.get("mrope_interleaved", False))
        if self.interleaved:
            raise NotImplementedError("mrope_interleaved=True is not used by Keye-VL-2.0 and is not implemented")
        self.config = config
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """[head_dim / 2] fp32 inverse frequencies (sets ``attention_scaling`` for non-default rope types)."""
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            return default_inv_freq(self.config.head_dim, self.config.rope_theta_value)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"Unknown rope type {rope_type!r} in rope_scaling")
        inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, None)
        return inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(position_ids, self.inv_freq, self.mrope_section, self.attention_scaling)


class KeyeVL2IndexerRotaryEmbedding(nn.Module):
    """Indexer M-RoPE (docs/keye_vl2.md section 3): rotates the whole D_I, always chunked, default type, the model's
    rope_theta, sections ``int(s * D_I / head_dim)`` = [8, 12, 12]."""

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        self.dim = int(config.sa_config["indexer_head_dim"])
        self.theta = config.rope_theta_value
        self.mrope_section = [int(s * self.dim / config.head_dim) for s in config.mrope_section]
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """[D_I / 2] fp32 inverse frequencies."""
        return default_inv_freq(self.dim, self.theta)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_cos_sin(position_ids, self.inv_freq, self.mrope_section)


# ======================================================================================================
# Decoder blocks
# ======================================================================================================
class KeyeVL2RMSNorm(nn.Module):
    """RMSNorm (Qwen3): ``w * x / sqrt(mean(x^2) + eps)`` in fp32, returned in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class KeyeVL2Indexer(nn.Module):
    """DSA lightning indexer (docs/keye_vl2.md section 3 item 2): H_I query heads x D_I dims, one shared key head.

    ``q_proj`` gives H_I*D_I query dims followed by H_I per-head weight logits; queries get per-head RMSNorm,
    keys a LayerNorm; both get the indexer M-RoPE and the orthonormal Hadamard transform. Scores
    ``I[t, s] = sum_h w[t, h] * D_I^-1/2 * ReLU(q[t, h] . k[s])`` (no ``H_I^-1/2`` factor, unlike DeepSeek-V3.2).
    """

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        sa = config.sa_config
        self.num_heads = int(sa["indexer_num_heads"])
        self.head_dim = int(sa["indexer_head_dim"])
        self.topk = int(sa["topk"])
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim + self.num_heads, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.q_norm = KeyeVL2RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)

    def forward(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: [B, T, hidden], the layer input after ``input_layernorm``.
            cos, sin: [B, T, D_I] fp32 indexer rotary angles.
        Returns:
            q: [B, T, H_I, D_I] (input dtype), w: [B, T, H_I] fp32, k: [B, T, D_I] (input dtype).
        """
        B, T, _ = hidden_states.shape
        qw = self.q_proj(hidden_states)
        q, w = qw.split([self.num_heads * self.head_dim, self.num_heads], dim=-1)
        q = self.q_norm(q.view(B, T, self.num_heads, self.head_dim))  # [B, T, H_I, D_I]
        k = self.k_norm(self.k_proj(hidden_states))  # [B, T, D_I]
        q = apply_rotary(q, cos[:, :, None, :], sin[:, :, None, :])
        k = apply_rotary(k, cos, sin)
        dtype = qw.dtype  # under autocast the norms return fp32; keep q and k in the projection's dtype
        return hadamard_transform(q.to(dtype)), w.float(), hadamard_transform(k.to(dtype))


def _dsa_backend(attn_implementation: str, device: torch.device):
    """The module implementing the DSA contract (``kernels/README.md``) for this implementation name."""
    triton_ok = _HAS_TRITON and device.type == "cuda"
    if attn_implementation == "dsa_triton":
        if not triton_ok:
            raise ValueError(
                "attn_implementation='dsa_triton' needs a CUDA device and the Triton DSA kernels; use 'dsa' "
                "(automatic) or 'dsa_torch' (reference) instead"
            )
        return dsa_triton
    if attn_implementation == "dsa" and triton_ok:
        return dsa_triton
    return dsa_reference


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D] (each kv head repeated for its query group)."""
    if n_rep == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, S, D).reshape(B, H * n_rep, S, D)


def build_dense_mask(
    T: int, S: int, q_offset: int, key_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
    device: torch.device, batch: int,
) -> torch.Tensor:
    """Boolean mask [B, 1, T, S], True = attend: causal (key s <= q_offset + t), padding, same segment."""
    q_pos = torch.arange(T, device=device) + q_offset
    allowed = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # [T, S]
    allowed = allowed[None, None].expand(batch, 1, T, S)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :S].bool()
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, q_offset:q_offset + T, None] == segment_ids[:, None, None, :S])
    return allowed


def eager_attention(q, k, v, mask, scaling, dropout=0.0, training=False):
    """Dense attention in the model layout: q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B, 1, T, S].
    Returns (out [B, T, Hq, D], probs [B, Hq, T, S]). Fully masked rows give 0."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v).transpose(1, 2), probs


def sdpa_attention(q, k, v, mask, scaling, dropout=0.0, training=False, is_causal=False):
    """Dense attention through ``F.scaled_dot_product_attention``; same contract as :func:`eager_attention`.

    Decode (one query token): the ``n_rep`` query heads of a KV group become the rows of one attention against that
    group's keys, so the cache is read once and never repeated ``n_rep`` times.
    """
    B, Hq, T, D = q.shape
    n_rep = Hq // k.shape[1]
    if T == 1 and n_rep > 1 and not (training and dropout):
        qg = q.reshape(B, k.shape[1], n_rep, D)  # heads g*n_rep .. g*n_rep+n_rep-1 share kv head g
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scaling)  # mask [B, 1, 1, S] broadcasts
        return out.reshape(B, Hq, 1, D).transpose(1, 2), None
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if is_causal else mask, dropout_p=dropout if training else 0.0,
        is_causal=is_causal, scale=scaling,
    )
    if mask is not None and not is_causal:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows with no key (padding): 0, not NaN
    return out.transpose(1, 2), None


def eager_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` signature of :func:`eager_attention`: (out [B, T, Hq, D], probs [B, Hq, T, S])."""
    return eager_attention(query, key, value, attention_mask, scaling, dropout, module.training)


def sdpa_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` signature of :func:`sdpa_attention` (causal when ``attention_mask`` is None)."""
    return sdpa_attention(query, key, value, attention_mask, scaling, dropout, module.training,
                          is_causal=attention_mask is None)


def dsa_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, indices=None,
                          fixed_shapes=False, **kwargs):
    """Sparse attention registered in transformers' ``AttentionInterface`` under the DSA names.

    Args: query [B, Hq, T, D], key/value [B, Hkv, S, D] (model layout), ``indices`` [B, T, K] int64 (-1 empty),
    one list per query token shared by all heads. ``fixed_shapes=True`` (a decode step on a static cache, where
    S is the capacity): no input checks that read device values; the Triton forward on CUDA, else the plain-torch
    :func:`sparse_attention_decode`. Returns (out [B, T, Hq, D], None).
    """
    if indices is None:
        raise ValueError("DSA attention needs `indices` (top-k key positions) from the lightning indexer")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    backend = _dsa_backend(module.config._attn_implementation, query.device)
    if fixed_shapes:
        if backend is dsa_triton and not torch.is_grad_enabled():
            return dsa_triton.sparse_attention_fixed(q, k, v, indices, scaling=scaling), None
        return sparse_attention_decode(q, k, v, indices, scaling=scaling), None
    return backend.sparse_attention(q, k, v, indices, scaling=scaling), None


for _name in DSA_ATTN_IMPLEMENTATIONS:  # makes from_pretrained(..., attn_implementation="dsa") valid
    AttentionInterface.register(_name, dsa_attention_forward)

# Every attention core (eager, sdpa, DSA) is looked up here: an ``AttentionInterface`` with two local entries,
# our eager / sdpa (fully masked padding rows give 0, GQA decode without repeat_kv); every other name (the DSA ones
# above, or a kernel a user registered with ``AttentionInterface.register``) resolves through transformers' global
# mapping (the per-file override pattern of ``transformers.utils.generic.GeneralInterface``).
ALL_ATTENTION_FUNCTIONS = AttentionInterface()
ALL_ATTENTION_FUNCTIONS["eager"] = eager_attention_forward
ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention_forward


@dataclass
class AttentionContext:
    """What every decoder layer of one forward needs besides its hidden states, built once by the text model.

    Attributes:
        q_offset: position of the first query among the keys: an int (dynamic cache / no cache / static-cache
            prefill) or a 0-d int64 device tensor (static-cache decode).
        key_mask: [B, S] bool padding mask of the keys, or None (no padding).
        segment_ids: [B, S] int64 packed-sequence ids, or None.
        kv_end: static-cache prefill: the host-known filled length to slice the buffers to; else None.
        static_decode: True for a decode step on a :class:`KeyeVL2StaticCache` (keys = the whole buffer).
        allowed: static decode: [B, T, C] bool, key s may be read by query t (causal and not padding).
        mask: the dense boolean mask [B, 1, T, S] (True = attend), built at most once (lazily, for eager / sdpa).
    """

    q_offset: int | torch.Tensor
    T: int
    S: int
    batch: int
    key_mask: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    kv_end: int | None = None
    static_decode: bool = False
    allowed: torch.Tensor | None = None
    _mask: Any = None

    def dense_mask(self, impl: str, device: torch.device) -> torch.Tensor | None:
        """[B, 1, T, S] bool, or None where sdpa can run plainly causal (no padding, no segments, T == S)."""
        if self.static_decode:
            return self.allowed[:, None]
        need = self.key_mask is not None or self.segment_ids is not None or self.T != self.S
        if not need and impl != "eager":
            return None
        if self._mask is None:  # built once per forward, shared by the layers
            self._mask = build_dense_mask(self.T, self.S, self.q_offset, self.key_mask, self.segment_ids, device,
                                          self.batch)
        return self._mask


class KeyeVL2Attention(nn.Module):
    """GQA attention with q/k RMSNorm, chunked M-RoPE and the DSA indexer (docs/keye_vl2.md section 3).

    The core is chosen by ``config._attn_implementation``: "eager" / "sdpa" (dense causal) or a DSA name
    (the indexer picks ``topk`` keys per query, shared by all heads, then sparse attention).
    """

    def __init__(self, config: KeyeVL2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=config.attention_bias)
        self.q_norm = KeyeVL2RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = KeyeVL2RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.sa_indexer = KeyeVL2Indexer(config) if config.sa_config is not None else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        indexer_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attn_context: "AttentionContext",
        past_key_values: Cache | None = None,
        indexer_loss: str | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            hidden_states: [B, T, hidden] (after input_layernorm).
            position_embeddings: (cos, sin) [B, T, head_dim] fp32; indexer_position_embeddings: [B, T, D_I].
            attn_context: masks and offsets of this forward, built once for all layers (:class:`AttentionContext`).
            indexer_loss: None, "dense" (warm-up KL against dense attention) or "sparse" (KL on the top-k set).
        Returns:
            (output [B, T, hidden], attention probs or None, indexer KL scalar or None)
        """
        ctx = attn_context
        B, T, _ = hidden_states.shape
        impl = self.config._attn_implementation or "sdpa"
        cos, sin = position_embeddings
        q = self.q_norm(self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos[:, None], sin[:, None])
        k = apply_rotary(k, cos[:, None], sin[:, None])
        q, k = q.to(v.dtype), k.to(v.dtype)  # autocast + fp32 norm weights: one dtype for every core
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
            if ctx.kv_end is not None:  # static cache, host-known length (prefill): the filled part only
                k, v = k[:, :, : ctx.kv_end], v[:, :, : ctx.kv_end]
        q_offset = ctx.q_offset

        use_dsa = impl in DSA_ATTN_IMPLEMENTATIONS
        if (use_dsa or indexer_loss) and self.sa_indexer is None:
            raise ValueError("DSA attention / indexer loss need `sa_config` in the config (no indexer in this model)")
        iq = iw = ik = indices = None
        if use_dsa or indexer_loss:
            # In training the indexer learns only from its KL: its input is detached (docs/keye_vl2.md section 3).
            x_idx = hidden_states.detach() if indexer_loss else hidden_states
            iq, iw, ik = self.sa_indexer(x_idx, *indexer_position_embeddings)
            ik_new_dtype = ik.dtype
            ik = update_indexer_cache(past_key_values, ik, self.layer_idx)
            if ctx.kv_end is not None:  # static-cache prefill: the filled part, in the dtype the kernels expect
                ik = ik[:, : ctx.kv_end].to(ik_new_dtype)

        probs = None
        attn_fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        if use_dsa:
            if ctx.static_decode:
                indices = decode_topk_indices(iq, iw, ik, ctx.allowed, self.sa_indexer.topk)
            else:
                backend = _dsa_backend(impl, hidden_states.device)
                with torch.no_grad():
                    indices = backend.dsa_topk_indices(
                        iq, iw, ik, self.sa_indexer.topk, q_offset=q_offset, key_mask=ctx.key_mask,
                        segment_ids=ctx.segment_ids,
                    )
            out, _ = attn_fn(self, q, k, v, None, scaling=self.scaling, dropout=0.0, indices=indices,
                             fixed_shapes=ctx.static_decode)
        else:
            if impl not in SUPPORTED_ATTN_IMPLEMENTATIONS:
                raise ValueError(
                    f"KeyeVL2 does not support attn_implementation={impl!r}; use one of {SUPPORTED_ATTN_IMPLEMENTATIONS}"
                )
            dropout = self.attention_dropout if self.training else 0.0
            if output_attentions and impl != "eager":
                attn_fn = eager_attention_forward
            out, probs = attn_fn(self, q, k, v, ctx.dense_mask(impl, q.device), scaling=self.scaling, dropout=dropout)

        kl = None
        if indexer_loss:
            backend = _dsa_backend(impl if use_dsa else "dsa", hidden_states.device)
            kl = backend.indexer_kl_loss(
                q.detach().transpose(1, 2), k.detach().transpose(1, 2), self.scaling, iq, iw, ik,
                indices=indices if indexer_loss == "sparse" else None,
                q_offset=q_offset, key_mask=ctx.key_mask, segment_ids=ctx.segment_ids,
            )
        out = self.o_proj(out.reshape(B, T, -1).to(hidden_states.dtype))
        return out, probs, kl


class KeyeVL2MLP(nn.Module):
    """Dense SwiGLU MLP (used only for layers listed in ``mlp_only_layers``; none in the official model)."""

    def __init__(self, config: KeyeVL2Config, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class KeyeVL2DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: attention (dense or DSA) + MoE (or dense MLP for ``mlp_only_layers``)."""

    def __init__(self, config: KeyeVL2Config, layer_idx: int):
        super().__init__()
        self.self_attn = KeyeVL2Attention(config, layer_idx)
        is_moe = layer_idx not in config.mlp_only_layers and (layer_idx + 1) % config.decoder_sparse_step == 0
        self.mlp = KeyeVL2SparseMoeBlock(config) if is_moe and config.num_experts > 0 else KeyeVL2MLP(config)
        self.input_layernorm = KeyeVL2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KeyeVL2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        indexer_position_embeddings=None,
        attn_context=None,
        past_key_values=None,
        indexer_loss=None,
        output_attentions=False,
        **kwargs,
    ):
        residual = hidden_states
        attn_out, probs, kl = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, indexer_position_embeddings, attn_context,
            past_key_values=past_key_values, indexer_loss=indexer_loss, output_attentions=output_attentions,
        )
        hidden_states = residual + attn_out
        residual = hidden_states
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        router_logits = None
        if isinstance(mlp_out, tuple):
            mlp_out, router_logits = mlp_out
        return residual + mlp_out, probs, router_logits, kl


# ======================================================================================================
# Vision tower (SigLIP NaViT) and projector
# ======================================================================================================
class KeyeVL2VisionEmbeddings(nn.Module):
    """Patch embedding (Conv2d 14x14, stride 14) + learned 27 x 27 absolute positions, bilinearly
    interpolated (align_corners=False) to each image's / frame's patch grid (docs/keye_vl2.md section 5)."""

    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.num_positions_side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.num_positions_side**2, config.hidden_size)
        self.packing_position_embedding = nn.Embedding(config.num_packing_positions, config.hidden_size)

    def interpolated_positions(self, h: int, w: int) -> torch.Tensor:
        """[h * w, hidden] position embeddings for an h x w patch grid (raster order)."""
        n = self.num_positions_side
        table = self.position_embedding.weight.view(n, n, -1).permute(2, 0, 1)[None].float()  # [1, C, n, n]
        grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)
        return grid[0].permute(1, 2, 0).reshape(h * w, -1)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values [N, C*P*P] or [N, C, P, P] -> [N, hidden]; ``grids`` = (t, h, w) per image/video."""
        C, P = self.config.num_channels, self.patch_size
        x = pixel_values.reshape(-1, C, P, P).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(1)  # [N, hidden]
        pos = torch.cat([self.interpolated_positions(h, w).repeat(t, 1) for t, h, w in grids])
        return x + pos.to(x.dtype)


class KeyeVL2VisionRotaryEmbedding(nn.Module):
    """2D RoPE of the vision tower: 18 frequencies ``theta^(-2i/36)``; per patch
    ``cat(angles[row], angles[col])`` (36) repeated to 72 = head_dim; rows/cols within the patch's frame."""

    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.dim = config.hidden_size // config.num_attention_heads // 2  # 36: 18 frequencies per axis
        self.theta = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """[head_dim / 4] fp32 inverse frequencies ``theta^(-2i/dim)``."""
        return default_inv_freq(self.dim, self.theta)

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [h * w, head_dim] fp32 for a raster-ordered h x w patch grid."""
        rows = torch.arange(h, device=self.inv_freq.device).repeat_interleave(w).float()
        cols = torch.arange(w, device=self.inv_freq.device).repeat(h).float()
        ang = torch.cat([rows[:, None] * self.inv_freq, cols[:, None] * self.inv_freq], dim=-1)  # [hw, 36]
        emb = torch.cat([ang, ang], dim=-1)  # [hw, 72]
        return emb.cos(), emb.sin()


class KeyeVL2VisionAttention(nn.Module):
    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        H = config.hidden_size
        self.q_proj, self.k_proj = nn.Linear(H, H), nn.Linear(H, H)
        self.v_proj, self.out_proj = nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [F, P, hidden] (F frames/images of P patches each, full attention within one), cos/sin [P, head_dim]."""
        Fn, P, _ = x.shape
        q = self.q_proj(x).view(Fn, P, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(Fn, P, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(Fn, P, self.num_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(Fn, P, -1))


class KeyeVL2VisionMLP(nn.Module):
    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class KeyeVL2VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm SigLIP layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = KeyeVL2VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = KeyeVL2VisionMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin)
        return x + self.mlp(self.layer_norm2(x))


class KeyeVL2VisionEncoder(nn.Module):
    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([KeyeVL2VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False


class KeyeVL2VisionTransformer(nn.Module):
    """``visual.vision_model``: embeddings -> 27 encoder layers (attention within each image / frame) ->
    post_layernorm."""

    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = KeyeVL2VisionEmbeddings(config)
        self.encoder = KeyeVL2VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = KeyeVL2VisionRotaryEmbedding(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, frames_per_chunk: int | None = None,
                input_names: tuple[str, str] = ("pixel_values", "grid_thw")) -> torch.Tensor:
        """
        Args:
            pixel_values: [N, C*P*P] (or [N, C, P, P]) patches, each image/frame in raster order.
            grid_thw: [n, 3] int64 (t, h, w) patches per image/video; ``N == sum(t * h * w)``.
            frames_per_chunk: process at most this many frames of one size at a time (bounds memory).
            input_names: what the caller calls the two inputs, for the error messages (e.g.
                ``("pixel_values_videos", "video_grid_thw")``).
        Returns:
            [N, hidden] patch features in raster order.
        Raises:
            ValueError: a wrong patch shape, a bad grid or a patch count that does not match ``grid_thw``, naming the
                input (NaN / inf pixels are refused by the model's get_image_features / get_video_features).
        """
        pname, gname = input_names
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        C, P, m = self.config.num_channels, self.config.patch_size, self.config.spatial_merge_size
        if pixel_values.dim() not in (2, 4) or pixel_values[0].numel() != C * P * P:
            raise ValueError(
                f"{pname} must be [N, {C * P * P}] (or [N, {C}, {P}, {P}]) patches, got {tuple(pixel_values.shape)}"
            )
        bad = [g for g in grids if min(g) < 1 or g[1] % m or g[2] % m]
        if bad:
            raise ValueError(f"{gname} rows {bad}: t, h, w must be >= 1 and h, w multiples of the merge size {m}")
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"{pname} has {pixel_values.shape[0]} patches but {gname} {grids} describes {expected}"
            )
        x = self.embeddings(pixel_values, grids)
        outs, start = [], 0
        for t, h, w in grids:
            P = h * w
            cos, sin = self.rotary(h, w)
            step = frames_per_chunk or t
            for f0 in range(0, t, step):
                nf = min(step, t - f0)
                chunk = x[start + f0 * P: start + (f0 + nf) * P].view(nf, P, -1)
                for layer in self.encoder.layers:
                    chunk = layer(chunk, cos, sin)
                outs.append(self.post_layernorm(chunk).reshape(nf * P, -1))
            start += t * P
        return torch.cat(outs) if outs else x[:0]


class KeyeVL2VisionModel(nn.Module):
    """Container giving the official key prefix ``visual.vision_model.*``."""

    def __init__(self, config: KeyeVL2VisionConfig):
        super().__init__()
        self.vision_model = KeyeVL2VisionTransformer(config)

    def forward(self, pixel_values, grid_thw, frames_per_chunk=None, input_names=("pixel_values", "grid_thw")):
        return self.vision_model(pixel_values, grid_thw, frames_per_chunk, input_names)


class KeyeVL2Projector(nn.Module):
    """``mlp_AR``: 2 x 2 merge ``(t h p1 w p2) d -> (t h w) (p1 p2 d)`` -> LayerNorm(4d, eps 1e-5) ->
    Linear(4d, 4d) -> GELU -> Linear(4d, text hidden) (docs/keye_vl2.md sections 1 and 5)."""

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        vc = config.vision_config
        self.merge = vc.spatial_merge_size
        d = vc.hidden_size * self.merge**2
        self.pre_norm = nn.LayerNorm(d, eps=config.projector_layer_norm_eps)
        self.linear_1 = nn.Linear(d, d)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d, config.hidden_size)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """features [N, d] (raster per frame) -> [N / 4, text hidden], one token per 2 x 2 patch block."""
        m, outs, start = self.merge, [], 0
        for t, h, w in grid_thw.tolist():
            x = features[start: start + t * h * w].view(t, h // m, m, w // m, m, -1)
            outs.append(x.permute(0, 1, 3, 2, 4, 5).reshape(t * (h // m) * (w // m), -1))
            start += t * h * w
        x = torch.cat(outs)
        return self.linear_2(self.act(self.linear_1(self.pre_norm(x))))


# ======================================================================================================
# Positions
# ======================================================================================================
def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions (docs/keye_vl2.md section 6).

    Text tokens get the same value on the three axes, continuing from max(previous) + 1. Each vision block
    (a run of ``<|image_pad|>`` = one image; a run of ``<|video_pad|>`` = ONE video frame) with LLM grid
    (1, h/2, w/2) gets t = start, h = start + row, w = start + col, where start = max(previous) + 1; text
    after it resumes at max + 1. Images and frames are consumed in order across the batch. Padding tokens
    (attention_mask 0) get position 1 and do not advance. With ``segment_ids`` positions restart at 0 for
    each segment (packed samples).

    Args:
        input_ids: [B, L] int64. image_grid_thw: [n_img, 3]; video_grid_thw: [n_vid, 3] (frames, h, w) in patches.
        attention_mask: [B, L] or None.
    Returns:
        position_ids [3, B, L] int64 and rope_deltas [B, 1] int64 (= max position + 1 - number of tokens).
    Raises:
        ValueError: a run of placeholders whose length does not match the next grid, or more placeholder
            runs than images / frames given.
    """
    B, L = input_ids.shape
    m = spatial_merge_size
    pos = torch.ones(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    images = [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    frames = []
    if video_grid_thw is not None:
        for t, h, w in video_grid_thw.tolist():
            frames.extend([(1, h, w)] * int(t))
    img_i = frm_i = 0
    ids_cpu = input_ids.detach().cpu()
    am = attention_mask.detach().cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
    seg = segment_ids.detach().cpu() if segment_ids is not None else None
    for b in range(B):
        valid = torch.nonzero(am[b]).flatten()
        ids = ids_cpu[b, valid]
        n = ids.numel()
        out = torch.empty(3, n, dtype=torch.long)
        # runs of one kind (0 text, 1 image pads, 2 video pads) inside one packed segment, processed run by run
        kind = (ids == image_token_id).long() + 2 * (ids == video_token_id).long()
        brk = torch.zeros(n, dtype=torch.bool)
        if n:
            brk[0] = True
            brk[1:] = kind[1:] != kind[:-1]
            if seg is not None:
                seg_b = seg[b, valid]
                new_seg = torch.zeros(n, dtype=torch.bool)
                new_seg[1:] = seg_b[1:] != seg_b[:-1]
                brk |= new_seg
        starts = torch.nonzero(brk).flatten().tolist()
        ends = starts[1:] + [n]
        nxt = 0
        for i, j in zip(starts, ends):
            if seg is not None and i > 0 and bool(seg_b[i] != seg_b[i - 1]):
                nxt = 0  # new packed sample
            k = int(kind[i])
            if k == 0:
                out[:, i:j] = torch.arange(nxt, nxt + j - i)
                nxt += j - i
                continue
            if k == 1:
                if img_i >= len(images):
                    raise ValueError(f"more <|image_pad|> runs in input_ids than images in image_grid_thw ({len(images)})")
                t, h, w = images[img_i]
                img_i += 1
            else:
                if frm_i >= len(frames):
                    raise ValueError(f"more <|video_pad|> runs in input_ids than video frames in video_grid_thw ({len(frames)})")
                t, h, w = frames[frm_i]
                frm_i += 1
            gh, gw = h // m, w // m
            if j - i != t * gh * gw:
                raise ValueError(
                    f"a run of {j - i} vision placeholder tokens at position {int(valid[i])} does not match its grid "
                    f"(t={t}, h={h}, w={w}) -> {t * gh * gw} tokens"
                )
            tt = torch.arange(t).repeat_interleave(gh * gw)
            hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
            ww = torch.arange(gw).repeat(gh * t)
            out[:, i:j] = torch.stack([tt, hh, ww]) + nxt
            nxt += max(t, gh, gw)
        pos[:, b, valid] = out
        deltas[b, 0] = (int(out.max()) + 1 if n else 0) - L
    return pos.to(input_ids.device), deltas.to(input_ids.device)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Qwen3-MoE / Switch load-balancing loss: ``E * sum_e f_e * P_e`` over all layers' tokens, where f_e =
    fraction of (token, slot) assignments to expert e (per slot) and P_e = mean router probability.

    Args: router_logits: per layer [B*L, E]; attention_mask [B, L] (padding tokens excluded).
    Returns: scalar fp32.
    """
    logits = torch.cat([r.float() for r in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts).float()  # [N, k, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(0)  # [k, E]
        router_prob = probs.mean(0)  # [E]
    else:
        w = attention_mask.reshape(-1).float().repeat(len(router_logits)).to(probs.device)  # [N]
        tokens_per_expert = (expert_mask * w[:, None, None]).sum(0) / w.sum()
        router_prob = (probs * w[:, None]).sum(0) / w.sum()
    return (tokens_per_expert * router_prob[None]).sum() * num_experts


# ======================================================================================================
# Pre-trained model base
# ======================================================================================================
class KeyeVL2PreTrainedModel(PreTrainedModel):
    config_class = KeyeVL2Config
    config: KeyeVL2Config
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["KeyeVL2DecoderLayer", "KeyeVL2VisionEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, KeyeVL2RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, KeyeVL2Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        # non-persistent rotary buffers are recomputed (meta-device init leaves them empty)
        if isinstance(module, (KeyeVL2TextRotaryEmbedding, KeyeVL2IndexerRotaryEmbedding, KeyeVL2VisionRotaryEmbedding)):
            module.inv_freq = module.compute_inv_freq().to(module.inv_freq.device)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained`` plus a complete ``auto_map`` (AutoConfig, AutoModel,
        AutoModelForCausalLM, AutoModelForImageTextToText) when the class is marked for remote code, so the
        folder (config.json, flat ``.py`` files, safetensors shards) loads with ``trust_remote_code=True``."""
        if getattr(self, "_auto_class", None) is not None:
            mod = "modeling_keye_vl_2"
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoConfig": "configuration_keye_vl_2.KeyeVL2Config",
                "AutoModel": f"{mod}.KeyeVL2MoeModel",
                "AutoModelForCausalLM": f"{mod}.KeyeVL2MoeForConditionalGeneration",
                "AutoModelForImageTextToText": f"{mod}.KeyeVL2MoeForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """DSA is the default when the config has an indexer (``sa_config``); dense "sdpa" otherwise."""
        if requested_attention is None:
            requested_attention = "dsa" if self.config.sa_config is not None else "sdpa"
        if requested_attention not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f'Specified `attn_implementation="{requested_attention}"` is not supported by KeyeVL2; use one of '
                f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}"
            )
        if requested_attention in DSA_ATTN_IMPLEMENTATIONS and self.config.sa_config is None:
            raise ValueError(f'attn_implementation="{requested_attention}" needs `sa_config` (the DSA indexer) in the config')
        return requested_attention


# ======================================================================================================
# Models
# ======================================================================================================
class KeyeVL2TextModel(nn.Module):
    """``model.*``: token embeddings, decoder layers, final norm (Qwen3-MoE with DSA)."""

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([KeyeVL2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = KeyeVL2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = KeyeVL2TextRotaryEmbedding(config)
        self.indexer_rotary_emb = KeyeVL2IndexerRotaryEmbedding(config) if config.sa_config is not None else None
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        past_key_values: Cache | None,
        indexer_loss: str | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        past_len: int | None = 0,
    ):
        """inputs_embeds [B, T, hidden], position_ids [3, B, T] -> (hidden [B, T, hidden], hiddens, attns,
        router logits, list of per-layer KL).

        ``past_len``: cached tokens before this call as a host int, or None for a decode step on a prefilled
        :class:`KeyeVL2StaticCache` (its length stays on the device). The masks of all layers are built here once.
        """
        B, T = inputs_embeds.shape[:2]
        if isinstance(past_key_values, KeyeVL2StaticCache):
            if past_len is None:  # decode: fixed shapes, length on the device
                C = past_key_values.max_cache_len
                q_start = past_key_values.length_tensor().clone()  # the layers advance it in place
                allowed = build_dense_mask(T, C, q_start, past_key_values.key_mask, None, inputs_embeds.device,
                                           B)[:, 0]  # [B, T, C]: causal from the device-side start, padding
                ctx = AttentionContext(q_offset=q_start, T=T, S=C, batch=B, static_decode=True, allowed=allowed)
            else:
                past_key_values.set_key_mask(key_mask, past_len, past_len + T, B, inputs_embeds.device)
                km = None if key_mask is None else past_key_values.key_mask[:, : past_len + T]
                ctx = AttentionContext(q_offset=past_len, T=T, S=past_len + T, batch=B, key_mask=km,
                                       segment_ids=segment_ids, kv_end=past_len + T)
        else:
            ctx = AttentionContext(q_offset=past_len, T=T, S=past_len + T, batch=B, key_mask=key_mask,
                                   segment_ids=segment_ids)
        pe = self.rotary_emb(position_ids)
        ipe = self.indexer_rotary_emb(position_ids) if self.indexer_rotary_emb is not None else None
        h = inputs_embeds
        all_h, all_a, routers, kls = [], [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_h.append(h)
            h, probs, router_logits, kl = layer(h, pe, ipe, ctx, past_key_values, indexer_loss, output_attentions)
            if output_attentions:
                all_a.append(probs)
            if router_logits is not None:
                routers.append(router_logits)
            if kl is not None:
                kls.append(kl)
        h = self.norm(h)
        if output_hidden_states:
            all_h.append(h)
        return h, all_h, all_a, routers, kls


class KeyeVL2MoeModel(KeyeVL2PreTrainedModel):
    """The bare Keye-VL-2.0 model: ``visual`` (vision tower), ``mlp_AR`` (projector), ``model`` (decoder).

    Same module names as the official checkpoint, so it loads the checkpoint minus ``lm_head``.
    """

    def __init__(self, config: KeyeVL2Config):
        super().__init__(config)
        self.visual = KeyeVL2VisionModel(config.vision_config)
        self.mlp_AR = KeyeVL2Projector(config)
        self.model = KeyeVL2TextModel(config)
        self.rope_deltas = None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_decoder(self):
        return self.model

    # ------------------------------------------------------------------ vision
    def _vision_features(self, pixels: torch.Tensor, grid_thw: torch.Tensor, input_names) -> torch.Tensor:
        dtype = self.visual.vision_model.embeddings.patch_embedding.weight.dtype
        if pixels.is_floating_point() and not bool(torch.isfinite(pixels).all()):  # before a cast could hide it
            raise ValueError(f"{input_names[0]} has NaN or inf values (a damaged or unnormalised input?)")
        feats = self.visual(pixels.to(dtype), grid_thw, frames_per_chunk=getattr(self.config, "vision_frames_per_chunk", None),
                            input_names=input_names)
        return self.mlp_AR(feats, grid_thw)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """[N_patches, 588] + grid [n, 3] -> [N_patches / 4, hidden] LLM embeddings (raster 2 x 2 merge).

        Raises ValueError naming ``pixel_values`` / ``image_grid_thw`` for bad shapes, grids or NaN / inf pixels."""
        return self._vision_features(pixel_values, image_grid_thw, ("pixel_values", "image_grid_thw"))

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
        """Videos are a sequence of frames; each frame is encoded on its own (temporal patch 1). Errors name
        ``pixel_values_videos`` / ``video_grid_thw``."""
        return self._vision_features(pixel_values_videos, video_grid_thw, ("pixel_values_videos", "video_grid_thw"))

    def _merge_vision(self, input_ids, inputs_embeds, features, token_id, kind):
        mask = input_ids == token_id
        n_tok = int(mask.sum())
        if n_tok != features.shape[0]:
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: {n_tok} <|{kind}_pad|> tokens in input_ids, "
                f"{features.shape[0]} {kind} embeddings from the grids"
            )
        return inputs_embeds.masked_scatter(mask[..., None].expand_as(inputs_embeds), features.to(inputs_embeds.dtype))

    def embed_inputs(self, input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                     check_placeholders: bool = True):
        """Token embeddings with the vision features scattered into the placeholder positions.

        ``check_placeholders=False`` (a static-cache decode step without vision inputs) skips counting the
        placeholder tokens, a host read; the prompt was checked at prefill."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids)
        if not check_placeholders and pixel_values is None and pixel_values_videos is None:
            return inputs_embeds
        if input_ids is not None:
            n_img_tok = int((input_ids == self.config.image_token_id).sum())
            n_vid_tok = int((input_ids == self.config.video_token_id).sum())
            if pixel_values is not None:
                if image_grid_thw is None:
                    raise ValueError("pixel_values given without image_grid_thw")
                inputs_embeds = self._merge_vision(
                    input_ids, inputs_embeds, self.get_image_features(pixel_values, image_grid_thw),
                    self.config.image_token_id, "image",
                )
            elif n_img_tok:
                raise ValueError(f"input_ids has {n_img_tok} <|image_pad|> tokens but no pixel_values were given")
            if pixel_values_videos is not None:
                if video_grid_thw is None:
                    raise ValueError("pixel_values_videos given without video_grid_thw")
                inputs_embeds = self._merge_vision(
                    input_ids, inputs_embeds, self.get_video_features(pixel_values_videos, video_grid_thw),
                    self.config.video_token_id, "video",
                )
            elif n_vid_tok:
                raise ValueError(f"input_ids has {n_vid_tok} <|video_pad|> tokens but no pixel_values_videos were given")
        return inputs_embeds

    def compute_position_ids(self, input_ids, inputs_embeds, attention_mask, image_grid_thw, video_grid_thw,
                             past_len, segment_ids=None, cache=None):
        """[3, B, T] positions: full M-RoPE index at prefill, ``past_len + t + rope_delta`` when decoding.

        ``past_len=None``: a decode step on a prefilled :class:`KeyeVL2StaticCache`; the positions are computed on
        the device from its length tensor (as transformers' decode positions ``cache_position + rope_delta``)."""
        B, T = inputs_embeds.shape[:2]
        dev = inputs_embeds.device
        if past_len is None:  # static-cache decode: the start is the cache's device-side length
            start, deltas = cache.length_tensor(), self.rope_deltas
        else:
            if past_len == 0 and input_ids is not None:
                pos, deltas = get_rope_index(
                    input_ids, image_grid_thw, video_grid_thw, attention_mask,
                    self.config.image_token_id, self.config.video_token_id,
                    self.config.vision_config.spatial_merge_size, segment_ids,
                )
                self.rope_deltas = deltas
                return pos, deltas
            deltas = self.rope_deltas if (self.rope_deltas is not None and past_len > 0) else None
            if deltas is None and attention_mask is not None and past_len == 0:  # text-only embeds, left padding
                p = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
                return p[None].expand(3, B, T).to(dev), None
            start = past_len
        if deltas is None:
            deltas = torch.zeros(B, 1, dtype=torch.long, device=dev)
        if deltas.shape[0] != B:  # beam search / num_return_sequences expanded the batch
            deltas = deltas.repeat_interleave(B // deltas.shape[0], dim=0)
        p = (start + torch.arange(T, device=dev))[None] + deltas.to(dev)
        return p[None].expand(3, B, T), deltas

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        indexer_loss: str | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> KeyeVL2ModelOutput:
        """Run the vision tower, merge features into the placeholders, and run the decoder.

        Args:
            input_ids: [B, L] int64; attention_mask: [B, L_total] (1 = token, 0 = padding; covers the cache too).
            pixel_values / pixel_values_videos: [N, 3*14*14] float patches (processor output, raster order);
            image_grid_thw / video_grid_thw: [n, 3] int64.
            position_ids: [3, B, L] M-RoPE positions (computed when None).
            past_key_values (alias ``cache``, the 5.2x name): a transformers Cache; a :class:`KeyeVL2Cache` is
                created when ``use_cache`` and none is given. With a :class:`KeyeVL2StaticCache` the first call is
                the prefill (checked, its ``attention_mask`` stored in the cache) and later calls are fixed-shape
                decode steps that read no device value on the host (``attention_mask`` is not read: the prompt's
                padding pattern applies; positions come from the cache's device-side length).
            segment_ids: [B, L] int64 for packed sequences (attention and positions restart per segment).
            indexer_loss: None, "dense" or "sparse": also return the DSA indexer KL (docs/keye_vl2.md section 3).
        Raises:
            ValueError: vision features that do not match the placeholders, wrong patch counts, prompt longer
                than ``max_position_embeddings``.
        """
        past_key_values = past_key_values if past_key_values is not None else cache
        if isinstance(past_key_values, StaticCache):
            raise ValueError(
                "transformers' StaticCache returns unmasked full buffers this model cannot read; pass a "
                "KeyeVL2StaticCache, or generate(..., cache_implementation='static') to have one built"
            )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = KeyeVL2Cache()
        static = isinstance(past_key_values, KeyeVL2StaticCache)
        static_decode = static and past_key_values.prefilled
        if not use_cache and not static and past_key_values is not None and past_key_values.get_seq_length() == 0:
            past_key_values = None
        inputs_embeds = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
            check_placeholders=not static_decode,
        )
        B, T = inputs_embeds.shape[:2]
        if static_decode:
            # Fixed shapes and no host read: the length stays on the device, the padding pattern is the prompt's
            # (kept in the cache), and the capacity was checked once by generate (check_capacity False there).
            past_len = None
            if past_key_values.check_capacity and not torch.compiler.is_compiling():
                filled = int(past_key_values.length_tensor())
                if filled + T > past_key_values.max_cache_len:
                    raise ValueError(
                        f"KeyeVL2StaticCache is full: {filled} cached + {T} new tokens > max_cache_len="
                        f"{past_key_values.max_cache_len}; build a larger cache (prompt + max_new_tokens)"
                    )
        else:
            # a static cache is filled only by its prefill (later forwards take the decode branch above)
            past_len = (0 if static else past_key_values.get_seq_length()) if past_key_values is not None else 0
            if static and past_len + T > past_key_values.max_cache_len:
                raise ValueError(
                    f"{past_len + T} tokens do not fit the KeyeVL2StaticCache (max_cache_len="
                    f"{past_key_values.max_cache_len}); build it for prompt + max_new_tokens"
                )
            if past_len + T > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence of {past_len + T} tokens exceeds max_position_embeddings={self.config.max_position_embeddings}"
                )
        if position_ids is None or position_ids.dim() == 2:
            if position_ids is not None and position_ids.dim() == 2:
                position_ids = position_ids[None].expand(3, *position_ids.shape)
                deltas = None
            else:
                position_ids, deltas = self.compute_position_ids(
                    input_ids, inputs_embeds, attention_mask, image_grid_thw, video_grid_thw, past_len, segment_ids,
                    past_key_values,
                )
        else:
            deltas = None
        key_mask = None
        if attention_mask is not None and not static_decode and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
            if key_mask.shape[1] != past_len + T:
                raise ValueError(
                    f"attention_mask covers {key_mask.shape[1]} tokens, expected cached + new = {past_len + T}"
                )
        if segment_ids is not None and (static or past_len):
            raise ValueError("segment_ids (packed sequences) are only supported without a cache")

        output_router_logits = (
            output_router_logits if output_router_logits is not None else (self.config.output_router_logits or self.training)
        )
        chunk = check_prefill_chunk_size(self.config.prefill_chunk_size)
        chunks = [(0, T)]
        if (chunk and T > chunk and past_key_values is not None and segment_ids is None and not indexer_loss
                and not static_decode):
            chunks = [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
        if len(chunks) > 1 and isinstance(past_key_values, KeyeVL2Cache):
            past_key_values.reserve(past_len + T)  # one allocation for the whole chunked prefill
        hs, all_h, all_a, routers, kls = [], [], [], [], []
        for s, e in chunks:
            km = key_mask[:, : past_len + e] if key_mask is not None else None
            h, hh, aa, rr, kk = self.model(
                inputs_embeds[:, s:e], position_ids[:, :, s:e], km, segment_ids, past_key_values,
                indexer_loss, bool(output_attentions), bool(output_hidden_states),
                None if static_decode else past_len + s,
            )
            hs.append(h), all_h.append(hh), all_a.append(aa), routers.extend(rr), kls.extend(kk)
        if static and not static_decode:
            past_key_values.prefilled = True
        hidden_states = attentions = None
        if output_hidden_states:  # per layer, the whole sequence (chunks joined along the tokens)
            hidden_states = tuple(torch.cat([c[i] for c in all_h], dim=1) if len(all_h) > 1 else all_h[0][i]
                                  for i in range(len(all_h[0])))
        if output_attentions:  # per layer [B, H, T, S]; a chunk's probabilities over keys it cannot see are 0
            S_all = (past_len if past_len is not None else 0) + T
            attentions = tuple(
                torch.cat([F.pad(c[i], (0, S_all - c[i].shape[-1])) for c in all_a], dim=2) if len(all_a) > 1
                else all_a[0][i] for i in range(len(all_a[0]))
            )
        hidden = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
        return _with_cache(KeyeVL2ModelOutput(
            last_hidden_state=hidden,
            hidden_states=hidden_states,
            attentions=attentions,
            router_logits=tuple(routers) if output_router_logits and routers else None,
            indexer_loss=torch.stack(kls).mean() if kls else None,
            rope_deltas=deltas if deltas is not None else self.rope_deltas,
        ), past_key_values if use_cache else None)


class KeyeVL2BaseModelView:
    """``base_model`` of :class:`KeyeVL2MoeForConditionalGeneration`: the same model run without its LM head.

    transformers models expose their backbone as ``model.base_model`` (the ``base_model_prefix`` attribute), and
    libraries call it directly: TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) runs
    ``model.base_model(**inputs).last_hidden_state`` and projects only the labelled positions. The official
    checkpoint keeps the backbone's modules at the top level (``model.*``, ``visual.*``, ``mlp_AR.*`` beside
    ``lm_head``), so there is no backbone attribute to point at without renaming every key. This view holds no
    parameters (the state dict is unchanged); calling it goes through the model's own ``__call__`` (so module
    hooks such as accelerate's or FSDP's run) and returns :class:`KeyeVL2ModelOutput` with
    ``last_hidden_state`` [B, L, hidden] in the decoder's dtype. Arguments: those of :meth:`KeyeVL2MoeModel.forward`.
    """

    def __init__(self, model: "KeyeVL2MoeForConditionalGeneration"):
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> KeyeVL2ModelOutput:
        return self._model(*args, return_base_model_output=True, **kwargs)

    forward = __call__

    @property
    def config(self) -> KeyeVL2Config:
        return self._model.config

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    @property
    def _tp_plan(self):
        return self._model._tp_plan

    @property
    def _pp_plan(self):
        return self._model._pp_plan

    def get_input_embeddings(self) -> nn.Embedding:
        return self._model.get_input_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        return self._model.get_image_features(pixel_values, image_grid_thw)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> torch.Tensor:
        return self._model.get_video_features(pixel_values_videos, video_grid_thw)


class KeyeVL2MoeForConditionalGeneration(KeyeVL2MoeModel, GenerationMixin):
    """Keye-VL-2.0 with the LM head: chat about images and videos, train with LM + MoE aux + DSA indexer losses.

    Example:
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype="bfloat16")
        >>> processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    """

    _tied_weights_keys: dict = {}  # set per instance once lm_head exists (the parent's post_init runs first)

    def __init__(self, config: KeyeVL2Config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # tied only where config.tie_word_embeddings is True (transformers 5.x reads the flag; the official model
        # is untied, so its checkpoint keeps both matrices)
        self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()
        self.generation_config = keye_generation_config()  # the family's sampling defaults (see that function)

    @property
    def base_model(self) -> KeyeVL2BaseModelView:
        """The model without its LM head (:class:`KeyeVL2BaseModelView`); its output has ``last_hidden_state``."""
        return KeyeVL2BaseModelView(self)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        indexer_loss: str | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> KeyeVL2CausalLMOutput:
        """Forward with the LM head. Arguments as :meth:`KeyeVL2MoeModel.forward`, plus:

        Args:
            labels: [B, L] int64 next-token targets (shifted inside; -100 = ignored).
            logits_to_keep: int N keeps the last N positions' logits (0 = all), or a 1-D index tensor: a 256K
                prefill with ``logits_to_keep=1`` never builds [256K, vocab] logits.
        Returns:
            :class:`KeyeVL2CausalLMOutput`; ``loss = LM + router_aux_loss_coef * aux + indexer_loss_coef * KL``.
        """
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw, segment_ids=segment_ids, indexer_loss=indexer_loss,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits, cache=cache,
        )
        if kwargs.get("return_base_model_output"):  # called through `base_model`: no LM head, no loss
            return out
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = lm_loss = aux = None
        if out.router_logits is not None and isinstance(self.model.layers[0].mlp, KeyeVL2SparseMoeBlock):
            n_new = out.last_hidden_state.shape[1]  # router logits cover this call's tokens, whatever logits_to_keep is
            am = attention_mask[:, -n_new:] if attention_mask is not None else None
            aux = load_balancing_loss(out.router_logits, self.config.num_experts, self.config.num_experts_per_tok, am)
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position: use logits_to_keep=0 when training")
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            lm_loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            loss = lm_loss
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux.to(loss.device)
            if out.indexer_loss is not None:
                loss = loss + self.config.indexer_loss_coef * out.indexer_loss.to(loss.device)
        elif out.indexer_loss is not None:
            loss = self.config.indexer_loss_coef * out.indexer_loss
        return _with_cache(KeyeVL2CausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states,
            attentions=out.attentions, router_logits=out.router_logits, aux_loss=aux, lm_loss=lm_loss,
            indexer_loss=out.indexer_loss, rope_deltas=out.rope_deltas,
        ), output_cache(out))

    # ------------------------------------------------------------------ generation
    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        """``generate(..., cache_implementation="static")``: a :class:`KeyeVL2StaticCache` (K/V + indexer keys,
        preallocated) instead of transformers' ``StaticCache``. Sized like transformers' (the largest
        ``max_cache_len`` seen by this model, so later calls can reuse compiled graphs)."""
        if cache_implementation != "static":
            raise ValueError(
                f"cache_implementation={cache_implementation!r} is not supported by KeyeVL2; use 'static' (preallocated, "
                "CUDA graphs on GPU) or leave it unset (the growing default cache)"
            )
        chunk = kwargs.get("prefill_chunk_size", args[0] if args else None)
        if chunk is not None:
            raise ValueError(
                "generation_config.prefill_chunk_size is not supported with this model's static cache (the M-RoPE "
                "positions of a multimodal prompt are computed over the whole prompt); set "
                "model.config.prefill_chunk_size instead (the model chunks its own prefill)"
            )
        effective = max(int(max_cache_len), getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = effective
        cache = KeyeVL2StaticCache(self.config, max_cache_len=effective)
        cache.check_capacity = False  # generate sized it for prompt + max_new_tokens
        return cache

    def create_masks_for_generate(self, *args, **kwargs):
        """Keep the 2-D ``attention_mask`` when ``generate`` runs a compileable cache (transformers would build a 4-D
        mask per step): the model builds its masks once per forward, and a static-cache decode step reads the
        prompt's padding pattern from the cache instead."""
        return kwargs.get("attention_mask")

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Use :class:`KeyeVL2Cache` (K/V + indexer keys) where ``generate`` would build a plain DynamicCache; check
        the length limits (and a user-given :class:`KeyeVL2StaticCache`'s room) once, before the first step."""
        # (generation_mode, batch_size, max_cache_length) follow in 5.17 through 5.2x: size the cache once for
        # prompt + max_new_tokens instead of growing it
        max_len = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
        if isinstance(max_len, int) and max_len > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens - 1 = {max_len} positions (the last new token is never fed back) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}; shorten the prompt or lower "
                "max_new_tokens"
            )
        for key in ("cache", "past_key_values"):
            user = model_kwargs.get(key)
            if isinstance(user, StaticCache):
                raise ValueError(
                    "transformers' StaticCache cannot hold this model's cache (DSA indexer keys, masked reads); use "
                    "generate(..., cache_implementation='static') or pass a KeyeVL2StaticCache"
                )
            if isinstance(user, KeyeVL2StaticCache):
                if user.prefilled:
                    raise ValueError("the KeyeVL2StaticCache passed to generate already holds tokens; call cache.reset()")
                if isinstance(max_len, int) and max_len > user.max_cache_len:
                    raise ValueError(
                        f"prompt + max_new_tokens - 1 = {max_len} tokens do not fit the KeyeVL2StaticCache passed to "
                        f"generate (max_cache_len={user.max_cache_len}); build it with max_cache_len >= {max_len} or "
                        "lower max_new_tokens"
                    )
                user.check_capacity = False
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key in ("cache", "past_key_values"):
            if type(model_kwargs.get(key)) is DynamicCache and model_kwargs[key].get_seq_length() == 0:
                model_kwargs[key] = KeyeVL2Cache(capacity=int(max_len) if isinstance(max_len, int) and max_len > 0 else None)
        return result

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Repeat each sample ``expand_size`` times (beam search, ``num_return_sequences``). Patches and grids are
        flattened over the batch, so they are regrouped per sample first (by the placeholder tokens each row holds)
        and each sample's group is repeated, instead of repeating single patches."""
        vision = {}
        if expand_size > 1 and input_ids is not None:
            merge = self.config.vision_config.spatial_merge_size**2
            for pix_key, grid_key, token_id in (
                ("pixel_values", "image_grid_thw", self.config.image_token_id),
                ("pixel_values_videos", "video_grid_thw", self.config.video_token_id),
            ):
                pix, grid = model_kwargs.pop(pix_key, None), model_kwargs.pop(grid_key, None)
                if pix is not None and grid is not None:
                    pix, grid = _repeat_vision_per_sample(input_ids, pix, grid, token_id, merge, expand_size)
                vision[pix_key], vision[grid_key] = pix, grid
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update({k: v for k, v in vision.items() if v is not None})
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        """Vision inputs only at the first step; M-RoPE positions are computed by ``forward`` (prefill: full
        index; decode: cache length + rope delta)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = model_inputs.get("cache", model_inputs.get("past_key_values"))
        if isinstance(cache, KeyeVL2StaticCache):
            first_step = not cache.prefilled  # no host read of the device-side length
        else:
            first_step = cache is None or cache.get_seq_length() == 0
        if not first_step:
            for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
                model_inputs[key] = None
        model_inputs["position_ids"] = None
        model_inputs.pop("cache_position", None)
        if isinstance(cache, KeyeVL2StaticCache) and not first_step:
            # a static-cache decode step reads the prompt's padding from the cache; the growing 2-D mask would only
            # change the compiled step's input shapes every token
            model_inputs.pop("attention_mask", None)
        return model_inputs


def _repeat_vision_per_sample(input_ids, pixels, grid, token_id, merge, repeats):
    """Regroup flattened patches [N, C*P*P] and grids [n, 3] by batch row (each row owns the images / videos whose
    placeholder tokens it holds, in order) and repeat each row's group ``repeats`` times, row by row."""
    tokens = (grid.prod(-1) // merge).tolist()  # placeholder tokens of each image / video
    patches = grid.prod(-1).tolist()
    per_row = (input_ids == token_id).sum(-1).tolist()
    pix_parts, grid_parts, item, start = [], [], 0, 0
    for row, need in enumerate(per_row):
        first, got, p0 = item, 0, start
        while got < need and item < len(tokens):
            got += tokens[item]
            start += patches[item]
            item += 1
        if got != need:
            raise ValueError(f"row {row} holds {need} vision placeholder tokens, which do not match its grids")
        for _ in range(repeats):
            pix_parts.append(pixels[p0:start])
            grid_parts.append(grid[first:item])
    return torch.cat(pix_parts), torch.cat(grid_parts)


def freeze_for_indexer_warmup(model: nn.Module) -> list[str]:
    """DSA dense warm-up (docs/keye_vl2.md section 3): freeze every parameter except the ``sa_indexer`` ones.

    Returns the names of the parameters left trainable. Raises ValueError if the model has no indexer.
    """
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(".sa_indexer." in name)
        if p.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError("no sa_indexer parameters found: the config has no sa_config")
    return trainable


__all__ = [
    "KeyeVL2BaseModelView",
    "KeyeVL2Cache",
    "KeyeVL2MoeForConditionalGeneration",
    "KeyeVL2MoeModel",
    "KeyeVL2PreTrainedModel",
    "freeze_for_indexer_warmup",
    "get_rope_index",
    "load_balancing_loss",
]
