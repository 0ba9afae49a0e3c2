"""Verifiable rewards for GSPO Video-RL and Context-RL: parsers, reward functions and their registry.

Every reward maps ``(completion: str, solution) -> float`` in ``[0, 1]`` and never raises on malformed model
output (a parse failure is reward 0); a malformed *solution* (the task file's ground truth) raises ``ValueError``.
Times are seconds (floats).

Definitions (sources):

- ``tiou`` -- temporal IoU for grounding, TimeLens' rule (TencentARC/TimeLens, training reward = tIoU only):
  the first ``"s - e"`` span in the answer (``"s to e"`` is normalised to ``"s - e"``; seconds, optional ``s``
  suffix); 0 on a parse failure or ``s >= e``; ``IoU(A, B) = max(min(e_A, e_B) - max(s_A, s_B), 0) /
  (max(e_A, e_B) - min(s_A, s_B))`` of the span as written (TimeLens does not clip it: an over-long span such as
  "0 - 1000" scores about 0, not the ground truth's share of the video). Clipping the span to ``[0, duration]``
  first is an opt-in (``clip_to_duration=True``; a span wholly past the video then becomes empty, reward 0).
- ``multi_tiou`` -- several spans: IoU of the unions, ``|U(P) ∩ U(G)| / |U(P) ∪ U(G)|`` (1-D measure), every
  parsed ``s - e`` span counted (spans with ``s >= e`` are ignored; none left -> 0).
- ``timestamp`` -- one time: ``max(0, 1 - |t_pred - t_gt| / tau)``, ``tau = max(1 s, 2 / fps)`` by default.
- ``count`` -- exact count (Video-R1: 1 iff ``round(gt, 2) == round(pred, 2)``); the first number of the answer.
- ``order`` -- exact order of named events: the events are ranked by the position of their first mention in the
  answer (case-insensitive, whole words); 1 iff every event is named and the ranking equals the ground truth.
- ``exact`` -- normalised exact match (case, surrounding whitespace and punctuation ignored), for Context-RL keys.
- ``format`` -- ``<think>...</think><answer>...</answer>`` (whitespace allowed around and between), the
  TVG-R1 / Video-R1 format check; 1 or 0.
- :class:`WeightedReward` -- a weighted sum, e.g. TVG-R1's ``0.9 * tiou + 0.1 * format``.

The answer text: when the completion has an ``<answer>...</answer>`` block its content is parsed (the last block),
else the whole completion (TimeLens parses the whole text; with think tags this avoids spans quoted in the
reasoning).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "REWARDS",
    "WeightedReward",
    "answer_text",
    "compute_rewards",
    "count_reward",
    "exact_reward",
    "format_reward",
    "get_reward",
    "multi_span_iou",
    "multi_tiou_reward",
    "order_reward",
    "parse_number",
    "parse_span",
    "parse_spans",
    "span_iou",
    "tiou_reward",
    "timestamp_reward",
]

_NUM = r"(\d+(?:\.\d+)?)"
_SPAN_RE = re.compile(_NUM + r"\s*(?:s|sec|secs|seconds?)?\s*-\s*" + _NUM)
_TO_RE = re.compile(r"\s+to\s+", re.IGNORECASE)
_DASHES = re.compile("[\u2012\u2013\u2014\u2212]")  # figure dash, en dash, em dash, minus sign -> "-"
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}


def answer_text(completion: str) -> str:
    """The text to parse: the content of the last ``<answer>...</answer>`` block, else the whole completion."""
    if not isinstance(completion, str):
        return ""
    blocks = _ANSWER_RE.findall(completion)
    return blocks[-1] if blocks else completion


def _normalise_span_text(text: str) -> str:
    return _TO_RE.sub(" - ", _DASHES.sub("-", text))


def parse_span(text: str) -> tuple[float, float] | None:
    """The first ``"s - e"`` / ``"s to e"`` span of ``text`` in seconds, or ``None`` (no span, or ``s >= e``).

    TimeLens' rule: only the first span counts; a reversed or zero-length first span is a failure (``None``), it is
    not swapped and the next span is not tried.
    """
    m = _SPAN_RE.search(_normalise_span_text(text or ""))
    if m is None:
        return None
    s, e = float(m.group(1)), float(m.group(2))
    if not (math.isfinite(s) and math.isfinite(e)) or s >= e:
        return None
    return s, e


def parse_spans(text: str) -> list[tuple[float, float]]:
    """Every ``"s - e"`` span of ``text`` with ``s < e``, in order of appearance (seconds)."""
    out = []
    for m in _SPAN_RE.finditer(_normalise_span_text(text or "")):
        s, e = float(m.group(1)), float(m.group(2))
        if math.isfinite(s) and math.isfinite(e) and s < e:
            out.append((s, e))
    return out


def parse_number(text: str) -> float | None:
    """The first number of ``text`` (digits, optionally signed / decimal; or a number word zero..twelve), or None."""
    text = text or ""
    m = _NUMBER_RE.search(text)
    w = re.search(r"\b(" + "|".join(_WORDS) + r")\b", text, re.IGNORECASE)
    if m is None and w is None:
        return None
    if w is not None and (m is None or w.start() < m.start()):
        return float(_WORDS[w.group(1).lower()])
    value = float(m.group(0))
    return value if math.isfinite(value) else None


def _check_span(span: Any, name: str = "solution span") -> tuple[float, float]:
    try:
        s, e = (float(x) for x in span)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be two numbers [start, end] in seconds, got {span!r}") from err
    if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or s >= e:
        raise ValueError(f"{name} must satisfy 0 <= start < end (seconds), got {span!r}")
    return s, e


def span_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two spans ``(start, end)`` with ``start < end``:
    ``max(min(e_a, e_b) - max(s_a, s_b), 0) / (max(e_a, e_b) - min(s_a, s_b))``."""
    inter = max(min(a[1], b[1]) - max(a[0], b[0]), 0.0)
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def _union(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _measure(spans: Sequence[tuple[float, float]]) -> float:
    return sum(e - s for s, e in spans)


def multi_span_iou(pred: Sequence[tuple[float, float]], gt: Sequence[tuple[float, float]]) -> float:
    """``|U(pred) ∩ U(gt)| / |U(pred) ∪ U(gt)|`` for two lists of spans (each ``start < end``); 0 when either is
    empty."""
    if not pred or not gt:
        return 0.0
    p, g = _union(pred), _union(gt)
    inter, i, j = 0.0, 0, 0
    while i < len(p) and j < len(g):
        inter += max(min(p[i][1], g[j][1]) - max(p[i][0], g[j][0]), 0.0)
        if p[i][1] < g[j][1]:
            i += 1
        else:
            j += 1
    union = _measure(p) + _measure(g) - inter
    return inter / union if union > 0 else 0.0


def _clip_duration(duration, clip_to_duration) -> float | None:
    """The duration to clip to (None: no clipping). Raises ValueError for a non-bool flag (a JSON "false" string
    would read as true) or clipping asked without a duration."""
    if not isinstance(clip_to_duration, bool):
        raise ValueError(f"clip_to_duration must be true or false, got {clip_to_duration!r}")
    if clip_to_duration and duration is None:
        raise ValueError("clip_to_duration is set but the task has no duration")
    return duration if clip_to_duration else None


def _clip(span: tuple[float, float], duration: float | None) -> tuple[float, float] | None:
    if duration is None:
        return span
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a finite number of seconds > 0, got {duration!r}")
    s, e = max(span[0], 0.0), min(span[1], float(duration))
    return (s, e) if s < e else None


def tiou_reward(completion: str, solution: Any, duration: float | None = None, clip_to_duration: bool = False,
                **_: Any) -> float:
    """Temporal-grounding reward (TimeLens): tIoU of the first predicted span with ``solution = [start, end]``.

    Args:
        completion: the model's text. solution: the ground-truth span in seconds. duration: the video's length in
            seconds; used only with ``clip_to_duration=True`` (not TimeLens' rule: the span is clipped to
            ``[0, duration]`` first).
    Returns: float in [0, 1]; 0 when no span parses or the first span has ``s >= e``.
    Raises: ValueError for a malformed ``solution``.
    """
    gt = _check_span(solution)
    pred = parse_span(answer_text(completion))
    if pred is None:
        return 0.0
    pred = _clip(pred, _clip_duration(duration, clip_to_duration))
    return 0.0 if pred is None else span_iou(pred, gt)


def multi_tiou_reward(completion: str, solution: Any, duration: float | None = None, clip_to_duration: bool = False,
                      **_: Any) -> float:
    """Multi-span grounding reward: IoU of the union of every parsed span with the union of ``solution`` (a list of
    ``[start, end]``). Spans with ``s >= e`` are ignored; with ``clip_to_duration=True`` predicted spans are clipped
    to ``[0, duration]`` first.

    Raises: ValueError for a malformed or empty ``solution``.
    """
    if not isinstance(solution, (list, tuple)) or not solution:
        raise ValueError(f"multi-span solution must be a non-empty list of [start, end], got {solution!r}")
    gt = [_check_span(s) for s in solution]
    dur = _clip_duration(duration, clip_to_duration)
    pred = [c for c in (_clip(s, dur) for s in parse_spans(answer_text(completion))) if c is not None]
    return multi_span_iou(pred, gt)


def timestamp_reward(completion: str, solution: Any, fps: float | None = None, tau: float | None = None,
                     **_: Any) -> float:
    """One-timestamp reward ``max(0, 1 - |t_pred - t_gt| / tau)``; ``tau`` defaults to ``max(1 s, 2 / fps)`` (1 s
    when ``fps`` is unknown). The prediction is the first number of the answer (seconds).

    Raises: ValueError for a non-finite / negative ``solution`` or a non-positive ``tau`` / ``fps``.
    """
    try:
        t_gt = float(solution)
    except (TypeError, ValueError) as err:
        raise ValueError(f"timestamp solution must be a time in seconds, got {solution!r}") from err
    if not math.isfinite(t_gt) or t_gt < 0:
        raise ValueError(f"timestamp solution must be a finite time >= 0 in seconds, got {solution!r}")
    if fps is not None and not float(fps) > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if tau is None:
        tau = max(1.0, 2.0 / float(fps)) if fps else 1.0
    if not float(tau) > 0:
        raise ValueError(f"tau must be > 0 seconds, got {tau!r}")
    t = parse_number(answer_text(completion))
    if t is None:
        return 0.0
    return max(0.0, 1.0 - abs(t - t_gt) / float(tau))


def count_reward(completion: str, solution: Any, **_: Any) -> float:
    """Counting reward (Video-R1's rule): 1 iff ``round(pred, 2) == round(gt, 2)``, the prediction being the first
    number of the answer (digits or a number word up to twelve); 0 otherwise.

    Raises: ValueError for a non-numeric ``solution``.
    """
    try:
        gt = float(solution)
    except (TypeError, ValueError) as err:
        raise ValueError(f"count solution must be a number, got {solution!r}") from err
    if not math.isfinite(gt):
        raise ValueError(f"count solution must be finite, got {solution!r}")
    pred = parse_number(answer_text(completion))
    return 1.0 if pred is not None and round(pred, 2) == round(gt, 2) else 0.0


def order_reward(completion: str, solution: Any, **_: Any) -> float:
    """Ordering reward: 1 iff every event name of ``solution`` (a list of names, in the true order) is mentioned in
    the answer and their first mentions come in that order (case-insensitive, whole-word match); else 0.

    Raises: ValueError when ``solution`` is not a list of >= 2 distinct non-empty names.
    """
    if (not isinstance(solution, (list, tuple)) or len(solution) < 2
            or not all(isinstance(s, str) and s.strip() for s in solution)
            or len({s.strip().lower() for s in solution}) != len(solution)):
        raise ValueError(f"order solution must be a list of >= 2 distinct event names, got {solution!r}")
    text = answer_text(completion)
    positions = []
    for name in solution:
        m = re.search(r"(?<!\w)" + re.escape(name.strip()) + r"(?!\w)", text, re.IGNORECASE)
        if m is None:
            return 0.0
        positions.append(m.start())
    return 1.0 if all(a < b for a, b in zip(positions, positions[1:])) else 0.0


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".,;:!?\"'`").strip()).lower()


