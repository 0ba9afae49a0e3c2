"""Generate verifiable RL tasks from local media and text written for this project (no downloads).

Writes ``OUTPUT/video.jsonl`` (Video-RL), ``OUTPUT/context.jsonl`` (Context-RL) and ``OUTPUT/frames/`` (the JPEG
frames the task files reference by relative path); with ``--sft`` also ``OUTPUT/{video,context}_sft.jsonl``, the same
prompts with the canonical answer as an assistant turn (a supervised warm-up, so that RL starts from a model whose
rewards vary). Every line is a prompt in the qwen-vl-utils message format plus
its exact answer, the trainer's format (``examples/rl.py``, ``examples/eval_rl.py``)::

    {"messages": [{"role": "user", "content": [{"type": "video", "video": ["frames/...jpg", ...], "fps": 2.0,
                   "max_pixels": 50176}, {"type": "text", "text": "..."}]}],
     "domain": "video", "task": "grounding", "solution": [3.0, 8.5], "duration": 12.0, "fps": 2.0,
     "id": "grounding-0003", "meta": {...how it was built...}}

Tasks (``task`` picks the reward, see ``keye_vl.training.rewards.DEFAULT_WEIGHTS``):

- ``grounding``: clips of 2-3 different local videos (``assets/media``) cut at random frame-aligned windows and
  concatenated into one frame list; "when does the <clip> play?", solution ``[start, end]`` in seconds of the
  concatenated list (frame ``i`` is at ``i / fps``).
- ``multi_grounding``: the same, with one video's clip shown twice (two windows); solution: both spans.
- ``timestamp`` / ``count`` / ``order`` (needles, after VideoNIAH, arXiv 2406.09367): local photos (cat, coffee
  cup, text page) spliced as single frames into a video's frame list at known positions; "when does the photo of
  a cat appear?" (seconds), "how many times ...?", "in what order ...?".
- Context-RL (``domain: context``): ``exact`` key chains (after LoongRL's KeyChain: "key A points to key B" links
  hidden among distractor passages and decoy chains; follow the chain from the given key and answer its value),
  ``count`` of mentions of a name across the documents, and ``timestamp`` for a needle frame in the first 10% of
  a long frame list; text contexts are built to about each ``--context_lengths`` length in tokens (the Qwen3
  tokenizer) and carry ``context_tokens`` for the trainer's curriculum.

Frames: the video frame shown at sample time ``t`` is the last decoded frame whose presentation time is ``<= t``
(PyAV); every frame (video or photo) is fitted to ``--frame_size`` (centre crop + resize). Same ``--seed``, same
files. Usage::

    python examples/make_rl_tasks.py --output_dir outputs/rl_tasks --seed 0 --num_grounding 32 --num_needle 32 \\
        --num_context 8 --context_lengths 4096 16384
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
MEDIA = os.path.normpath(os.path.join(HERE, "..", "assets", "media"))

# What each local video shows (checked by looking at the files), the words used in the questions.
VIDEOS = {
    "cockatoo.mp4": "the cockatoo clip",
    "lego_stopmotion.webm": "the Lego stop-motion clip",
    "realshort.mp4": "the office scene",
}
# Needle photos: name used in order answers -> (file, description in questions).
NEEDLES = {
    "cat": ("chelsea.png", "a cat"),
    "coffee": ("coffee.png", "a cup of coffee"),
    "page": ("page.png", "a printed text page"),
}

GROUNDING_PROMPT = ("The numbers before each video frame are its timestamps in seconds. When does {desc} play? "
                    "Answer in the format 'The event happens in <start time> - <end time> seconds'.")
MULTI_PROMPT = ("The numbers before each video frame are its timestamps in seconds. {desc} is shown twice. Give "
                "both time spans, in the format '<start> - <end> and <start> - <end>' (seconds).")
TIMESTAMP_PROMPT = ("The numbers before each video frame are its timestamps in seconds. One frame is a still photo "
                    "of {desc}, not part of the video. At what time does it appear? Answer with the number of "
                    "seconds.")
COUNT_PROMPT = ("Some frames of this video are a still photo of {desc}, not part of the video. How many times "
                "does that photo appear? Answer with a number.")
ORDER_PROMPT = ("Three still photos are spliced into this video: {names}. In what order do they appear? Answer "
                "with the three names ({names}) in order of appearance.")
THINK_SUFFIX = " Think first inside <think></think>, then give the answer inside <answer></answer>."

# ---------------------------------------------------------------------------------------------------------
# Distractor passages (written for this project; mundane, and free of every key, value and name used below).
# ---------------------------------------------------------------------------------------------------------
PASSAGES = [
    "The municipal library reopened after its roof was replaced. Volunteers spent two weekends moving the "
    "reference books back onto the shelves, sorting them by subject and then by the surname of the author. The "
    "children's corner now has a reading rug shaped like a lake, and the staff say attendance at the Saturday "
    "story hour has doubled since the spring.",
    "A good loaf of bread needs time more than it needs skill. Flour, water, salt and a little yeast are mixed "
    "the night before and left in a cool room. In the morning the dough is folded a few times, shaped, and "
    "baked in a heavy pot with its lid on for the first twenty minutes, so that the steam keeps the crust soft "
    "while the loaf rises.",
    "The ferry between the two harbours runs every forty minutes in summer and every hour in winter. Passengers "
    "with bicycles board first and ride to the front deck. On windy days the crossing takes a little longer, "
    "and the crew hand out paper bags to anyone who looks pale before the boat clears the breakwater.",
    "Tomatoes grown on a balcony need a large pot, a sunny wall and regular water. The lower leaves should be "
    "removed once the plant is tall, and side shoots pinched out so that the plant puts its energy into fruit. "
    "A weak solution of liquid feed once a week is enough; too much makes the leaves grow at the expense of "
    "the tomatoes.",
    "The orchestra's winter programme opens with a short overture, followed by a piano concerto and, after the "
    "interval, a symphony in four movements. The conductor asked the audience not to clap between movements, "
    "though she admitted that the composer himself had enjoyed applause wherever it came.",
    "Cleaning a bicycle chain takes ten minutes. Shift to the smallest rear cog, wipe the chain with a rag while "
    "turning the pedals backwards, brush the links with a little degreaser, rinse, and let it dry. Then put one "
    "drop of oil on each roller and wipe off the excess, because oil left on the outside only collects grit.",
    "The old railway line was turned into a walking path twelve years ago. It runs along the river for nine "
    "kilometres, past two stone bridges and the remains of a signal box. Benches were added every kilometre, "
    "and in autumn the path is covered in yellow leaves from the poplars planted beside it.",
    "A household budget starts with a list of fixed costs: rent, heating, insurance and transport. What is left "
    "is divided between food, savings and everything else. Many people find it easier to move the savings "
    "amount to a separate account on the day the salary arrives, rather than saving what remains at the end of "
    "the month.",
    "The museum's new exhibition shows tools used by weavers over three centuries, from hand looms to the first "
    "machines driven by water wheels. Visitors can try a small loom near the entrance. A guide explains how the "
    "pattern cards worked and why the noise in the early mills was so loud that workers learned to lip-read.",
    "Fresh snow reflects most of the sunlight that falls on it, which is why a sunny day in the mountains can "
    "burn the skin even when the air is cold. Skiers are advised to wear sunglasses or goggles and to put on "
    "sun cream twice a day, including under the chin, where the light bounces up from the slope.",
    "The village market is held on the first Sunday of each month. Farmers sell eggs, cheese and vegetables, a "
    "baker brings rye bread, and a man from the next valley sells honey in jars of three sizes. By noon most "
    "stalls are empty, and the square is swept before the church bells ring for the afternoon.",
    "Learning to type without looking at the keyboard takes a few weeks of short daily practice. The fingers "
    "rest on the middle row, each responsible for a column of keys. Accuracy comes first; speed follows on its "
    "own once the fingers no longer hesitate over where each letter is.",
    "The lighthouse on the point was automated decades ago. Its lamp now turns on at dusk by itself and the "
    "building is maintained by a team who visit twice a year. Walkers can climb the hill to its base, where a "
    "board explains the pattern of flashes that ships use to tell it apart from the one across the bay.",
    "Compost needs a mix of green material, such as grass cuttings and vegetable peelings, and brown material, "
    "such as dry leaves and torn cardboard. Turning the heap every few weeks lets air in and speeds things up. "
    "After six months to a year the bottom of the heap becomes dark, crumbly soil ready for the garden.",
    "The school's science fair had forty projects this year. One group measured how quickly ice melts on "
    "different metals, another compared the growth of beans under coloured lights, and a third built a small "
    "wind turbine from a bicycle wheel. The judges spent longest at a stand that tested which paper makes the "
    "best aeroplane.",
    "A kettle that has been used for years in hard-water areas collects a white crust of limescale. Filling it "
    "with equal parts water and vinegar, bringing it to the boil and leaving it for an hour loosens the crust. "
    "After two rinses with clean water the kettle boils faster and the tea no longer has flakes floating on top.",
    "The city's tram network has four lines that meet at the central station. Tickets are valid for ninety "
    "minutes on any line, and children under six travel free. Night trams run on Fridays and Saturdays, and "
    "the timetable is posted at every stop, along with a map of the nearest bicycle racks.",
    "Swimming lessons for adults are offered on Tuesday evenings at the public pool. Most beginners start in "
    "the shallow end, practising floating and breathing out under water. By the end of the ten-week course "
    "many can swim a full length, and a few go on to join the early-morning lane sessions.",
    "Repainting a room goes faster with good preparation. Furniture is moved to the centre and covered, cracks "
    "are filled and sanded, and the edges are masked with tape. Two thin coats give a more even finish than "
    "one thick coat, and the windows should stay open until the smell of the paint has gone.",
    "The hiking club's spring walk climbed to the ridge above the reservoir. The group stopped for lunch beside "
    "a cairn, where the view reached the coast on a clear day. On the way down they followed a stream through "
    "a birch wood and arrived at the car park just as the first drops of rain began to fall.",
    "Keeping houseplants alive mostly comes down to not overwatering them. Many plants prefer their soil to dry "
    "out a little between waterings, and pots need a hole at the bottom so that water can drain away. In "
    "winter, when the light is weak, plants grow slowly and need even less water than in summer.",
    "The town's football team won its league after a season of close matches. The deciding game was played in "
    "heavy rain, and the only goal came from a header in the last ten minutes. Supporters waited outside the "
    "ground afterwards to cheer the players onto the bus that took them to a celebration in the square.",
    "A simple soup can be made from whatever vegetables are in the kitchen. Onions are softened in oil, then "
    "carrots, potatoes and celery are added with enough stock to cover them. After half an hour of gentle "
    "simmering the soup is blended, seasoned with salt and pepper, and served with bread.",
    "The observatory opens its doors to the public on clear Friday nights. Visitors queue to look through the "
    "large telescope at the Moon, Saturn's rings or a distant cluster of stars. Volunteers explain what can be "
    "seen, and on cloudy nights they give a talk in the lecture room instead.",
]
KEY_VALUES = ["amber-falcon", "velvet-otter", "copper-lantern", "silent-meadow", "crimson-harbor", "frozen-orchid",
              "golden-anvil", "hollow-reed", "ivory-compass", "jade-river", "lunar-thistle", "marble-finch"]
MENTION_NAMES = ["Oriel Vance", "Tamsin Crowe", "Halvard Brink", "Ysolde Marr"]
MENTION_TEMPLATES = [
    "Later that week, {name} wrote a short letter to the council about the state of the footpaths.",
    "A photograph in the local paper showed {name} standing beside a stack of freshly cut timber.",
    "According to the minutes of the meeting, {name} asked for the item to be moved to the next agenda.",
    "The prize for the best vegetable patch went, for the second year running, to {name}.",
    "Nobody was surprised when {name} volunteered to organise the summer fair again.",
]
CONTEXT_PROMPTS = {
    "keychain": ("The documents above contain statements of the form 'Key X points to key Y.' and 'Key X holds the "
                 "value V.'. Start from key {start} and follow the pointers to the end of the chain. What value "
                 "does the chain end at? Answer with the value only."),
    "mentions": "How many times is {name} mentioned in the documents above? Answer with a number.",
}


@dataclass
class Clip:
    video: str  # file name in assets/media
    start: float  # seconds in the source video (a multiple of 1 / fps)
    n_frames: int


class FrameStore:
    """Decodes each local video once and writes the frames the tasks use as JPEG files (one file per source
    frame), keyed by the source frame's index."""

    def __init__(self, out_dir: str, size: tuple[int, int], media_dir: str = MEDIA):
        self.out_dir, self.size, self.media_dir = out_dir, size, media_dir
        self._frames: dict[str, list] = {}  # video -> [(pts seconds, PIL image)]
        self._written: set[str] = set()
        os.makedirs(os.path.join(out_dir, "frames"), exist_ok=True)

    def _fit(self, img):
        from PIL import ImageOps

        return ImageOps.fit(img.convert("RGB"), self.size)

    def video_frames(self, video: str) -> list:
        if video not in self._frames:
            import av

            frames = []
            with av.open(os.path.join(self.media_dir, video)) as container:
                stream = container.streams.video[0]
                src_w, src_h = stream.codec_context.width, stream.codec_context.height
                scale = max(self.size[0] / src_w, self.size[1] / src_h)  # cover the frame size, then crop
                w, h = max(self.size[0], round(src_w * scale)), max(self.size[1], round(src_h * scale))
                for frame in container.decode(stream):
                    if frame.pts is None:
                        raise ValueError(f"{video}: a frame without a presentation time")
                    img = frame.to_image(width=w, height=h)  # libswscale: cheaper than resizing 720p in PIL
                    frames.append((float(frame.pts * stream.time_base), self._fit(img)))
            if not frames:
                raise ValueError(f"{video}: no frame decoded")
            frames.sort(key=lambda x: x[0])
            self._frames[video] = frames
        return self._frames[video]

    def decoded_span(self, video: str) -> float:
        """Seconds of video that decode: last frame's time + one average frame period."""
        f = self.video_frames(video)
        period = (f[-1][0] - f[0][0]) / max(len(f) - 1, 1)
        return f[-1][0] + period

    def frame_at(self, video: str, t: float) -> str:
        """Relative path of the frame shown at time ``t`` (last frame with pts <= t)."""
        frames = self.video_frames(video)
        idx = 0
        for i, (pts, _) in enumerate(frames):
            if pts <= t + 1e-6:
                idx = i
            else:
                break
        rel = f"frames/{os.path.splitext(video)[0]}_{idx:05d}.jpg"
        if rel not in self._written:
            frames[idx][1].save(os.path.join(self.out_dir, rel), quality=92)
            self._written.add(rel)
        return rel

    def needle(self, name: str) -> str:
        rel = f"frames/needle_{name}.jpg"
        if rel not in self._written:
            from PIL import Image

            with Image.open(os.path.join(self.media_dir, NEEDLES[name][0])) as img:
                self._fit(img).save(os.path.join(self.out_dir, rel), quality=92)
            self._written.add(rel)
        return rel

    def clip_frames(self, clip: Clip, fps: float) -> list[str]:
        return [self.frame_at(clip.video, clip.start + k / fps) for k in range(clip.n_frames)]


