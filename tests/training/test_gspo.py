"""GSPO: group advantages, the two-token gradient, the clipped-ratio zero gradient, micro-batch accumulation, the
rollout importance weight, and zero-variance groups dropped and refilled -- all against hand computations."""

import math

import pytest
import torch

from keye_vl.training.gspo import GroupFiller, group_advantages, gspo_loss, nonzero_variance_groups


def test_group_advantages_hand():
    # rewards [1, 0, 0, 1]: mean 1/2, unbiased std sqrt(4 * 1/4 / 3) = sqrt(1/3) = 0.5773502691896258
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    h = 0.5 / (0.5773502691896258 + 1e-4)
    torch.testing.assert_close(a, torch.tensor([h, -h, -h, h]), rtol=0, atol=1e-6)
    # two groups of 2: [3, 1] -> std sqrt(2), A = +-1/(sqrt 2 + 1e-4); [2, 2] -> 0, 0
    a = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2)
    h = 1.0 / (math.sqrt(2.0) + 1e-4)
    torch.testing.assert_close(a, torch.tensor([h, -h, 0.0, 0.0]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def _two_token_case(old_shift: float, adv: float):
    """One completion of two tokens (ids 0 and 2) over a 3-token vocabulary, logits all zero (p = 1/3 each)."""
    z = torch.zeros(2, 3, requires_grad=True)
    logp = torch.log_softmax(z, -1)[[0, 1], [0, 2]][None]  # [1, 2], each log(1/3)
    old = logp.detach() + old_shift
    out = gspo_loss(logp, old, torch.tensor([adv]), torch.ones(1, 2, dtype=torch.bool))
    out.loss.backward()
    return z.grad, out


def test_two_token_gradient_hand():
    # old == current: s = 1 inside the clip range; loss = -s A, ds/dlogp_t = s / 2, dlogp_t/dz = onehot - 1/3.
    # A = 1: grad_z[t] = -(1/2) (onehot_t - 1/3): token 0 -> [-1/3, 1/6, 1/6], token 2 -> [1/6, 1/6, -1/3]
    g, out = _two_token_case(0.0, 1.0)
    torch.testing.assert_close(g, torch.tensor([[-1 / 3, 1 / 6, 1 / 6], [1 / 6, 1 / 6, -1 / 3]]), rtol=0, atol=1e-7)
    assert out.ratio.item() == 1.0 and not out.clipped.item()
    torch.testing.assert_close(out.loss, torch.tensor(-1.0))
    # A = -2, old log-probs higher by 1e-4 each: s = exp(-1e-4) = 0.99990 inside [1 - 3e-4, 1 + 4e-4];
    # grad = -A s / 2 (onehot - 1/3) = s (onehot - 1/3)
    g, out = _two_token_case(1e-4, -2.0)
    s = math.exp(-1e-4)
    exp = s * torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]])
    torch.testing.assert_close(g, exp, rtol=0, atol=1e-6)


def test_clipped_ratio_zero_gradient():
    # A > 0 and s = exp(1e-3) > 1 + 4e-4 (old lower by 1e-3): clipped branch binds -> zero gradient, loss -(1+4e-4)A
    g, out = _two_token_case(-1e-3, 1.0)
    assert torch.equal(g, torch.zeros(2, 3)) and out.clipped.item()
    torch.testing.assert_close(out.loss, torch.tensor(-(1 + 4e-4)), rtol=0, atol=1e-7)
    # A < 0 and s = exp(-1e-3) < 1 - 3e-4: binds -> zero gradient
    g, out = _two_token_case(1e-3, -1.0)
    assert torch.equal(g, torch.zeros(2, 3)) and out.clipped.item()
    # A > 0 and s < 1 - eps: the unclipped branch is the minimum -> gradient flows (pessimistic bound)
    g, out = _two_token_case(1e-3, 1.0)
    assert not out.clipped.item() and g.abs().sum() > 0


def test_microbatch_accumulation_equals_big_batch():
    torch.manual_seed(0)
    B, T, V = 6, 5, 7
    w = torch.randn(V, V, dtype=torch.float64)
    x = torch.randn(B, T, V, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, 1:] = False
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0]), 3).double()

    def logp_of(wt, sl):
        lp = torch.log_softmax(x[sl] @ wt, -1)
        return lp.gather(-1, tokens[sl, :, None])[..., 0]

    old = logp_of(w, slice(None)).detach() + 1e-4 * torch.randn(B, T, dtype=torch.float64)
    w1 = w.clone().requires_grad_(True)
    gspo_loss(logp_of(w1, slice(None)), old, adv, mask).loss.backward()
    w2 = w.clone().requires_grad_(True)
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        gspo_loss(logp_of(w2, sl), old[sl], adv[sl], mask[sl], num_sequences=B).loss.backward()
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-12, atol=1e-14)


