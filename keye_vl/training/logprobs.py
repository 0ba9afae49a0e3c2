"""Per-token log-probabilities of completions, without ever building [L, vocab] logits for a whole sequence.

The model runs with its LM head bypassed (:func:`lm_head_inputs` captures the final hidden states the head would
get); the head is then applied to ``chunk_size`` positions at a time. With gradients, each chunk is recomputed in
the backward pass (``torch.utils.checkpoint``), so at most one chunk's logits exist at any moment, forward or
backward. Works for this package's model and for any transformers causal LM whose forward feeds its hidden states
to ``get_output_embeddings()`` (Llama, Qwen, ... families).

Log-probabilities are of ``softmax(logits / temperature)`` in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def lm_head_inputs(model):
    """Inside the block, the model's output head gets an empty slice instead of its input, and the input (the
    final hidden states, [B, L, H]) is appended to the yielded list. Logits come out as [B, 0, V] (never built)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    box: list[torch.Tensor] = []

    def pre_hook(module, args):
        box.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield box
    finally:
        handle.remove()


@dataclass
class TokenStats:
    """Per-position results of :func:`chunked_token_stats`; shapes [N] for N positions (k = top-k size, m = number
    of gathered ids)."""

    logprobs: torch.Tensor                      # [N] float32, log p(target)
    topk_ids: torch.Tensor | None = None        # [N, k] int64, the k most likely tokens (descending)
    topk_logprobs: torch.Tensor | None = None   # [N, k] float32
    gathered: torch.Tensor | None = None        # [N, m] float32, log p of ``gather_ids``


def _head(head, h: torch.Tensor) -> torch.Tensor:
    """``head(h)``, with ``h`` cast to the head's weight dtype outside autocast (a bf16 hidden state from an
    autocast forward meets an fp32 head here; under FSDP2 the mixed-precision policy casts inputs itself)."""
    w = getattr(head, "weight", None)
    if w is not None and not torch.is_autocast_enabled(h.device.type) and h.dtype != w.dtype and w.dtype.is_floating_point:
        h = h.to(w.dtype)
    return head(h)


def _chunk_fn(head, temperature: float, topk: int, with_gather: bool):
    def fn(h, target, gather_ids):
        logits = _head(head, h).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out = [logits.gather(-1, target[:, None]).squeeze(-1) - lse.squeeze(-1)]
        if topk:
            v, i = torch.topk(logits.detach(), topk, dim=-1)
            out += [i, v - lse.detach()]
        if with_gather:
            out.append(logits.gather(-1, gather_ids) - lse)
        return tuple(out)

    return fn


