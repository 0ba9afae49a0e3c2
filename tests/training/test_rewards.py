"""Reward registry: every reward on hand-computed values and edge cases (malformed text, reversed / zero-length
spans, spans past the video, several spans, empty answers)."""

import pytest

from keye_vl.training.rewards import (
    REWARDS,
    WeightedReward,
    compute_rewards,
    count_reward,
    exact_reward,
    format_reward,
    get_reward,
    multi_span_iou,
    multi_tiou_reward,
    order_reward,
    parse_number,
    parse_span,
    parse_spans,
    tiou_reward,
    timestamp_reward,
)


def test_registry_names():
    assert set(REWARDS) == {"tiou", "multi_tiou", "timestamp", "count", "order", "exact", "format"}
    with pytest.raises(KeyError, match="unknown reward 'iou'"):
        get_reward("iou")


def test_parse_span_timelens_rule():
    assert parse_span("The event happens in 2.5 - 7 seconds") == (2.5, 7.0)
    assert parse_span("from 3 to 9.5 seconds") == (3.0, 9.5)
    assert parse_span("3s - 9s") == (3.0, 9.0)
    assert parse_span("3 \u2013 9") == (3.0, 9.0)  # en dash
    # only the first span counts; a reversed / zero-length first span fails, the second is not tried
    assert parse_span("8 - 4, or maybe 1 - 2") is None
    assert parse_span("5 - 5") is None
    assert parse_span("1 - 2 and 4 - 6") == (1.0, 2.0)
    assert parse_span("no numbers here") is None
    assert parse_span("") is None
    assert parse_span("at 4 seconds") is None
    assert parse_spans("1 - 2, 5 to 4, 6 - 8") == [(1.0, 2.0), (6.0, 8.0)]


def test_tiou_hand_values():
    # gt [2, 6]; pred [4, 8]: inter 2, union 6
    assert tiou_reward("4 - 8", [2, 6]) == pytest.approx(2 / 6, abs=1e-12)
    assert tiou_reward("<think>maybe 0 - 1</think><answer>2 to 6</answer>", [2, 6]) == 1.0  # answer block parsed
    assert tiou_reward("7 - 9", [2, 6]) == 0.0  # disjoint
    assert tiou_reward("6 - 2", [2, 6]) == 0.0  # reversed
    assert tiou_reward("3 - 3", [2, 6]) == 0.0  # zero-length
    assert tiou_reward("garbage <answer></answer>", [2, 6]) == 0.0  # empty answer
    assert tiou_reward("", [2, 6]) == 0.0
    # span past the video (duration 10), TimeLens' rule: the span as written; gt [6, 10]: inter 2, union 24
    assert tiou_reward("8 - 30", [6, 10], duration=10) == pytest.approx(2 / 24, abs=1e-12)
    assert tiou_reward("0 - 1000", [8, 10], duration=10) == pytest.approx(2 / 1000, abs=1e-12)  # no reward hack
    # opt-in clipping: [8, 30] -> [8, 10]: inter 2, union 4; a span wholly past the end is empty
    assert tiou_reward("8 - 30", [6, 10], duration=10, clip_to_duration=True) == pytest.approx(0.5, abs=1e-12)
    assert tiou_reward("12 - 30", [6, 10], duration=10, clip_to_duration=True) == 0.0
    assert tiou_reward("12 - 30", [6, 10], duration=10) == 0.0  # disjoint either way
    with pytest.raises(ValueError, match="duration must be"):
        tiou_reward("1 - 2", [0, 3], duration=float("nan"), clip_to_duration=True)
    with pytest.raises(ValueError, match="clip_to_duration must be true or false"):
        tiou_reward("1 - 2", [0, 3], duration=10, clip_to_duration="false")
    with pytest.raises(ValueError, match="no duration"):
        tiou_reward("1 - 2", [0, 3], clip_to_duration=True)
    with pytest.raises(ValueError, match="0 <= start < end"):
        tiou_reward("1 - 2", [5, 3])
    with pytest.raises(ValueError, match="two numbers"):
        tiou_reward("1 - 2", "five")