def test_kl_and_rollout_importance_weight():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    # k3 per token: d = ref - logp = [-ln 2, 0]: e^d - d - 1 = [1/2 + ln 2 - 1, 0]; mean = (ln 2 - 1/2) / 2
    out = gspo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logp=ref, beta=0.5)
    kl = (math.log(2) - 0.5) / 2
    torch.testing.assert_close(out.kl, torch.tensor([kl]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * kl), rtol=0, atol=1e-7)
    # rollout weight: old - rollout = [0.2, 0.4] -> exp(0.3); capped at 1.2
    roll = logp - torch.tensor([[0.2, 0.4]])
    out = gspo_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), rollout_logp=roll, rollout_is_cap=2.0)
    torch.testing.assert_close(out.is_weight, torch.tensor([math.exp(0.3)]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.tensor(-math.exp(0.3)), rtol=0, atol=1e-6)
    out = gspo_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), rollout_logp=roll, rollout_is_cap=1.2)
    torch.testing.assert_close(out.is_weight, torch.tensor([1.2]))
    # both: the rollout weight scales the policy term only, not the KL penalty (as verl): -1.2 * 1 + 0.5 * kl
    out = gspo_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), ref_logp=ref, beta=0.5,
                    rollout_logp=roll, rollout_is_cap=1.2)
    torch.testing.assert_close(out.loss, torch.tensor(-1.2 + 0.5 * kl), rtol=0, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no tokens"):
        gspo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="same"):
        gspo_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        gspo_loss(torch.full((1, 2), float("nan")), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2))
    z, one = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="ref_logp must be"):  # would broadcast and double the KL
        gspo_loss(z, z, torch.zeros(1), one, ref_logp=torch.zeros(2, 2), beta=0.1)
    with pytest.raises(ValueError, match="ref_logp has NaN"):
        gspo_loss(z, z, torch.zeros(1), one, ref_logp=torch.full((1, 2), float("nan")), beta=0.1)
    with pytest.raises(ValueError, match="rollout_logp has NaN"):
        gspo_loss(z, z, torch.zeros(1), one, rollout_logp=torch.full((1, 2), float("nan")), rollout_is_cap=2.0)
    # NaN only where the mask is 0 is fine (padding)
    gspo_loss(z, z, torch.zeros(1), torch.tensor([[1, 0]]), rollout_logp=torch.tensor([[0.0, float("nan")]]),
              rollout_is_cap=2.0)


def test_zero_variance_groups_dropped_and_refilled():
    assert nonzero_variance_groups([1, 1, 0, 1, 0.5, 0.5], 2) == [False, True, False]
    # a deterministic stream of groups: every third has identical rewards
    stream = iter([{"id": i, "rewards": [1.0, 1.0] if i % 3 == 0 else [0.0, float(i)]} for i in range(100)])
    calls = []

    def draw(k):
        calls.append(k)
        return [next(stream) for _ in range(k)]

    kept, stats = GroupFiller(4, oversample=1.0).fill(draw)
    # draw 4 -> ids 0..3, 0 and 3 dropped; need 2 -> ids 4, 5 kept
    assert [g["id"] for g in kept] == [1, 2, 4, 5] and calls == [4, 2]
    assert stats == {"groups_drawn": 6, "groups_dropped": 2, "groups_kept": 4, "draw_rounds": 2}
    calls.clear()
    kept, stats = GroupFiller(2, oversample=1.5).fill(draw)
    # ceil(2 * 1.5) = 3 -> ids 6 (dropped), 7, 8: enough in one round
    assert [g["id"] for g in kept] == [7, 8] and calls == [3]
    assert stats == {"groups_drawn": 3, "groups_dropped": 1, "groups_kept": 2, "draw_rounds": 1}
    # all groups constant: rounds run out, nothing kept
    kept, stats = GroupFiller(2, max_rounds=3).fill(lambda k: [{"rewards": [0.0, 0.0]}] * k)
    assert kept == [] and stats == {"groups_drawn": 6, "groups_dropped": 6, "groups_kept": 0, "draw_rounds": 3}