def _random_clip(rng: random.Random, store: FrameStore, video: str, fps: float, max_seconds: float) -> Clip:
    """A frame-aligned window of ``video``: at least 2 frames, at most ``max_seconds``, inside the decoded span."""
    total = int(store.decoded_span(video) * fps + 1e-6)  # sample times k / fps < decoded span
    if total < 2:
        raise ValueError(f"{video} is too short for a clip at {fps} fps")
    n = rng.randint(2, max(2, min(total, int(max_seconds * fps))))
    first = rng.randint(0, total - n)
    return Clip(video, first / fps, n)


def _video_item(frames: list[str], fps: float, max_pixels: int) -> dict:
    return {"type": "video", "video": frames, "fps": fps, "max_pixels": max_pixels}


def _record(task_id, task, frames, fps, max_pixels, prompt, solution, meta, think, domain="video") -> dict:
    text = prompt + (THINK_SUFFIX if think else "")
    rec = {
        "messages": [{"role": "user", "content": [_video_item(frames, fps, max_pixels), {"type": "text", "text": text}]}],
        "domain": domain, "task": task, "solution": solution, "duration": len(frames) / fps, "fps": fps,
        "id": task_id, "meta": meta,
    }
    if think:
        rec["reward_weights"] = _think_weights(task)
    return rec


