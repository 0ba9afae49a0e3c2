# Copyright 2025 The keye-vl authors. Licensed under the Apache License, Version 2.0.
"""Keye-VL-2.0 image processor: smart resize to multiples of 28, normalise, 14x14 patches in raster order.

Output contract with the model (fixed; see ``modeling_keye``):

- ``pixel_values``: float32 ``[N_patches_total, 3 * 14 * 14]``. Each 14x14 patch is flattened in (C, P, P) order
  and normalised ``(x / 255 - 0.5) / 0.5``. The patches of one image follow RASTER order over its
  ``(h / 14, w / 14)`` patch grid (not Qwen2-VL's 2x2-block order: the model's projector merges 2x2 neighbours
  itself, docs/keye_vl2.md section 5). Images are concatenated in order.
- ``image_grid_thw``: int64 ``[n_images, 3]`` = ``(1, h / 14, w / 14)``; ``h`` and ``w`` are multiples of 28, so an
  image becomes ``h * w / 784`` LLM tokens.

The class subclasses transformers' ``BaseImageProcessor`` only for the save / load / Auto-class machinery; the whole
pipeline is in :meth:`KeyeVL2ImageProcessor.preprocess`, so it behaves the same in transformers 5.17 ... 5.x.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .vision_process_keye_vl_2 import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    MERGE_SIZE,
    PATCH_SIZE,
    load_image,
    pil_to_rgb,
    smart_resize,
    to_chw_uint8,
)


def patchify(image: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Cut a normalised image ``[C, H, W]`` (H, W multiples of ``patch_size``) into raster-ordered patches.

    Returns ``[(H / p) * (W / p), C * p * p]``: row-major over the patch grid, each patch flattened in (C, p, p)
    order - the layout of ``Conv2d(3, D, p, stride=p)`` applied patch by patch (docs/keye_vl2.md section 5).
    """
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(1, 3, 0, 2, 4)  # (gh, gw, C, p, p)
    return patches.reshape(grid_h * grid_w, channels * patch_size * patch_size)


def normalize_uint8(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float], rescale: float) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> float32 ``(x * rescale - mean) / std`` per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (frames.to(torch.float32) * rescale - mean_t) / std_t


