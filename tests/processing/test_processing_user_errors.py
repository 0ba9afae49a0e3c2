"""Regressions from a new-user trial: no network access, left padding by default, no silent truncation of
visual tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from keye_vl.processing import build_keye_processor, process_vision_info

MEDIA = Path(__file__).resolve().parents[2] / "assets" / "media"


@pytest.fixture(scope="module")
def processor():
    return build_keye_processor()


def test_urls_are_refused_without_touching_the_network():
    for kind in ("image", "video"):
        msgs = [{"role": "user", "content": [{"type": kind, kind: "http://example.invalid/x"}]}]
        with pytest.raises(ValueError, match="no network calls"):
            process_vision_info(msgs)


def test_batches_are_left_padded_by_default(processor, tmp_path):
    assert processor.tokenizer.padding_side == "left"
    processor.save_pretrained(tmp_path)
    from keye_vl.processing import KeyeVL2Processor

    again = KeyeVL2Processor.from_pretrained(tmp_path, trust_remote_code=True)
    assert again.tokenizer.padding_side == "left"
    out = again(text=["short", "a much longer prompt than the first one"], return_tensors="pt")
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1


def test_truncation_into_visual_tokens_is_an_error(processor):
    image = Image.open(MEDIA / "chelsea.png").convert("RGB")
    text = f"<|vision_start|>{processor.image_token}<|vision_end|>What animal is this?"
    full = processor(text=[text], images=[image], return_tensors="pt")
    n = int((full["input_ids"] == processor.image_token_id).sum())
    assert n > 50
    with pytest.raises(ValueError, match="cut into the visual tokens"):
        processor(text=[text], images=[image], truncation=True, max_length=50, return_tensors="pt")
    ok = processor(text=[text], images=[image], truncation=True, max_length=n + 20, return_tensors="pt")
    assert int((ok["input_ids"] == processor.image_token_id).sum()) == n
