# Copyright 2025 The keye-vl authors. Licensed under the Apache License, Version 2.0.
"""Keye-VL-2.0 vision input rules and media reading (images, videos, qwen-vl-utils style messages).

This file holds the *rules* of docs/keye_vl2.md section 7 ("Processor") as plain functions, plus the readers that
turn paths, URIs, PIL images and frame lists into the uint8 tensors the processors consume:

- :func:`smart_resize`            the Qwen/Keye resize rule (multiples of 28, pixel bounds, aspect <= 200).
- :func:`smart_nframes`           how many frames a video gets (Keye-VL-2.0, all frames "slow").
- :func:`sample_frame_indices`    ``round(linspace(0, n - 1, k))`` with round-half-to-even.
- :func:`tokens_per_frame_cap`    the binary search of the authors' server = ``clamp(floor(B / k) + 1, 64, 256)``.
- :func:`video_budget_pixels`     the token budget (optionally duration-adaptive, divided among videos).
- :class:`VideoSampling`          the typed, validated video options (fps or nframes, frame caps, pixel bounds,
  budget, resized size, window); message items and keyword arguments are turned into one, unknown keys refused.
- :func:`plan_video`              the only home of the frame-count and frame-size rules: indices, timestamps,
  frame size, tokens for one video (files, frame lists and already-sampled arrays alike).
- :func:`probe_video` / :func:`read_video`  PyAV readers: one definition of frame count, rate and duration, then
  decode *streaming* and keep only the sampled frames (index ``i`` = the frame on screen at ``i / fps``), each
  resized to the shared frame size as soon as it is decoded; long videos skip the groups of pictures that hold no
  sampled frame by seeking to keyframes (:func:`decode_frames`).

A video of a single frame (a still image given as a video) stays one frame: the rule's minimum of two frames is
capped by the frames available (``min(max(n, 2), total_frames)``), as in the authors' code; nothing is repeated.
- :func:`process_vision_info`     the qwen-vl-utils / keye-vl-utils entry point: messages -> (images, videos,
  video_kwargs).

Source of every rule: ``docs/keye_vl2.md`` section 7, which transcribes the authors' server code
(``Kwai-Keye/sglang`` branch ``keye-vl-v2-30b-release``, ``multimodal/processors/keye_adaptive_video.py``:
``smart_resize``, ``smart_nframes``, ``get_video_total_pixels_by_duration``, ``fetch_video``).
Deviations from that code, all deliberate and documented where they occur:

- frames are decoded with PyAV (the authors use torchcodec/decord/torchvision), streaming, never the whole video;
- ``linspace`` is evaluated in float64 (the authors: float32) - identical except at float32 near-ties;
- decoded frames are resized once (bilinear, antialias, like the authors) and stored as uint8 (the authors keep
  float32): at most 0.5/255 difference per pixel before normalisation;
- with several videos in one conversation the budget is divided among the videos of *that conversation* (the
  authors divide among all videos of one ``process_vision_info`` call).

Only stdlib, numpy, torch and PIL are imported at module level; PyAV is imported inside functions, so this file
can be copied flat into a Hub folder and imported without PyAV installed.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import math
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Constants (docs/keye_vl2.md section 7; S1 keye_adaptive_video.py). Pixels are counted in the resized frame; one
# visual token (after the projector's 2x2 merge) covers IMAGE_FACTOR x IMAGE_FACTOR = 28 x 28 = 784 pixels.
# ----------------------------------------------------------------------------------------------------------------------
PATCH_SIZE = 14  # ViT patch (pixels)
MERGE_SIZE = 2  # projector merges 2x2 patches into one LLM token
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: frame sides are multiples of this
PIXELS_PER_TOKEN = IMAGE_FACTOR * IMAGE_FACTOR  # 784

IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 20480
IMAGE_MIN_PIXELS = IMAGE_MIN_TOKENS * PIXELS_PER_TOKEN  # 3,136
IMAGE_MAX_PIXELS = IMAGE_MAX_TOKENS * PIXELS_PER_TOKEN  # 16,056,320
MAX_RATIO = 200  # max(h, w) / min(h, w)

VIDEO_MIN_TOKENS = 64  # per frame
VIDEO_MAX_TOKENS = 256  # per frame
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * PIXELS_PER_TOKEN  # 50,176
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * PIXELS_PER_TOKEN  # 200,704
VIDEO_TOTAL_TOKENS = 184320  # per video (whole budget of one request)
VIDEO_TOTAL_PIXELS = VIDEO_TOTAL_TOKENS * PIXELS_PER_TOKEN  # 144,506,880
VIDEO_FPS = 2.0  # default sampling rate (frames per second), never above the video's own fps
VIDEO_MIN_FRAMES = 2

# Duration-adaptive budget (off by default; single video only). (max duration in seconds, budget factor), from
# S1 `get_video_total_pixels_by_duration`; longer videos keep the full budget. The paper states 256 s 0.125x,
# 512 s 0.25x, 1024 s 0.5x, 2048 s 1.0x; the code's values are used.
ADAPTIVE_BUDGET_STEPS = ((259.0, 0.09), (518.0, 0.18), (1036.0, 0.36), (2016.0, 0.7))

# Keyframe seeking (decode_frames): used by default only when the last requested frame is at least this far into
# the video; shorter clips are decoded sequentially (cheap and exact for any file). KEYE_VIDEO_SEEK=0/1 forces it.
SEEK_MIN_FRAMES = 1500
_SEEK_ENV = os.environ.get("KEYE_VIDEO_SEEK", "").strip().lower()
_SEEK_DEFAULT = None if _SEEK_ENV in ("", "auto") else _SEEK_ENV in ("1", "true", "yes")

# Wall-clock limit for reading one video (seconds); the decode loops check it between packets.
DEFAULT_VIDEO_READ_TIMEOUT = float(os.environ.get("KEYE_VIDEO_READ_TIMEOUT", "600"))



class VideoReadError(RuntimeError):
    """Raised when a video file cannot be opened or yields no decodable frame (the message names the file)."""


# ----------------------------------------------------------------------------------------------------------------------
# Resize rule
# ----------------------------------------------------------------------------------------------------------------------
def round_by_factor(number: float, factor: int) -> int:
    """Closest multiple of ``factor`` to ``number`` (Python ``round``: half to even)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    """Smallest multiple of ``factor`` that is >= ``number``."""
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    """Largest multiple of ``factor`` that is <= ``number``."""
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width) of an image or video frame (docs/keye_vl2.md section 7, the Qwen rule; S1
    ``smart_resize``).

    1. round each side to the nearest multiple of ``factor`` (at least ``factor``);
    2. if the area is above ``max_pixels``: scale both sides by ``sqrt(h*w / max_pixels)`` and *floor* to multiples;
    3. elif the area is below ``min_pixels``: scale up by ``sqrt(min_pixels / (h*w))`` and *ceil* to multiples.

    Args:
        height, width: input size in pixels (> 0).
        factor: side multiple, 28 = patch 14 x merge 2.
        min_pixels, max_pixels: area bounds in pixels (4 and 20480 tokens of 784 pixels for images).

    Returns:
        ``(resized_height, resized_width)``, both multiples of ``factor``.

    Raises:
        ValueError: a side is not positive, or ``max(h, w) / min(h, w) > 200``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image/frame size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be at most {MAX_RATIO} (Keye-VL processor rule), got {ratio:.1f} for an "
            f"image of height {height} and width {width}; crop or pad it first"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return max(h_bar, factor), max(w_bar, factor)