def test_multi_span_iou():
    # pred {[0, 2], [4, 6]}, gt {[1, 5]}: inter 1 + 1 = 2, union 6 - 0 = 6
    assert multi_span_iou([(0, 2), (4, 6)], [(1, 5)]) == pytest.approx(2 / 6, abs=1e-12)
    # overlapping predictions are merged first: {[0, 3], [2, 4]} = [0, 4]; gt [0, 4]
    assert multi_span_iou([(0, 3), (2, 4)], [(0, 4)]) == 1.0
    assert multi_span_iou([], [(0, 1)]) == 0.0
    assert multi_tiou_reward("<answer>0 - 2 and 4 - 6</answer>", [[1, 5]]) == pytest.approx(1 / 3, abs=1e-12)
    assert multi_tiou_reward("1 - 2 and 8 - 9", [[1, 2], [8, 9]]) == 1.0
    # reversed span dropped, the other kept: pred [1, 2]; gt {[1, 2], [8, 9]}: 1 / 2
    assert multi_tiou_reward("9 - 8, 1 - 2", [[1, 2], [8, 9]]) == pytest.approx(0.5, abs=1e-12)
    # past the video: as written [8, 20] vs {[8, 10]}: 2 / 12; clipped (opt-in) to [8, 10]: 1
    assert multi_tiou_reward("8 - 20", [[8, 10]], duration=10) == pytest.approx(2 / 12, abs=1e-12)
    assert multi_tiou_reward("8 - 20", [[8, 10]], duration=10, clip_to_duration=True) == 1.0
    assert multi_tiou_reward("none", [[1, 2]]) == 0.0
    with pytest.raises(ValueError, match="non-empty list"):
        multi_tiou_reward("1 - 2", [])


def test_timestamp_reward():
    # tau = max(1, 2 / fps) = 2 at fps 1: |4.5 - 4| / 2 = 0.25 -> 0.75
    assert timestamp_reward("At 4.5 seconds.", 4.0, fps=1.0) == pytest.approx(0.75, abs=1e-12)
    assert timestamp_reward("4.5", 4.0, fps=4.0) == pytest.approx(0.5, abs=1e-12)  # tau 1
    assert timestamp_reward("9", 4.0) == 0.0  # clamped at 0
    assert timestamp_reward("<answer>never</answer>", 4.0) == 0.0
    with pytest.raises(ValueError, match="fps must be > 0"):
        timestamp_reward("1", 1.0, fps=0)
    with pytest.raises(ValueError, match="finite time"):
        timestamp_reward("1", float("nan"))
    for bad in (None, [1.0]):
        with pytest.raises(ValueError, match="timestamp solution must be a time"):
            timestamp_reward("1", bad)
    with pytest.raises(ValueError, match="count solution must be finite"):
        count_reward("3", float("nan"))


def test_count_reward():
    assert parse_number("There are three cats and 4 dogs") == 3.0
    assert count_reward("<answer>3</answer>", 3) == 1.0
    assert count_reward("3.0 times", 3) == 1.0
    assert count_reward("three", 3) == 1.0
    assert count_reward("4", 3) == 0.0
    assert count_reward("", 3) == 0.0
    assert count_reward("-3", 3) == 0.0
    with pytest.raises(ValueError, match="must be a number"):
        count_reward("3", "many")


def test_order_reward():
    events = ["cat", "coffee", "page"]
    assert order_reward("<answer>cat, then coffee, then page</answer>", events) == 1.0
    assert order_reward("Cat > COFFEE > page", events) == 1.0
    assert order_reward("coffee, cat, page", events) == 0.0
    assert order_reward("cat, coffee", events) == 0.0  # one missing
    assert order_reward("cats, coffee, page", events) == 0.0  # whole words only
    assert order_reward("", events) == 0.0
    with pytest.raises(ValueError, match="distinct event names"):
        order_reward("a b", ["cat", "Cat"])


def test_exact_and_format():
    assert exact_reward("<answer> Velvet-Owl. </answer>", "velvet-owl") == 1.0
    assert exact_reward("velvet owl", "velvet-owl") == 0.0
    with pytest.raises(ValueError, match="non-empty string"):
        exact_reward("x", "")
    assert format_reward("<think>a</think>\n<answer>b</answer>") == 1.0
    assert format_reward("  <think>a\nb</think><answer></answer> ") == 1.0
    assert format_reward("<answer>b</answer>") == 0.0
    assert format_reward("<think>a</think><answer>b</answer> trailing") == 0.0
    assert format_reward(None) == 0.0


def test_weighted_and_compute_rewards():
    w = WeightedReward({"tiou": 0.9, "format": 0.1})
    total, parts = w("<think>x</think><answer>4 - 8</answer>", [2, 6])
    assert parts == {"tiou": pytest.approx(1 / 3, abs=1e-12), "format": 1.0}
    assert total == pytest.approx(0.9 / 3 + 0.1, abs=1e-12)
    with pytest.raises(ValueError, match="finite"):
        WeightedReward({"tiou": float("inf")})
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward({})
    total, parts = compute_rewards("8 - 30", {"task": "grounding", "solution": [6, 10], "duration": 10})
    assert (total, parts) == (pytest.approx(2 / 24), {"tiou": pytest.approx(2 / 24)})  # TimeLens: not clipped
    total, parts = compute_rewards("8 - 30", {"task": "grounding", "solution": [6, 10], "duration": 10,
                                              "clip_to_duration": True})
    assert (total, parts) == (0.5, {"tiou": 0.5})
    total, parts = compute_rewards("2", {"task": "count", "solution": 2, "reward_weights": {"count": 2.0}})
    assert total == 2.0
    with pytest.raises(KeyError, match="unknown task"):
        compute_rewards("2", {"task": "dance", "solution": 2})
