"""KeyeVL2Processor, image processor, tokenizer and chat template.

Token counts are checked against the grid arithmetic of docs/keye_vl2.md (section 7: an image of h x w pixels becomes
(h/14 * w/14) / 4 tokens; a video frame likewise, after `<|frame|>` + its time). The save / load round trip runs in a
clean interpreter (keye_vl imports blocked, empty PYTHONPATH, temporary cwd, HF_HUB_OFFLINE=1).
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from keye_vl.processing import (
    KEYE_VL2_CHAT_TEMPLATE,
    KeyeVL2ImageProcessor,
    KeyeVL2Processor,
    KeyeVL2VideoProcessor,
    build_keye_processor,
    build_keye_tokenizer,
    process_vision_info,
)


MEDIA = Path(__file__).resolve().parents[2] / "assets" / "media"
PX = 28 * 28

# Token ids of the contract (Qwen3 vocabulary + Keye additions appended after </think>)
IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<think>": 151667,
    "</think>": 151668,
    "<|frame|>": 151669,
    "<|fast_start|>": 151670,
    "<|fast_end|>": 151671,
}


def ref_smart_resize(h, w, min_pixels=4 * PX, max_pixels=20480 * PX, factor=28):
    """docs/keye_vl2.md section 7, written from the text (not imported)."""
    hb = max(factor, round(h / factor) * factor)
    wb = max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return max(hb, factor), max(wb, factor)


def runs_of(ids, token_id):
    """Lengths of the maximal runs of `token_id` in a 1-D id list."""
    runs, current = [], 0
    for t in ids:
        if t == token_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


@pytest.fixture(scope="module")
def processor():
    return build_keye_processor()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------
def test_tokenizer_ids(processor):
    tok = processor.tokenizer
    for token, token_id in IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert len(tok) == 151672
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    ids = tok("<|vision_start|><|frame|>12.5<|video_pad|><|vision_end|>")["input_ids"]
    assert ids[:2] == [151652, 151669] and ids[-2:] == [151656, 151653]
    assert tok.convert_ids_to_tokens(ids[2:-2]) == ["1", "2", ".", "5"]  # Qwen splits digits
    assert (processor.image_token, processor.video_token, processor.frame_token) == ("<|image_pad|>", "<|video_pad|>", "<|frame|>")
    assert (processor.image_token_id, processor.video_token_id, processor.frame_token_id) == (151655, 151656, 151669)
    # real Qwen3 BPE, not a toy vocabulary
    assert tok("Hello world")["input_ids"] == [9707, 1879]


def test_processor_from_parts_defaults():
    tokenizer = build_keye_tokenizer()
    assert tokenizer.chat_template == KEYE_VL2_CHAT_TEMPLATE
    proc = KeyeVL2Processor(tokenizer=tokenizer)  # default image / video processors
    assert isinstance(proc.image_processor, KeyeVL2ImageProcessor)
    assert isinstance(proc.video_processor, KeyeVL2VideoProcessor)
    assert proc.chat_template == KEYE_VL2_CHAT_TEMPLATE
    assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (4 * PX, 20480 * PX)
    vp = proc.video_processor
    assert (vp.fps, vp.min_pixels, vp.max_pixels, vp.total_pixels) == (2.0, 64 * PX, 256 * PX, 184320 * PX)
    assert proc.model_input_names == [
        "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Image processor: layout contract and sizes (item 2)
# ---------------------------------------------------------------------------------------------------------------------
def test_pixel_layout_is_raster_and_normalised():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)  # multiples of 28, >= 4 tokens: no resize
    out = KeyeVL2ImageProcessor()(image)
    pv, grid = out["pixel_values"], out["image_grid_thw"]
    assert pv.dtype == torch.float32 and grid.dtype == torch.int64
    assert grid.tolist() == [[1, 4, 6]] and tuple(pv.shape) == (24, 588)
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    for r in range(4):
        for c in range(6):
            patch = chw[:, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
            expected = ((patch / 255 - 0.5) / 0.5).reshape(-1)  # (C, P, P) order
            torch.testing.assert_close(pv[r * 6 + c], expected, rtol=0, atol=1e-6)


def test_image_input_types_agree():
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    proc = KeyeVL2ImageProcessor()
    ref = proc(Image.fromarray(hwc))["pixel_values"]
    for variant in (hwc, torch.from_numpy(hwc), torch.from_numpy(hwc).permute(2, 0, 1), hwc.astype(np.float32) / 255):
        assert torch.equal(proc(variant)["pixel_values"], ref)
    rgba = Image.fromarray(np.dstack([hwc, np.full((120, 200), 255, np.uint8)]), "RGBA")
    assert torch.equal(proc(rgba)["pixel_values"], ref)


SIZES = [(100, 1000), (1000, 100), (28, 5600), (5600, 28), (37, 53), (10, 10), (3000, 4000), (4200, 4000)]


@pytest.mark.parametrize("h,w", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_image_placeholders_match_grid(processor, h, w):
    image = Image.fromarray(np.full((h, w, 3), 127, np.uint8))
    out = processor(text="<|vision_start|><|image_pad|><|vision_end|>Describe.", images=image)
    rh, rw = ref_smart_resize(h, w)
    assert out["image_grid_thw"].tolist() == [[1, rh // 14, rw // 14]]
    n_tokens = rh * rw // PX
    assert 4 <= n_tokens <= 20480
    assert int((out["input_ids"] == 151655).sum()) == n_tokens == int(out["image_grid_thw"].prod()) // 4
    assert out["pixel_values"].shape[0] == rh * rw // (14 * 14)


@pytest.mark.parametrize("name", ["page.png", "chelsea.png", "coffee.png"])
def test_real_images(processor, name):
    image = Image.open(MEDIA / name)
    w, h = image.size
    out = processor(text=["<|image_pad|> what is this?"], images=[image])
    rh, rw = ref_smart_resize(h, w)
    assert out["image_grid_thw"].tolist() == [[1, rh // 14, rw // 14]]
    assert int((out["input_ids"] == 151655).sum()) == rh * rw // PX
    # per-call max_pixels (the scanned page at most 256 tokens)
    small = processor(text="<|image_pad|>", images=image, max_pixels=256 * PX)
    srh, srw = ref_smart_resize(h, w, max_pixels=256 * PX)
    assert small["image_grid_thw"].tolist() == [[1, srh // 14, srw // 14]] and srh * srw <= 256 * PX


def test_aspect_ratio_error(processor):
    with pytest.raises(ValueError, match="aspect ratio"):
        processor(text="<|image_pad|>", images=Image.new("RGB", (28 * 201, 28)))


# ---------------------------------------------------------------------------------------------------------------------
# Processor with videos (item 1, token side)
# ---------------------------------------------------------------------------------------------------------------------
def test_video_prompt_layout(processor):
    path = MEDIA / "cockatoo.mp4"
    out = processor(
        text="<|vision_start|><|video_pad|><|vision_end|>What bird?", videos=[str(path)], return_video_timestamps=True
    )
    grid = out["video_grid_thw"].tolist()
    assert grid == [[28, 24, 42]]  # 28 frames of 336 x 588
    ids = out["input_ids"][0].tolist()
    per_frame = 24 * 42 // 4
    assert runs_of(ids, 151656) == [per_frame] * 28  # one run of <|video_pad|> per frame
    assert ids.count(151669) == 28 and ids.count(151652) == 1 and ids.count(151653) == 1
    assert out["pixel_values_videos"].shape == (28 * 24 * 42, 588)
    stamps = out["video_timestamps"][0]
    text = processor.tokenizer.decode(ids)
    expected = "".join(f"<|frame|>{np.float32(i) / np.float32(20.0):.1f}" + "<|video_pad|>" * per_frame for i in np.round(np.linspace(0, 279, 28)).astype(int))
    assert "<|vision_start|>" + expected + "<|vision_end|>" in text
    assert [f"{t:.1f}" for t in stamps] == re.findall(r"<\|frame\|>([0-9.]+)", text)
    assert "video_timestamps" not in processor(text="<|video_pad|>", videos=[str(path)])  # not a model input


@pytest.mark.parametrize("name", ["cockatoo.mp4", "realshort.mp4", "lego_stopmotion.webm"])
def test_video_tokens_equal_grid(processor, name):
    messages = [{"role": "user", "content": [{"type": "video", "video": str(MEDIA / name)}, {"type": "text", "text": "Describe."}]}]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    (t, gh, gw), = out["video_grid_thw"].tolist()
    ids = out["input_ids"][0].tolist()
    assert ids.count(151656) == t * gh * gw // 4 <= 184320
    assert runs_of(ids, 151656) == [gh * gw // 4] * t
    assert ids.count(151669) == t
    assert out["pixel_values_videos"].shape[0] == t * gh * gw


def test_processor_matches_process_vision_info(processor):
    """Passing a path, or the frames + kwargs from process_vision_info, gives the same model inputs."""
    path = str(MEDIA / "realshort.mp4")
    messages = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "image", "image": str(MEDIA / "chelsea.png")}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images, videos, video_kwargs = process_vision_info(messages)
    a = processor(text=text, images=images, videos=videos, **video_kwargs)
    b = processor(text=text, images=[str(MEDIA / "chelsea.png")], videos=[path])
    assert set(a) == set(b) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_frame_list_without_fps_has_no_times(processor):
    frames = [Image.fromarray(np.full((224, 224, 3), i * 30, np.uint8)) for i in range(4)]
    out = processor(text="<|video_pad|>", videos=[frames])
    text = processor.tokenizer.decode(out["input_ids"][0])
    assert out["video_grid_thw"].tolist() == [[4, 16, 16]]
    assert text == ("<|frame|>" + "<|video_pad|>" * 64) * 4
    timed = processor(text="<|video_pad|>", videos=[frames], fps=[4.0])
    assert re.findall(r"<\|frame\|>([0-9.]+)", processor.tokenizer.decode(timed["input_ids"][0])) == ["0.0", "0.2", "0.5", "0.8"]


def test_two_videos_share_the_budget():
    """The budget is per prompt: two long (synthetic) videos in one prompt get half each (docs/keye_vl2.md
    section 7)."""
    from keye_vl.processing.vision_process_keye_vl_2 import VideoSampling, plan_video

    plans = [plan_video(1200, 2.0, 720, 1280, VideoSampling(nframes=1200), num_videos=n) for n in (1, 2)]
    one, two = [(p["resized_height"], p["resized_width"]) for p in plans]  # T = 154; budget 92160: T = 77
    assert [p["tokens_per_frame_cap"] for p in plans] == [154, 77]
    assert one[0] * one[1] <= 154 * PX and two[0] * two[1] <= 77 * PX and two[0] * two[1] > 64 * PX
    assert one == ref_smart_resize(720, 1280, 64 * PX, 154 * PX) and two == ref_smart_resize(720, 1280, 64 * PX, 77 * PX)
    # the video processor sizes already-sampled frames with the same plan (2 x 1200 frames of 720 x 1280 would be
    # 6.6 GB; 40 frames of 280 x 504 under a 40 x 64-token budget give T = 65 for one video, 64 (the floor) for two)
    vp = KeyeVL2VideoProcessor(total_pixels=40 * 64 * PX)
    frames = torch.zeros(40, 3, 280, 504, dtype=torch.uint8)
    for n, tokens in ((1, 65), (2, 64)):
        grid = vp(frames, num_videos=n)["video_grid_thw"].tolist()[0]
        assert grid[0] == 40 and (grid[1] * 14, grid[2] * 14) == ref_smart_resize(280, 504, 64 * PX, tokens * PX)


# ---------------------------------------------------------------------------------------------------------------------
# Errors, batching
# ---------------------------------------------------------------------------------------------------------------------
def test_placeholder_count_mismatch(processor):
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image"):
        processor(text="<|image_pad|>", images=[image, image])
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        processor(text=["<|image_pad|>", "<|image_pad|>"], images=[image])
    with pytest.raises(ValueError, match=r"0 <\|video_pad\|> placeholder\(s\) but 1 video"):
        processor(text="no placeholder", videos=[str(MEDIA / "does-not-matter.mp4")])  # fails before decoding
    with pytest.raises(ValueError, match="zero frames|empty"):
        processor(text="<|video_pad|>", videos=[np.zeros((0, 28, 28, 3), np.uint8)])


def test_batch_padding_sides(processor):
    image = Image.new("RGB", (56, 56), "red")
    texts = ["<|image_pad|> short", "a much longer prompt without any image at all, padded"]
    right = processor(text=texts, images=[image], padding_side="right")
    left = processor(text=texts, images=[image])  # left is the default (generation)
    lengths = right["attention_mask"].sum(-1).tolist()
    assert right["input_ids"].shape == left["input_ids"].shape == (2, max(lengths))
    short = int(np.argmin(lengths))
    pad = max(lengths) - lengths[short]
    assert pad > 0
    assert right["input_ids"][short, -pad:].tolist() == [151643] * pad and right["attention_mask"][short, -pad:].sum() == 0
    assert left["input_ids"][short, :pad].tolist() == [151643] * pad and left["attention_mask"][short, :pad].sum() == 0
    assert torch.equal(left["input_ids"][short, pad:], right["input_ids"][short, : lengths[short]])


# ---------------------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------------------
def test_chat_template_multimodal_and_thinking(processor):
    messages = [
        {"role": "system", "content": "You are Keye."},
        {"role": "user", "content": [
            {"type": "image", "image": "a.png"},
            {"type": "video", "video": "b.mp4"},
            {"type": "text", "text": "What happens? /no_think"},
        ]},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA bird."},
        {"role": "user", "content": "And then? /think"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Keye.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
        "What happens? /no_think<|im_end|>\n"
        "<|im_start|>assistant\nA bird.<|im_end|>\n"  # earlier reasoning is dropped (Qwen3)
        "<|im_start|>user\nAnd then? /think<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_think = processor.apply_chat_template(messages[-1:], add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_tools(processor):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]},
        {"role": "tool", "content": "12:00"},
    ]
    text = processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call><|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_batch(processor):
    conv = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]]
    assert processor.apply_chat_template(conv) == ["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\nyo<|im_end|>\n"]


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: save / load round trip in a clean process
# ---------------------------------------------------------------------------------------------------------------------
_CLEAN_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class _Block(importlib.abc.MetaPathFinder):  # the repo's package must not be importable
        def find_spec(self, name, path=None, target=None):
            if name == "keye_vl" or name.startswith("keye_vl."):
                raise ImportError("keye_vl is blocked in this process")
            return None
    sys.meta_path.insert(0, _Block())
    import torch
    from transformers import AutoProcessor, AutoImageProcessor, AutoVideoProcessor
    folder, media, out_path = sys.argv[1:4]
    proc = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ip = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    vp = AutoVideoProcessor.from_pretrained(folder, trust_remote_code=True)
    exec(open(sys.argv[4]).read())  # defines run_cases(proc, media) -> dict of tensors
    result = run_cases(proc, media)
    torch.save(result, out_path)
    print(json.dumps({"processor": type(proc).__module__, "image": type(ip).__module__, "video": type(vp).__module__,
                      "tokenizer": type(proc.tokenizer).__name__, "template_same": proc.chat_template is not None}))
    """
)

