"""examples/make_rl_tasks.py: every answer re-derived independently of the generator.

- grounding: each listed frame is identified by matching it against this test's own PyAV decode of every local
  video (and the needle photos); maximal runs of one video are the clips; their spans are run positions / fps; each
  run must fit in its video's duration as the container metadata states it.
- needles: needle frames found by matching the photos; their times from the processor's frame-list timestamps
  (``process_vision_info``), counts and order from the positions.
- key chains and mentions: the text is parsed with this test's own patterns and the chain followed.
"""

import importlib.util
import json
import os
import re
import sys
from fractions import Fraction

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEDIA = os.path.join(REPO, "assets", "media")
SIZE = (336, 196)


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_rl_tasks", os.path.join(REPO, "examples", "make_rl_tasks.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_rl_tasks"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_tasks")
    gen = _load_generator()
    counts = gen.main(["--output_dir", str(out), "--seed", "3", "--num_grounding", "4", "--num_multi_grounding", "2",
                       "--num_needle", "6", "--num_context", "2", "--context_lengths", "1500",
                       "--tokenizer", "chars", "--long_needle_frames", "30", "--sft"])
    video = [json.loads(line) for line in open(out / "video.jsonl")]
    context = [json.loads(line) for line in open(out / "context.jsonl")]
    assert counts == {"video": 12, "context": 6} and len(video) == 12 and len(context) == 6
    # same seed, same files
    out2 = tmp_path_factory.mktemp("rl_tasks2")
    gen.main(["--output_dir", str(out2), "--seed", "3", "--num_grounding", "4", "--num_multi_grounding", "2",
              "--num_needle", "6", "--num_context", "2", "--context_lengths", "1500", "--tokenizer", "chars",
              "--long_needle_frames", "30"])
    assert open(out2 / "video.jsonl").read() == open(out / "video.jsonl").read()
    return out, video, context


THUMB = (48, 28)


def _thumb(img):
    """A small thumbnail of the frame as the generator shows it (centre crop to the frame size's aspect)."""
    from PIL import ImageOps

    return np.asarray(ImageOps.fit(img.convert("RGB"), THUMB), dtype=np.float32)


@pytest.fixture(scope="module")
def references():
    """Own decode: {source name: (stack of frames, duration from metadata in seconds)} and the needle photos."""
    import av
    from PIL import Image

    refs = {}
    for name in ("cockatoo.mp4", "lego_stopmotion.webm", "realshort.mp4"):
        with av.open(os.path.join(MEDIA, name)) as c:
            s = c.streams.video[0]
            if s.frames:
                duration = Fraction(s.frames) / Fraction(s.average_rate)
            else:
                duration = Fraction(c.duration, av.time_base)
            small = dict(width=192, height=round(192 * s.codec_context.height / s.codec_context.width))
            frames = np.stack([_thumb(f.to_image(**small)) for f in c.decode(s)])
        refs[name] = (frames, float(duration))
    needles = {}
    for key, file in (("cat", "chelsea.png"), ("coffee", "coffee.png"), ("page", "page.png")):
        with Image.open(os.path.join(MEDIA, file)) as img:
            needles[key] = _thumb(img)
    return refs, needles


_SEEN = {}


def _identify(path, refs, needles):
    """Which local video (or needle photo) a listed frame shows: the nearest thumbnail (mean absolute error)."""
    from PIL import Image

    if path in _SEEN:
        return _SEEN[path]
    with Image.open(path) as img:
        x = _thumb(img)
    best, best_err = None, float("inf")
    for name, (frames, _) in refs.items():
        err = np.abs(frames - x).mean(axis=(1, 2, 3)).min()
        if err < best_err:
            best, best_err = name, err
    for key, img in needles.items():
        err = np.abs(img - x).mean()
        if err < best_err:
            best, best_err = "needle:" + key, err
    assert best_err < 12.0, f"{path} matches nothing (mean abs error {best_err})"
    _SEEN[path] = best
    return best


def _runs(labels):
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i))
            start = i
    return runs


def test_grounding_spans_from_own_decode(tasks, references):
    out, video, _ = tasks
    refs, needles = references
    grounding = [r for r in video if r["task"] in ("grounding", "multi_grounding")]
    assert len(grounding) == 6
    for rec in grounding:
        item = rec["messages"][0]["content"][0]
        fps = item["fps"]
        labels = [_identify(os.path.join(out, p), refs, needles) for p in item["video"]]
        runs = _runs(labels)
        assert not any(lab.startswith("needle") for lab in labels)
        for name, a, b in runs:
            assert (b - a) / fps <= refs[name][1] + 1e-9  # a clip never runs past its video
        spans = {}
        for name, a, b in runs:
            spans.setdefault(name, []).append([a / fps, b / fps])
        # the question names one video by its description; that video's runs are the answer
        target = next(n for n, d in _load_generator().VIDEOS.items() if d.lower() in rec["messages"][0]["content"][1]["text"].lower())
        if rec["task"] == "grounding":
            assert len(set(labels)) == len(runs)  # different videos, each once
            assert rec["solution"] == spans[target][0]
        else:
            assert len(spans[target]) == 2 and rec["solution"] == spans[target]
        assert rec["duration"] == len(labels) / fps