def _think_weights(task: str) -> dict:
    from keye_vl.training.rewards import DEFAULT_WEIGHTS

    (name, _), = DEFAULT_WEIGHTS[task].items()
    return {name: 0.9, "format": 0.1}


def grounding_task(rng, store, i, fps, max_pixels, think, multi=False) -> dict:
    k = 2 if multi else rng.choice([2, 3])
    videos = rng.sample(sorted(VIDEOS), k)
    clips = [_random_clip(rng, store, v, fps, 4.0) for v in videos]
    target = videos[0]
    if multi:
        clips.append(_random_clip(rng, store, target, fps, 4.0))
        # never two clips of the target side by side (the spans would merge)
        order = [0, 1, 2] if rng.random() < 0.5 else [2, 1, 0]
        clips = [clips[j] for j in order]
    else:
        rng.shuffle(clips)
    frames, spans, segments, pos = [], [], [], 0
    for c in clips:
        frames += store.clip_frames(c, fps)
        span = [pos / fps, (pos + c.n_frames) / fps]
        segments.append({"video": c.video, "source_start": c.start, "n_frames": c.n_frames, "span": span})
        if c.video == target:
            spans.append(span)
        pos += c.n_frames
    meta = {"target_video": target, "segments": segments}
    if multi:
        return _record(f"multi_grounding-{i:04d}", "multi_grounding", frames, fps, max_pixels,
                       MULTI_PROMPT.format(desc=VIDEOS[target][0].upper() + VIDEOS[target][1:]), spans, meta, think)
    return _record(f"grounding-{i:04d}", "grounding", frames, fps, max_pixels,
                   GROUNDING_PROMPT.format(desc=VIDEOS[target]), spans[0], meta, think)