# ----------------------------------------------------------------------------------------------------------------------
# Video sampling rules
# ----------------------------------------------------------------------------------------------------------------------
def video_budget_pixels(
    duration: float | None = None,
    num_videos: int = 1,
    total_pixels: float | None = None,
    adaptive: bool = False,
) -> float:
    """Pixel budget of one video (docs/keye_vl2.md section 7; S1 ``get_video_total_pixels_by_duration``).

    ``base = total_pixels / num_videos`` (default total: 184,320 tokens x 784 pixels). With ``adaptive=True`` and a
    single video, the budget is scaled by 0.09 (<= 259 s), 0.18 (<= 518 s), 0.36 (<= 1036 s), 0.7 (<= 2016 s).

    Args:
        duration: video length in seconds (``total_frames / fps``); only used when ``adaptive``.
        num_videos: videos sharing the budget (>= 1).
        total_pixels: budget in pixels before division (``None``: 184,320 x 784).
        adaptive: enable the duration-adaptive factors.

    Returns:
        The budget in pixels (a float, as in the authors' code; divide by 784 for tokens).
    """
    total = float(VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels)
    base = total / max(int(num_videos), 1)
    if adaptive and num_videos == 1 and duration is not None:
        for limit, factor in ADAPTIVE_BUDGET_STEPS:
            if duration <= limit:
                return factor * base
    return base


