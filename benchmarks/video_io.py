"""Video I/O on the CPU: time and peak RSS from a video path to ``pixel_values_videos``, beside qwen-vl-utils.

The videos are generated locally with PyAV (no download, no extra tool): a moving gradient with a moving white
block, ``yuv420p``, h264 (libx264, preset ``ultrafast``, CRF 28) or VP9 (libvpx-vp9, realtime, cpu-used 8).
Synthetic content compresses far better than camera footage, so every decoder here runs faster than it would on a
real film of the same size; the comparison between readers on the same files is what the numbers are for.

Each measurement runs in a fresh subprocess (peak RSS = that process's ``VmHWM``, i.e. Python + torch + the
reader + the output), with the same Keye sampling plan for every reader (2 fps, at most 2,880 frames, the
184,320-token budget; frame indices ``round(linspace(0, total - 1, n))``):

- ``keye``: this package's ``KeyeVL2VideoProcessor`` on the path (PyAV; probe, plan, streaming decode);
- ``decord-chunked``: decord's ``VideoReader.get_batch`` (qwen-vl-utils' decord backend's reader) called on 32
  sampled frames at a time, each chunk resized at once (``resize_frames``), then the same processor: decord's decode
  speed without qwen-vl-utils' memory use (it holds every sampled frame at native size, then as float32);
- ``qwen-<backend>``: ``qwen_vl_utils.fetch_video`` with ``FORCE_QWENVL_VIDEO_READER=<backend>`` and
  ``nframes`` = the Keye plan's frame count (qwen-vl-utils then rounds it to a multiple of 2), followed by the
  same ``KeyeVL2VideoProcessor`` on the returned frames, so both rows end at ``pixel_values_videos``. Backends
  that are not installed or fail (the torchvision 0.29 installed with this package has no ``read_video``) are
  recorded with their error.

    python benchmarks/video_io.py --workdir /tmp/keye-video-bench --output benchmarks/results/video_io_cpu.json
    python benchmarks/video_io.py --generate-only --workdir /tmp/keye-video-bench     # just make the files
    python benchmarks/video_io.py --check-seek --readers "" ...   # seeking decode == sequential decode?

Options: ``--videos 360p_h264,1080p_h264`` (subset), ``--seconds 3600`` (length of the generated files),
``--readers keye,decord-chunked,qwen-decord``, ``--timeout 1800`` (per measurement), ``--max-qwen-gb 16``,
``--append`` (add rows to an existing ``--output``). Needs PyAV only; the decord rows need ``pip install decord``
(torchcodec also needs a system FFmpeg), and rows whose reader is missing record the error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# name: (width, height, fps, codec, container suffix)
VIDEOS = {
    "360p_h264": (640, 360, 24, "libx264", "mp4"),
    "360p_vp9": (640, 360, 24, "libvpx-vp9", "webm"),
    "1080p_h264": (1920, 1080, 30, "libx264", "mp4"),
    "1080p_vp9": (1920, 1080, 30, "libvpx-vp9", "webm"),
}
QWEN_BACKENDS = ("torchcodec", "decord", "torchvision")
# qwen-vl-utils keeps every sampled frame at native size (uint8, then float32 for its resize): at 1080p, 2,880
# frames need about 18 GB + 72 GB; its rows are skipped (recorded as "skipped") when that exceeds --max-qwen-gb.



def generate(path: str, width: int, height: int, fps: int, codec: str, seconds: float) -> dict:
    """Write a synthetic video with PyAV; returns its generation facts (frames, seconds taken, bytes)."""
    import av
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    base = ((xx * 255 // width + yy * 255 // height) // 2).astype(np.uint8)
    chroma = np.full((height // 2, width), 128, np.uint8)
    frames = int(round(fps * seconds))
    start = time.monotonic()
    tmp = path + ".part"
    with av.open(tmp, "w", format=path.rsplit(".", 1)[-1].replace("mp4", "mp4")) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "28"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "40", "b": "0", "row-mt": "1"}
        block = min(64, height // 4)
        for i in range(frames):
            luma = np.roll(base, i * 4, axis=1)
            top = (i * 7) % (height - block)
            luma[top : top + block, : 2 * block] = 255
            frame = av.VideoFrame.from_ndarray(np.concatenate([luma, chroma]), format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return {"frames": frames, "generate_s": round(time.monotonic() - start, 1), "bytes": os.path.getsize(path)}


def ensure_videos(workdir: str, names: list[str], seconds: float) -> dict:
    """Generate the missing files of ``names`` under ``workdir`` (a ``.json`` beside each records its facts)."""
    os.makedirs(workdir, exist_ok=True)
    facts = {}
    for name in names:
        width, height, fps, codec, suffix = VIDEOS[name]
        path = os.path.join(workdir, f"{name}_{int(seconds)}s.{suffix}")
        meta = path + ".json"
        if not (os.path.exists(path) and os.path.exists(meta)):
            print(f"generating {path} ({seconds:g} s, {width}x{height}@{fps}, {codec}) ...", flush=True)
            info = generate(path, width, height, fps, codec, seconds)
            with open(meta, "w") as f:
                json.dump(info, f)
        with open(meta) as f:
            facts[name] = {"path": path, "width": width, "height": height, "fps": fps, "codec": codec,
                           "seconds": seconds, **json.load(f)}
    return facts


_CHILD = r"""
import hashlib, json, os, resource, sys, time
reader, path, nframes, height, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if reader.startswith("qwen-"):
    os.environ["FORCE_QWENVL_VIDEO_READER"] = reader[len("qwen-"):]
