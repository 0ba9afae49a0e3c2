"""Quickstart: chat with Keye-VL-2.0 about a real photo and a real video, through the Auto classes.

Without ``--model`` it builds a tiny random-weight Keye-VL-2.0 (``keye_vl.modeling_keye.tiny_config``, 19.6 M
parameters, the real Qwen3 vocabulary) and its processor, exports both as one self-contained Hub folder
(``save_pretrained``: config, safetensors, the flat modeling / processing code with ``auto_map``), loads that folder
back with ``AutoProcessor`` and ``AutoModelForImageTextToText`` (``trust_remote_code=True``) and asks about
``assets/media/chelsea.png`` and ``assets/media/cockatoo.mp4``. The tiny model has random weights, so it answers
with random tokens: the point is the pipeline and its figures. Its checkpoint goes to a temporary folder that is
deleted when the script ends; ``--export-dir DIR`` keeps it in ``DIR``. With ``--model PATH`` (e.g. a local copy of
``Kwai-Keye/Keye-VL-2.0-30B-A3B``) the same steps run on that checkpoint.

It prints, per input, the visual token count, the number of frames, their timestamps (seconds), the frame size,
the prompt length and the generated text, and the seconds spent per stage; ``--output-json PATH`` writes the same
figures for scripts.

Run (CPU, under 2 minutes on 2 cores)::

    python examples/quickstart.py
    python examples/quickstart.py --export-dir keye-vl-2-tiny   # keep the exported checkpoint
    python examples/quickstart.py --output-json quickstart.json
    python examples/quickstart.py --model /path/to/Keye-VL-2.0-30B-A3B --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "assets" / "media"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    # --- model
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id; default: build a tiny random one")
    parser.add_argument(
        "--export-dir", default=None,
        help="keep the tiny checkpoint in this folder (default: a temporary folder, deleted at exit)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-implementation", default=None, help="e.g. dsa, dsa_torch, sdpa (default: the config's)")
    parser.add_argument(
        "--code", default="package", choices=["package", "checkpoint"],
        help="with --model: run this package's model / processor classes on the checkpoint (default), or the\n"
             "checkpoint's own remote code (AutoProcessor / AutoModelForImageTextToText, trust_remote_code=True)",
    )
    # --- inputs
    parser.add_argument("--image", default=str(MEDIA / "chelsea.png"))
    parser.add_argument("--video", default=str(MEDIA / "cockatoo.mp4"))
    parser.add_argument("--image-question", default="What animal is in this photo? /no_think")
    parser.add_argument("--video-question", default="What happens in this video, and when? /no_think")
    parser.add_argument("--fps", type=float, default=None, help="video sampling rate (default 2.0, Keye-VL-2.0)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames (default: budget cap)")
    # --- generation / output
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 12 (tiny model) or 256 (--model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None, help="write the printed figures as JSON to this path")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
def build_tiny_checkpoint(folder: Path, seed: int) -> None:
    """Tiny random Keye-VL-2.0 + processor (real Qwen3 tokenizer) saved as one self-contained Hub folder."""
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config
    from keye_vl.processing import build_keye_processor

    torch.manual_seed(seed)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval()
    model.save_pretrained(folder)
    build_keye_processor().save_pretrained(folder)


def run_one(name, messages, processor, model, args, timings) -> dict:
    """Prepare one conversation, generate, and collect its figures."""
    t0 = time.perf_counter()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    video_defaults = {k: v for k, v in {"fps": args.fps, "max_frames": args.max_frames}.items() if v is not None}
    images, videos, video_kwargs = processor.process_vision_info(messages, **video_defaults)
    inputs = processor(text=prompt, images=images, videos=videos, **(video_kwargs if videos else {}))
    t1 = time.perf_counter()
    inputs = inputs.to(args.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    t2 = time.perf_counter()
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    text = processor.decode(new_tokens, skip_special_tokens=True)
    timings[f"{name}_preprocess"] = t1 - t0
    timings[f"{name}_generate"] = t2 - t1

    ids = inputs["input_ids"][0]
    figures = {
        "prompt_tokens": int(ids.numel()),
        "generated_tokens": int(new_tokens.numel()),
        "generated_text": text,
    }
    if images:
        grid = inputs["image_grid_thw"][0].tolist()
        figures.update(
            image=str(messages[0]["content"][0]["image"]),
            frame_height=grid[1] * 14,
            frame_width=grid[2] * 14,
            visual_tokens=int((ids == processor.image_token_id).sum()),
        )
    if videos:
        t, gh, gw = inputs["video_grid_thw"][0].tolist()
        figures.update(
            video=str(messages[0]["content"][0]["video"]),
            frames=t,
            timestamps=[float(ts) for ts in video_kwargs["timestamps"][0]],  # seconds; the prompt shows f"{ts:.1f}"
            frame_indices=video_kwargs["frame_indices"][0],
            source_fps=video_kwargs["video_fps"][0],
            source_frames=video_kwargs["total_frames"][0],
            frame_height=gh * 14,
            frame_width=gw * 14,
            visual_tokens=int((ids == processor.video_token_id).sum()),
            tokens_per_frame=gh * gw // 4,
        )
    return figures


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # ------------------------------------------------------------------ checkpoint
    tmp = None
    if args.model is None:
        if args.export_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="keye-tiny-")
            folder = Path(tmp.name) / "keye-vl-2-tiny"
        else:
            folder = Path(args.export_dir)
        t = time.perf_counter()
        build_tiny_checkpoint(folder, args.seed)
        timings["build_and_export"] = time.perf_counter() - t
        model_path = str(folder)
        max_new_tokens = 12
    else:
        model_path = args.model
        max_new_tokens = 256
    if args.max_new_tokens is None:
        args.max_new_tokens = max_new_tokens

    # ------------------------------------------------------------------ load
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    t = time.perf_counter()
    load_kwargs = {"dtype": dtype}
    if args.attn_implementation:
        load_kwargs["attn_implementation"] = args.attn_implementation
    if args.device != "cpu":
        load_kwargs["device_map"] = args.device
    if args.model is None or args.code == "checkpoint":
        # the exported folder's own code, through the Auto classes (what a Hub user runs)
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, **load_kwargs)
    else:
        # a checkpoint such as the official one: this package's classes, the checkpoint's tokenizer and template
        from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration
        from keye_vl.processing import KeyeVL2ImageProcessor, KeyeVL2Processor, KeyeVL2VideoProcessor

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        processor = KeyeVL2Processor(KeyeVL2ImageProcessor(), KeyeVL2VideoProcessor(), tokenizer)
        if getattr(processor, "frame_token_id", 0) is None:
            print("warning: the checkpoint's tokenizer has no <|frame|> token; frame markers become plain text")
        model = KeyeVL2MoeForConditionalGeneration.from_pretrained(model_path, **load_kwargs)
    model = model.to(args.device).eval() if args.device == "cpu" else model.eval()
    timings["load"] = time.perf_counter() - t

    # ------------------------------------------------------------------ chat
    image_messages = [{"role": "user", "content": [
        {"type": "image", "image": args.image}, {"type": "text", "text": args.image_question}]}]
    video_messages = [{"role": "user", "content": [
        {"type": "video", "video": args.video}, {"type": "text", "text": args.video_question}]}]
    results = {
        "image": run_one("image", image_messages, processor, model, args, timings),
        "video": run_one("video", video_messages, processor, model, args, timings),
    }
    timings["total"] = time.perf_counter() - start

    # ------------------------------------------------------------------ report
    report = {
        "model": args.model or "tiny random Keye-VL-2.0 (exported and reloaded)",
        "model_path": model_path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "processor_class": type(processor).__name__,
        "model_class": type(model).__name__,
        "inputs": results,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    img, vid = results["image"], results["video"]
    if args.model is None:
        where = f"temporary folder {model_path}, deleted at exit (--export-dir DIR keeps it)" if tmp else model_path
        print(f"model: {report['model']} ({report['parameters'] / 1e6:.1f} M parameters), checkpoint in {where}")
        print("        random weights: the answers below are random tokens, not a description of the inputs")
    else:
        print(f"model: {report['model']} ({report['parameters'] / 1e6:.1f} M parameters) from {model_path}")
    print(f"[image] {img['image']}: {img['frame_height']}x{img['frame_width']} px -> {img['visual_tokens']} visual tokens, "
          f"prompt {img['prompt_tokens']} tokens")
    print(f"        answer: {img['generated_text']!r}")
    print(f"[video] {vid['video']}: {vid['source_frames']} frames at {vid['source_fps']:g} fps -> {vid['frames']} frames of "
          f"{vid['frame_height']}x{vid['frame_width']} px ({vid['tokens_per_frame']} tokens each), "
          f"{vid['visual_tokens']} visual tokens, prompt {vid['prompt_tokens']} tokens")
    print(f"        timestamps (s): {', '.join(f'{ts:.1f}' for ts in vid['timestamps'])}")
    print(f"        answer: {vid['generated_text']!r}")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output_json}")
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
