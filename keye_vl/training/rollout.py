"""Rollouts: batched sampling of ``num_return_sequences`` completions per prompt with the model's own ``generate``
(its fast path, DSA with the indexer cache), the sampler's log-probabilities recorded as the tokens are drawn,
vision features computed once per prompt, and FSDP2 parameters gathered once per rollout phase.

- :func:`generate_rollouts` returns a :class:`RolloutBatch`: prompts [N, P] (left padding), completions [N, C]
  (right padding after the end token), ``sampler_logprobs`` [N, C] = log mu(y_t), the log-probability under the
  distribution the token was actually drawn from (temperature, top-k, top-p applied), recorded at sampling time,
  never recomputed.
- :class:`VisionFeatureCache` runs the vision tower and projector once per prompt and serves the features to every
  repeated row (the ``G`` completions of that prompt), in ``generate`` and in later forwards over
  ``[prompt | completion]`` (training, scoring), as long as the cache is in scope. Without gradients it is valid
  when the vision tower and projector are frozen; ``grad=True`` keeps the graph (the gradient of a prompt's
  features sums over its completions).
- :func:`unsharded_for_rollout`: under FSDP2, decoding token by token would all-gather every layer's parameters
  for every new token (FSDP reshards after each forward). Inside this context every FSDP unit is all-gathered
  once and kept unsharded (``unshard()`` + ``set_reshard_after_forward(False)``), and resharded on exit; this is
  how verl's hybrid engine switches between the training and the inference layout. Memory cost: the full
  parameters in the FSDP ``param_dtype`` on every GPU during the rollout (2 bytes x parameters for bf16, e.g.
  ~2.4 GiB for a 1.2B model, ~62 GB for the 31B model, which therefore needs fewer, larger rollout groups or a
  separate inference copy), on top of the sharded fp32 master weights and optimizer state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .models import unwrap_base

VISION_KINDS = (
    # kind, pixel key, grid key, placeholder token attribute, feature method
    ("image", "pixel_values", "image_grid_thw", "image_token_id", "get_image_features"),
    ("video", "pixel_values_videos", "video_grid_thw", "video_token_id", "get_video_features"),
)


# generate() appends these warpers AFTER custom logits processors; they are neutralised so that the recorder sees the
# distribution that is actually sampled (a generation_config may set them).
_NEUTRAL_WARPERS = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
try:  # newer transformers releases also have top_h
    from transformers import GenerationConfig as _GC

    if hasattr(_GC(), "top_h"):
        _NEUTRAL_WARPERS["top_h"] = None
except Exception:  # noqa: BLE001
    pass


def _row_items(input_ids: torch.Tensor, tokens_per_item: list[int], token_id: int) -> list[tuple[int, int]]:
    """For each row: the ``[first, end)`` range of the vision items (images or videos, flattened over the batch in
    row order) whose placeholder tokens it holds. Raises ValueError when the counts do not match."""
    per_row = (input_ids == token_id).sum(-1).tolist()
    ranges, item = [], 0
    for row, need in enumerate(per_row):
        first, got = item, 0
        while got < need and item < len(tokens_per_item):
            got += tokens_per_item[item]
            item += 1
        if got != need:
            raise ValueError(f"row {row} holds {need} vision placeholder tokens, which do not match the grids")
        ranges.append((first, item))
    if item != len(tokens_per_item):
        raise ValueError(f"{len(tokens_per_item) - item} vision items have no placeholder tokens in input_ids")
    return ranges


def repeat_rows(batch: dict, repeats: int, merge: int, token_ids: dict[str, int]) -> dict:
    """Repeat every row of a prompt batch ``repeats`` times (row by row: r0, r0, ..., r1, r1, ...), vision tensors
    included (each row's images / videos are copied with it).

    Args:
        batch: ``input_ids`` / ``attention_mask`` [B, P] and optional vision tensors.
        merge: placeholder tokens per item = grid.prod() // merge (``spatial_merge_size ** 2``).
        token_ids: {"image": id, "video": id}.
    """
    out = {k: v.repeat_interleave(repeats, dim=0) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    for kind, pix_key, grid_key, _, _ in VISION_KINDS:
        pix, grid = batch.get(pix_key), batch.get(grid_key)
        if pix is None:
            continue
        sizes = grid.prod(-1).tolist()
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        ranges = _row_items(batch["input_ids"], [s // merge for s in sizes], token_ids[kind])
        pix_parts, grid_parts = [], []
        for first, end in ranges:
            for _ in range(repeats):
                pix_parts.append(pix[starts[first]: starts[end]])
                grid_parts.append(grid[first:end])
        out[pix_key], out[grid_key] = torch.cat(pix_parts), torch.cat(grid_parts)
    return out


class VisionFeatureCache:
    """Vision features of a prompt batch, computed once and served to its rows repeated ``repeats`` times.

    Args:
        model: this package's model (PEFT / Accelerate wrappers are looked through).
        batch: the prompt batch (``input_ids`` [B, P], vision tensors as the processor gives them).
        repeats: completions per prompt (G).
        grad: keep the autograd graph of the features (vision tower or projector training); otherwise computed
            under ``torch.no_grad()``.

    Use :meth:`expanded_inputs` for the vision arguments of a forward over the repeated rows (the grids expanded,
    the pixels replaced by a zero-size tensor so they are never copied) inside ``with cache.serve(model):``, which
    makes ``get_image_features`` / ``get_video_features`` return the cached features (after checking that the
    grids asked for are the expanded ones). ``encoder_calls`` counts vision-tower runs (tests).
    """

    encoder_calls = 0

    def __init__(self, model, batch: dict, repeats: int, grad: bool = False):
        base = unwrap_base(model)
        cfg = base.config
        self.repeats = int(repeats)
        merge = cfg.vision_config.spatial_merge_size ** 2
        self.features: dict[str, torch.Tensor] = {}
        self.grids: dict[str, torch.Tensor] = {}
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        for kind, pix_key, grid_key, tok_attr, method in VISION_KINDS:
            pix, grid = batch.get(pix_key), batch.get(grid_key)
            if pix is None:
                continue
            with ctx:
                feats = getattr(base, method)(pix, grid)
            VisionFeatureCache.encoder_calls += 1
            tokens = (grid.prod(-1) // merge).tolist()
            starts = [0]
            for t in tokens:
                starts.append(starts[-1] + t)
            ranges = _row_items(batch["input_ids"], tokens, getattr(cfg, tok_attr))
            idx, grid_parts = [], []
            for first, end in ranges:
                for _ in range(self.repeats):
                    idx.append(torch.arange(starts[first], starts[end]))
                    grid_parts.append(grid[first:end])
            index = torch.cat(idx).to(feats.device)
            self.features[kind] = feats.index_select(0, index)
            self.grids[kind] = torch.cat(grid_parts)
            self._placeholder = pix[:0]

    def expanded_inputs(self) -> dict:
        """Vision keyword arguments of a forward over the repeated rows (empty dict when the prompts have none)."""
        out = {}
        for kind, pix_key, grid_key, _, _ in VISION_KINDS:
            if kind in self.features:
                out[pix_key] = self._placeholder.new_zeros((0, self._placeholder.shape[-1]))
                out[grid_key] = self.grids[kind]
        return out

    @contextlib.contextmanager
    def serve(self, model):
        """Within the block the model's vision feature methods return the cached features (instance attributes
        shadow the class methods; removed on exit)."""
        base = unwrap_base(model)

        def make(kind):
            def fn(pixel_values, grid_thw):
                want = self.grids.get(kind)
                if want is None or not torch.equal(grid_thw.cpu(), want.cpu()):
                    raise ValueError(f"cached {kind} features were asked for grids that are not the cached ones")
                return self.features[kind]
            return fn

        added = []
        for kind, _, _, _, method in VISION_KINDS:
            if kind in self.features:
                setattr(base, method, make(kind))
                added.append(method)
        try:
            yield self
        finally:
            for method in added:
                delattr(base, method)


# ---------------------------------------------------------------------------------------------------------------
# sampler log-probabilities
# ---------------------------------------------------------------------------------------------------------------
def _logits_processor_base():
    from transformers import LogitsProcessor

    return LogitsProcessor


class SamplerLogprobRecorder(_logits_processor_base()):
    """A logits processor, placed last, that records log mu(y_t) of each drawn token.

    At step t it keeps ``log_softmax(scores)`` [B, V] (the processed scores the sampler draws from); the token drawn
    from them is the last column of ``input_ids`` at step t + 1, and :meth:`finish` reads the final one from the
    returned sequences. So only one [B, V] buffer is ever held. ``scores`` pass through unchanged.
    """

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self._prev: torch.Tensor | None = None
        self._cols: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prev is not None:
            self._cols.append(self._prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, C] float32 log mu of ``sequences[:, prompt_len:]`` (C = generated length)."""
        if self._prev is not None:
            pos = self.prompt_len + len(self._cols)
            self._cols.append(self._prev.gather(-1, sequences[:, pos: pos + 1]).squeeze(-1))
            self._prev = None
        C = sequences.shape[1] - self.prompt_len
        if len(self._cols) != C:
            raise RuntimeError(f"recorded {len(self._cols)} sampler log-probs for {C} generated tokens")
        return torch.stack(self._cols, dim=1) if self._cols else sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)