def make_image_list(images: Any) -> list[Any]:
    """Flatten one image, a list of images or a batch (list of lists) into a flat list, keeping order."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, str)):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:  # a stacked batch [N, C, H, W] / [N, H, W, C]
            return list(images)
        return [images]
    if isinstance(images, (list, tuple)):
        out: list[Any] = []
        for item in images:
            out.extend(make_image_list(item))
        return out
    raise TypeError(f"unsupported images input of type {type(images).__name__}")


class KeyeVL2ImageProcessor(BaseImageProcessor):
    r"""Image processor of Keye-VL-2.0 (docs/keye_vl2.md section 7 "Processor", images).

    Each image is converted to RGB, resized with :func:`smart_resize` (sides multiples of 28, area between
    ``min_pixels`` and ``max_pixels``, aspect ratio at most 200) using PIL bicubic (as keye-vl-utils /
    qwen-vl-utils), rescaled by 1/255, normalised with mean = std = 0.5 and cut into 14x14 patches in raster order.

    Args:
        min_pixels (`int`, defaults to 4 * 784 = 3,136): minimum area after resizing (4 LLM tokens).
        max_pixels (`int`, defaults to 20480 * 784 = 16,056,320): maximum area after resizing (20,480 LLM tokens).
        patch_size (`int`, defaults to 14): ViT patch side in pixels.
        merge_size (`int`, defaults to 2): projector merge (2x2 patches -> 1 LLM token).
        temporal_patch_size (`int`, defaults to 1): frames per patch (always 1 for Keye).
        image_mean, image_std (`list[float]`, default `[0.5] * 3`): normalisation.
        rescale_factor (`float`, default 1/255).
        do_resize, do_rescale, do_normalize, do_convert_rgb (`bool`, default True).

    Call: ``processor(images, min_pixels=None, max_pixels=None, return_tensors="pt")`` with one image or a list
    (PIL images, numpy / torch arrays HWC or CHW, uint8 or float in [0, 1] / [0, 255], or paths).

    Returns a `BatchFeature` with ``pixel_values`` float32 ``[N_patches, 588]`` and ``image_grid_thw`` int64
    ``[n_images, 3]`` (torch tensors with ``return_tensors="pt"`` (default), numpy arrays with ``"np"``).

    Raises ValueError for an aspect ratio above 200 or an empty image; TypeError for unsupported inputs.
    """

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(
        self,
        min_pixels: int = IMAGE_MIN_PIXELS,
        max_pixels: int = IMAGE_MAX_PIXELS,
        patch_size: int = PATCH_SIZE,
        merge_size: int = MERGE_SIZE,
        temporal_patch_size: int = 1,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        rescale_factor: float = 1 / 255,
        do_resize: bool = True,
        do_rescale: bool = True,
        do_normalize: bool = True,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("size", None)  # accepted for compatibility with Qwen-style configs; min/max_pixels rule
        super().__init__(**kwargs)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.rescale_factor = float(rescale_factor)
        self.do_resize = bool(do_resize)
        self.do_rescale = bool(do_rescale)
        self.do_normalize = bool(do_normalize)
        self.do_convert_rgb = bool(do_convert_rgb)
        if self.temporal_patch_size != 1:
            raise ValueError("Keye-VL uses temporal_patch_size=1 (one frame per patch)")

    @property
    def factor(self) -> int:
        """Side multiple of resized images: patch_size * merge_size (28)."""
        return self.patch_size * self.merge_size

    def get_resized_size(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """Size an image of ``height x width`` pixels gets (docs/keye_vl2.md section 7 smart_resize)."""
        return smart_resize(
            height,
            width,
            self.factor,
            min_pixels=self.min_pixels if min_pixels is None else int(min_pixels),
            max_pixels=self.max_pixels if max_pixels is None else int(max_pixels),
        )

    def get_number_of_image_tokens(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> int:
        """Number of ``<|image_pad|>`` tokens (= visual embeddings after the 2x2 merge) for an image of this size."""
        h, w = self.get_resized_size(height, width, min_pixels, max_pixels)
        return (h // self.factor) * (w // self.factor)

    def _resize_one(self, image: Any, min_pixels: int | None, max_pixels: int | None, do_resize: bool) -> torch.Tensor:
        """One input image -> uint8 ``[3, H, W]`` with H, W multiples of 28."""
        if isinstance(image, str):
            image = load_image(image)
        if isinstance(image, Image.Image):
            pil = pil_to_rgb(image)
        else:
            pil = Image.fromarray(to_chw_uint8(image).permute(1, 2, 0).numpy())
        if pil.width <= 0 or pil.height <= 0:
            raise ValueError("empty image (0 pixels)")
        if do_resize:
            height, width = self.get_resized_size(pil.height, pil.width, min_pixels, max_pixels)
            if (height, width) != (pil.height, pil.width):
                pil = pil.resize((width, height), resample=Image.Resampling.BICUBIC)
        elif pil.height % self.factor or pil.width % self.factor:
            raise ValueError(
                f"do_resize=False needs sides that are multiples of {self.factor}, got {pil.height}x{pil.width}"
            )
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)

    def to_patches(self, image_uint8: torch.Tensor, do_rescale: bool = True, do_normalize: bool = True) -> torch.Tensor:
        """uint8 ``[3, H, W]`` -> float32 patches ``[(H/14)*(W/14), 588]`` (normalised, raster order)."""
        mean = self.image_mean if do_normalize else [0.0, 0.0, 0.0]
        std = self.image_std if do_normalize else [1.0, 1.0, 1.0]
        pixels = normalize_uint8(image_uint8, mean, std, self.rescale_factor if do_rescale else 1.0)
        return patchify(pixels, self.patch_size)

    def preprocess(
        self,
        images: Any,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        do_resize: bool | None = None,
        do_rescale: bool | None = None,
        do_normalize: bool | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one image or a list of images; see the class docstring for inputs, outputs and errors.

        ``min_pixels`` / ``max_pixels`` override the instance bounds for this call. Other keyword arguments that
        other processors accept (``size``, ``resample``, ``data_format``, ...) are ignored.
        """
        do_resize = self.do_resize if do_resize is None else do_resize
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_list = make_image_list(images)
        if not image_list:
            raise ValueError("no image given to KeyeVL2ImageProcessor")
        pixel_values, grids = [], []
        for image in image_list:
            resized = self._resize_one(image, min_pixels, max_pixels, do_resize)
            pixel_values.append(self.to_patches(resized, do_rescale, do_normalize))
            grids.append([1, resized.shape[1] // self.patch_size, resized.shape[2] // self.patch_size])
        data = {
            "pixel_values": torch.cat(pixel_values, dim=0),
            "image_grid_thw": torch.tensor(grids, dtype=torch.int64),
        }
        if return_tensors in ("np", "numpy"):
            data = {k: v.numpy() for k, v in data.items()}
        return BatchFeature(data=data)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> BatchFeature:
        """Alias of :meth:`preprocess`."""
        return self.preprocess(images, *args, **kwargs)


KeyeVL2ImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["KeyeVL2ImageProcessor", "patchify", "normalize_uint8", "make_image_list"]