def _base_frames(rng, store, fps, min_frames) -> tuple[list[str], dict]:
    video = rng.choice(sorted(VIDEOS))
    total = int(store.decoded_span(video) * fps + 1e-6)
    if total >= min_frames:
        clip = _random_clip(rng, store, video, fps, total / fps)
        clip.n_frames = max(clip.n_frames, min_frames)
        clip.start = min(clip.start, (total - clip.n_frames) / fps)
        return store.clip_frames(clip, fps), {"video": video, "source_start": clip.start, "n_frames": clip.n_frames}
    # a short video: loop it
    if total < 1:
        raise ValueError(f"video {video!r} is {store.decoded_span(video):.2f} s long: no frame at --fps {fps}; "
                         "raise --fps or use longer videos")
    frames = []
    while len(frames) < min_frames:
        frames += store.clip_frames(Clip(video, 0.0, total), fps)
    return frames, {"video": video, "source_start": 0.0, "n_frames": len(frames), "looped": True}


def _insert(frames: list[str], positions_and_names: list[tuple[int, str]], store) -> list[str]:
    """Insert needle frames so that needle ``name`` ends up at index ``pos`` of the result (positions ascending)."""
    out = list(frames)
    for pos, name in sorted(positions_and_names):
        out.insert(pos, store.needle(name))
    return out


