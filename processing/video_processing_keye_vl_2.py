# Copyright 2025 The keye-vl authors. Licensed under the Apache License, Version 2.0.
"""Keye-VL-2.0 video processor: Keye's frame sampling and token budget, then 14x14 patches per frame.

Output contract with the model (fixed; see ``modeling_keye``):

- ``pixel_values_videos``: float32 ``[N_video_patches, 588]``: frames in order, each frame's patches in raster order
  over its ``(h / 14, w / 14)`` grid, each patch flattened (C, 14, 14), normalised ``(x / 255 - 0.5) / 0.5``.
- ``video_grid_thw``: int64 ``[n_videos, 3]`` = ``(n_frames, h / 14, w / 14)``; all frames of a video share one size.

Timestamps (seconds, ``frame index / average fps``) are returned under ``video_timestamps`` (a python list per video,
not a model input); :class:`KeyeVL2Processor` removes them before handing the batch to the model and writes them into
the prompt as ``<|frame|>`` + ``f"{ts:.1f}"``.

Sampling rules (docs/keye_vl2.md section 7, S1 ``keye_adaptive_video.py``) live in ``vision_process_keye_vl_2.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.video_processing_utils import BaseVideoProcessor

from .image_processing_keye_vl_2 import normalize_uint8, patchify
from .vision_process_keye_vl_2 import (
    IMAGE_FACTOR,
    MERGE_SIZE,
    PATCH_SIZE,
    VIDEO_FPS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_FRAMES,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    VideoSampling,
    frame_timestamps,
    plan_video,
    read_frame_list,
    read_video,
    resize_frames,
    to_chw_uint8,
)


def make_video_list(videos: Any) -> list[Any]:
    """Normalise the ``videos`` argument into a list of videos.

    A video is a path / ``file://`` URI (str or PathLike), a 4-D array or tensor of frames ``[T, C, H, W]`` /
    ``[T, H, W, C]`` (already sampled), or a python list of frames (PIL images, 3-D arrays, image paths), which is
    sampled with the S1 frame-list rule. A single video may be passed without the outer list; a 5-D array is a
    batch of videos.
    """
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike)):
        return [os.fspath(videos)]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 5:
            return list(videos)
        if videos.ndim == 4:
            return [videos]
        raise ValueError(f"a video array must be 4-D [T, C, H, W] (or 5-D for a batch), got shape {tuple(videos.shape)}")
    if isinstance(videos, (list, tuple)):
        if len(videos) == 0:
            return []
        first = videos[0]
        is_frame = isinstance(first, Image.Image) or (
            isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim in (2, 3)
        )
        if is_frame:
            return [list(videos)]
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in videos]
    raise TypeError(f"unsupported videos input of type {type(videos).__name__}")


# Keyword arguments of other video processors / of process_vision_info's metadata: accepted and ignored.
_IGNORED_KWARGS = {
    "do_sample_frames", "video_metadata", "frame_indices", "video_fps", "total_frames", "fast_height", "fast_width",
    "return_metadata", "device", "input_data_format", "data_format", "do_convert_rgb", "do_resize", "size",
    "resample", "num_frames", "do_rescale", "do_normalize", "timeout",
}


def _per_video(value: Any, n: int, name: str) -> list[Any]:
    """Broadcast a scalar / ``None`` to ``n`` videos, or check a per-video list.

    ``timestamps`` is per video already (a list of seconds per video); a single flat list / 1-D tensor of seconds is
    accepted for a single video.
    """
    if value is None:
        return [None] * n
    if name == "timestamps":
        if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1:
            value = [value]
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float)):
            value = [value]
    elif not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} videos")
    return list(value)


class KeyeVL2VideoProcessor(BaseVideoProcessor):
    r"""Video processor of Keye-VL-2.0 (docs/keye_vl2.md section 7 "Processor", video).

    Per video: ``nframes = min(max(int(duration * min(fps, native_fps)), 2), min(max_frames, floor(budget / 64),
    total_frames))`` frames at ``round(linspace(0, total_frames - 1, nframes))`` (half to even); timestamps
    ``index / average_fps``; tokens per frame ``T = clamp(floor(budget / nframes) + 1, 64, 256)``; one shared frame size
    ``smart_resize(h, w, 28, min_pixels=64*784, max_pixels=T*784)``; budget = 184,320 tokens per request (shared by
    the videos of one conversation), optionally duration-adaptive.

    Args:
        fps (`float`, default 2.0): sampling rate, never above the video's own rate.
        min_frames (`int`, default 2), max_frames (`int`, default None = budget cap).
        min_pixels (`int`, default 64 * 784), max_pixels (`int`, default 256 * 784): per-frame area bounds.
        total_pixels (`int`, default 184,320 * 784): the budget in pixels.
        adaptive_budget (`bool`, default False): duration-adaptive budget (single video).
        patch_size (14), merge_size (2), temporal_patch_size (1), image_mean / image_std ([0.5] * 3),
        rescale_factor (1/255), do_rescale / do_normalize (True).
        read_timeout (`float`, default None = 600 s or ``KEYE_VIDEO_READ_TIMEOUT``): wall-clock limit per file.

    Call: ``processor(videos, sampling=None, fps=None, timestamps=None, height=None, width=None, num_videos=None,
    return_tensors="pt", **options)`` where ``sampling`` is a :class:`VideoSampling` (default: :attr:`sampling`,
    built from the attributes above) and ``options`` are its field names (``nframes``, ``max_frames``,
    ``resized_height``, ``video_start``, ...); a misspelt option raises ValueError naming it.

    - ``videos``: see :func:`make_video_list`. Paths are decoded with PyAV (only the sampled frames are kept);
      frame lists are sampled with the S1 frame-list rule; 4-D arrays are taken as already-sampled frames.
    - ``timestamps``: per-video list of seconds for array inputs (else ``index / fps`` when ``fps`` is given, else
      none: the prompt then has ``<|frame|>`` without a time).
    - ``height`` / ``width``: per-video frame size for array inputs (as returned by ``process_vision_info``); by
      default the size comes from the rule above.
    - ``num_videos``: per-video number of videos sharing its budget (the processor fills it per prompt).

    Returns a `BatchFeature` with ``pixel_values_videos`` float32 ``[N, 588]``, ``video_grid_thw`` int64
    ``[n_videos, 3]`` and ``video_timestamps`` (list per video of float seconds or ``None``; not a model input).

    Raises:
        FileNotFoundError (missing file), VideoReadError (empty / unreadable / not a video / nothing decodes),
        ValueError (zero-length frame list, bad shapes, aspect ratio > 200), TimeoutError (read too slow).
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        fps: float = VIDEO_FPS,
        min_frames: int = VIDEO_MIN_FRAMES,
        max_frames: int | None = None,
        min_pixels: int = VIDEO_MIN_PIXELS,
        max_pixels: int = VIDEO_MAX_PIXELS,
        total_pixels: int = VIDEO_TOTAL_PIXELS,
        adaptive_budget: bool = False,
        patch_size: int = PATCH_SIZE,
        merge_size: int = MERGE_SIZE,
        temporal_patch_size: int = 1,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        read_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("size", "do_resize", "resample", "do_sample_frames", "num_frames"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.fps = float(fps)
        self.min_frames = int(min_frames)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.total_pixels = int(total_pixels)
        self.adaptive_budget = bool(adaptive_budget)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.rescale_factor = float(rescale_factor)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)
        self.read_timeout = None if read_timeout is None else float(read_timeout)
        if self.temporal_patch_size != 1:
            raise ValueError("Keye-VL uses temporal_patch_size=1 (one frame per patch)")
        if self.patch_size * self.merge_size != IMAGE_FACTOR:
            raise ValueError(f"patch_size * merge_size must be {IMAGE_FACTOR} (the sampling rules assume it)")

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def sampling(self) -> VideoSampling:
        """This processor's default :class:`VideoSampling` (from its saved attributes)."""
        return VideoSampling(
            fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames, min_pixels=self.min_pixels,
            max_pixels=self.max_pixels, total_pixels=self.total_pixels, adaptive_budget=self.adaptive_budget,
        )

    def load_video(
        self, video: Any, sampling: VideoSampling | None = None, num_videos: int = 1, frames_fps: float | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Decode / sample one path (:func:`read_video`) or frame list (:func:`read_frame_list`, timed only when
        ``frames_fps`` is given). Returns ``(frames uint8 [T, 3, H, W], info)``."""
        sampling = sampling or self.sampling
        if isinstance(video, str):
            return read_video(video, sampling, num_videos=num_videos, timeout=self.read_timeout)
        return read_frame_list(video, sampling, frames_fps=frames_fps, num_videos=num_videos)

    def preprocess(
        self,
        videos: Any,
        sampling: VideoSampling | None = None,
        *,
        fps: float | Sequence[float] | None = None,
        timestamps: Sequence[Sequence[float] | None] | None = None,
        height: int | Sequence[int] | None = None,
        width: int | Sequence[int] | None = None,
        num_videos: int | Sequence[int] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one video or a list of videos; see the class docstring.

        ``sampling`` (:class:`VideoSampling`, default: this processor's) and the keyword arguments named like its
        fields (``nframes``, ``max_frames``, ``min_frames``, ``min_pixels``, ``max_pixels``, ``total_pixels``,
        ``adaptive_budget``, ``resized_height``, ``resized_width``, ``video_start``, ``video_end``;
        transformers' ``num_frames`` = ``nframes``) apply to every video; ``fps`` may be one value or one per
        video. Metadata that other video processors take (``do_sample_frames``, ``video_metadata``,
        ``frame_indices``, ``video_fps``, ``total_frames``, ...) is ignored; any other keyword raises ValueError
        naming it."""
        video_list = make_video_list(videos)
        if not video_list:
            raise ValueError("no video given to KeyeVL2VideoProcessor (an empty list is not a video)")
        if kwargs.get("num_frames") is not None:
            kwargs.setdefault("nframes", kwargs["num_frames"])
        options = {k: v for k, v in kwargs.items() if k not in _IGNORED_KWARGS}
        base = VideoSampling.from_mapping(options, sampling or self.sampling, where="the video processor's arguments")
        n = len(video_list)
        fps_l = _per_video(fps, n, "fps")
        ts_l = _per_video(timestamps, n, "timestamps")
        h_l = _per_video(height, n, "height")
        w_l = _per_video(width, n, "width")
        nv_l = _per_video(num_videos, n, "num_videos")
        loaded, grids, out_ts = [], [], []
        for i, video in enumerate(video_list):
            if isinstance(video, str):
                one = base if fps_l[i] is None else dataclasses.replace(base, fps=fps_l[i], nframes=None)
                frames, info = self.load_video(video, one, num_videos=int(nv_l[i] or 1))
                stamps = info["timestamps"]
            elif isinstance(video, (list, tuple)):
                frames, info = self.load_video(video, base, num_videos=int(nv_l[i] or 1), frames_fps=fps_l[i])
                stamps = info["timestamps"]
            elif isinstance(video, (np.ndarray, torch.Tensor)):
                if not len(video):
                    raise ValueError("a video has zero frames")
                if isinstance(video, torch.Tensor) and video.dtype == torch.uint8 and video.shape[1] == 3:
                    frames = video  # already [T, 3, H, W] uint8 (process_vision_info's output): no copy
                else:
                    frames = torch.stack([to_chw_uint8(f) for f in video])
                if h_l[i] is not None and w_l[i] is not None:
                    size = (int(h_l[i]), int(w_l[i]))
                else:  # already-sampled frames: all are kept; the plan gives their size
                    count = frames.shape[0]
                    plan = plan_video(
                        count, VIDEO_FPS, frames.shape[-2], frames.shape[-1],
                        dataclasses.replace(base, nframes=count, video_start=None, video_end=None),
                        num_videos=int(nv_l[i] or 1),
                    )
                    size = (plan["resized_height"], plan["resized_width"])
                if size[0] % IMAGE_FACTOR or size[1] % IMAGE_FACTOR:
                    raise ValueError(f"video frame size {size} is not a multiple of {IMAGE_FACTOR}")
                frames = resize_frames(frames, *size)
                if ts_l[i] is not None:
                    stamps = [float(t) for t in (ts_l[i].tolist() if hasattr(ts_l[i], "tolist") else ts_l[i])]
                    if len(stamps) != frames.shape[0]:
                        raise ValueError(f"video {i}: {len(stamps)} timestamps for {frames.shape[0]} frames")
                elif fps_l[i]:
                    stamps = frame_timestamps(range(frames.shape[0]), float(fps_l[i]))
                else:
                    stamps = None
            else:
                raise TypeError(f"unsupported video of type {type(video).__name__}")
            t, _, hh, ww = frames.shape
            loaded.append(frames)
            grids.append([t, hh // self.patch_size, ww // self.patch_size])
            out_ts.append(stamps)
        data: dict[str, Any] = {
            "pixel_values_videos": self._patches(loaded),
            "video_grid_thw": torch.tensor(grids, dtype=torch.int64),
        }
        if return_tensors in ("np", "numpy"):
            data = {k: v.numpy() for k, v in data.items()}
        data["video_timestamps"] = out_ts
        return BatchFeature(data=data)

    def _patches(self, videos: list[torch.Tensor], chunk: int = 32) -> torch.Tensor:
        """uint8 frames ``[T, 3, H, W]`` per video -> float32 ``[sum T * H/14 * W/14, 588]``, normalised and in raster
        patch order (as :func:`patchify` of :func:`normalize_uint8`, the same operations in the same order).

        The output is allocated once and filled ``chunk`` frames at a time, so the float32 memory is the output plus
        one chunk (an hour of video at the default budget: 1.6 GB of output, not twice that)."""
        p = self.patch_size
        total = sum(v.shape[0] * (v.shape[2] // p) * (v.shape[3] // p) for v in videos)
        out = torch.empty(total, 3 * p * p, dtype=torch.float32)
        mean = torch.tensor(self.image_mean if self.do_normalize else [0.0] * 3, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std if self.do_normalize else [1.0] * 3, dtype=torch.float32).view(1, -1, 1, 1)
        rescale = self.rescale_factor if self.do_rescale else 1.0
        row = 0
        for frames in videos:
            t, c, h, w = frames.shape
            gh, gw = h // p, w // p
            for a in range(0, t, chunk):
                part = frames[a : a + chunk]
                k = part.shape[0]
                x = (part.to(torch.float32) * rescale - mean) / std
                n = k * gh * gw
                out[row : row + n].view(k, gh, gw, c, p, p).copy_(x.view(k, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5))
                row += n
        return out

    def __call__(self, videos: Any = None, **kwargs: Any) -> BatchFeature:
        """Alias of :meth:`preprocess`."""
        return self.preprocess(videos, **kwargs)


KeyeVL2VideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = ["KeyeVL2VideoProcessor", "make_video_list"]
