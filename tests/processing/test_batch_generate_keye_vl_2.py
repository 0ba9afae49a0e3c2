"""Under load (issue 16): 16 conversations with different images and videos in one processor call and one
``generate()`` give the same tokens as the 16 one by one (tiny random model, CPU, greedy), and the batch's
first-step logits equal the single runs' to float32 rounding."""

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av")
modeling = pytest.importorskip("keye_vl.modeling_keye")

from pathlib import Path  # noqa: E402

from keye_vl.processing import build_keye_processor  # noqa: E402

MEDIA = Path(__file__).resolve().parents[2] / "assets" / "media"


def conversations():
    rng = np.random.default_rng(0)
    sizes = [(56, 84), (84, 56), (112, 112), (28, 140), (70, 98), (140, 56)]
    convs = []
    for i in range(16):
        content = []
        kind = i % 4
        if kind in (0, 3):
            h, w = sizes[i % len(sizes)]
            content.append({"type": "image", "image": Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))})
        if kind in (1, 3):
            frames = [Image.fromarray(rng.integers(0, 255, (56, 84), dtype=np.uint8)).convert("RGB")
                      for _ in range(2 + i % 2)]
            content.append({"type": "video", "video": frames, "sample_fps": 2.0, "max_pixels": 64 * 784})
        if kind == 2:
            name = "realshort.mp4" if i % 8 == 2 else "lego_stopmotion.webm"
            content.append({"type": "video", "video": str(MEDIA / name), "nframes": 2, "max_pixels": 64 * 784})
        content.append({"type": "text", "text": f"Question {i}: " + "what is shown? " * (1 + i % 5)})
        convs.append([{"role": "user", "content": content}])
    return convs


def test_sixteen_conversations_batched_equal_one_by_one():
    torch.manual_seed(0)
    model = modeling.KeyeVL2MoeForConditionalGeneration(modeling.tiny_config()).eval()
    processor = build_keye_processor()
    convs = conversations()
    gen = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batch = processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True)
    assert batch["input_ids"].shape[0] == 16 and batch["attention_mask"][:, -1].all()  # left padded
    assert batch["image_grid_thw"].shape[0] == 8 and batch["video_grid_thw"].shape[0] == 12
    with torch.no_grad():
        together = model.generate(**batch, **gen)
    prompt = batch["input_ids"].shape[1]
    for i, conv in enumerate(convs):
        single = processor.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        length = int(single["attention_mask"].sum())
        assert torch.equal(batch["input_ids"][i, prompt - length:], single["input_ids"][0]), i
        with torch.no_grad():
            alone = model.generate(**single, **gen)
        assert torch.equal(together.sequences[i, prompt:], alone.sequences[0, length:]), i
        torch.testing.assert_close(together.scores[0][i], alone.scores[0][0], rtol=1e-4, atol=1e-4)


def test_video_patches_filled_in_place_equal_per_frame_patchify():
    """The video processor fills pixel_values_videos chunk by chunk into one buffer (no per-frame list + cat, half
    the float32 peak for an hour of video); values are bit-identical to patchify(normalize_uint8(frame))."""
    from keye_vl.processing import KeyeVL2VideoProcessor
    from keye_vl.processing.image_processing_keye_vl_2 import normalize_uint8, patchify

    rng = np.random.default_rng(1)
    shapes = ((37, 28, 56), (5, 56, 28))
    videos = [torch.from_numpy(rng.integers(0, 256, (t, 3, h, w), dtype=np.uint8)) for t, h, w in shapes]
    out = KeyeVL2VideoProcessor()._patches(videos, chunk=8)
    want = torch.cat([patchify(normalize_uint8(f, [0.5] * 3, [0.5] * 3, 1 / 255), 14) for v in videos for f in v])
    assert out.shape == (37 * 2 * 4 + 5 * 4 * 2, 588) and torch.equal(out, want)