def _spread_positions(rng, n_total: int, k: int, lo: int = 1) -> list[int]:
    """``k`` distinct, pairwise non-adjacent indices in ``[lo, n_total - 1)`` of a list of ``n_total`` frames."""
    while True:
        pos = sorted(rng.sample(range(lo, n_total - 1), k))
        if all(b - a >= 2 for a, b in zip(pos, pos[1:])):
            return pos


def needle_task(rng, store, i, fps, max_pixels, think, kind, min_frames=8, far_back=False,
                domain="video") -> dict:
    base, base_meta = _base_frames(rng, store, fps, min_frames)
    if kind == "timestamp":
        name = rng.choice(sorted(NEEDLES))
        n_total = len(base) + 1
        hi = max(2, n_total // 10) if far_back else n_total - 1
        pos = rng.randrange(1, hi)
        frames = _insert(base, [(pos, name)], store)
        return _record(f"{'long_' if far_back else ''}timestamp-{i:04d}", "timestamp", frames, fps, max_pixels,
                       TIMESTAMP_PROMPT.format(desc=NEEDLES[name][1]), pos / fps,
                       {"base": base_meta, "needles": [[pos, name]]}, think, domain)
    if kind == "count":
        name = rng.choice(sorted(NEEDLES))
        m = rng.randint(1, 4)
        positions = _spread_positions(rng, len(base) + m, m)
        frames = _insert(base, [(p, name) for p in positions], store)
        return _record(f"count-{i:04d}", "count", frames, fps, max_pixels, COUNT_PROMPT.format(desc=NEEDLES[name][1]),
                       m, {"base": base_meta, "needles": [[p, name] for p in positions]}, think, domain)
    if kind == "order":
        names = sorted(NEEDLES)
        rng.shuffle(names)
        positions = _spread_positions(rng, len(base) + 3, 3)
        frames = _insert(base, list(zip(positions, names)), store)
        listed = ", ".join(sorted(NEEDLES))
        return _record(f"order-{i:04d}", "order", frames, fps, max_pixels, ORDER_PROMPT.format(names=listed), names,
                       {"base": base_meta, "needles": [[p, n] for p, n in zip(positions, names)]}, think, domain)
    raise ValueError(f"unknown needle task {kind!r}")


# ---------------------------------------------------------------------------------------------------------
# Context-RL text tasks
# ---------------------------------------------------------------------------------------------------------
def _key(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(4)) + "-" + \
        "".join(rng.choice("0123456789abcdef") for _ in range(4))


def _fill(rng, count_tokens, target: int, statements: list[str]) -> tuple[str, int]:
    """Documents of distractor passages up to about ``target`` tokens with ``statements`` scattered among them (in
    random order, each its own paragraph); returns ``(text, tokens)``."""
    paragraphs, used = [], sum(count_tokens(s) for s in statements) + 200
    pool = []
    while used < target:
        if not pool:
            pool = list(range(len(PASSAGES)))
            rng.shuffle(pool)
        p = PASSAGES[pool.pop()]
        paragraphs.append(p)
        used += count_tokens(p) + 8
    for s in statements:
        paragraphs.insert(rng.randint(0, len(paragraphs)), s)
    text = "\n\n".join(f"Document {j + 1}: {p}" for j, p in enumerate(paragraphs))
    return text, count_tokens(text)


def keychain_task(rng, count_tokens, i, target, think, hops=None) -> dict:
    hops = hops or rng.randint(2, 4)
    keys = []
    while len(keys) < hops + 1 + 3 * 3:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    chain, rest = keys[: hops + 1], keys[hops + 1:]
    values = rng.sample(KEY_VALUES, 4)
    statements = [f"Key {a} points to key {b}." for a, b in zip(chain, chain[1:])]
    statements.append(f"Key {chain[-1]} holds the value {values[0]}.")
    for d in range(3):  # decoy chains: two links and a value each, never touching the real chain
        a, b, c = rest[3 * d: 3 * d + 3]
        statements += [f"Key {a} points to key {b}.", f"Key {b} points to key {c}.",
                       f"Key {c} holds the value {values[d + 1]}."]
    text, n = _fill(rng, count_tokens, target, statements)
    prompt = text + "\n\n" + CONTEXT_PROMPTS["keychain"].format(start=chain[0]) + (THINK_SUFFIX if think else "")
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}], "domain": "context",
           "task": "exact", "solution": values[0], "id": f"keychain-{target}-{i:04d}", "context_tokens": n,
           "meta": {"chain": chain, "decoy_values": values[1:]}}
    if think:
        rec["reward_weights"] = _think_weights("exact")
    return rec