def exact_reward(completion: str, solution: Any, **_: Any) -> float:
    """Exact match after normalisation (lower case, collapsed whitespace, surrounding punctuation stripped); 1 or 0.

    Raises: ValueError for an empty ``solution``.
    """
    if not isinstance(solution, str) or not solution.strip():
        raise ValueError(f"exact-match solution must be a non-empty string, got {solution!r}")
    return 1.0 if _norm(answer_text(completion)) == _norm(solution) else 0.0


def format_reward(completion: str, solution: Any = None, **_: Any) -> float:
    """1 iff the completion is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else (whitespace
    allowed), the think / answer format of TVG-R1 and Video-R1; else 0."""
    return 1.0 if isinstance(completion, str) and _FORMAT_RE.fullmatch(completion) else 0.0


REWARDS: dict[str, Callable[..., float]] = {
    "tiou": tiou_reward,
    "multi_tiou": multi_tiou_reward,
    "timestamp": timestamp_reward,
    "count": count_reward,
    "order": order_reward,
    "exact": exact_reward,
    "format": format_reward,
}


def get_reward(name: str) -> Callable[..., float]:
    """The registered reward ``name`` (see :data:`REWARDS`); ``KeyError`` naming the known ones otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REWARDS)}") from None


class WeightedReward:
    """``sum_k w_k * reward_k(completion, solution, **meta)`` over registered rewards.

    Args:
        weights: ``{reward name: weight}`` (finite weights; at least one).
    Call: ``(completion, solution, **meta) -> (total, {name: value})``.
    Raises: KeyError (unknown name), ValueError (empty or non-finite weights).
    """

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise ValueError("WeightedReward needs at least one reward")
        self.weights = {}
        for name, w in weights.items():
            get_reward(name)
            if not math.isfinite(float(w)):
                raise ValueError(f"reward weight for {name!r} must be finite, got {w!r}")
            self.weights[name] = float(w)

    def __call__(self, completion: str, solution: Any, **meta: Any) -> tuple[float, dict[str, float]]:
        parts = {name: float(REWARDS[name](completion, solution, **meta)) for name in self.weights}
        return sum(self.weights[n] * parts[n] for n in self.weights), parts


# Default reward of each task type of the task files (examples/make_rl_tasks.py).
DEFAULT_WEIGHTS = {
    "grounding": {"tiou": 1.0},
    "multi_grounding": {"multi_tiou": 1.0},
    "timestamp": {"timestamp": 1.0},
    "count": {"count": 1.0},
    "order": {"order": 1.0},
    "exact": {"exact": 1.0},
}


def compute_rewards(completion: str, sample: Mapping[str, Any],
                    weights: Mapping[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """Reward of one completion for one task-file sample.

    ``sample`` has ``task`` (a key of :data:`DEFAULT_WEIGHTS`), ``solution`` and optionally ``reward_weights``
    (overrides the task default), ``duration`` / ``fps`` (seconds, frames per second) and ``clip_to_duration``
    (grounding spans clipped to the video first; off by default, as TimeLens). ``weights`` overrides both.
    Returns ``(total, {reward name: value})``. Raises: KeyError / ValueError as :class:`WeightedReward` and the
    reward functions, and for a sample without ``task`` / ``solution``.
    """
    if "solution" not in sample:
        raise KeyError("task sample has no 'solution'")
    if weights is None:
        weights = sample.get("reward_weights")
    if weights is None:
        task = sample.get("task")
        if task not in DEFAULT_WEIGHTS:
            raise KeyError(f"task sample has unknown task {task!r}; known: {sorted(DEFAULT_WEIGHTS)}")
        weights = DEFAULT_WEIGHTS[task]
    meta = {k: sample[k] for k in ("duration", "fps", "clip_to_duration") if sample.get(k) is not None}
    return WeightedReward(weights)(completion, sample["solution"], **meta)