import torch
from keye_vl.processing import KeyeVL2VideoProcessor

processor = KeyeVL2VideoProcessor()
result = {"reader": reader}
start = time.perf_counter()
try:
    if reader == "keye":
        from keye_vl.processing.vision_process_keye_vl_2 import plan_video, probe_video
        probe = probe_video(path)
        indices = plan_video(probe["total_frames"], probe["video_fps"], probe["height"], probe["width"])["frame_indices"]
        start = time.perf_counter()  # the probe above is repeated inside the processor call
        out = processor([path])
    elif reader == "decord-chunked":
        import decord
        from keye_vl.processing.vision_process_keye_vl_2 import resize_frames
        vr = decord.VideoReader(path, num_threads=0)
        total = len(vr)
        indices = torch.linspace(0, total - 1, nframes, dtype=torch.float64).round().long().tolist()
        result["decord_total_frames"] = total
        parts = []
        for a in range(0, len(indices), 32):
            batch = torch.from_numpy(vr.get_batch(indices[a:a + 32]).asnumpy()).permute(0, 3, 1, 2)
            parts.append(resize_frames(batch, height, width))
        frames = torch.cat(parts)
        del parts
        result["read_s"] = round(time.perf_counter() - start, 2)
        out = processor([frames], height=[height], width=[width])
    else:
        import importlib.util
        from qwen_vl_utils import vision_process as qv
        backend = reader[len("qwen-"):]
        if backend != "torchvision" and importlib.util.find_spec(backend) is None:
            raise ImportError(f"{backend} is not installed (qwen-vl-utils would fall back to torchvision)")
        ele = {"video": path, "nframes": nframes, "resized_height": height, "resized_width": width}
        video, meta = qv.fetch_video(ele, return_video_metadata=True)
        result["read_s"] = round(time.perf_counter() - start, 2)
        indices = [int(i) for i in meta["frames_indices"]]
        frames = video.round().clamp(0, 255).to(torch.uint8)
        out = processor([frames], height=[frames.shape[-2]], width=[frames.shape[-1]])
    result["seconds"] = round(time.perf_counter() - start, 2)
    result.update(status="ok", frames=int(out["video_grid_thw"][0, 0]), grid=out["video_grid_thw"][0].tolist(),
                  pixel_values_videos=list(out["pixel_values_videos"].shape),
                  indices_sha1=hashlib.sha1(json.dumps(indices).encode()).hexdigest()[:12])
except Exception as err:
    result.update(status="error", seconds=round(time.perf_counter() - start, 2), error=f"{type(err).__name__}: {err}"[:300])
# VmHWM is this process image's peak RSS (ru_maxrss would include the parent's RSS inherited across fork + exec)
with open("/proc/self/status") as status:
    hwm = [int(line.split()[1]) for line in status if line.startswith("VmHWM")]
