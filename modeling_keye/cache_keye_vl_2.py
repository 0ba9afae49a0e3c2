"""Caches of Keye-VL-2.0: K/V per decoder layer plus the DSA indexer keys ([B, S, D_I] per layer).

- :class:`KeyeVL2Cache` (the default of ``generate``): a transformers ``DynamicCache`` whose layers grow by
  capacity instead of ``torch.cat`` every step.
- :class:`KeyeVL2StaticCache` (``generate(..., cache_implementation="static")``): every buffer preallocated for
  ``max_cache_len`` tokens at a fixed address, the filled length a device tensor, so a decode step has fixed shapes
  and no host synchronisation and ``torch.compile`` / CUDA graphs can capture it. It plays the role of
  transformers' ``StaticCache`` with ``StaticIndexedLayer`` layers (``cache_utils.py``, transformers 5.17+), with
  the token-major layout the DSA kernels read and the prompt's padding mask kept beside the buffers.

Flat remote-code file (copied beside ``modeling_keye_vl_2.py`` by ``save_pretrained``): imports torch and the
public transformers cache API only.
"""

from __future__ import annotations

import torch
from transformers import cache_utils as _cache_utils
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
from transformers.utils import logging

logger = logging.get_logger(__name__)
# transformers' own DSA cache layer (5.1x+); converted into ours when a cache holding it is wrapped
DynamicIndexedLayer = getattr(_cache_utils, "DynamicIndexedLayer", DynamicLayer)


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