def test_needles_from_frame_list_timestamps(tasks, references):
    from keye_vl.processing import process_vision_info

    out, video, context = tasks
    refs, needles = references
    needle_recs = [r for r in video + context if r["task"] in ("timestamp", "count", "order")
                   and r["messages"][0]["content"][0]["type"] == "video"]
    assert sorted(r["task"] for r in needle_recs) == ["count", "count", "order", "order"] + ["timestamp"] * 4
    for rec in needle_recs:
        item = dict(rec["messages"][0]["content"][0])
        item["video"] = [os.path.join(out, p) for p in item["video"]]
        _, _, kw = process_vision_info([{"role": "user", "content": [item]}])
        stamps = kw["timestamps"][0]
        assert len(stamps) == len(item["video"])
        found = [(i, lab[7:]) for i, lab in enumerate(_identify(p, refs, needles) for p in item["video"])
                 if lab.startswith("needle:")]
        if rec["task"] == "timestamp":
            assert len(found) == 1 and rec["solution"] == stamps[found[0][0]]
            if rec["id"].startswith("long_"):
                assert len(stamps) >= 31 and found[0][0] < len(stamps) // 10 + 1
        elif rec["task"] == "count":
            assert len({n for _, n in found}) == 1 and rec["solution"] == len(found)
        else:
            assert rec["solution"] == [n for _, n in found] and sorted(rec["solution"]) == ["cat", "coffee", "page"]


def test_context_answers_reparsed(tasks):
    _, _, context = tasks
    text_recs = [r for r in context if r["messages"][0]["content"][0]["type"] == "text"]
    assert sorted(r["task"] for r in text_recs) == ["count", "count", "exact", "exact"]
    for rec in text_recs:
        text = rec["messages"][0]["content"][0]["text"]
        body, question = text.rsplit("\n\n", 1)
        assert 1200 <= rec["context_tokens"] <= 1800  # about the 1500-token target (4 chars a token here)
        if rec["task"] == "exact":
            start = re.search(r"Start from key (\w{4}-\w{4})", question).group(1)
            links = re.findall(r"Key (\w{4}-\w{4}) points to key (\w{4}-\w{4})\.", body)
            values = re.findall(r"Key (\w{4}-\w{4}) holds the value ([a-z-]+)\.", body)
            nxt = dict(links)
            assert len(nxt) == len(links) and len(values) == 4  # unambiguous: one pointer per key
            key, hops = start, 0
            while key in nxt:
                key, hops = nxt[key], hops + 1
            assert 2 <= hops <= 4 and rec["solution"] == dict(values)[key]
        else:
            name = re.search(r"How many times is (.+?) mentioned", question).group(1)
            assert rec["solution"] == body.count(name) and 1 <= rec["solution"] <= 6


def test_sft_answers_score_full_reward(tasks):
    """The warm-up file's canonical answers parse back to the exact solution under the trainer's rewards."""
    from keye_vl.training.rewards import compute_rewards

    out, video, context = tasks
    sft = [json.loads(line) for line in open(out / "video_sft.jsonl")] + \
        [json.loads(line) for line in open(out / "context_sft.jsonl")]
    assert len(sft) == len(video) + len(context)
    for rec, s in zip(video + context, sft):
        assert s["messages"][:-1] == rec["messages"] and s["messages"][-1]["role"] == "assistant"
        total, _ = compute_rewards(s["messages"][-1]["content"][0]["text"], rec)
        assert total == 1.0, (rec["id"], s["messages"][-1])


def test_frame_rate_too_low_for_a_short_video_is_an_error(tmp_path):
    """A needle task on a video too short for one frame at --fps raises (it looped forever before)."""
    import subprocess

    script = os.path.join(REPO, "examples", "make_rl_tasks.py")
    args = ["--output_dir", str(tmp_path / "o"), "--seed", "5", "--fps", "0.5", "--num_grounding", "0",
            "--num_multi_grounding", "0", "--num_needle", "1", "--num_context", "0"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no frame at --fps 0.5" in r.stderr, r.stderr[-1500:]
