"""The message format: qwen-vl-utils video keys honoured (nframes, resized_height / resized_width,
video_start / video_end), unknown or misspelt keys rejected by name, transformers' chat-template items accepted,
the typed VideoSampling options, and the README's video example run as written from a saved Hub folder in a
process where this repository is not importable.

Expected indices are hand-computed from the published rule (``round(linspace(start, end, n))``, half to even) for
realshort.mp4 (36 frames, 45000/1499 = 30.02 fps, 320 x 240) and cockatoo.mp4 (280 frames, 20 fps, 1280 x 720).
"""

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av")

from keye_vl.processing import build_keye_processor  # noqa: E402
from keye_vl.processing import vision_process_keye_vl_2 as vp  # noqa: E402
from keye_vl.processing.vision_process_keye_vl_2 import VideoSampling  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MEDIA = REPO / "assets" / "media"
SHORT = str(MEDIA / "realshort.mp4")


def one_video(item):
    return vp.process_vision_info([{"role": "user", "content": [item, {"type": "text", "text": "?"}]}])


@pytest.fixture(scope="module")
def processor():
    return build_keye_processor()


def test_nframes_is_honoured():
    _, videos, kw = one_video({"type": "video", "video": SHORT, "nframes": 5})
    # linspace(0, 35, 5) = 0, 8.75, 17.5, 26.25, 35 -> 0, 9, 18 (half to even), 26, 35
    assert kw["frame_indices"] == [[0, 9, 18, 26, 35]] and videos[0].shape[0] == 5
    with pytest.raises(ValueError, match="either fps or nframes"):
        one_video({"type": "video", "video": SHORT, "nframes": 5, "fps": 1.0})
    with pytest.raises(ValueError, match="nframes=50 is more than the 36 frames"):
        one_video({"type": "video", "video": SHORT, "nframes": 50})
    with pytest.raises(ValueError, match="nframes must be positive"):
        one_video({"type": "video", "video": SHORT, "nframes": 0})


def test_resized_size_and_window_are_honoured():
    # resized 100 x 150 -> multiples of 28 by rounding: 4 x 28 = 112, round(5.36) x 28 = 140
    _, videos, kw = one_video({"type": "video", "video": SHORT, "resized_height": 100, "resized_width": 150})
    assert tuple(videos[0].shape[2:]) == (112, 140) and (kw["height"], kw["width"]) == ([112], [140])
    with pytest.raises(ValueError, match="both resized_height and resized_width"):
        one_video({"type": "video", "video": SHORT, "resized_height": 100})
    # window 0.2 .. 0.8 s at 30.02 fps: frames ceil(6.004) = 7 .. floor(24.016) = 24 (18 frames, 0.6 s) -> 2 frames
    _, _, kw = one_video({"type": "video", "video": SHORT, "video_start": 0.2, "video_end": 0.8})
    assert kw["frame_indices"] == [[7, 24]]
    np.testing.assert_array_equal(np.float32(kw["timestamps"][0]), np.float32([7, 24]) / np.float32(45000 / 1499))
    with pytest.raises(ValueError, match="video_start .* must be before video_end"):
        one_video({"type": "video", "video": SHORT, "video_start": 0.8, "video_end": 0.2})


def test_unknown_and_misspelt_keys_are_rejected_by_name(processor):
    with pytest.raises(ValueError, match=r"unknown key 'max_frame' in a video item; did you mean 'max_frames'"):
        one_video({"type": "video", "video": SHORT, "max_frame": 4})
    with pytest.raises(ValueError, match=r"unknown key 'max_pixel' in an image item; did you mean 'max_pixels'"):
        vp.process_vision_info([{"role": "user", "content": [
            {"type": "image", "image": str(MEDIA / "chelsea.png"), "max_pixel": 1000}]}])
    with pytest.raises(ValueError, match=r"'fsp'.*did you mean 'fps'"):
        vp.process_vision_info([{"role": "user", "content": [{"type": "video", "video": SHORT}]}], fsp=1.0)
    with pytest.raises(ValueError, match=r"'max_frame'.*did you mean 'max_frames'"):
        processor(text="<|video_pad|>", videos=[SHORT], max_frame=3)
    with pytest.raises(ValueError, match=r"'nframe'.*did you mean 'nframes'"):
        processor.video_processor([SHORT], nframe=3)


def test_transformers_style_items(processor):
    chelsea = str(MEDIA / "chelsea.png")
    reference = vp.fetch_image({"type": "image", "image": chelsea})
    for key in ("url", "path"):
        got = vp.fetch_image({"type": "image", key: chelsea})
        assert np.array_equal(np.asarray(got), np.asarray(reference))
    with pytest.raises(ValueError, match="URLs are not fetched"):
        vp.fetch_image({"type": "image", "url": "https://example.com/a.png"})
    with pytest.raises(ValueError, match="several sources"):
        vp.fetch_image({"type": "image", "url": chelsea, "path": chelsea})
    messages = [{"role": "user", "content": [
        {"type": "image", "path": chelsea},
        {"type": "video", "path": SHORT, "nframes": 3},
        {"type": "text", "text": "Describe."},
    ]}]
    images, videos, kw = processor.process_vision_info(messages)
    assert len(images) == 1 and kw["frame_indices"] == [[0, 18, 35]]  # linspace(0, 35, 3) = 0, 17.5 -> 18, 35
    batch = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert batch["video_grid_thw"][0, 0] == 3 and batch["image_grid_thw"].shape == (1, 3)
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert re.findall(r"<\|frame\|>([0-9.]+)", text) == ["0.0", "0.6", "1.2"]  # 18 / 30.02 = 0.5996, 35 / 30.02