def smart_nframes(
    total_frames: int,
    video_fps: float,
    fps: float | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> int:
    """Number of frames sampled from a video (docs/keye_vl2.md section 7; S1 ``smart_nframes``).

    ``nframes = min(max(int(total_frames / video_fps * min(fps, video_fps)), min_frames),
    min(max_frames, floor(total_pixels / (64 * 784)), total_frames))``; with the default budget the cap from the
    budget is 2,880 frames.

    Args:
        total_frames: frames in the (selected range of the) video.
        video_fps: the video's average frame rate (frames per second).
        fps: sampling rate (default 2.0); the video's own rate if that is lower.
        min_frames: lower bound (default 2).
        max_frames: optional user cap.
        total_pixels: the video's pixel budget (see :func:`video_budget_pixels`).

    Returns:
        The number of frames, ``1 <= nframes <= total_frames``.

    Raises:
        ValueError: ``total_frames < 1``, ``video_fps <= 0`` or ``fps <= 0``.
    """
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got total_frames={total_frames}")
    if not video_fps or video_fps <= 0:
        raise ValueError(f"video fps must be positive, got {video_fps}")
    if fps is not None and not float(fps) > 0:
        raise ValueError(f"the sampling fps must be positive (frames per second to take), got {fps}")
    sample_fps = min(VIDEO_FPS if fps is None else float(fps), float(video_fps))
    max_frames_by_pixels = max(1, math.floor(total_pixels / VIDEO_MIN_PIXELS))
    cap = min(max_frames_by_pixels if max_frames is None else int(max_frames), max_frames_by_pixels, total_frames)
    fps_nframes = int(total_frames / video_fps * sample_fps)
    return max(1, min(max(fps_nframes, int(min_frames)), cap))


def sample_frame_indices(total_frames: int, nframes: int, start: int = 0) -> list[int]:
    """``start + round(linspace(0, total_frames - 1, nframes))``, rounding half to even (docs/keye_vl2.md section 7).

    Evaluated in float64 (the authors' ``torch.linspace`` is float32; results differ only at float32 near-ties).
    """
    if nframes < 1:
        raise ValueError(f"nframes must be >= 1, got {nframes}")
    if nframes == 1:
        return [start]
    values = torch.linspace(0, total_frames - 1, nframes, dtype=torch.float64).round().long()
    return [start + int(v) for v in values.tolist()]


def tokens_per_frame_cap(
    nframes: int,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> int:
    """Per-frame token cap T (docs/keye_vl2.md section 7; the binary search in S1 ``fetch_video``).

    The search returns the smallest ``t`` in ``[lo, hi]`` with ``nframes * t * 784 > total_pixels`` (``hi`` if none),
    where ``lo = max(min_pixels, 64*784) // 784`` and ``hi = max_pixels // 784`` (at least ``lo``). With the default
    bounds this equals ``clamp(floor(budget_tokens / nframes) + 1, 64, 256)``; the frame area is then capped at
    ``T * 784`` pixels, so the per-video total can exceed the budget by at most ``nframes`` tokens
    (docs/keye_vl2.md section 7).
    """
    left = int(max(int(min_pixels), VIDEO_MIN_PIXELS) / PIXELS_PER_TOKEN)
    right = int(int(max_pixels) / PIXELS_PER_TOKEN)
    left = max(left, 1)
    right = max(right, left)
    while left < right:
        mid = (left + right) // 2
        if nframes * mid * PIXELS_PER_TOKEN > total_pixels:
            right = mid
        else:
            left = mid + 1
    return left


def frame_timestamps(indices: Sequence[int], fps: float) -> list[float]:
    """Timestamps in seconds of frame ``indices`` at ``fps``: ``index / fps`` computed in float32, as the authors'
    torch code does (``indices.float() / video_fps``), so that ``f"{ts:.1f}"`` prints the same text (for example
    frame 21 at 20 fps is 1.0499999523 s and prints ``1.0``)."""
    if not len(indices):
        return []
    return [float(v) for v in (torch.tensor(list(indices), dtype=torch.float32) / float(fps)).tolist()]


def frame_range(
    total_frames: int, video_fps: float, video_start: float | None = None, video_end: float | None = None
) -> tuple[int, int]:
    """First and last frame index of the optional ``[video_start, video_end]`` window in seconds.

    Same rule as qwen-vl-utils / S1 ``calculate_video_frame_range``: ``start = ceil(video_start * fps)``,
    ``end = min(floor(video_end * fps), total_frames - 1)``, both clamped to the video.

    Raises:
        ValueError: the window is empty.
    """
    if video_start is None and video_end is None:
        return 0, total_frames - 1
    max_duration = total_frames / video_fps
    start = 0
    if video_start is not None:
        start = math.ceil(max(0.0, min(float(video_start), max_duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(float(video_end), max_duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(
            f"invalid video window: start frame {start} >= end frame {end} (video_start={video_start}, "
            f"video_end={video_end}; the video lasts {max_duration:.2f} s, {total_frames} frames at {video_fps:g} fps)"
        )
    return start, end


@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How one video is sampled and sized (Keye-VL-2.0 rules, sources in the module docstring); immutable, validated.

    Fields (all optional; defaults are the model's):

    - ``fps`` (float, 2.0): frames per second to take, never above the video's own rate.
    - ``nframes`` (int, None): take exactly this many frames instead of the ``fps`` rule (qwen-vl-utils key);
      must be <= the frames in the (windowed) video.
    - ``min_frames`` (int, 2), ``max_frames`` (int, None): bounds of the ``fps`` rule, ``max_frames`` winning
      where they cross (``max_frames=1`` gives one frame with the default ``min_frames``); the budget also caps
      the count at ``floor(budget / (64 * 784))`` frames (2,880 by default).
    - ``min_pixels`` (int, 64 x 784), ``max_pixels`` (int, 256 x 784): per-frame area bounds in pixels (the
      minimum is never below 64 tokens).
    - ``total_pixels`` (float, 184,320 x 784): the per-request budget in pixels, divided among the videos of one
      conversation.
    - ``adaptive_budget`` (bool, False): duration-adaptive budget (0.09x up to 259 s ... 0.7x up to 2016 s; single
      video only).
    - ``resized_height``, ``resized_width`` (int, None): fixed frame size (qwen-vl-utils key; both or neither),
      rounded to multiples of 28 by :func:`smart_resize` with the image bounds, replacing the budget's size rule.
    - ``video_start``, ``video_end`` (float seconds, None): window of the video to sample (qwen-vl-utils keys).

    Build from a message item or keyword arguments with :meth:`from_mapping`, which rejects unknown keys by name.

    Raises:
        ValueError: a value out of range (non-positive fps / counts / pixels, only one of resized_height /
        resized_width, ``video_start >= video_end``).
    """

    fps: float = VIDEO_FPS
    nframes: int | None = None
    min_frames: int = VIDEO_MIN_FRAMES
    max_frames: int | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: float = VIDEO_TOTAL_PIXELS
    adaptive_budget: bool = False
    resized_height: int | None = None
    resized_width: int | None = None
    video_start: float | None = None
    video_end: float | None = None

    def __post_init__(self) -> None:
        def positive(name, value, kind=float):
            if value is None:
                return
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"video option {name} must be a number, got {value!r}") from None
            if not number > 0 or math.isinf(number):
                what = "the sampling fps must be positive (frames per second to take)" if name == "fps" else (
                    f"video option {name} must be positive")
                raise ValueError(f"{what}, got {value!r}")
            if kind is int and number != int(number):
                raise ValueError(f"video option {name} must be a whole number, got {value!r}")
            object.__setattr__(self, name, kind(number))

        if self.fps is None:
            object.__setattr__(self, "fps", VIDEO_FPS)
        positive("fps", self.fps)
        for name in ("nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "resized_height",
                     "resized_width"):
            positive(name, getattr(self, name), int)
        positive("total_pixels", self.total_pixels)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"video option min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels}); "
                             "lower min_pixels together with max_pixels")
        object.__setattr__(self, "adaptive_budget", bool(self.adaptive_budget))
        if (self.resized_height is None) != (self.resized_width is None):
            raise ValueError(
                f"give both resized_height and resized_width or neither (got resized_height={self.resized_height}, "
                f"resized_width={self.resized_width})"
            )
        for name in ("video_start", "video_end"):
            value = getattr(self, name)
            if value is not None:
                if not float(value) >= 0 or math.isinf(float(value)):
                    raise ValueError(f"video option {name} must be a time in seconds >= 0, got {value!r}")
                object.__setattr__(self, name, float(value))
        if self.video_start is not None and self.video_end is not None and self.video_start >= self.video_end:
            raise ValueError(f"video_start ({self.video_start} s) must be before video_end ({self.video_end} s)")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option names (the keys :meth:`from_mapping` accepts besides the aliases)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(
        cls, options: dict[str, Any], base: "VideoSampling | None" = None, ignore: Sequence[str] = (), where: str = ""
    ) -> "VideoSampling":
        """``base`` (default: the model's defaults) with the non-``None`` entries of ``options`` replaced.

        Accepts the field names and the alias ``video_total_pixels`` (= ``total_pixels``, keye-vl-utils); keys in
        ``ignore`` are skipped. ``fps`` and ``nframes`` together are refused (as in qwen-vl-utils).

        Raises:
            ValueError: an unknown key (the message names it, ``where`` it was found, and the closest known key).
        """
        base = base if base is not None else cls()
        names = set(cls.field_names())
        changes: dict[str, Any] = {}
        for key, value in options.items():
            if key in ignore:
                continue
            target = "total_pixels" if key == "video_total_pixels" else key
            if target not in names:
                known = names | set(ignore) | {"video_total_pixels"}
                raise ValueError(_unknown_key_message(key, known, where or "video options"))
            if value is not None:
                changes[target] = value
        if options.get("fps") is not None and options.get("nframes") is not None:
            raise ValueError(f"give either fps or nframes for a video, not both (got fps={options['fps']}, "
                             f"nframes={options['nframes']}){' in ' + where if where else ''}")
        if "fps" in changes:
            changes.setdefault("nframes", None)
        return dataclasses.replace(base, **changes) if changes else base


def _unknown_key_message(key: str, known: set[str], where: str) -> str:
    import difflib

    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {key!r} in {where}{hint} (known keys: {', '.join(sorted(known))})"


def plan_video(
    total_frames: int,
    video_fps: float,
    height: int,
    width: int,
    sampling: VideoSampling | None = None,
    *,
    num_videos: int = 1,
    timestamps_fps: float | None = -1.0,
    **options: Any,
) -> dict[str, Any]:
    """Everything the Keye-VL-2.0 sampling rule decides for one video, from its metadata alone: the only home of
    the frame-count and frame-size rules (used for files, frame lists and already-sampled frame arrays).

    1. window: ``frame_range`` of ``[video_start, video_end]`` (all frames by default); ``count`` frames;
    2. budget: :func:`video_budget_pixels` (``total_pixels / num_videos``, optionally duration-adaptive);
    3. frame count: ``nframes`` if given, else :func:`smart_nframes` (fps rule, min/max frames, budget cap);
    4. indices ``start + round(linspace(0, count - 1, nframes))``, timestamps ``index / fps`` (float32);
    5. frame size: ``resized_height x resized_width`` rounded to multiples of 28 if given, else
       :func:`smart_resize` with ``min_pixels`` (at least 64 x 784) and the per-frame cap
       ``T = tokens_per_frame_cap(nframes, budget)`` tokens (at most ``max_pixels``).

    Args:
        total_frames: frames in the video (>= 1). video_fps: its average rate (frames/second, > 0).
        height, width: native frame size in pixels.
        sampling: the options (:class:`VideoSampling`; default: the model's).
        num_videos: videos sharing the budget (those of one conversation).
        timestamps_fps: rate used for timestamps; ``-1`` (default) means ``video_fps``, ``None`` means no timestamps
            (frame lists without an ``fps``).
        **options: :class:`VideoSampling` fields overriding ``sampling`` (checked by name).

    Returns:
        dict with ``frame_indices`` (list[int]), ``timestamps`` (list[float] seconds or ``None``), ``nframes``,
        ``resized_height``, ``resized_width`` (multiples of 28), ``tokens_per_frame`` (int, after the 2x2 merge),
        ``tokens_per_frame_cap`` (T), ``total_tokens``, ``budget_tokens`` (float), ``video_fps``, ``total_frames``,
        ``duration`` (seconds, ``total_frames / video_fps``).

    Raises:
        ValueError: ``nframes`` above the frames available, empty window, bad sizes (see :func:`smart_resize`).
    """
    sampling = VideoSampling.from_mapping(options, sampling, where="plan_video")
    start, end = frame_range(total_frames, video_fps, sampling.video_start, sampling.video_end)
    count = end - start + 1
    duration = total_frames / video_fps
    budget = video_budget_pixels(duration, num_videos=num_videos, total_pixels=sampling.total_pixels,
                                 adaptive=sampling.adaptive_budget)
    if sampling.nframes is not None:
        if sampling.nframes > count:
            raise ValueError(
                f"nframes={sampling.nframes} is more than the {count} frames of the video"
                f"{' window' if count != total_frames else ''} ({total_frames} frames at {video_fps:g} fps)"
            )
        nframes = sampling.nframes
    else:
        nframes = smart_nframes(count, video_fps, fps=sampling.fps, min_frames=sampling.min_frames,
                                max_frames=sampling.max_frames, total_pixels=budget)
    indices = sample_frame_indices(count, nframes, start=start)
    eff_min_pixels = max(sampling.min_pixels, VIDEO_MIN_PIXELS)
    cap = tokens_per_frame_cap(nframes, budget, eff_min_pixels, sampling.max_pixels)
    if sampling.resized_height is not None:
        resized_height, resized_width = smart_resize(sampling.resized_height, sampling.resized_width, IMAGE_FACTOR)
    else:
        resized_height, resized_width = smart_resize(
            height, width, IMAGE_FACTOR, min_pixels=eff_min_pixels, max_pixels=cap * PIXELS_PER_TOKEN
        )
    ts_fps = video_fps if timestamps_fps == -1.0 else timestamps_fps
    timestamps = None if ts_fps is None else frame_timestamps(indices, ts_fps)
    per_frame = (resized_height // IMAGE_FACTOR) * (resized_width // IMAGE_FACTOR)
    return {
        "frame_indices": indices,
        "timestamps": timestamps,
        "nframes": nframes,
        "resized_height": resized_height,
        "resized_width": resized_width,
        "tokens_per_frame": per_frame,
        "tokens_per_frame_cap": cap,
        "total_tokens": per_frame * nframes,
        "budget_tokens": budget / PIXELS_PER_TOKEN,
        "video_fps": float(video_fps),
        "total_frames": int(total_frames),
        "duration": duration,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Frame resizing (shared by the video reader and the video processor)
# ----------------------------------------------------------------------------------------------------------------------
def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8/float frames ``[T, C, H, W]`` (values 0..255) to ``[T, C, height, width]`` uint8.

    Bilinear with antialias, as the authors' processor does for video frames (``F.interpolate(..., "bilinear",
    antialias=True)``). uint8 input uses torch's uint8 kernel (about 25x faster than float on CPU); it differs from
    the authors' float result by at most 1 level of 255 (they keep float values). Frames already at the target size
    are returned unchanged (as uint8).
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be [T, C, H, W], got shape {tuple(frames.shape)}")
    if tuple(frames.shape[-2:]) == (height, width):
        return frames if frames.dtype == torch.uint8 else frames.round().clamp(0, 255).to(torch.uint8)
    if frames.dtype == torch.uint8:
        out = torch.nn.functional.interpolate(
            frames.contiguous(memory_format=torch.channels_last),
            size=(height, width),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return out.contiguous()
    out = torch.nn.functional.interpolate(
        frames.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_chw_uint8(image: Any) -> torch.Tensor:
    """One image (PIL, HWC/CHW numpy or torch, uint8 or float) -> RGB uint8 tensor ``[3, H, W]``.

    Float inputs with maximum <= 1 are taken as [0, 1] and scaled by 255, otherwise as [0, 255]. Grey images are
    repeated to 3 channels; an alpha channel is composited on white (PIL) or dropped (arrays).
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(pil_to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; use a PIL image, numpy array or torch tensor")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) in image of shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        tensor = tensor[:3]
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
        if tensor.numel() and float(tensor.max()) <= 1.0:
            tensor = tensor * 255.0
        tensor = tensor.round().clamp(0, 255).to(torch.uint8)
    return tensor.contiguous()


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image as it is meant to be seen.

    - the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``, as transformers' ``load_image`` does);
    - 16-bit greyscale (modes ``I;16*``, and ``I`` holding values above 255) is scaled to 8 bits,
      ``round(v * 255 / 65535)`` (PIL's own ``convert("RGB")`` clips such values to 255: a white image);
    - transparent pixels are composited on white (as qwen-vl-utils does).
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------------
# Source helpers
# ----------------------------------------------------------------------------------------------------------------------
def _strip_file_uri(path: str) -> str:
    return path[7:] if path.startswith("file://") else path


def load_image(source: Any, timeout: float = 30.0) -> Image.Image:
    """Open an image from a PIL image, a local path, a ``file://`` URI, a ``data:image...;base64,`` URI. ``http(s)://``
    URLs are refused (no network calls): download first. Returns an RGB PIL image.

    Raises:
        FileNotFoundError: a local path does not exist.
        ValueError: the source is not an image, or is a URL (message names it).
    """
    if isinstance(source, Image.Image):
        return pil_to_rgb(source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return Image.fromarray(to_chw_uint8(source).permute(1, 2, 0).numpy())
    if not isinstance(source, str):
        raise TypeError(f"unsupported image source of type {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        raise ValueError(
            f"image URLs are not fetched (this package makes no network calls): {source!r}; download the file and "
            "pass its local path, a file:// URI or a PIL image"
        )
    if source.startswith("data:image"):
        if "base64," not in source:
            raise ValueError("data URI images must be base64 encoded ('data:image/...;base64,...')")
        return _open_image_bytes(base64.b64decode(source.split("base64,", 1)[1]), "data URI")
    path = _strip_file_uri(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_rgb(image)
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ...
        raise ValueError(f"cannot read image {path!r}: {err}") from err


def _open_image_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_rgb(image)
    except Exception as err:
        raise ValueError(f"cannot decode image from {name}: {err}") from err


def fetch_image(ele: dict[str, Any] | Any) -> Image.Image:
    """Load and resize one image item of a message (qwen-vl-utils format, or transformers' chat-template item).

    ``ele`` is ``{"type": "image", <source>, "min_pixels": ..., "max_pixels": ..., "resized_height": ...,
    "resized_width": ...}`` where the source is one of ``"image"`` / ``"image_url"`` (qwen-vl-utils; an OpenAI
    style ``{"url": ...}`` dict is accepted), ``"url"`` / ``"path"`` / ``"base64"`` (transformers): a PIL image, a
    local path, a ``file://`` or ``data:`` URI (``http(s)`` URLs are refused: no network), or a bare source.

    Returns an RGB PIL image whose sides are multiples of 28, resized with PIL bicubic (the resampling of PIL's
    ``Image.resize`` default used by keye-vl-utils / qwen-vl-utils).

    Raises:
        ValueError: an unknown key (named, with the closest known key: ``max_pixel`` -> ``max_pixels``), no or
        several sources, only one of ``resized_height`` / ``resized_width``; :func:`load_image`'s errors.
    """
    if not isinstance(ele, dict):
        ele = {"image": ele}
    known = {"type", *IMAGE_SOURCE_KEYS, *IMAGE_OPTION_KEYS}
    for key in ele:
        if key not in known:
            raise ValueError(_unknown_key_message(key, known, "an image item"))
    source = _media_source(ele, IMAGE_SOURCE_KEYS, "image")
    if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
        source = source.get("url")
    image = load_image(source)
    min_pixels = int(ele.get("min_pixels") or IMAGE_MIN_PIXELS)
    max_pixels = int(ele.get("max_pixels") or IMAGE_MAX_PIXELS)
    has_h, has_w = ele.get("resized_height") is not None, ele.get("resized_width") is not None
    if has_h != has_w:
        raise ValueError("give both resized_height and resized_width for an image, or neither")
    if has_h:
        height, width = smart_resize(int(ele["resized_height"]), int(ele["resized_width"]), IMAGE_FACTOR)
    else:
        height, width = smart_resize(image.height, image.width, IMAGE_FACTOR, min_pixels, max_pixels)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return image


# ----------------------------------------------------------------------------------------------------------------------
# Video reading with PyAV
# ----------------------------------------------------------------------------------------------------------------------
def _import_av():
    try:
        import av  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading video files needs PyAV: pip install av (or pip install 'keye-vl[video]')"
        ) from err
    return av


def _check_video_path(path: str) -> str:
    path = _strip_file_uri(os.fspath(path))
    if path.startswith(("http://", "https://")):
        raise ValueError(
            f"video URLs are not fetched (this package makes no network calls): {path!r}; download the file and "
            "pass its local path or a file:// URI"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    if os.path.isdir(path):
        raise VideoReadError(f"video path is a directory, not a file: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"video file is empty (0 bytes): {path!r}")
    return path


def _open_container(path: str):
    av = _import_av()
    try:
        container = av.open(path, mode="r", timeout=30.0)
    except Exception as err:  # av.error.InvalidDataError, av.error.FFmpegError, OSError ...
        raise VideoReadError(f"cannot open video {path!r}: not a readable video file ({type(err).__name__}: {err})") from err
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"no video stream in {path!r} (is it an audio or text file?)")
    return container


# The stream's average rate is trusted unless the packet timestamps of a header-less container (mkv, webm, ts, ...)
# give a rate more than this far from it (relative): then the timestamps' rate is used (see probe_video).
FPS_MISMATCH_TOLERANCE = 0.02


def probe_video(path: str, count_packets: bool | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Read a video's metadata with PyAV without decoding pixels: the one definition of frames, rate and duration.

    - ``total_frames``: the header's frame count when the container stores one (mp4/mov), otherwise the number
      of non-empty video packets found by demuxing (no decoding, streaming); AVI: the larger of the two (its
      header count can be short of the file, and its null frames are counted by the header only);
    - ``video_fps``: the stream's average frame rate (``avg_frame_rate``, as decord's ``get_avg_fps``); when packets
      were counted and their timestamps are distinct, the rate they imply, ``(n - 1) / (last - first)``, replaces it
      if the two differ by more than 2% (variable-rate files whose header rate is nominal), with
      ``fps_source = "timestamps"``; when the stream has no rate, ``total_frames / duration``;
    - ``duration``: ``total_frames / video_fps`` seconds.

    :func:`decode_frames` maps frame index ``i`` to the time ``i / video_fps`` after the first frame, so the plan's
    frame count, indices and timestamps all follow from these three numbers.

    Args:
        path: local path or ``file://`` URI.
        count_packets: force (True) or forbid (False) the packet count; default: only when the header has no count.
        timeout: seconds allowed for the packet count (default ``KEYE_VIDEO_READ_TIMEOUT`` or 600).

    Returns:
        dict with ``total_frames`` (int), ``video_fps`` (float), ``height``, ``width`` (int, pixels), ``duration``
        (float seconds), ``codec`` (str), ``frames_from_header`` (bool), ``fps_source`` (``"stream"``,
        ``"timestamps"`` or ``"duration"``).

    Raises:
        FileNotFoundError: missing path. VideoReadError: empty / unreadable / no video stream / no frames.
        TimeoutError: the packet count ran longer than ``timeout``.
    """
    path = _check_video_path(path)
    deadline = time.monotonic() + (DEFAULT_VIDEO_READ_TIMEOUT if timeout is None else timeout)
    container = _open_container(path)
    packet_pts: list[int] = []
    try:
        stream = container.streams.video[0]
        height, width = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
        codec = stream.codec_context.name
        header_frames = int(stream.frames or 0)
        # AVI's count is a writable header field (dwLength) that can be short of the frames the file holds (a
        # silently dropped tail): its packets are counted too, demux only, and the larger count wins (null frames
        # stay counted by the header)
        avi = "avi" in (container.format.name or "").split(",")
        use_count = count_packets if count_packets is not None else (header_frames <= 0 or avi)
        total_frames = header_frames
        time_base = stream.time_base
        if use_count:
            total_frames = 0
            try:
                for packet in container.demux(stream):
                    if packet.size:
                        total_frames += 1
                        packet_pts.append(-1 if packet.pts is None else int(packet.pts))
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"counting the frames of {path!r} took longer than the read timeout")
            except TimeoutError:
                raise
            except Exception as err:  # a damaged container may stop demuxing part way
                warnings.warn(f"demuxing {path!r} stopped after {total_frames} packets: {err}", stacklevel=2)
            if avi and header_frames > 0:
                if total_frames > header_frames:
                    warnings.warn(f"{path!r}: the AVI header counts {header_frames} frames, the file holds "
                                  f"{total_frames}; using {total_frames}", stacklevel=2)
                total_frames = max(total_frames, header_frames)
                packet_pts = []  # the header's rate stands (AVI timestamps are frame numbers)
        video_fps = _stream_fps(stream)
        fps_source = "stream"
        if video_fps <= 0:
            seconds = None
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / 1_000_000
            video_fps = total_frames / seconds if seconds else 0.0
            fps_source = "duration"
        if len(packet_pts) >= 3 and time_base and min(packet_pts) >= 0 and len(set(packet_pts)) == len(packet_pts):
            span = (max(packet_pts) - min(packet_pts)) * float(time_base)
            if span > 0:
                ts_fps = (len(packet_pts) - 1) / span
                if video_fps <= 0 or abs(ts_fps / video_fps - 1.0) > FPS_MISMATCH_TOLERANCE:
                    video_fps, fps_source = ts_fps, "timestamps"
    finally:
        container.close()
    if total_frames <= 0:
        raise VideoReadError(f"video {path!r} has no video frames")
    if video_fps <= 0:
        raise VideoReadError(f"cannot determine the frame rate of {path!r}")
    if height <= 0 or width <= 0:
        raise VideoReadError(f"cannot determine the frame size of {path!r}")
    return {
        "total_frames": total_frames,
        "video_fps": video_fps,
        "height": height,
        "width": width,
        "duration": total_frames / video_fps,
        "codec": codec,
        "frames_from_header": total_frames == header_frames,
        "fps_source": fps_source,
    }


class _SeekUnusable(Exception):
    """Internal: the keyframe-seeking reader cannot guarantee frame identity for this file; decode sequentially."""


class _TimesUnusable(Exception):
    """Internal: frames have missing or non-increasing timestamps; select frames by decoding order instead."""


def _scan_packets(container, stream, deadline: float, path: str) -> tuple[list[int], list[int]] | None:
    """Presentation times of all video packets and of the keyframes (demux only, no decoding).

    Returns ``(sorted_pts, sorted_key_pts)`` or ``None`` when the stream cannot be indexed by time (missing or
    repeated timestamps, as in damaged files).
    """
    pts, keys = [], []
    for packet in container.demux(stream):
        if time.monotonic() > deadline:
            raise TimeoutError(f"indexing {path!r} took longer than the read timeout")
        if not packet.size:
            continue
        if packet.pts is None:
            return None
        pts.append(int(packet.pts))
        if packet.is_keyframe:
            keys.append(int(packet.pts))
    if not pts or len(set(pts)) != len(pts) or not keys:
        return None
    return sorted(pts), sorted(keys)


def _frame_to_tensor(frame, height: int | None, width: int | None) -> torch.Tensor:
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).unsqueeze(0)
    if height is not None and width is not None:
        rgb = resize_frames(rgb, height, width)
    return rgb[0].contiguous()


def _timeout_error(path: str, timeout: float | None, done: int) -> TimeoutError:
    return TimeoutError(
        f"reading {path!r} took longer than {timeout if timeout is not None else DEFAULT_VIDEO_READ_TIMEOUT:g} s "
        f"({done} frames decoded); raise KEYE_VIDEO_READ_TIMEOUT (seconds) for very long videos"
    )


class _TimeSelector:
    """Assigns decoded frames to frame indices by presentation time (the definition :func:`decode_frames` documents).

    Index ``i`` is the time ``t_i = t_0 + i / fps`` (``t_0``: the first frame's timestamp, ``fps``: the average rate
    the plan used); its frame is the last one whose timestamp is ``<= t_i + 0.5 / fps`` (half a frame of tolerance
    for timestamps rounded by the container). At the end of the stream, indices whose ``t_i`` still lies within the
    last frame's display interval (``< t_last + 1 / fps``) get the last frame; later ones are missing.
    """

    def __init__(self, wanted: list[int], fps: float, time_base, height, width) -> None:
        self.wanted = wanted
        self.step = 1.0 / (float(fps) * float(time_base))  # timestamp units per frame slot
        self.height, self.width = height, width
        self.start: int | None = None
        self.pos = 0
        self.prev = None
        self.prev_pts: int | None = None
        self.prev_tensor: torch.Tensor | None = None
        self.kept: dict[int, torch.Tensor] = {}
        self.decoded = 0

    def target(self, index: int) -> float:
        return self.start + (index + 0.5) * self.step

    def next_target(self) -> float | None:
        return None if self.pos >= len(self.wanted) or self.start is None else self.target(self.wanted[self.pos])

    def done(self) -> bool:
        return self.pos >= len(self.wanted)

    def _take_prev(self) -> None:
        if self.prev_tensor is None:
            self.prev_tensor = _frame_to_tensor(self.prev, self.height, self.width)
        self.kept[self.wanted[self.pos]] = self.prev_tensor
        self.pos += 1

    def reset_after_seek(self) -> None:
        self.prev = self.prev_pts = self.prev_tensor = None

    def feed(self, frame, floor_pts: int | None = None) -> None:
        """Take one decoded frame (presentation order). ``floor_pts``: after a seek, frames before it are skipped."""
        pts = frame.pts
        if pts is None:
            raise _TimesUnusable()
        pts = int(pts)
        self.decoded += 1
        if floor_pts is not None and pts < floor_pts:
            return
        if self.start is None:
            self.start = pts
        elif self.prev_pts is not None and pts <= self.prev_pts:
            raise _TimesUnusable()
        while self.pos < len(self.wanted) and self.target(self.wanted[self.pos]) < pts:
            if self.prev is None:  # only after a seek that overshot: the caller guarantees it does not happen
                raise _SeekUnusable()
            self._take_prev()
        self.prev, self.prev_pts, self.prev_tensor = frame, pts, None

    def finish(self) -> None:
        """End of stream: the last frame serves the indices inside its display interval."""
        while self.pos < len(self.wanted) and self.prev is not None:
            if self.target(self.wanted[self.pos]) - 0.5 * self.step >= self.prev_pts + self.step:
                break
            self._take_prev()


def _decode_by_time(container, stream, wanted, fps, height, width, deadline, path, timeout, index=None):
    """Decode in order (``index=None``) or with keyframe seeks (``index`` from :func:`_scan_packets`), selecting
    frames with :class:`_TimeSelector`. Returns ``(kept, stats)``; raises ``_TimesUnusable`` / ``_SeekUnusable``."""
    import bisect

    selector = _TimeSelector(wanted, fps, stream.time_base, height, width)
    errors = 0
    key_pts = index[1] if index is not None else None
    demux = container.demux(stream)
    floor_pts = None
    while not selector.done():
        if key_pts is not None and selector.prev_pts is not None:
            target = selector.next_target()
            k = bisect.bisect_right(key_pts, target) - 1
            if k >= 0 and key_pts[k] > selector.prev_pts:  # a keyframe between here and the next target: jump
                container.seek(key_pts[k], stream=stream, backward=True, any_frame=False)
                stream.codec_context.flush_buffers()
                demux = container.demux(stream)
                selector.reset_after_seek()
                floor_pts = key_pts[k]
        if time.monotonic() > deadline:
            raise _timeout_error(path, timeout, selector.decoded)
        try:
            packet = next(demux)
        except StopIteration:
            break
        except Exception as err:  # demuxer error in a damaged file: stop here, keep what we have
            if key_pts is not None:
                raise _SeekUnusable() from err
            warnings.warn(f"demuxing {path!r} failed after {selector.decoded} frames: {err}", stacklevel=4)
            break
        try:
            frames = packet.decode()
        except Exception as err:  # corrupt packet: skip it (the decoder resynchronises on the next keyframe)
            if key_pts is not None:
                raise _SeekUnusable() from err
            errors += 1
            if errors > 1000:
                raise VideoReadError(f"too many corrupt packets in {path!r}: {err}") from err
            continue
        for frame in frames:
            selector.feed(frame, floor_pts)
    selector.finish()
    return selector.kept, {"errors": errors, "bad_pts": 0, "decoded": selector.decoded}


def _decode_by_order(container, stream, wanted, height, width, deadline, path, timeout):
    """Decode every packet in order; index ``i`` = the ``i``-th frame the decoder outputs (files whose timestamps
    are missing or restart). Returns (kept, stats)."""
    kept: dict[int, torch.Tensor] = {}
    errors = bad_pts = ordinal = pos = 0
    last_pts = None
    demux = container.demux(stream)
    while pos < len(wanted):
        if time.monotonic() > deadline:
            raise _timeout_error(path, timeout, ordinal)
        try:
            packet = next(demux)
        except StopIteration:
            break
        except Exception as err:  # demuxer error in a damaged file: stop here, keep what we have
            warnings.warn(f"demuxing {path!r} failed after {ordinal} frames: {err}", stacklevel=4)
            break
        try:
            frames = packet.decode()
        except Exception as err:  # corrupt packet: skip it (the decoder resynchronises on the next keyframe)
            errors += 1
            if errors > 1000:
                raise VideoReadError(f"too many corrupt packets in {path!r}: {err}") from err
            continue
        for frame in frames:
            if frame.pts is None or (last_pts is not None and frame.pts <= last_pts):
                bad_pts += 1
            if frame.pts is not None:
                last_pts = frame.pts
            if pos < len(wanted) and ordinal == wanted[pos]:
                kept[ordinal] = _frame_to_tensor(frame, height, width)
                pos += 1
            ordinal += 1
    return kept, {"errors": errors, "bad_pts": bad_pts, "decoded": ordinal}


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def decode_frames(
    path: str,
    indices: Sequence[int],
    height: int | None = None,
    width: int | None = None,
    timeout: float | None = None,
    seek: bool | None = None,
    fps: float | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Decode the frames at ``indices`` with PyAV, streaming; frame index ``i`` means the time ``i / fps``.

    Definition (the one the sampling plan uses, whatever the container's frame count says): index ``i`` is the
    instant ``t_0 + i / fps`` after the first frame (``t_0``), and its frame is the one on screen then, i.e. the last
    frame whose timestamp is ``<= t_0 + (i + 0.5) / fps`` (half a frame of tolerance for rounded timestamps). For a
    constant-rate file this is exactly the ``i``-th frame; for variable rates, dropped / hidden frames (a header
    count above the frames that decode) or timestamps that start late, it is the frame shown at the index's
    timestamp, so the timestamps written into the prompt (``i / fps``) stay true. Files whose frame timestamps are
    missing or restart (damaged files) fall back to decoding order, ``i`` = the ``i``-th decoded frame, with a
    warning.

    Two strategies give the same frames: sequential decoding, and keyframe seeking (long videos; files whose
    packets all have distinct timestamps): before each requested frame the reader seeks to the last keyframe at or
    before its time when that keyframe is ahead of the decoder, so only the needed groups of pictures are decoded.

    Only the requested frames are converted to RGB and resized (bilinear, antialias) to ``height x width``, so memory
    holds the decoder's few frames plus the sampled output, never the whole video.

    Args:
        path: video path / ``file://`` URI.
        indices: frame indices to keep (any order, duplicates allowed).
        height, width: output size; ``None`` keeps the native size.
        timeout: wall-clock limit in seconds (checked between packets; default 600 or ``KEYE_VIDEO_READ_TIMEOUT``).
        seek: ``None`` (auto: seek when the last requested frame is >= ``SEEK_MIN_FRAMES`` = 1500 into the video,
            or as ``KEYE_VIDEO_SEEK`` says), ``True`` (seek when the file allows it), ``False`` (always sequential).
        fps: the frame rate that maps indices to times (default: the stream's average rate, as :func:`probe_video`).

    Returns:
        ``(frames, found)``: uint8 tensor ``[len(found), 3, H, W]`` and the indices actually decoded, in the order
        of ``indices``. Fewer frames than requested come back (with a warning) when the file ends before an index's
        time or packets are corrupt.

    Raises:
        FileNotFoundError, VideoReadError (no frame decodes), TimeoutError.
    """
    path = _check_video_path(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("no frame indices requested")
    if wanted[0] < 0:
        raise ValueError(f"frame indices must be >= 0, got {wanted[0]}")
    deadline = time.monotonic() + (DEFAULT_VIDEO_READ_TIMEOUT if timeout is None else timeout)
    kept = None
    stats = {"errors": 0, "bad_pts": 0, "decoded": 0}
    if seek is None:
        seek = _SEEK_DEFAULT if _SEEK_DEFAULT is not None else (wanted[-1] >= SEEK_MIN_FRAMES)
    by_time = True
    if seek:
        container = _open_container(path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(fps) if fps else _stream_fps(stream)
            index = _scan_packets(container, stream, deadline, path)
            if index is not None and rate > 0:
                container.seek(index[1][0], stream=stream, backward=True, any_frame=False)
                stream.codec_context.flush_buffers()
                kept, stats = _decode_by_time(container, stream, wanted, rate, height, width, deadline, path, timeout,
                                              index)
        except TimeoutError:
            raise
        except _TimesUnusable:
            kept, by_time = None, False
        except Exception:  # _SeekUnusable, failed seek (damaged index), decoder errors: decode sequentially
            kept = None
        finally:
            container.close()
    if kept is None and by_time:
        container = _open_container(path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(fps) if fps else _stream_fps(stream)
            if rate > 0:
                kept, stats = _decode_by_time(container, stream, wanted, rate, height, width, deadline, path, timeout)
            else:
                by_time = False
        except _TimesUnusable:
            kept, by_time = None, False
        finally:
            container.close()
    if kept is None:
        container = _open_container(path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            kept, stats = _decode_by_order(container, stream, wanted, height, width, deadline, path, timeout)
        finally:
            container.close()
    if not kept:
        raise VideoReadError(
            f"no frame could be decoded from {path!r} (requested frames {wanted[:5]}...; the decoder produced "
            f"{stats['decoded']} frames)"
        )
    found = [int(i) for i in indices if int(i) in kept]
    if not by_time:
        warnings.warn(
            f"video {path!r} looks damaged: frame timestamps are missing or restart ({stats['bad_pts']} frame(s) out "
            "of order); frames are taken in decoding order and timed as index / average fps",
            stacklevel=2,
        )
    if len(kept) < len(wanted) or stats["errors"]:
        missing = [i for i in wanted if i not in kept]
        warnings.warn(
            f"video {path!r} looks damaged or shorter than its header says: {stats['errors']} corrupt packet(s); "
            f"{len(missing)} of {len(wanted)} sampled frames missing (e.g. {missing[:5]}); using the {len(kept)} "
            "frames that decoded",
            stacklevel=2,
        )
    return torch.stack([kept[i] for i in found]), found


def read_video(
    path: str,
    sampling: VideoSampling | None = None,
    *,
    num_videos: int = 1,
    timeout: float | None = None,
    seek: bool | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read one video file the Keye-VL-2.0 way: probe (:func:`probe_video`), plan (:func:`plan_video`), decode only
    the sampled frames (:func:`decode_frames`).

    Args:
        path: local path or ``file://`` URI.
        sampling: :class:`VideoSampling` (default: the model's); ``**options`` (its field names) override it.
        num_videos: videos sharing the budget. timeout, seek: see :func:`decode_frames`.

    Returns:
        ``(frames, info)``: uint8 tensor ``[nframes, 3, H, W]`` with H, W multiples of 28 (the shared frame size),
        and the :func:`plan_video` dict updated with the frames actually decoded (``frame_indices``, ``timestamps``,
        ``nframes``, ``total_tokens``) plus the probe's ``height``/``width``/``codec``/``fps_source``.

    Raises:
        FileNotFoundError, VideoReadError (empty file, not a video, nothing decodes), TimeoutError, ImportError (no
        PyAV), ValueError (unknown option, bad values).
    """
    sampling = VideoSampling.from_mapping(options, sampling, where="read_video")
    probe = probe_video(path, timeout=timeout)
    plan = plan_video(probe["total_frames"], probe["video_fps"], probe["height"], probe["width"], sampling,
                      num_videos=num_videos)
    frames, found = decode_frames(
        path, plan["frame_indices"], plan["resized_height"], plan["resized_width"], timeout=timeout, seek=seek,
        fps=plan["video_fps"],
    )
    if found != plan["frame_indices"]:
        plan["frame_indices"] = found
        plan["timestamps"] = frame_timestamps(found, plan["video_fps"])
        plan["nframes"] = len(found)
        plan["total_tokens"] = plan["tokens_per_frame"] * len(found)
    plan.update({"height": probe["height"], "width": probe["width"], "codec": probe["codec"], "path": path,
                 "fps_source": probe["fps_source"]})
    return frames, plan


def _frame_list_to_tensor(frames: Any) -> list[torch.Tensor]:
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        if frames.ndim != 4:
            raise ValueError(f"a video given as an array must be 4-D [T, C, H, W] or [T, H, W, C], got {frames.shape}")
        frames = list(frames)
    out = []
    for frame in frames:
        if isinstance(frame, dict):
            frame = frame.get("image", frame.get("image_url"))
        if isinstance(frame, str):
            frame = load_image(frame)
        out.append(to_chw_uint8(frame))
    return out


def read_frame_list(
    frames: Any,
    sampling: VideoSampling | None = None,
    *,
    frames_fps: float | None = None,
    num_videos: int = 1,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A video given as a list of frames (PIL images, paths, arrays) or a 4-D array, the S1 way.

    S1 ``fetch_video`` (image-list branch): each frame is first sized with :func:`smart_resize` within
    ``[min_pixels, max_pixels]``; frames are sampled by :func:`plan_video` with ``video_fps = frames_fps or 2.0``
    as both the frames' rate and the sampling rate (so every frame is kept up to ``max_frames`` / the budget, or
    ``nframes``); timestamps are ``index / frames_fps`` only when ``frames_fps`` is given (else ``None`` and the
    prompt carries ``<|frame|>`` without a time). Frames are resized once, straight to the final size (S1 resizes
    twice).

    Args:
        frames: the frames. sampling / ``**options``: as :func:`read_video` (``fps`` among the options is taken as
            ``frames_fps``). frames_fps: the rate the frames were taken at (seconds = index / rate).

    Returns:
        ``(frames, info)`` as :func:`read_video`.

    Raises:
        ValueError: empty frame list (zero-length video), frames of unusable shape, bad options.
    """
    if "fps" in options:
        frames_fps = options.pop("fps") if frames_fps is None else frames_fps
        options.pop("fps", None)
    sampling = VideoSampling.from_mapping(options, sampling, where="read_frame_list")
    if frames is None or len(frames) == 0:
        raise ValueError("the video's frame list is empty: a video needs at least one frame")
    tensors = _frame_list_to_tensor(frames)
    if not tensors:
        raise ValueError("the video's frame list is empty: a video needs at least one frame")
    height, width = int(tensors[0].shape[-2]), int(tensors[0].shape[-1])
    inter_h, inter_w = smart_resize(height, width, IMAGE_FACTOR, min_pixels=sampling.min_pixels,
                                    max_pixels=sampling.max_pixels)
    video_fps = VideoSampling(fps=VIDEO_FPS if frames_fps is None else frames_fps).fps  # validated
    plan = plan_video(len(tensors), video_fps, inter_h, inter_w, dataclasses.replace(sampling, fps=video_fps),
                      num_videos=num_videos, timestamps_fps=None if frames_fps is None else video_fps)
    size = (plan["resized_height"], plan["resized_width"])
    out = torch.stack([resize_frames(tensors[i].unsqueeze(0), *size)[0] for i in plan["frame_indices"]])
    plan.update({"height": height, "width": width, "codec": None, "path": None})
    return out, plan


# ----------------------------------------------------------------------------------------------------------------------
# Messages (qwen-vl-utils / keye-vl-utils format, and transformers' chat-template items)
# ----------------------------------------------------------------------------------------------------------------------
# Where a media item keeps its source: qwen-vl-utils uses "image" / "image_url" / "video"; transformers' chat
# templates use "url", "path" (and "base64" for images) next to "type".
IMAGE_SOURCE_KEYS = ("image", "image_url", "url", "path", "base64")
VIDEO_SOURCE_KEYS = ("video", "url", "path")
IMAGE_OPTION_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
# Per-item keys that are not sampling options: the reader's time limit, the frame list's rate (qwen-vl-utils).
VIDEO_READER_KEYS = ("timeout", "sample_fps")


def _media_kind(ele: Any) -> str | None:
    """``"image"``, ``"video"`` or ``None`` for one content item."""
    if not isinstance(ele, dict):
        return None
    kind = ele.get("type")
    if kind in ("image", "image_url") or (kind is None and ("image" in ele or "image_url" in ele)):
        return "image"
    if kind == "video" or (kind is None and "video" in ele):
        return "video"
    if kind is not None and kind != "text" and ("image" in ele or "video" in ele or "image_url" in ele):
        return "video" if "video" in ele else "image"
    return None


def _media_source(ele: dict, keys: Sequence[str], kind: str) -> Any:
    found = [k for k in keys if ele.get(k) is not None]
    if not found:
        raise ValueError(
            f"{kind} item without a source: give one of {', '.join(repr(k) for k in keys)} (got keys {sorted(ele)})"
        )
    if len(found) > 1:
        raise ValueError(f"{kind} item has several sources {found}; give exactly one")
    source = ele[found[0]]
    if found[0] == "base64":
        source = source if str(source).startswith("data:") else "data:image/unknown;base64," + str(source)
    return source


def extract_vision_info(conversations: Sequence[dict] | Sequence[Sequence[dict]]) -> list[list[dict]]:
    """Image/video items of one conversation or a batch of conversations, per conversation, in order."""
    if not conversations:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]  # type: ignore[list-item]
    result = []
    for conversation in conversations:
        infos = []
        for message in conversation:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                for ele in content:
                    if _media_kind(ele) is not None:
                        infos.append(ele)
        result.append(infos)
    return result


def fetch_video(
    ele: dict[str, Any], num_videos: int = 1, sampling: VideoSampling | None = None, timeout: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load one video item of a message.

    ``ele`` is ``{"type": "video", "video" | "url" | "path": <path | file:// URI | frame list | 4-D array>, ...}``
    with any :class:`VideoSampling` field (``fps`` or ``nframes``, ``min_frames``, ``max_frames``, ``min_pixels``,
    ``max_pixels``, ``total_pixels`` (alias ``video_total_pixels``), ``adaptive_budget``, ``resized_height`` /
    ``resized_width``, ``video_start`` / ``video_end``), ``timeout`` (seconds), and for frame lists
    ``sample_fps`` (= their ``fps``: the rate they were taken at). Item values override ``sampling`` (the defaults).

    Returns ``(frames, info)`` as :func:`read_video` / :func:`read_frame_list`.

    Raises:
        ValueError: an unknown key (named, with the closest known key: ``max_frame`` -> ``max_frames``), no or
        several sources, bad values; the readers' errors.
    """
    source = _media_source(ele, VIDEO_SOURCE_KEYS, "video")
    where = "a video item"
    ignore = ("type",) + VIDEO_SOURCE_KEYS + VIDEO_READER_KEYS
    is_file = isinstance(source, (str, os.PathLike))
    item_options = dict(ele)
    if not is_file:  # a frame list: fps / sample_fps are the frames' own rate
        frames_fps = ele.get("sample_fps", ele.get("fps"))
        item_options.pop("fps", None)
        sampling = VideoSampling.from_mapping(item_options, sampling, ignore=ignore + ("fps",), where=where)
        return read_frame_list(source, sampling, frames_fps=frames_fps, num_videos=num_videos)
    if ele.get("sample_fps") is not None:
        raise ValueError("sample_fps is the rate of a video given as a frame list; for a file use fps")
    sampling = VideoSampling.from_mapping(item_options, sampling, ignore=ignore, where=where)
    item_timeout = ele.get("timeout", timeout)
    return read_video(os.fspath(source), sampling, num_videos=num_videos, timeout=item_timeout)


def process_vision_info(
    conversations: Sequence[dict] | Sequence[Sequence[dict]],
    return_video_kwargs: bool = True,
    sampling: VideoSampling | None = None,
    **video_defaults: Any,
) -> tuple[list[Image.Image] | None, list[torch.Tensor] | None, dict[str, list]]:
    """Load the images and videos of chat messages for :class:`KeyeVL2Processor` (keye-vl-utils compatible).

    Accepts the qwen-vl-utils message format: ``[{"role": "user", "content": [{"type": "image", "image": ...},
    {"type": "video", "video": "file:///a.mp4", "fps": 1.0, "max_pixels": ...}, {"type": "text", "text": ...}]}]``
    or a list of such conversations, and transformers' chat-template items (``{"type": "image", "url" | "path" |
    "base64": ...}``, ``{"type": "video", "url" | "path": ...}``; local paths only: this package fetches nothing).
    Images may be PIL images, local paths, ``file://`` URIs or ``data:`` URIs; videos may be paths / URIs (decoded
    with PyAV) or lists of frames / 4-D arrays. Per-item keys: images ``min_pixels``, ``max_pixels``,
    ``resized_height``, ``resized_width``; videos the :class:`VideoSampling` fields (see :func:`fetch_video`).
    Unknown keys raise ``ValueError`` naming them. ``sampling`` / ``**video_defaults`` (field names) set the
    defaults for every video.

    The video budget (184,320 tokens) is shared by the videos of one conversation.

    Returns:
        ``(images, videos, video_kwargs)``:

        - ``images``: list of RGB PIL images already resized to multiples of 28, or ``None``;
        - ``videos``: list of uint8 tensors ``[nframes, 3, H, W]`` (H, W multiples of 28, one size per video), or
          ``None``;
        - ``video_kwargs``: dict of per-video lists, to pass as ``processor(..., **video_kwargs)``:
          ``timestamps`` (list[float] seconds, index / fps, or ``None``), ``height``/``width`` (the frame size),
          ``frame_indices`` (indices in the source), ``video_fps`` (source frame rate), ``total_frames``.
          Always returned (three values, like keye-vl-utils); ``return_video_kwargs`` is accepted for
          qwen-vl-utils call compatibility.

    Raises:
        FileNotFoundError, VideoReadError, ValueError (unknown key, empty frame list, bad aspect ratio, bad values),
        TimeoutError.
    """
    del return_video_kwargs
    timeout = video_defaults.pop("timeout", None)
    base = VideoSampling.from_mapping(video_defaults, sampling, where="process_vision_info's keyword arguments")
    images: list[Image.Image] = []
    videos: list[torch.Tensor] = []
    video_kwargs: dict[str, list] = {
        "timestamps": [],
        "height": [],
        "width": [],
        "frame_indices": [],
        "video_fps": [],
        "total_frames": [],
    }
    for infos in extract_vision_info(conversations):
        num_videos = sum(1 for ele in infos if _media_kind(ele) == "video")
        for ele in infos:
            if _media_kind(ele) == "image":
                images.append(fetch_image(ele))
            else:
                frames, info = fetch_video(ele, num_videos=max(num_videos, 1), sampling=base, timeout=timeout)
                videos.append(frames)
                video_kwargs["timestamps"].append(info["timestamps"])
                video_kwargs["height"].append(info["resized_height"])
                video_kwargs["width"].append(info["resized_width"])
                video_kwargs["frame_indices"].append(info["frame_indices"])
                video_kwargs["video_fps"].append(info["video_fps"])
                video_kwargs["total_frames"].append(info["total_frames"])
    return (images or None), (videos or None), video_kwargs


__all__ = [
    "IMAGE_FACTOR",
    "IMAGE_MAX_PIXELS",
    "IMAGE_MIN_PIXELS",
    "MAX_RATIO",
    "MERGE_SIZE",
    "PATCH_SIZE",
    "PIXELS_PER_TOKEN",
    "VIDEO_FPS",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "VIDEO_TOTAL_PIXELS",
    "VIDEO_TOTAL_TOKENS",
    "VideoReadError",
    "VideoSampling",
    "decode_frames",
    "extract_vision_info",
    "fetch_image",
    "fetch_video",
    "frame_timestamps",
    "load_image",
    "plan_video",
    "probe_video",
    "process_vision_info",
    "read_frame_list",
    "read_video",
    "resize_frames",
    "sample_frame_indices",
    "smart_nframes",
    "smart_resize",
    "to_chw_uint8",
    "tokens_per_frame_cap",
    "video_budget_pixels",
]