def chunked_token_stats(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_size: int = 1024,
                        temperature: float = 1.0, topk: int = 0, gather_ids: torch.Tensor | None = None) -> TokenStats:
    """Log-probabilities from final hidden states, ``chunk_size`` positions at a time.

    Args:
        hidden: [N, H] final hidden states (the LM head's input) at the positions that predict ``targets``.
        head: the output head (``model.get_output_embeddings()``), called on [chunk, H].
        targets: [N] int64 token ids.
        temperature: logits are divided by it (> 0).
        topk: also return each position's ``topk`` most likely tokens and their log-probs (no gradient).
        gather_ids: [N, m] int64: also return the log-probs of these ids (with gradient).
    Returns:
        :class:`TokenStats`. ``logprobs`` and ``gathered`` carry gradients to ``hidden`` and the head when
        grad mode is on (each chunk recomputed in backward).
    Raises:
        ValueError: mismatched shapes, a non-positive temperature or chunk size.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if temperature <= 0 or chunk_size <= 0:
        raise ValueError(f"temperature and chunk_size must be > 0 (got {temperature}, {chunk_size})")
    if gather_ids is not None and gather_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"gather_ids must be [N, m] with N={hidden.shape[0]}; got {tuple(gather_ids.shape)}")
    fn = _chunk_fn(head, temperature, topk, gather_ids is not None)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    dummy = targets.new_zeros(0, 1)
    for s in range(0, hidden.shape[0], chunk_size):
        e = min(s + chunk_size, hidden.shape[0])
        g = gather_ids[s:e] if gather_ids is not None else dummy
        if grad:
            parts.append(checkpoint(fn, hidden[s:e], targets[s:e], g, use_reentrant=False))
        else:
            parts.append(fn(hidden[s:e], targets[s:e], g))
    cols = list(zip(*parts)) if parts else []
    if not cols:
        raise ValueError("no positions to score")
    cat = [torch.cat(c) for c in cols]
    stats = TokenStats(logprobs=cat.pop(0))
    if topk:
        stats.topk_ids, stats.topk_logprobs = cat.pop(0), cat.pop(0)
    if gather_ids is not None:
        stats.gathered = cat.pop(0)
    return stats


def completion_hidden(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      **forward_kwargs) -> torch.Tensor:
    """[B, C, H] final hidden states at the positions that predict the completion tokens (position t predicts
    token t + 1), from one forward of ``model`` over ``inputs`` with its output head bypassed.

    Raises ValueError when ``input_ids`` does not end with ``completion_ids`` or the forward does not call its
    output head exactly once on every position.
    """
    ids = inputs["input_ids"]
    B, C = completion_ids.shape
    if completion_mask.shape != (B, C) or ids.shape[0] != B or ids.shape[1] <= C:
        raise ValueError(f"input_ids {tuple(ids.shape)} must end with completions {tuple(completion_ids.shape)} "
                         f"(mask {tuple(completion_mask.shape)})")
    if not torch.equal(ids[:, -C:], completion_ids):
        raise ValueError("the last C tokens of input_ids are not completion_ids")
    with lm_head_inputs(model) as box:
        model(**inputs, logits_to_keep=0, **forward_kwargs)
    if len(box) != 1:
        raise ValueError(f"{type(model).__name__}'s forward called its output head {len(box)} times (expected once)")
    hidden = box[0]
    if hidden.shape[1] != ids.shape[1]:
        raise ValueError("the output head did not get every position's hidden state")
    L = ids.shape[1]
    return hidden[:, L - C - 1: L - 1]


def exact_reverse_kl(student_hidden: torch.Tensor, student_head, teacher_hidden: torch.Tensor, teacher_head,
                     chunk_size: int = 256, temperature: float = 1.0) -> torch.Tensor:
    """Per position ``KL(pi_S || pi_T) = sum_v pi_S(v) [log pi_S(v) - log pi_T(v)]`` over the whole vocabulary
    ([N] float32, nats), ``chunk_size`` positions at a time, no gradient.

    Args: the two models' final hidden states [N, H_S] / [N, H_T] at the same N positions and their output heads
    (same vocabulary: the first min(V_S, V_T) ids are compared; the rest of the larger vocabulary is ignored).
    """
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError("student and teacher hidden states must cover the same positions")
    out = []
    with torch.no_grad():
        for s in range(0, student_hidden.shape[0], chunk_size):
            ls = _head(student_head, student_hidden[s: s + chunk_size]).float() / temperature
            lt = _head(teacher_head, teacher_hidden[s: s + chunk_size].to(ls.device)).float() / temperature
            v = min(ls.shape[-1], lt.shape[-1])
            ps = torch.log_softmax(ls[:, :v], -1)
            pt = torch.log_softmax(lt[:, :v], -1)
            out.append((ps.exp() * (ps - pt)).sum(-1))
    return torch.cat(out) if out else student_hidden.new_zeros(0)


def completion_logprobs(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        chunk_size: int = 1024, temperature: float = 1.0, topk: int = 0,
                        gather_ids: torch.Tensor | None = None, **forward_kwargs) -> dict[str, torch.Tensor]:
    """Per-token log-probs of completions that end the sequences of ``inputs``.

    Args:
        model: a causal LM (this package's model or any transformers one); the forward gets ``**inputs``,
            ``logits_to_keep=0`` and ``**forward_kwargs``.
        inputs: the model inputs of the full sequences ``[prompt | completion]`` (``input_ids`` [B, P + C],
            ``attention_mask``, vision tensors, ``position_ids``, ...); the last C positions are the completion.
        completion_ids: [B, C] int64, the completion tokens (the last C of ``input_ids``).
        completion_mask: [B, C] (1 = a real completion token, 0 = padding after the end).
        gather_ids: [B, C, m] ids whose log-probs are also returned (with gradient).
    Returns:
        ``{"logprobs": [B, C] float32}`` (0 where the mask is 0), plus ``topk_ids`` / ``topk_logprobs`` [B, C, k]
        with ``topk`` and ``gathered`` [B, C, m] with ``gather_ids``. Only masked-in positions run the head.
    Raises:
        ValueError: shapes that disagree, or a model whose forward does not call its output head.
    """
    h = completion_hidden(model, inputs, completion_ids, completion_mask, **forward_kwargs)
    B, C = completion_ids.shape
    keep = completion_mask.bool()
    rows = keep.reshape(-1).nonzero().squeeze(1)
    flat_h = h.reshape(B * C, -1).index_select(0, rows)
    flat_t = completion_ids.reshape(-1).index_select(0, rows)
    flat_g = gather_ids.reshape(B * C, -1).index_select(0, rows) if gather_ids is not None else None
    stats = chunked_token_stats(flat_h, model.get_output_embeddings(), flat_t, chunk_size, temperature, topk, flat_g)

    def scatter(x, fill=0.0):
        out = x.new_full((B * C, *x.shape[1:]), fill)
        out = out.index_copy(0, rows, x)
        return out.reshape(B, C, *x.shape[1:])

    result = {"logprobs": scatter(stats.logprobs)}
    if topk:
        result["topk_ids"] = scatter(stats.topk_ids, 0)
        result["topk_logprobs"] = scatter(stats.topk_logprobs, float("-inf"))
    if gather_ids is not None:
        result["gathered"] = scatter(stats.gathered)
    return result
