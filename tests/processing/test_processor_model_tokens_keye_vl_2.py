"""The number of placeholder tokens the processor writes equals the number of
visual embeddings the (tiny, random) model produces, for images of several aspect ratios (1:10, 10:1, a scanned
page, tiny and near-limit shapes) and for videos; and a full forward pass accepts the processor's batch."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MEDIA = REPO / "assets" / "media"

modeling = pytest.importorskip("keye_vl.modeling_keye")
from keye_vl.processing import build_keye_processor  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = modeling.KeyeVL2MoeForConditionalGeneration(modeling.tiny_config()).eval()
    return build_keye_processor(), model


IMAGES = {
    "1:10": (60, 600),
    "10:1": (600, 60),
    "1:200": (28, 5600),
    "square_tiny": (10, 10),
    "odd": (333, 517),
}


@pytest.mark.parametrize("name", list(IMAGES) + ["page.png", "chelsea.png"])
def test_image_tokens_equal_model_embeddings(setup, name):
    processor, model = setup
    if name.endswith(".png"):
        image = Image.open(MEDIA / name)
    else:
        h, w = IMAGES[name]
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    batch = processor(text="<|vision_start|><|image_pad|><|vision_end|>", images=image)
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    n_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    assert features.shape[0] == n_tokens == int(batch["image_grid_thw"].prod()) // 4


@pytest.mark.parametrize("name", ["realshort.mp4", "lego_stopmotion.webm"])
def test_video_tokens_equal_model_embeddings(setup, name):
    processor, model = setup
    batch = processor(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[str(MEDIA / name)])
    with torch.no_grad():
        features = model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    n_tokens = int((batch["input_ids"] == processor.video_token_id).sum())
    assert features.shape[0] == n_tokens == int(batch["video_grid_thw"].prod()) // 4


def test_forward_on_a_left_padded_mixed_batch(setup):
    processor, model = setup
    frames = [Image.fromarray(np.full((112, 140, 3), 40 * i, np.uint8)) for i in range(3)]
    texts = [
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], add_generation_prompt=True),
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When?"}]}], add_generation_prompt=True),
    ]
    batch = processor(text=texts, images=[Image.open(MEDIA / "chelsea.png")], videos=[frames], fps=[1.0], padding_side="left")
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # left padding: prompts end together
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    # a mismatched batch is rejected by the model with its own clear error
    bad = dict(batch)
    bad["video_grid_thw"] = batch["video_grid_thw"].clone()
    bad["video_grid_thw"][0, 0] = 2
    bad["pixel_values_videos"] = batch["pixel_values_videos"][: int(bad["video_grid_thw"].prod())]
    with pytest.raises(ValueError):
        model(**bad)
