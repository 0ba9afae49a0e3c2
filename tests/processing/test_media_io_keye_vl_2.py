"""Odd containers and images, as generated fixtures: frame timing from unusual frame rates,
missing / wrong frame counts, late and restarting timestamps; EXIF orientation; 16-bit PNG.

Every fixture is written here with PyAV / PIL into tmp_path (a few KB each). Expected values are hand-computed from
the published sampling rule (``nframes = min(max(int(duration * min(2, fps)), 2), ...)``, indices
``round(linspace(0, total - 1, n))``, timestamp = index / fps) and from the timestamps the test itself wrote; the
frames a reader must return are found by an independent full decode of the file with PyAV (``expected_frame``):
index ``i`` is the frame on screen at ``i / fps`` (the last frame whose time is <= ``(i + 0.5) / fps`` after the
first), which for constant-rate files is simply the ``i``-th frame.
"""

import fractions
import warnings

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from keye_vl.processing import vision_process_keye_vl_2 as vp  # noqa: E402

H, W = 48, 64


def _frame_image(k: int) -> np.ndarray:
    """Frame ``k``: a grey level 9k mod 256 (distinct for k < 256) with a white column at k mod W."""
    image = np.full((H, W, 3), (9 * k) % 256, np.uint8)
    image[:, k % W] = 255
    return image


def write_video(path, pts, *, rate=30, time_base=None, codec="libx264", fmt=None, null_slots=()):
    """Encode ``len(pts)`` frames with the given presentation timestamps (in ``time_base`` units).

    ``null_slots``: packet positions where an empty packet is muxed instead (AVI "null frames": the header counts
    them as frames, but nothing decodes; the demuxer drops them).
    """
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if time_base is not None:
            stream.time_base = stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": "0"}
        packets = []
        for k, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(_frame_image(k), format="rgb24")
            frame.pts = p
            if time_base is not None:
                frame.time_base = time_base
            packets += stream.encode(frame)
        packets += stream.encode()
        if not null_slots:
            for packet in packets:
                container.mux(packet)
            return
        slot, j = 0, 0
        while j < len(packets):
            if slot in null_slots:
                packet = av.Packet(0)
            else:
                packet, j = packets[j], j + 1
            packet.stream = stream
            packet.pts = packet.dts = slot
            slot += 1
            container.mux(packet)


