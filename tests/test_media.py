"""Media fetch and decode: every supported form, and a clear MediaError for each bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.media import MediaError, decode_image, decode_video, fetch_bytes, sample_indices

DATA = Path(__file__).parent / "data"
SAMPLES = Path(__file__).parent.parent / "jobs" / "sample_data"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data: a decompression-bomb stand-in)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def video_bytes() -> bytes:
    return pq.read_table(SAMPLES / "videos.parquet").column("video")[0].as_py()


def test_fetch_accepts_bytes_hf_struct_and_paths(tmp_path):
    data = encoded(Image.new("RGB", (8, 8)), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert fetch_bytes(data) == data
    assert fetch_bytes({"bytes": data, "path": None}) == data
    assert fetch_bytes({"bytes": None, "path": str(path)}) == data
    assert fetch_bytes(str(path)) == data
    assert fetch_bytes(f"file://{path}") == data
    with pytest.raises(MediaError, match="cannot read"):
        fetch_bytes(str(tmp_path / "missing.png"))
    with pytest.raises(MediaError, match="no media"):
        fetch_bytes(None)


def test_images_become_rgb_upright_first_frame():
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 128))
    assert decode_image(encoded(rgba, "PNG"), 10**6).mode == "RGB"
    grey16 = Image.fromarray(np.full((5, 7), 300, dtype=np.uint16))
    assert decode_image(encoded(grey16, "PNG"), 10**6).size == (7, 5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    rotated = decode_image(encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif), 10**6)
    assert rotated.size == (20, 40)
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif, 10**6).getpixel((0, 0))[0] > 200  # the first (red) frame


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"not an image at all, just text", "not an image"),
    (b"%PDF-1.4 a pdf is not an image", "not an image"),
    (png_header(30000, 30000), "image too large .*900000000 pixels"),
], ids=["zero-bytes", "corrupt", "unsupported-format", "bomb-header"])
def test_bad_images_say_why(data, reason):
    with pytest.raises(MediaError, match=reason):
        decode_image(data, 100_000_000)


def test_truncated_image_is_an_error():
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(MediaError, match="corrupt"):
        decode_image(data[: len(data) // 2], 10**6)


def test_video_frames_uniform_and_by_fps(video_bytes):
    frames = decode_video(video_bytes, num_frames=6, fps=None, max_frames=64)
    assert len(frames.images) == 6 and frames.images[0].size == (224, 224)
    by_rate = decode_video(video_bytes, num_frames=6, fps=2.0, max_frames=64)  # 24 frames at 8 fps: 3 s
    assert len(by_rate.images) == 6 and by_rate.fps == pytest.approx(2.0, rel=0.2)
    assert len(decode_video(video_bytes, num_frames=6, fps=8.0, max_frames=10).images) == 10


def test_sample_indices_are_even_and_bounded():
    for total in (2, 3, 7, 100):
        for num, fps in ((5, None), (16, None), (4, 1.0), (4, 30.0)):
            idx = sample_indices(total, 10.0, num, fps, max_frames=12)
            assert len(idx) % 2 == 0 and 2 <= len(idx) <= 12
            assert idx.min() >= 0 and idx.max() <= total - 1 and np.all(np.diff(idx) > 0)  # no frame twice
    assert sample_indices(8, 4.0, 16, None, max_frames=64).tolist() == list(range(8))  # all of a short video


@pytest.mark.parametrize("case", ["zero-bytes", "corrupt", "truncated"])
def test_bad_videos_say_why(case, video_bytes):
    data, reason = {
        "zero-bytes": (b"", "empty file"),
        "corrupt": (b"\x00\x01garbage" * 50, "not a video"),
        "truncated": (video_bytes[: len(video_bytes) // 3], "not a video|decoding failed|frame"),
    }[case]
    with pytest.raises(MediaError, match=reason):
        decode_video(data, num_frames=8, fps=None, max_frames=64)


def test_a_one_frame_video_is_its_frame_repeated_up_to_the_temporal_patch(tiny_checkpoints):
    """As transformers' video processor does it: one temporal patch of the frame twice."""
    from sparsevlm.preprocess import QwenVLProcessor, normalization_table, normalize_frames, resize_frame

    video = decode_video((DATA / "one_frame.mp4").read_bytes(), num_frames=8, fps=None, max_frames=64)
    assert len(video.images) == 1 and video.fps > 0
    processor = QwenVLProcessor.from_pretrained(tiny_checkpoints["qwen2_5_vl"])
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
    sample = processor(text=[prompt], videos=[video.images], video_fps=video.fps)
    t, h, w = sample["video_grid_thw"][0].tolist()
    assert t == 1
    frame = resize_frame(video.images[0], (h * 14, w * 14))
    twice = normalize_frames(np.stack([frame, frame]), normalization_table(processor.video_cfg))  # 2, C, H, W
    first_patch = twice[:, :, :14, :14].transpose(1, 0, 2, 3).reshape(-1)  # C, tp, p, p as the tower reads it
    assert np.array_equal(sample["pixel_values_videos"][0].numpy(), first_patch)


def test_our_pixel_limit_applies_below_pillows():
    with pytest.raises(MediaError, match="3000x3000 = 9000000 pixels, over media.max_image_pixels=1000000"):
        decode_image(png_header(3000, 3000), 1_000_000)