_CASES = textwrap.dedent(
    """
    def run_cases(proc, media):
        from PIL import Image
        out = {}
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image", "image": media + "/chelsea.png"},
            {"type": "video", "video": media + "/realshort.mp4"},
            {"type": "text", "text": "What is shown? /no_think"}]}]
        batch = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.update({"chat_" + k: v for k, v in batch.items()})
        texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "1"}]}]),
                 proc.apply_chat_template([{"role": "user", "content": "a longer text-only prompt"}], add_generation_prompt=True)]
        two = proc(text=texts, images=[Image.open(media + "/page.png")], padding_side="left")
        out.update({"batch_" + k: v for k, v in two.items()})
        return out
    """
)


def test_save_load_round_trip_clean_process(processor, tmp_path):
    folder = tmp_path / "keye_processor"
    processor.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"processing_keye_vl_2.py", "image_processing_keye_vl_2.py", "video_processing_keye_vl_2.py",
            "vision_process_keye_vl_2.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "__init__.py" not in files
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_keye_vl_2.KeyeVL2Processor"
    cases = tmp_path / "cases.py"
    cases.write_text(_CASES)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    proc = subprocess.run(
        [sys.executable, "-c", _CLEAN_LOAD, str(folder), str(MEDIA), str(tmp_path / "out.pt"), str(cases)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("processor", "image", "video"):
        assert info[key].startswith("transformers_modules."), info  # loaded from the folder's copied code
    loaded = torch.load(tmp_path / "out.pt")
    namespace = {}
    exec(_CASES, namespace)
    here = namespace["run_cases"](processor, str(MEDIA))
    assert set(loaded) == set(here)
    for key in here:
        assert torch.equal(loaded[key], here[key]), key
    # the reloaded processor kept the Keye template and the prompt layout
    assert int((here["chat_input_ids"] == 151669).sum()) == here["chat_video_grid_thw"][0, 0]