def decode_all(path):
    """Independent reference: every decoded frame as (pts, rgb24 array), in output order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(stream)], stream.time_base


def expected_frame(frames, time_base, fps, index):
    """The frame on screen at index ``index`` (last frame with time <= (index + 0.5) / fps after the first)."""
    start = frames[0][0]
    limit = start + (index + 0.5) / (fps * float(time_base))
    candidates = [image for pts, image in frames if pts <= limit]
    return candidates[-1]


def native(frames_chw):
    return [f.permute(1, 2, 0).numpy() for f in frames_chw]


def test_avi_odd_rate_with_dropped_frames(tmp_path):
    """The issue's case: VP9 in AVI at 187.35 fps, 300 frames by the header (1.6 s), 295 that decode.

    Rule with the metadata: nframes = int(300 / 187.35 * 2) = int(3.2) = 3, indices round(linspace(0, 299, 3)) =
    [0, 150, 299], timestamps [0, 0.8006, 1.5959] s (the prompt prints 0.0, 0.8, 1.6). Slot 150 is a dropped frame,
    so index 150 shows the frame of slot 149. Before the fix: 2 frames, the last at 0.8 s.
    """
    path = tmp_path / "odd.avi"
    rate = fractions.Fraction(18735, 100)
    null = (50, 100, 150, 200, 250)
    write_video(path, list(range(295)), rate=rate, codec="libvpx-vp9", null_slots=null)
    probe = vp.probe_video(str(path))
    assert (probe["total_frames"], probe["video_fps"]) == (300, 187.35)
    assert probe["duration"] == pytest.approx(1.60128, abs=1e-5)
    frames, info = vp.read_video(str(path))
    assert info["frame_indices"] == [0, 150, 299] and frames.shape[0] == 3
    np.testing.assert_array_equal(np.float32(info["timestamps"]), np.float32([0, 150, 299]) / np.float32(187.35))
    assert [f"{t:.1f}" for t in info["timestamps"]] == ["0.0", "0.8", "1.6"]
    # native-size frames: slot 0 is frame 0; slot 150 (dropped) still shows frame 148's successor = slot 149,
    # which holds encoded frame 149 - 2 = 147 (two null slots before it: 50, 100); slot 299 holds frame 294
    got, found = vp.decode_frames(str(path), [0, 150, 299])
    ref, time_base = decode_all(path)
    assert len(ref) == 295 and found == [0, 150, 299]
    assert [pts for pts, _ in ref if pts in (149, 151)] == [149, 151]  # slot 150 has no frame
    for image, index in zip(native(got), found):
        np.testing.assert_array_equal(image, expected_frame(ref, time_base, 187.35, index))
    assert np.array_equal(native(got)[1], ref[147][1]) and np.array_equal(native(got)[2], ref[294][1])
    seeking, _ = vp.decode_frames(str(path), [0, 150, 299], seek=True)
    assert torch.equal(seeking, got)


def test_avi_header_counting_fewer_frames_than_the_file_holds(tmp_path):
    """An AVI whose header (strh dwLength) says 40 frames while 90 are stored: the packets are counted, the larger
    count wins (with a warning), so the last 50 frames (1.67 s) are not silently dropped. 90 frames at 30 fps =
    3.0 s: nframes = 6, indices round(linspace(0, 89, 6)) = [0, 18, 36, 53, 71, 89]."""
    import struct

    path = tmp_path / "short_header.avi"
    write_video(path, list(range(90)), rate=30, codec="mpeg4", fmt="avi")
    raw = bytearray(path.read_bytes())
    at = raw.find(b"strh")
    assert raw[at + 8:at + 12] == b"vids" and struct.unpack_from("<I", raw, at + 8 + 32) == (90,)
    struct.pack_into("<I", raw, at + 8 + 32, 40)
    path.write_bytes(bytes(raw))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 40  # what the header now says
    with pytest.warns(UserWarning, match="header counts 40 frames, the file holds 90"):
        probe = vp.probe_video(str(path))
    assert (probe["total_frames"], probe["video_fps"], probe["duration"]) == (90, 30.0, 3.0)
    with pytest.warns(UserWarning, match="header counts 40"):
        frames, info = vp.read_video(str(path))
    assert info["frame_indices"] == [0, 18, 36, 53, 71, 89]
    ref, time_base = decode_all(path)
    assert len(ref) == 90
    got, found = vp.decode_frames(str(path), info["frame_indices"])
    for image, index in zip(native(got), found):
        np.testing.assert_array_equal(image, expected_frame(ref, time_base, 30.0, index))


def test_variable_rate_mkv_without_frame_count(tmp_path):
    """mkv has no frame count (packets are counted: 60) and states a nominal 30 fps, but the frames alternate 20 ms
    and 80 ms: the timestamps span 29 x 100 + 20 = 2,920 ms for 59 intervals, 20.2055 fps, so the video lasts
    60 / 20.2055 = 2.97 s (not 2.0 s). nframes = int(2.9695 * 2) = 5, indices round(linspace(0, 59, 5)) =
    [0, 15, 30, 44, 59] (14.75, 29.5 -> 30 half to even, 44.25)."""
    pts, t = [], 0
    for k in range(60):
        pts.append(t)
        t += 20 if k % 2 == 0 else 80
    path = tmp_path / "vfr.mkv"
    write_video(path, pts, time_base=fractions.Fraction(1, 1000))
    with av.open(str(path)) as container:  # what the container says
        assert container.streams.video[0].frames == 0 and float(container.streams.video[0].average_rate) == 30.0
    probe = vp.probe_video(str(path))
    fps = 59 / 2.920
    assert probe["total_frames"] == 60 and probe["fps_source"] == "timestamps"
    assert probe["video_fps"] == pytest.approx(fps, rel=1e-12)
    frames, info = vp.read_video(str(path))
    assert info["frame_indices"] == [0, 15, 30, 44, 59]
    np.testing.assert_array_equal(np.float32(info["timestamps"]), np.float32([0, 15, 30, 44, 59]) / np.float32(fps))
    got, _ = vp.decode_frames(str(path), info["frame_indices"], fps=info["video_fps"])
    ref, time_base = decode_all(path)
    for image, index in zip(native(got), info["frame_indices"]):
        want = expected_frame(ref, time_base, fps, index)
        np.testing.assert_array_equal(image, want)
    # index 15 is 15.5 / 20.2055 = 0.767 s, inside frame 15 (shown 720..800 ms); the timestamp written for it is
    # 15 / 20.2055 = 0.742 s (at the nominal 30 fps it would have said 0.5 s)
    assert (pts[15], pts[16]) == (720, 800) and np.array_equal(native(got)[1], ref[15][1])
    seeking, _ = vp.decode_frames(str(path), info["frame_indices"], fps=info["video_fps"], seek=True)
    assert torch.equal(seeking, got)


def test_variable_rate_mp4_with_header_count(tmp_path):
    """mp4 stores the frame count (60) and its average rate is frames / duration; frames follow the time rule."""
    pts = [0]
    for k in range(59):
        pts.append(pts[-1] + (10 if k % 3 else 90))
    path = tmp_path / "vfr.mp4"
    write_video(path, pts, time_base=fractions.Fraction(1, 1000))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps, total = float(stream.average_rate), stream.frames
    assert total == 60
    frames, info = vp.read_video(str(path))
    n = min(max(int(60 / fps * 2), 2), 60)
    assert info["frame_indices"] == np.round(np.linspace(0, 59, n)).astype(int).tolist()
    got, _ = vp.decode_frames(str(path), info["frame_indices"])
    ref, time_base = decode_all(path)
    ordinal_differs = 0
    for image, index in zip(native(got), info["frame_indices"]):
        np.testing.assert_array_equal(image, expected_frame(ref, time_base, fps, index))
        ordinal_differs += not np.array_equal(image, ref[index][1])
    assert ordinal_differs >= 1  # the time rule is not the decoding-order rule on this file


def test_timestamps_starting_late(tmp_path):
    """The first frame is at 5.0 s (33 ms steps): index 0 is the first frame, timestamps count from it."""
    path = tmp_path / "late.mkv"
    write_video(path, [5000 + 33 * k for k in range(30)], time_base=fractions.Fraction(1, 1000))
    frames, info = vp.read_video(str(path))
    assert info["total_frames"] == 30 and info["video_fps"] == 30.0  # 33 ms vs 33.3 ms: within 2%, stream rate kept
    assert info["frame_indices"] == [0, 29] and info["timestamps"] == [0.0, pytest.approx(29 / 30)]
    got, _ = vp.decode_frames(str(path), [0, 29])
    ref, _ = decode_all(path)
    np.testing.assert_array_equal(native(got)[0], ref[0][1])
    np.testing.assert_array_equal(native(got)[1], ref[29][1])


def test_timestamps_that_restart(tmp_path):
    """Two MPEG-TS segments concatenated: timestamps restart at frame 30. Frames are taken in decoding order,
    with a warning naming the file; 60 packets at 30 fps -> 4 frames at [0, 20, 39, 59]."""
    parts = []
    for segment in range(2):
        part = tmp_path / f"part{segment}.ts"
        with av.open(str(part), "w", format="mpegts") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.options = {"preset": "ultrafast", "bf": "0"}
            for k in range(30):
                frame = av.VideoFrame.from_ndarray(_frame_image(30 * segment + k), format="rgb24")
                frame.pts = k
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        parts.append(part.read_bytes())
    path = tmp_path / "restart.ts"
    path.write_bytes(b"".join(parts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames, info = vp.read_video(str(path))
    assert any("restart" in str(w.message) and "restart.ts" in str(w.message) for w in caught)
    assert info["frame_indices"] == [0, 20, 39, 59]
    ref, _ = decode_all(path)
    assert len(ref) == 60 and ref[30][0] < ref[29][0]  # the fixture really restarts
    got, _ = vp.decode_frames(str(path), info["frame_indices"])
    for image, index in zip(native(got), info["frame_indices"]):
        np.testing.assert_array_equal(image, ref[index][1])


def test_truncated_file_with_a_header_count(tmp_path):
    """An AVI cut in half still says 300 frames (10 s at 30 fps): the plan is 20 frames at round(linspace(0, 299,
    20)); the frames that exist come back with their own timestamps and a warning naming the file, within seconds."""
    import time

    full = tmp_path / "full.avi"
    write_video(full, list(range(300)), codec="mpeg4")
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames, info = vp.read_video(str(cut))
    assert time.monotonic() - start < 10
    plan = np.round(np.linspace(0, 299, 20)).astype(int).tolist()
    n = len(info["frame_indices"])
    assert 5 <= n < 20 and info["frame_indices"] == plan[:n] and frames.shape[0] == n
    np.testing.assert_array_equal(np.float32(info["timestamps"]), np.float32(plan[:n]) / np.float32(30))
    assert any("shorter than its header" in str(w.message) and "cut.avi" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    """A 40 x 20 JPEG whose left quarter is white, tagged orientation 6 (rotate 90 degrees clockwise to display):
    it must arrive as 20 wide x 40 high with the white part on top (transformers' load_image does the same)."""
    from PIL import Image

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = 255
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = np.asarray(vp.load_image(str(path)))
    assert loaded.shape == (40, 20, 3)
    assert loaded[:8].min() >= 240 and loaded[12:].max() <= 15
    from transformers.image_utils import load_image as hf_load_image

    assert np.abs(np.asarray(hf_load_image(str(path)), dtype=int) - loaded.astype(int)).max() <= 0
    with Image.open(path) as opened:  # a PIL image carrying the tag is rotated too
        assert np.array_equal(np.asarray(vp.fetch_image({"image": opened, "min_pixels": 1})), np.asarray(
            vp.fetch_image({"image": str(path), "min_pixels": 1})))


def test_16bit_grayscale_png_is_scaled(tmp_path):
    """A 16-bit PNG with values 0, 30, ..., 61410 arrives as round(v * 255 / 65535) (was: 98% white)."""
    from PIL import Image

    values = (np.arange(32 * 64, dtype=np.uint32).reshape(32, 64) * 30).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # PIL opens it as 16-bit
    loaded = np.asarray(vp.load_image(str(path)))
    want = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], want)
    assert (loaded == 255).mean() < 0.01


def test_video_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/video_io.py on a 2-second generated clip: the file is made, measured, and the JSON has an ok row
    with the plan's frame count (2 s at 24 fps -> 4 frames at 2 fps)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "video_io.py"
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--workdir", str(tmp_path / "videos"), "--seconds", "2", "--videos",
         "360p_h264", "--readers", "keye", "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["frames"] == 4 and row["grid"] == [4, 24, 42] and row["peak_rss_mb"] > 0
    assert report["videos"]["360p_h264"]["frames"] == 48