def mentions_task(rng, count_tokens, i, target, think) -> dict:
    name, *others = rng.sample(MENTION_NAMES, 3)
    m = rng.randint(1, 6)
    statements = [rng.choice(MENTION_TEMPLATES).format(name=name) for _ in range(m)]
    statements += [rng.choice(MENTION_TEMPLATES).format(name=o) for o in others for _ in range(rng.randint(1, 3))]
    text, n = _fill(rng, count_tokens, target, statements)
    prompt = text + "\n\n" + CONTEXT_PROMPTS["mentions"].format(name=name) + (THINK_SUFFIX if think else "")
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}], "domain": "context",
           "task": "count", "solution": m, "id": f"mentions-{target}-{i:04d}", "context_tokens": n,
           "meta": {"name": name, "others": others}}
    if think:
        rec["reward_weights"] = _think_weights("count")
    return rec


def canonical_answer(rec: dict) -> str:
    """The answer a perfect model would give, in the format the prompt asks for (for an SFT warm-up file)."""
    task, sol = rec["task"], rec["solution"]
    if task == "grounding":
        ans = f"The event happens in {sol[0]:g} - {sol[1]:g} seconds."
    elif task == "multi_grounding":
        ans = " and ".join(f"{s:g} - {e:g}" for s, e in sol)
    elif task in ("timestamp", "count"):
        ans = f"{sol:g}"
    elif task == "order":
        ans = ", ".join(sol)
    else:
        ans = str(sol)
    if "format" in rec.get("reward_weights", {}):
        return f"<think>I read the frames and their timestamps.</think>\n<answer>{ans}</answer>"
    return ans