@dataclass
class RolloutBatch:
    """``N = prompts x G`` sampled completions, row ``i`` from prompt ``group[i]`` (rows of a prompt adjacent).

    Shapes: ``prompt_ids`` / ``prompt_mask`` [N, P] (left padding), ``completion_ids`` / ``completion_mask`` [N, C]
    (mask 1 through the first end token inclusive; 0 after it), ``sampler_logprobs`` [N, C] float32 (0 where the
    mask is 0), ``group`` [N] int64. ``vision``: the forward's vision arguments for the N rows (with ``cache``,
    the expanded grids that the cache serves); ``records``: the prompt records (one per prompt).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampler_logprobs: torch.Tensor
    group: torch.Tensor
    vision: dict = field(default_factory=dict)
    cache: VisionFeatureCache | None = None
    records: list = field(default_factory=list)

    def model_inputs(self) -> dict:
        """Inputs of a forward over ``[prompt | completion]``: ``input_ids``, ``attention_mask`` [N, P + C] and the
        vision arguments (use inside ``self.cache.serve(model)`` when a cache is set)."""
        return {"input_ids": torch.cat([self.prompt_ids, self.completion_ids], 1),
                "attention_mask": torch.cat([self.prompt_mask, self.completion_mask], 1), **self.vision}

    def serve(self, model):
        """``self.cache.serve(model)``, or a no-op context without a cache."""
        return self.cache.serve(model) if self.cache is not None else contextlib.nullcontext()

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def completion_mask_from(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """[N, C] int64 mask: 1 up to and including the first token in ``eos_ids`` of each row, 0 after it (all 1 for a
    row that never ends, i.e. was cut at ``max_new_tokens``)."""
    is_end = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    ended_before = (is_end.long().cumsum(1) - is_end.long()) > 0
    return (~ended_before).long()


@torch.no_grad()
def generate_rollouts(model, batch: dict, num_return_sequences: int, max_new_tokens: int, eos_token_ids: list[int],
                      pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      reuse_vision: bool = True, vision_grad: bool = False, records: list | None = None,
                      generator_seed: int | None = None, **generate_kwargs) -> RolloutBatch:
    """Sample ``num_return_sequences`` completions for every prompt of ``batch`` with ``model.generate``.

    Args:
        model: this package's model (or a wrapper of it); it is put in eval mode for the call and back after.
        batch: left-padded prompts (:func:`keye_vl.training.data.collate_prompts`), on the model's device.
        num_return_sequences: G completions per prompt (rows repeated before ``generate``, so each is an
            independent sample).
        eos_token_ids: tokens that end a completion (e.g. ``<|im_end|>``, ``<|endoftext|>``).
        temperature / top_k / top_p: the sampling distribution mu (0 / 1.0 = off); applied by this function's own
            logits processors, so that the recorded log mu is that of the distribution actually sampled from.
        reuse_vision: compute the prompts' vision features once (:class:`VisionFeatureCache`) and keep the cache
            in the result for the later forwards (valid for training only when the vision tower and projector are
            frozen, or with ``vision_grad`` where the later forward recomputes with gradients).
        generator_seed: when given, ``torch.manual_seed`` for the call (sampling is reproducible).
        generate_kwargs: passed to ``generate`` (e.g. ``use_cache``).
    Returns:
        :class:`RolloutBatch` with ``N = B x G`` rows.
    Raises:
        ValueError: ``num_return_sequences`` or ``max_new_tokens`` < 1, temperature <= 0.
    """
    bad = sorted(set(generate_kwargs) & set(_NEUTRAL_WARPERS))
    if bad:
        raise ValueError(f"rollout records the sampler's log-probs after temperature / top_k / top_p; {bad} would "
                         "change the distribution after the recorder (not supported)")
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if num_return_sequences < 1 or max_new_tokens < 1:
        raise ValueError(f"num_return_sequences and max_new_tokens must be >= 1 ({num_return_sequences}, {max_new_tokens})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    base = unwrap_base(model)
    cfg = base.config
    G = int(num_return_sequences)
    B, P = batch["input_ids"].shape
    token_ids = {"image": cfg.image_token_id, "video": cfg.video_token_id}
    has_vision = any(batch.get(k) is not None for _, k, _, _, _ in VISION_KINDS)
    cache = VisionFeatureCache(model, batch, G, grad=False) if (reuse_vision and has_vision) else None
    if cache is not None:
        rows = {k: v.repeat_interleave(G, dim=0) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        vision = cache.expanded_inputs()
    else:
        rows = repeat_rows(batch, G, cfg.vision_config.spatial_merge_size ** 2, token_ids) if has_vision else \
            {k: v.repeat_interleave(G, dim=0) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        vision = {k: v for k, v in rows.items() if k not in ("input_ids", "attention_mask")}
    procs = []
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    recorder = SamplerLogprobRecorder(P)
    procs.append(recorder)  # last: generate's own warpers (which it would add after it) are switched off below
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = base.training
    base.eval()
    try:
        with (cache.serve(model) if cache is not None else contextlib.nullcontext()):
            seqs = base.generate(
                input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], **vision,
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, **_NEUTRAL_WARPERS,
                eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, logits_processor=LogitsProcessorList(procs),
                num_return_sequences=1, **generate_kwargs,
            )
    finally:
        base.train(was_training)
    completions = seqs[:, P:]
    mu = recorder.finish(seqs)
    mask = completion_mask_from(completions, list(eos_token_ids))
    completions = torch.where(mask.bool(), completions, torch.full_like(completions, pad_token_id))
    if vision_grad and cache is not None:
        # the training forward recomputes the features with gradients: give it every row's own pixels
        cache = None
        full = repeat_rows(batch, G, cfg.vision_config.spatial_merge_size ** 2, token_ids)
        vision = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
    return RolloutBatch(
        prompt_ids=rows["input_ids"], prompt_mask=rows["attention_mask"], completion_ids=completions,
        completion_mask=mask, sampler_logprobs=torch.where(mask.bool(), mu, torch.zeros_like(mu)), group=torch.arange(B).repeat_interleave(G),
        vision=vision, cache=cache, records=list(records) if records is not None else [],
    )


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 rollout layout
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def unsharded_for_rollout(model):
    """Gather every FSDP2 unit of ``model`` once and keep it gathered until the block ends (see the module
    docstring); a no-op for a model without FSDP2 units. The reshard-after-forward settings are restored exactly
    on exit (read from FSDP's per-group state, since the root's default differs from the other units'; this reads
    and restores private FSDP2 state of torch 2.6-2.14: ``_auto_reshard_after_forward``, ``post_forward_mesh_info``,
    ``_lazy_init``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    # FSDP's lazy initialisation (at the root's first forward) makes the root keep its parameters after forward;
    # run it now, so that restoring the saved settings on exit restores that too.
    units[0]._get_fsdp_state()._lazy_init()
    saved = []
    for m in units:
        state = m._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]))
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for g, info in groups:
                g.post_forward_mesh_info = info