def test_processor_defaults_reach_process_vision_info():
    """processor.process_vision_info uses the (saved) video processor's options, not the module defaults."""
    proc = build_keye_processor()
    proc.video_processor.min_frames = 3  # 1.2 s at 2 fps would give 2 frames
    assert proc.video_processor.sampling == VideoSampling(min_frames=3)
    _, _, kw = proc.process_vision_info([{"role": "user", "content": [{"type": "video", "video": SHORT}]}])
    assert kw["frame_indices"] == [[0, 18, 35]]


def test_video_sampling_options_object():
    assert VideoSampling().fps == 2.0 and VideoSampling().total_pixels == 184320 * 784
    s = VideoSampling.from_mapping({"max_frames": 8, "video_total_pixels": 1000 * 784, "type": "video"}, ignore=("type",))
    assert (s.max_frames, s.total_pixels, s.fps) == (8, 1000 * 784, 2.0)
    with pytest.raises(ValueError, match="whole number"):
        VideoSampling(max_frames=2.5)
    with pytest.raises(ValueError, match="sampling fps must be positive"):
        VideoSampling(fps=float("inf"))
    # max_frames wins over min_frames where they cross (documented): one frame for max_frames=1
    assert vp.plan_video(280, 20.0, 720, 1280, VideoSampling(max_frames=1))["nframes"] == 1
    with pytest.raises(ValueError, match=r"min_pixels \(78400\) must be <= max_pixels \(50176\)"):
        VideoSampling(min_pixels=100 * 784, max_pixels=64 * 784)
    # one plan for files, frame lists and arrays: the same numbers as the keyword form
    a = vp.plan_video(280, 20.0, 720, 1280, VideoSampling(fps=1.0, max_frames=9))
    b = vp.plan_video(280, 20.0, 720, 1280, fps=1.0, max_frames=9)
    assert a == b and a["frame_indices"] == np.round(np.linspace(0, 279, 9)).astype(int).tolist()
    with pytest.raises(ValueError, match="unknown key 'max_frame' in plan_video"):
        vp.plan_video(280, 20.0, 720, 1280, max_frame=9)


def test_process_vision_info_output_goes_straight_into_the_processor(processor):
    frames = [Image.fromarray(np.full((56, 84, 3), 30 * i, np.uint8)) for i in range(3)]
    messages = [{"role": "user", "content": [
        {"type": "video", "video": SHORT, "nframes": 2},
        {"type": "video", "video": frames, "sample_fps": 2.0},
        {"type": "text", "text": "Compare."},
    ]}]
    images, videos, kw = processor.process_vision_info(messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    direct = processor(text=text, images=images, videos=videos, **kw)
    one_call = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    for key in ("input_ids", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(direct[key], one_call[key]), key
    stamps = re.findall(r"<\|frame\|>([0-9.]+)", processor.tokenizer.decode(direct["input_ids"][0]))
    assert stamps == ["0.0", "1.2", "0.0", "0.5", "1.0"]  # 35 / 30.02 = 1.166; frames at 2 fps: 0, 0.5, 1.0


def readme_video_example() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- readme-video-example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "processor.process_vision_info(messages)" in block and "model.generate" in block
    return block


def test_readme_video_example_runs_from_a_hub_folder(tmp_path, run_clean):
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    folder = tmp_path / "keye-tiny"
    KeyeVL2MoeForConditionalGeneration(tiny_config()).eval().save_pretrained(folder)
    build_keye_processor().save_pretrained(folder)
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(folder)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        """
    ) + readme_video_example() + textwrap.dedent(
        """
        print("GRID", inputs["video_grid_thw"].tolist(), "NEW", output.shape[1] - inputs["input_ids"].shape[1])
        print("MODULE", type(processor).__module__)
        """
    )
    proc = run_clean(code, REPO, timeout=240, home=tmp_path)  # the README's relative media paths: run in the repo
    # cockatoo: 14 s, fps 1 -> 14 frames, capped at max_frames 4; 720 x 1280 under T = 256 tokens -> 336 x 588
    assert "GRID [[4, 24, 42]] NEW 8" in proc.stdout, proc.stdout
    assert "transformers_modules" in proc.stdout.split("MODULE", 1)[1]


def test_still_image_given_as_a_video_is_one_frame():
    """Documented choice: min(max(n, 2), total_frames) = 1 frame for a one-frame video; no frame is repeated."""
    frame = Image.fromarray(np.full((56, 56, 3), 7, np.uint8))
    _, videos, kw = one_video({"type": "video", "video": [frame]})
    assert videos[0].shape == (1, 3, 224, 224) and kw["frame_indices"] == [[0]]  # 56 x 56 -> 64 tokens minimum