# ======================================================================================================
# Dynamic cache (grows by capacity)
# ======================================================================================================
class KeyeVL2CacheLayer(DynamicLayer):
    """One decoder layer's cache: K/V and DSA indexer keys in buffers that grow by capacity, not by ``torch.cat``.

    Storage is token-major, the layout the DSA kernels read (``docs/dsa_kernels.md``: the 4 KV heads of one
    token contiguous): ``_k``/``_v`` [B, capacity, H_kv, D] and ``_ik`` [B, capacity, D_I], all in the dtype of
    the first update. ``keys`` / ``values`` are views [B, H_kv, S, D] (``_k[:, :S].transpose(1, 2)``) and
    ``indexer_keys`` a view [B, S, D_I], so the transformers Cache API sees a ``DynamicLayer``.

    Growth: when an update does not fit, the capacity becomes ``max(needed, growth * capacity)`` rounded up to
    ``block`` tokens, and only the filled part is copied once. A step therefore writes only its new tokens
    (``DynamicLayer``'s ``torch.cat`` copies the whole layer every step: O(S^2) bytes over a generation),
    and the spare room is at most ``growth - 1`` of the length (25% by default); ``reserve(n)`` sizes it
    exactly in advance. ``crop`` only moves the length; batch operations keep the capacity.

    Under autograd (an update whose inputs require grad) it falls back to out-of-place concatenation, so no
    tensor saved for backward is ever written in place.
    """

    _layer_type = None  # never replace transformers' global layer-type mapping

    def __init__(self, capacity: int | None = None, growth: float = 1.25, block: int = 256, **kwargs):
        super().__init__(**kwargs)
        if growth <= 1.0:
            raise ValueError(f"KeyeVL2CacheLayer growth must be > 1, got {growth}")
        self.capacity_hint = int(capacity) if capacity else 0
        self.growth = float(growth)
        self.block = max(1, int(block))
        self._k = self._v = self._ik = None  # [B, cap, H, D], [B, cap, H, D], [B, cap, D_I]
        self._len = 0  # tokens in _k / _v
        self._ilen = 0  # tokens in _ik
        self.indexer_keys: torch.Tensor | None = None

    # ---------------------------------------------------------------- helpers
    def _round(self, n: int) -> int:
        return -(-int(n) // self.block) * self.block

    def _grown(self, buf: torch.Tensor | None, filled: int, needed: int, shape_tail, dtype, device,
               min_capacity: int = 0) -> torch.Tensor:
        """A buffer [B, cap, *tail] with cap >= needed holding ``buf[:, :filled]`` (``buf`` itself if it fits)."""
        cap = 0 if buf is None else buf.shape[1]
        if buf is not None and needed <= cap:
            return buf
        new_cap = self._round(max(needed, int(cap * self.growth), self.capacity_hint, min_capacity))
        B = shape_tail[0]
        new = torch.empty((B, new_cap, *shape_tail[1:]), dtype=dtype, device=device)
        if filled:
            new[:, :filled].copy_(buf[:, :filled])
        return new

    def _refresh(self) -> None:
        if self._k is not None:
            self.keys = self._k[:, : self._len].transpose(1, 2)
            self.values = self._v[:, : self._len].transpose(1, 2)
        if self._ik is not None:
            self.indexer_keys = self._ik[:, : self._ilen]

    def _compatible(self, buf: torch.Tensor | None, x: torch.Tensor, tail) -> bool:
        return buf is not None and buf.device == x.device and tuple(buf.shape[2:]) == tuple(tail) and buf.shape[0] == x.shape[0]

    # ---------------------------------------------------------------- CacheLayerMixin API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype/device; allocate ``capacity_hint`` tokens when one was given (else on first update)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        if self.capacity_hint and not self._compatible(self._k, key_states, (H, D)):
            self._k = torch.empty(B, self._round(self.capacity_hint), H, D, dtype=key_states.dtype, device=self.device)
            self._v = torch.empty(B, self._round(self.capacity_hint), H, value_states.shape[-1],
                                  dtype=value_states.dtype, device=self.device)
        elif self._k is None:
            self._k = key_states.new_empty(B, 0, H, D)
            self._v = value_states.new_empty(B, 0, H, value_states.shape[-1])
        self._len = 0
        self.is_initialized = True
        self._refresh()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append key/value states [B, H_kv, T, D]; return all keys and values [B, H_kv, S, D] (views)."""
        B, H, T, D = key_states.shape
        if not self.is_initialized or not self._compatible(self._k, key_states, (H, D)):
            if self.is_initialized and self._len:
                raise ValueError(
                    f"KeyeVL2CacheLayer holds {self._len} tokens of shape {tuple(self._k.shape[:1]) + tuple(self._k.shape[2:])} "
                    f"(batch, heads, dim); cannot append states of shape {tuple(key_states.shape)} (reset() the cache first)"
                )
            self._k = self._v = None
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            keys = key_states if self._len == 0 else torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
            values = value_states if self._len == 0 else torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
            self._k, self._v = keys.transpose(1, 2), values.transpose(1, 2)
            self._len = keys.shape[-2]
            self._refresh()
            return self.keys, self.values
        L = self._len
        self._k = self._grown(self._k, L, L + T, (B, H, D), self._k.dtype, key_states.device)
        self._v = self._grown(self._v, L, L + T, (B, H, value_states.shape[-1]), self._v.dtype, value_states.device)
        self._k[:, L : L + T].copy_(key_states.transpose(1, 2))
        self._v[:, L : L + T].copy_(value_states.transpose(1, 2))
        self._len = L + T
        self._refresh()
        return self.keys, self.values

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        """Append indexer keys [B, T, D_I]; return all of them [B, S, D_I] (a view)."""
        B, T, Di = indexer_key_states.shape
        if not self._compatible(self._ik, indexer_key_states, (Di,)):
            if self._ik is not None and self._ilen:
                raise ValueError(
                    f"KeyeVL2CacheLayer holds {self._ilen} indexer keys of shape {tuple(self._ik.shape)}; cannot append "
                    f"{tuple(indexer_key_states.shape)} (reset() the cache first)"
                )
            self._ik, self._ilen = indexer_key_states.new_empty(B, 0, Di), 0
        if torch.is_grad_enabled() and indexer_key_states.requires_grad:
            ik = indexer_key_states if self._ilen == 0 else torch.cat(
                [self.indexer_keys.to(indexer_key_states.dtype), indexer_key_states], dim=1)
            self._ik, self._ilen = ik, ik.shape[1]
        else:
            L = self._ilen
            kv_cap = self._k.shape[1] if self._k is not None else 0  # grow in step with K/V
            self._ik = self._grown(self._ik, L, L + T, (B, Di), self._ik.dtype, indexer_key_states.device, kv_cap)
            self._ik[:, L : L + T].copy_(indexer_key_states)
            self._ilen = L + T
        self._refresh()
        return self.indexer_keys

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def reserve(self, total_tokens: int) -> None:
        """Make room for ``total_tokens`` tokens now (one copy of what is filled), and for layers not yet
        allocated, allocate that many on the first update."""
        self.capacity_hint = max(self.capacity_hint, int(total_tokens))
        if self._k is not None and self._k.shape[1] < total_tokens and not self._k.requires_grad:
            self._k = self._grown(self._k, self._len, total_tokens, (self._k.shape[0], *self._k.shape[2:]), self._k.dtype, self._k.device)
            self._v = self._grown(self._v, self._len, total_tokens, (self._v.shape[0], *self._v.shape[2:]), self._v.dtype, self._v.device)
        if self._ik is not None and self._ik.shape[1] < total_tokens and not self._ik.requires_grad:
            self._ik = self._grown(self._ik, self._ilen, total_tokens, (self._ik.shape[0], self._ik.shape[2]), self._ik.dtype, self._ik.device)
        self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        """Negative n: drop the last -n tokens (transformers >= 5.18 convention); positive n: keep the first n
        (the older absolute-length convention, still sent by 5.17's deprecated path); 0: nothing."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = max(0, self._len + tokens_to_remove) if tokens_to_remove < 0 else min(self._len, tokens_to_remove)
        self._len = keep
        self._ilen = min(self._ilen, keep)
        self._refresh()

    def _apply_batch(self, fn) -> None:
        for name in ("_k", "_v", "_ik"):
            buf = getattr(self, name)
            if buf is not None:
                setattr(self, name, fn(buf))
        self._refresh()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self) -> None:
        """Empty the layer but keep its buffers (the next prompt reuses the memory; a different batch size or
        head shape reallocates)."""
        self._len = self._ilen = 0
        self._refresh()

    def offload(self):
        if self.is_initialized:
            self._apply_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self._k is not None and self._k.device != self.device:
            self._apply_batch(lambda t: t.to(self.device, non_blocking=True))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated (capacity) and used (filled) by this layer's K/V and indexer-key buffers."""
        kv_tok = sum(b[0, 0].numel() * b.element_size() * b.shape[0] for b in (self._k, self._v) if b is not None and b.shape[1])
        ik_tok = self._ik[0, 0].numel() * self._ik.element_size() * self._ik.shape[0] if self._ik is not None and self._ik.shape[1] else 0
        return {
            "kv_allocated": kv_tok * (self._k.shape[1] if self._k is not None else 0),
            "kv_used": kv_tok * self._len,
            "indexer_allocated": ik_tok * (self._ik.shape[1] if self._ik is not None else 0),
            "indexer_used": ik_tok * self._ilen,
        }


class KeyeVL2Cache(DynamicCache):
    """``DynamicCache`` whose layers are :class:`KeyeVL2CacheLayer`: K/V plus DSA indexer keys ([B, S, D_I],
    docs/keye_vl2.md section 3 item 5), grown by capacity instead of copied every step.

    Args (besides ``DynamicCache``'s):
        capacity: tokens to allocate per layer on the first update (e.g. prompt + max_new_tokens); None grows.
        growth: capacity factor when an update does not fit (> 1; 1.25 wastes at most 25%).
        block: capacities are rounded up to a multiple of this many tokens.

    Works with the cache API of transformers 5.17 through 5.x (``update``, ``update_indexer``,
    ``get_seq_length``, ``crop`` in both conventions, ``reorder_cache``, ``reset``, ``batch_*``). ``indexer_keys``
    maps layer index -> [B, S, D_I] view.
    """

    def __init__(self, *args, capacity: int | None = None, growth: float = 1.25, block: int = 256, **kwargs):
        super().__init__(*args, **kwargs)
        self.capacity = capacity
        self.growth = growth
        self.block = block
        if self.layer_class_to_replicate is not None:
            self.layer_class_to_replicate = self._new_layer
        self.layers = [self._convert(layer) for layer in self.layers]

    def _new_layer(self) -> KeyeVL2CacheLayer:
        return KeyeVL2CacheLayer(capacity=self.capacity, growth=self.growth, block=self.block)

    def _convert(self, layer):
        if isinstance(layer, KeyeVL2CacheLayer) or type(layer) not in (DynamicLayer, DynamicIndexedLayer):
            return layer
        new = self._new_layer()
        if layer.is_initialized and layer.get_seq_length() > 0:
            with torch.no_grad():
                new.update(layer.keys, layer.values)
                if getattr(layer, "indexer_keys", None) is not None and layer.indexer_keys.numel():
                    new.update_indexer(layer.indexer_keys)
        return new

    def _layer(self, layer_idx: int) -> KeyeVL2CacheLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer())
        return self.layers[layer_idx]

    def update_indexer(self, indexer_keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Append ``indexer_keys`` [B, T, D_I] for ``layer_idx``; return all cached keys [B, S, D_I]."""
        return self._layer(layer_idx).update_indexer(indexer_keys)

    @property
    def indexer_keys(self) -> dict[int, torch.Tensor]:
        """Layer index -> cached indexer keys [B, S, D_I] (views)."""
        return {i: l.indexer_keys for i, l in enumerate(self.layers) if getattr(l, "indexer_keys", None) is not None}

    def reserve(self, total_tokens: int) -> None:
        """Size every layer (present and future) for ``total_tokens`` tokens, e.g. prompt + max_new_tokens."""
        self.capacity = max(self.capacity or 0, int(total_tokens))
        for layer in self.layers:
            if isinstance(layer, KeyeVL2CacheLayer):
                layer.reserve(total_tokens)

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop the last -n tokens; positive: keep the first n (older convention); 0: nothing."""
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def memory_bytes(self) -> dict[str, int]:
        """Summed :meth:`KeyeVL2CacheLayer.memory_bytes` over the layers."""
        total = {"kv_allocated": 0, "kv_used": 0, "indexer_allocated": 0, "indexer_used": 0}
        for layer in self.layers:
            if isinstance(layer, KeyeVL2CacheLayer):
                for key, val in layer.memory_bytes().items():
                    total[key] += val
        return total



# ======================================================================================================
# Static cache (fixed capacity, fixed addresses, device-side length)
# ======================================================================================================
class KeyeVL2StaticCacheLayer(StaticLayer):
    """One decoder layer of :class:`KeyeVL2StaticCache`: K/V and indexer keys preallocated for ``max_cache_len``.

    Storage is token-major (``_k`` / ``_v`` [B, C, H_kv, D], ``_ik`` [B, C, D_I] fp32, C = ``max_cache_len``), the layout
    the DSA kernels read, allocated with zeros on the first update (so unfilled rows are finite) and marked as static
    addresses for ``torch.compile`` (as transformers' ``StaticLayer``). ``update`` writes the new tokens at
    ``cumulative_length`` (a 0-d int64 device tensor, advanced in place) with ``index_copy_`` and returns views of the
    WHOLE buffers, ``[B, H_kv, C, D]``: callers mask keys at or past the filled length (the model builds that mask
    once per forward). Nothing here reads a device value on the host.
    """

    is_compileable = True
    _layer_type = None  # never replace transformers' global layer-type mapping

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=int(max_cache_len))
        self._k = self._v = self._ik = None
        self.indexer_keys: torch.Tensor | None = None
        self.indexer_cumulative_length: torch.Tensor | None = None

    def _mark(self, *tensors: torch.Tensor) -> None:
        if not _is_compiling():
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate [B, C, H_kv, D] zeros for K and V in the dtype/device of the first states."""
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.batch_size, self.num_heads, self.k_head_dim, self.v_head_dim = B, H, D, value_states.shape[-1]
        C = self.max_cache_len
        self._k = torch.zeros(B, C, H, D, dtype=key_states.dtype, device=self.device)
        self._v = torch.zeros(B, C, H, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        self.keys, self.values = self._k.transpose(1, 2), self._v.transpose(1, 2)
        self.cumulative_length = torch.zeros((), dtype=torch.long, device=self.device)
        self._mark(self._k, self._v, self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write key/value states [B, H_kv, T, D] at the filled length; return the whole buffers [B, H_kv, C, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self._k.shape[0]:  # a shape, known on the host: no sync
            raise ValueError(f"this KeyeVL2StaticCache holds buffers for batch size {self._k.shape[0]}, got "
                             f"{key_states.shape[0]} rows; build a new cache for another batch size")
        T = key_states.shape[-2]
        pos = torch.arange(T, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(T)
        self._k.index_copy_(1, pos, key_states.transpose(1, 2).to(self._k.dtype))
        self._v.index_copy_(1, pos, value_states.transpose(1, 2).to(self._v.dtype))
        return self._k.transpose(1, 2), self._v.transpose(1, 2)

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        """Write indexer keys [B, T, D_I] at the filled length; return the whole buffer [B, C, D_I].

        The buffer is fp32 (fp64 for fp64 keys): the decode top-k scores in fp32 (as ``keye_dsa_reference``), and
        upcasting bf16 keys once when written is exact and saves converting the whole buffer every step."""
        if self._ik is None:
            B, _, Di = indexer_key_states.shape
            dtype = torch.float64 if indexer_key_states.dtype == torch.float64 else torch.float32
            self._ik = torch.zeros(B, self.max_cache_len, Di, dtype=dtype, device=indexer_key_states.device)
            self.indexer_keys = self._ik
            self.indexer_cumulative_length = torch.zeros((), dtype=torch.long, device=indexer_key_states.device)
            self._mark(self._ik, self.indexer_cumulative_length)
        T = indexer_key_states.shape[1]
        pos = torch.arange(T, device=self._ik.device) + self.indexer_cumulative_length
        self.indexer_cumulative_length.add_(T)
        self._ik.index_copy_(1, pos, indexer_key_states.to(self._ik.dtype))
        return self._ik

    def get_seq_length(self):
        """Filled length: a 0-d int64 device tensor once allocated (as transformers' ``StaticLayer``), else 0."""
        return self.cumulative_length if self.is_initialized else 0

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def _set_length(self, n) -> None:
        for t in (self.cumulative_length if self.is_initialized else None, self.indexer_cumulative_length):
            if t is not None:
                t.fill_(n) if not isinstance(n, torch.Tensor) else t.copy_(n)

    def crop(self, tokens_to_remove: int) -> None:
        """Negative n: drop the last -n tokens; positive n: keep the first n (5.17's absolute convention)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        if tokens_to_remove < 0:
            self.cumulative_length.sub_(-tokens_to_remove)
            if self.indexer_cumulative_length is not None:
                self.indexer_cumulative_length.sub_(-tokens_to_remove)
        else:
            self._set_length(torch.minimum(self.cumulative_length, torch.tensor(tokens_to_remove, device=self.device)))

    def reset(self) -> None:
        """Length 0; buffers kept (their old rows are masked by length until overwritten)."""
        if self.is_initialized:
            self.cumulative_length.zero_()
        if self.indexer_cumulative_length is not None:
            self.indexer_cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch in place (the buffers keep their addresses)."""
        for buf in (self._k, self._v, self._ik):
            if buf is not None:
                buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    def _apply_batch(self, fn) -> None:
        if self._k is not None:
            self._k, self._v = fn(self._k), fn(self._v)
            self.keys, self.values = self._k.transpose(1, 2), self._v.transpose(1, 2)
            self.batch_size = self._k.shape[0]
        if self._ik is not None:
            self._ik = self.indexer_keys = fn(self._ik)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """New buffers (a batch-size change cannot keep the addresses)."""
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New buffers holding the selected batch rows."""
        self._apply_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        raise NotImplementedError("KeyeVL2StaticCache does not offload; use the default (dynamic) cache")

    def prefetch(self):
        raise NotImplementedError("KeyeVL2StaticCache does not offload; use the default (dynamic) cache")


class KeyeVL2StaticCache(Cache):
    """Preallocated cache for ``max_cache_len`` tokens (prompt + max_new_tokens): what
    ``generate(..., cache_implementation="static")`` builds for this model.

    Every layer is a :class:`KeyeVL2StaticCacheLayer` (K/V + indexer keys, token-major, fixed addresses). Besides the
    buffers the cache keeps ``key_mask`` [B, C] bool (False = a padding token of the prompt; positions after the
    prompt are True), written by the model's first forward from its ``attention_mask``: later steps only append
    tokens, so their padding pattern is that of the prompt, and a decode step never reads ``attention_mask``.

    ``prefilled`` (a python bool) says whether the first forward ran: the model then takes the device-side decode path
    (filled length read from ``get_seq_length()``, a 0-d int64 device tensor, never copied to the host).

    Args:
        config: the model config (its text part sets the number of layers), or None with ``num_layers``.
        max_cache_len: tokens per layer (positions 0 .. max_cache_len - 1).
        num_layers: number of decoder layers when ``config`` is None.
    Raises:
        ValueError: ``max_cache_len < 1`` or no layer count.

    Exceeding ``max_cache_len`` is an error: ``generate`` checks prompt + max_new_tokens once before the first
    step (the cache is sized from it), and a forward on a prefilled cache in eager mode checks the room left when
    ``check_capacity`` is True (one host read; ``generate`` turns it off after its own check).
    """

    is_compileable = True

    def __init__(self, config=None, max_cache_len: int | None = None, num_layers: int | None = None, **kwargs):
        if max_cache_len is None or int(max_cache_len) < 1:
            raise ValueError(f"KeyeVL2StaticCache needs max_cache_len >= 1, got {max_cache_len}")
        if num_layers is None:
            if config is None:
                raise ValueError("KeyeVL2StaticCache needs a config or num_layers")
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = int(text.num_hidden_layers)
        self._capacity = int(max_cache_len)
        super().__init__(layers=[KeyeVL2StaticCacheLayer(self._capacity) for _ in range(int(num_layers))])
        self.key_mask: torch.Tensor | None = None
        self.prefilled = False
        self.check_capacity = True

    @property
    def max_cache_len(self) -> int:
        """Tokens per layer (a property in transformers' ``Cache``; fixed here)."""
        return self._capacity

    # ------------------------------------------------------------------ model-side helpers
    def set_key_mask(self, attention_mask: torch.Tensor | None, start: int, end: int, batch: int,
                     device: torch.device) -> None:
        """Record the padding pattern of tokens [start, end) (host-known positions during prefill).

        ``attention_mask`` is [B, end] (the whole history, transformers' convention) or None (no padding).
        """
        if self.key_mask is None or self.key_mask.shape[0] != batch or self.key_mask.device != device:
            self.key_mask = torch.ones(batch, self.max_cache_len, dtype=torch.bool, device=device)
            if not _is_compiling():
                torch._dynamo.mark_static_address(self.key_mask)
        if attention_mask is None:
            self.key_mask[:, start:end] = True
        else:
            self.key_mask[:, start:end].copy_(attention_mask[:, start:end].to(device=device, dtype=torch.bool))
        self.key_mask[:, end:] = True

    def length_tensor(self) -> torch.Tensor:
        """The filled length as a 0-d int64 device tensor (layer 0's; all layers advance together)."""
        return self.layers[0].cumulative_length

    def update_indexer(self, indexer_keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Write ``indexer_keys`` [B, T, D_I] for ``layer_idx``; return the whole buffer [B, C, D_I]."""
        return self.layers[layer_idx].update_indexer(indexer_keys)

    @property
    def indexer_keys(self) -> dict[int, torch.Tensor]:
        """Layer index -> whole indexer-key buffer [B, C, D_I] (allocated layers only)."""
        return {i: l.indexer_keys for i, l in enumerate(self.layers) if l.indexer_keys is not None}

    # ------------------------------------------------------------------ Cache API
    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the cache, keep its buffers: the next forward is a prefill again (and a forward past the capacity
        raises again: ``generate`` switches that check off for its own run)."""
        for layer in self.layers:
            layer.reset()
        self.prefilled = False
        self.check_capacity = True

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop the last -n tokens; positive: keep the first n."""
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_mask is not None:
            self.key_mask.copy_(self.key_mask.index_select(0, beam_idx.to(self.key_mask.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[indices]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes allocated by the K/V and indexer-key buffers (everything is allocated up front)."""
        kv = sum(b.numel() * b.element_size() for l in self.layers for b in (l._k, l._v) if b is not None)
        ik = sum(l._ik.numel() * l._ik.element_size() for l in self.layers if l._ik is not None)
        return {"kv_allocated": kv, "indexer_allocated": ik}


def update_indexer_cache(cache: Cache | None, indexer_keys: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Store this step's indexer keys [B, T, D_I] in ``cache`` and return the full history [B, S, D_I].

    A :class:`KeyeVL2Cache` (or any Cache whose layer has ``update_indexer``, e.g. transformers'
    ``DynamicIndexedLayer``) keeps them in the layer, so crop / reorder / batch operations apply to them.
    Any other Cache gets them beside it (same numbers; crop and reorder do not reach them).
    """
    if cache is None:
        return indexer_keys
    if isinstance(cache, (KeyeVL2Cache, KeyeVL2StaticCache)):
        return cache.update_indexer(indexer_keys, layer_idx)
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and hasattr(layers[layer_idx], "update_indexer"):
        return layers[layer_idx].update_indexer(indexer_keys)
    if not cache.__dict__.get("_keye_indexer_warned"):
        cache.__dict__["_keye_indexer_warned"] = True
        logger.warning(
            f"{type(cache).__name__} has no indexer-key layers: the DSA indexer keys are kept beside it and are not "
            "cropped or reordered with it; pass a KeyeVL2Cache for beam search or assisted decoding"
        )
    store = cache.__dict__.setdefault("_keye_indexer_keys", {})
    old = store.get(layer_idx)
    store[layer_idx] = indexer_keys if old is None else torch.cat([old, indexer_keys], dim=1)
    return store[layer_idx]



__all__ = ["KeyeVL2Cache", "KeyeVL2CacheLayer", "KeyeVL2StaticCache", "KeyeVL2StaticCacheLayer", "update_indexer_cache"]