def sft_record(rec: dict) -> dict:
    """The task with its canonical answer as an assistant turn (``examples/pretrain.py`` conversation format)."""
    return {"messages": rec["messages"] + [{"role": "assistant", "content": [{"type": "text",
                                                                              "text": canonical_answer(rec)}]}]}


def _token_counter(tokenizer_path: str | None):
    if tokenizer_path == "chars":  # rough and offline-safe: 4 characters a token
        return lambda s: (len(s) + 3) // 4
    if tokenizer_path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        from keye_vl.processing import build_keye_tokenizer

        tok = build_keye_tokenizer()
    return lambda s: len(tok.encode(s, add_special_tokens=False))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=float, default=2.0, help="frame rate of the frame lists (frame i at i / fps)")
    ap.add_argument("--frame_size", type=int, nargs=2, default=[336, 196], metavar=("W", "H"))
    ap.add_argument("--max_pixels", type=int, default=64 * 784, help="per-frame pixel cap for the processor")
    ap.add_argument("--num_grounding", type=int, default=24)
    ap.add_argument("--num_multi_grounding", type=int, default=8)
    ap.add_argument("--num_needle", type=int, default=24, help="needle tasks (timestamp / count / order in turn)")
    ap.add_argument("--num_context", type=int, default=4, help="Context-RL tasks per context length and kind")
    ap.add_argument("--context_lengths", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--long_needle_frames", type=int, default=0,
                    help="also write long frame-list needle tasks (Context-RL) with this many frames")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for context lengths ('chars': 4 chars/token)")
    ap.add_argument("--think", action="store_true", help="ask for <think>/<answer> and add a 0.1 format reward")
    ap.add_argument("--sft", action="store_true",
                    help="also write video_sft.jsonl / context_sft.jsonl: the tasks with their canonical answers as "
                         "assistant turns, for a supervised warm-up (examples/pretrain.py) before RL")
    args = ap.parse_args(argv)
    if args.fps <= 0:
        raise SystemExit("--fps must be > 0")
    rng = random.Random(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    store = FrameStore(args.output_dir, tuple(args.frame_size))
    video = []
    for i in range(args.num_grounding):
        video.append(grounding_task(rng, store, i, args.fps, args.max_pixels, args.think))
    for i in range(args.num_multi_grounding):
        video.append(grounding_task(rng, store, i, args.fps, args.max_pixels, args.think, multi=True))
    kinds = ["timestamp", "count", "order"]
    for i in range(args.num_needle):
        video.append(needle_task(rng, store, i, args.fps, args.max_pixels, args.think, kinds[i % 3]))
    context = []
    if args.num_context and (args.context_lengths or args.long_needle_frames):
        count_tokens = _token_counter(args.tokenizer) if args.context_lengths else None
        for target in args.context_lengths:
            for i in range(args.num_context):
                context.append(keychain_task(rng, count_tokens, i, target, args.think))
                context.append(mentions_task(rng, count_tokens, i, target, args.think))
        if args.long_needle_frames:
            for i in range(args.num_context):
                context.append(needle_task(rng, store, i, args.fps, args.max_pixels, args.think, "timestamp",
                                           min_frames=args.long_needle_frames, far_back=True, domain="context"))
    counts = {}
    for name, rows in (("video", video), ("context", context)):
        if rows:
            with open(os.path.join(args.output_dir, f"{name}.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            if args.sft:
                with open(os.path.join(args.output_dir, f"{name}_sft.jsonl"), "w") as f:
                    for r in rows:
                        f.write(json.dumps(sft_record(r)) + "\n")
        counts[name] = len(rows)
    print(json.dumps({"output_dir": args.output_dir, **counts}))
    return counts


if __name__ == "__main__":
    main()