result["peak_rss_mb"] = round((hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1)
print("RESULT" + json.dumps(result))
"""


def measure(reader: str, path: str, plan: dict, timeout: float) -> dict:
    """One reader on one file in a fresh interpreter (so ``ru_maxrss`` is this measurement's peak)."""
    args = [sys.executable, "-c", _CHILD, reader, path, str(plan["nframes"]), str(plan["resized_height"]),
            str(plan["resized_width"])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"reader": reader, "status": "timeout", "seconds": timeout}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if not lines:
        return {"reader": reader, "status": "crashed", "error": proc.stderr[-500:]}
    return json.loads(lines[-1][len("RESULT"):])


def _backend_usable(backend: str) -> bool:
    """Whether qwen-vl-utils' ``backend`` can run here (unusable ones are still measured: they fail at once)."""
    import importlib.util

    if backend == "torchvision":
        try:
            import torchvision.io

            return hasattr(torchvision.io, "read_video")
        except ImportError:
            return False
    return importlib.util.find_spec(backend) is not None


def keye_plan(path: str) -> dict:
    from keye_vl.processing.vision_process_keye_vl_2 import plan_video, probe_video

    probe = probe_video(path)
    plan = plan_video(probe["total_frames"], probe["video_fps"], probe["height"], probe["width"])
    return {"total_frames": probe["total_frames"], "video_fps": probe["video_fps"], "nframes": plan["nframes"],
            "resized_height": plan["resized_height"], "resized_width": plan["resized_width"],
            "tokens": plan["total_tokens"]}


def check_seek(path: str) -> dict:
    """The default (keyframe-seeking) decode of the sampled frames against a sequential decode of the whole file."""
    import torch

    from keye_vl.processing.vision_process_keye_vl_2 import decode_frames, plan_video, probe_video

    probe = probe_video(path)
    plan = plan_video(probe["total_frames"], probe["video_fps"], probe["height"], probe["width"])
    args = (path, plan["frame_indices"], plan["resized_height"], plan["resized_width"])
    t0 = time.perf_counter()
    seeking, found_a = decode_frames(*args, seek=True, fps=probe["video_fps"])
    t1 = time.perf_counter()
    sequential, found_b = decode_frames(*args, seek=False, fps=probe["video_fps"])
    t2 = time.perf_counter()
    same = found_a == found_b and torch.equal(seeking, sequential)
    return {"frames": len(found_a), "identical": bool(same),
            "max_abs_diff": int((seeking.int() - sequential.int()).abs().max()) if found_a == found_b else None,
            "seek_s": round(t1 - t0, 2), "sequential_s": round(t2 - t1, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/keye-video-bench")
    parser.add_argument("--videos", default=",".join(VIDEOS))
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--readers", default="keye,decord-chunked," + ",".join("qwen-" + b for b in QWEN_BACKENDS))
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--output", default=None, help="JSON file (rewritten after every measurement)")
    parser.add_argument("--append", action="store_true", help="add the rows to an existing --output file")
    parser.add_argument("--max-qwen-gb", type=float, default=16.0,
                        help="skip qwen-vl-utils rows whose sampled frames need more memory than this (GB)")
    parser.add_argument("--check-seek", action="store_true",
                        help="also compare the seeking decode with a sequential decode of each file (frames identical?)")
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in args.videos.split(",") if n]
    facts = ensure_videos(args.workdir, names, args.seconds)
    if args.generate_only:
        print(json.dumps(facts, indent=1))
        return 0
    import av
    import torch

    try:
        import importlib.metadata as md

        qwen_version = md.version("qwen-vl-utils")
    except Exception:
        qwen_version = None
    report = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "av": av.__version__, "qwen_vl_utils": qwen_version,
                    "load_average_at_start": os.getloadavg()},
        "settings": {"seconds": args.seconds, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")},
        "videos": facts,
        "rows": [],
    }
    if args.append and args.output and os.path.exists(args.output):
        with open(args.output) as f:
            previous = json.load(f)
        report["runs"] = previous.get("runs", [previous["machine"]]) + [report["machine"]]
        report["videos"] = {**previous["videos"], **facts}
        report["rows"] = previous["rows"]
        if "seek_checks" in previous:
            report["seek_checks"] = previous["seek_checks"]
        facts = report["videos"]
    for name in names:
        path = facts[name]["path"]
        plan = keye_plan(path)
        facts[name]["plan"] = plan
        if args.check_seek:
            print(f"{name} / seek vs sequential ...", flush=True)
            report.setdefault("seek_checks", {})[name] = check_seek(path)
            print("   ", json.dumps(report["seek_checks"][name]), flush=True)
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(report, f, indent=1)
        for reader in [r for r in args.readers.split(",") if r]:
            print(f"{name} / {reader} ...", flush=True)
            need_gb = plan["nframes"] * 3 * facts[name]["width"] * facts[name]["height"] * 5 / 1e9
            if reader.startswith("qwen-") and need_gb > args.max_qwen_gb and _backend_usable(reader[5:]):
                row = {"video": name, "reader": reader, "status": "skipped",
                       "error": f"needs about {need_gb:.0f} GB for its sampled frames (uint8 + float32 at native "
                                f"size) > --max-qwen-gb {args.max_qwen_gb:g}"}
            else:
                row = {"video": name, **measure(reader, path, plan, args.timeout)}
            row["load_average"] = round(os.getloadavg()[0], 2)
            row["seconds_of_video"] = args.seconds
            row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print("   ", json.dumps(row), flush=True)
            report["rows"].append(row)
            if args.output:
                with open(args.output, "w") as f:
                    json.dump(report, f, indent=1)
    if not args.output:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
