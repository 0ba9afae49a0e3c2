"""GSPO (Group Sequence Policy Optimization): group advantages, the sequence-level clipped loss, zero-variance group
filtering with refill by over-sampling, and the rollout importance correction.

Sources: GSPO, Zheng et al. 2025 (arXiv 2507.18071), Eqs. 5-7; TRL's ``GRPOTrainer`` with
``importance_sampling_level="sequence"`` for the defaults (``epsilon=3e-4``, ``epsilon_high=4e-4``, ``beta=0``) and
the advantage ``(r - mean_group) / (std_group + 1e-4)`` with the unbiased std; DAPO (arXiv 2503.14476) and Keye-VL's
report for dropping groups whose rewards do not vary and over-sampling to refill the batch (TRL only logs them);
the k3 KL estimator ``exp(ref - logp) - (ref - logp) - 1`` (Schulman, "Approximating KL divergence"); truncated
importance sampling of rollout-vs-training mismatch (Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training"), applied here at the sequence level like the GSPO ratio.

Shapes: ``B`` sequences (completions), ``T`` completion tokens (right-padded, ``mask`` marks real tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "GroupFiller",
    "GSPOLossOutput",
    "group_advantages",
    "gspo_loss",
    "nonzero_variance_groups",
    "sequence_mean",
]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """``A_i = (r_i - mean_group) / (std_group + eps)`` with the unbiased std of each group of ``group_size``
    consecutive rewards (TRL / GRPO convention).

    Args:
        rewards: float ``[B]``, ``B`` a multiple of ``group_size``; groups are consecutive.
        group_size: ``G >= 2`` (the unbiased std of one sample is undefined).
    Returns: float32 ``[B]``.
    Raises: ValueError for ``G < 2``, ``B`` not a multiple of ``G``, or non-finite rewards.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(r.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group std, got {group_size}")
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards are not a whole number of groups of {group_size}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, keepdim=True, unbiased=True)
    return ((g - mean) / (std + eps)).reshape(-1)


def nonzero_variance_groups(rewards: torch.Tensor | Sequence[float], group_size: int) -> list[bool]:
    """Per group of ``group_size`` consecutive rewards: True when the rewards are not all equal (exact
    comparison: a group whose rewards are all identical has zero advantage and no GSPO gradient)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)
    return [bool((row != row[0]).any()) for row in r]


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over the real tokens: ``sum_t mask * values / sum_t mask`` -> ``[B]``.

    Raises: ValueError when a sequence has no token (its mean is undefined).
    """
    m = mask.to(values.dtype)
    n = m.sum(dim=-1)
    if (n == 0).any():
        raise ValueError("a completion has no tokens (empty mask row): its sequence ratio is undefined")
    return (values * m).sum(dim=-1) / n


@dataclass
class GSPOLossOutput:
    """``loss`` (scalar, to backpropagate) and detached per-batch statistics (python floats / tensors)."""

    loss: torch.Tensor
    ratio: torch.Tensor  # [B] sequence ratios s_i (detached)
    clipped: torch.Tensor  # [B] bool: the clipped branch is the minimum and binds (no gradient)
    kl: torch.Tensor | None = None  # [B] per-sequence mean k3 KL to the reference (detached)
    is_weight: torch.Tensor | None = None  # [B] rollout importance weights (detached)
    stats: dict = field(default_factory=dict)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    num_sequences: int | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    rollout_logp: torch.Tensor | None = None,
    rollout_is_cap: float | None = None,
) -> GSPOLossOutput:
    """The GSPO objective of a (micro-)batch of completions.

    ``s_i = exp(mean_t(logp - old_logp))``; ``loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``;
    with a reference: ``+ beta * mean_t k3(ref, logp)``; with rollout log-probs (the sampler's, recorded at
    generation time) and ``rollout_is_cap``: ``loss_i *= sg[min(exp(mean_t(old_logp - rollout_logp)), cap)]`` (the
    sequence-level truncated importance weight correcting the sampler / trainer mismatch). The result is
    ``sum_i loss_i / num_sequences``: pass the number of sequences of the whole optimiser step when the batch is
    split into micro-batches, so that accumulated gradients equal those of one big batch.

    Args:
        logp: float ``[B, T]`` per-token log-probs of the completion tokens under the current policy (with grad).
        old_logp: float ``[B, T]`` the same under the policy that generated (no grad is taken through it).
        advantages: float ``[B]`` (e.g. :func:`group_advantages`). mask: bool / 0-1 ``[B, T]`` real tokens.
        eps_low, eps_high: clip range of the sequence ratio (TRL's GSPO defaults 3e-4, 4e-4).
        num_sequences: divisor of the summed loss (default ``B``).
        ref_logp: optional ``[B, T]`` reference-model log-probs; beta: KL weight (0 = no KL term).
        rollout_logp: optional ``[B, T]`` sampler log-probs; rollout_is_cap: truncation C of the importance weight
            (None: no correction).
    Returns: :class:`GSPOLossOutput`.
    Raises: ValueError on mismatched shapes, non-finite inputs, empty completions or bad clip values.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.ndim != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must be the same [B, T]")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    for name, t in (("ref_logp", ref_logp), ("rollout_logp", rollout_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must be [B, T] = {tuple(logp.shape)} like logp, got {tuple(t.shape)}")
    m = mask.bool()
    extra = [(n, t) for n, t in (("ref_logp", ref_logp if beta else None),
                                 ("rollout_logp", rollout_logp if rollout_is_cap is not None else None)) if t is not None]
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), *extra):
        vals = t[m] if t.ndim == 2 else t
        if not torch.isfinite(vals.detach()).all():
            raise ValueError(f"{name} has NaN or inf on real tokens")
    n = int(num_sequences) if num_sequences is not None else logp.shape[0]
    if n <= 0:
        raise ValueError(f"num_sequences must be > 0, got {num_sequences}")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = sequence_mean(torch.where(m, logp - old_logp.detach(), zero), m)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype).detach()
    unclipped = ratio * adv
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped_obj = clipped_ratio * adv
    per_seq = -torch.minimum(unclipped, clipped_obj)
    binds = (clipped_obj < unclipped) & (clipped_ratio != ratio)
    is_w = None
    if rollout_logp is not None and rollout_is_cap is not None:  # weights the policy term only (as verl)
        if not rollout_is_cap > 0:
            raise ValueError(f"rollout_is_cap must be > 0, got {rollout_is_cap}")
        diff = torch.where(m, old_logp.detach() - rollout_logp.detach().to(logp.dtype), zero)
        is_w = torch.exp(sequence_mean(diff, m)).clamp(max=float(rollout_is_cap))
        per_seq = per_seq * is_w
    out_kl = None
    if ref_logp is not None and beta:
        d = torch.where(m, ref_logp.detach().to(logp.dtype) - logp, zero)
        kl = sequence_mean(torch.exp(d) - d - 1.0, m)
        per_seq = per_seq + beta * kl
        out_kl = kl.detach()
    loss = per_seq.sum() / n
    return GSPOLossOutput(loss=loss, ratio=ratio.detach(), clipped=binds.detach(), kl=out_kl, is_weight=is_w)


class GroupFiller:
    """Collect ``n_groups`` groups whose rewards vary, over-sampling prompts and dropping zero-variance groups
    (Keye-VL / DAPO dynamic sampling).

    ``draw(k)`` must return ``k`` groups, each an object or dict with a ``rewards`` sequence of length ``G``
    (anything else it carries is kept). Each call to :meth:`fill` draws ``ceil(need * oversample)`` groups,
    keeps those with non-zero reward variance (in draw order) and repeats for the still missing ones, at most
    ``max_rounds`` draws; surplus valid groups of the last draw are discarded (they would be stale by the next
    step). If the rounds run out the step proceeds with fewer groups (possibly none: the caller skips the update).

    Args:
        n_groups: groups per optimiser step (>= 1). oversample: draw factor (>= 1). max_rounds: draws per step.
    Returns of :meth:`fill`: ``(kept groups, stats)`` with ``stats = {"groups_drawn", "groups_dropped",
    "groups_kept", "draw_rounds"}``.
    """

    def __init__(self, n_groups: int, oversample: float = 1.0, max_rounds: int = 4):
        if n_groups < 1 or not oversample >= 1.0 or max_rounds < 1:
            raise ValueError(f"need n_groups >= 1, oversample >= 1, max_rounds >= 1; got {n_groups}, "
                             f"{oversample}, {max_rounds}")
        self.n_groups, self.oversample, self.max_rounds = int(n_groups), float(oversample), int(max_rounds)

    @staticmethod
    def _rewards(group: Any) -> Sequence[float]:
        return group["rewards"] if isinstance(group, dict) else group.rewards

    def fill(self, draw: Callable[[int], list[Any]]) -> tuple[list[Any], dict[str, int]]:
        kept: list[Any] = []
        drawn = dropped = rounds = 0
        while len(kept) < self.n_groups and rounds < self.max_rounds:
            need = self.n_groups - len(kept)
            k = max(need, math.ceil(need * self.oversample - 1e-9))
            groups = draw(k)
            if len(groups) != k:
                raise ValueError(f"draw({k}) returned {len(groups)} groups")
            rounds += 1
            drawn += k
            for grp in groups:
                r = list(self._rewards(grp))
                if len(r) < 2:
                    raise ValueError("a group needs >= 2 completions")
                if any(x != r[0] for x in r):
                    if len(kept) < self.n_groups:
                        kept.append(grp)
                else:
                    dropped += 1
        return kept, {"groups_drawn": drawn, "groups_dropped": dropped, "groups_kept": len(kept),
                      "draw_rounds": rounds}
