"""Fetch and decode one row's media: images with Pillow, videos with decord.

Media arrive as encoded bytes, as the Hugging Face datasets struct {"bytes", "path"}, or
as a path / URI string (any pyarrow filesystem: local, s3://, gs://, ...). Every failure
raises `MediaError` with a one-line reason; the caller turns it into an error row.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class MediaError(Exception):
    """This row's media cannot be used; the message says why."""


def fetch_bytes(value) -> bytes:
    """Encoded bytes from any supported form of the media column."""
    if value is None:
        raise MediaError("no media in this row")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):  # Hugging Face datasets Image/Video struct
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return fetch_bytes(str(value["path"]))
        raise MediaError("media struct has neither bytes nor path")
    if isinstance(value, str):
        return _read_uri(value)
    raise MediaError(f"unsupported media value of type {type(value).__name__}; give bytes, "
                     "{bytes, path} or a path/URI string")


def _read_uri(uri: str) -> bytes:
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri) if "://" in uri else (fs.LocalFileSystem(), uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError) as error:  # pyarrow raises FileNotFoundError / ArrowInvalid (ValueError)
        raise MediaError(f"cannot read {uri}: {error}") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image, EXIF orientation applied, first frame of animations. Sizes are checked from
    the header before any pixel is decoded (decompression bombs fail cheaply)."""
    if not data:
        raise MediaError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError("not an image Pillow can read (corrupt bytes or unsupported format)") from None
    except Image.DecompressionBombError as error:  # Pillow's own guard fires first for huge headers
        raise MediaError(f"image too large (decompression-bomb guard): {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"image is {width}x{height} = {width * height} pixels, over "
                         f"media.max_image_pixels={max_pixels}")
    try:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGBA").convert("RGB") if "A" in image.getbands() else image.convert("RGB")
        image.load()
    except (OSError, ValueError, SyntaxError) as error:  # truncated or malformed data
        raise MediaError(f"image data is corrupt: {error}") from None
    return image


@dataclass
class Frames:
    images: list[Image.Image]
    fps: float  # rate at which the returned frames sample the video


def sample_indices(num_frames_in_video: int, average_fps: float, num_frames: int, fps: float | None,
                   max_frames: int) -> np.ndarray:
    """Uniform `num_frames` over the video, or one frame every 1/fps seconds; at most
    `max_frames` and never a frame twice (a repeat costs visual tokens and shows nothing new);
    an even count (Qwen-VL groups frames in pairs), except for a one-frame video: its one frame
    (the processor repeats it up to the temporal patch, as transformers' does)."""
    if num_frames_in_video == 1:
        return np.zeros(1, dtype=np.int64)
    if fps is not None:
        step = max(average_fps / fps, 1.0)
        indices = np.arange(0, num_frames_in_video, step)
        if len(indices) > max_frames:
            indices = np.linspace(0, num_frames_in_video - 1, max_frames)
    else:
        indices = np.linspace(0, num_frames_in_video - 1, min(num_frames, max_frames, num_frames_in_video))
    count = max(2, len(indices) - len(indices) % 2)
    if count != len(indices):
        indices = np.linspace(0, num_frames_in_video - 1, count)
    return np.round(indices).astype(np.int64)


def decode_video(data: bytes, num_frames: int, fps: float | None, max_frames: int) -> Frames:
    import decord

    if not data:
        raise MediaError("empty file (0 bytes)")
    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        total = len(reader)
        average_fps = float(reader.get_avg_fps()) or 1.0
    except Exception as error:  # decord raises its own DECORDError and RuntimeError variants
        raise MediaError(f"not a video decord can read: {str(error).splitlines()[0][:200]}") from None
    if total < 1:
        raise MediaError("video has no frames")
    indices = sample_indices(total, average_fps, num_frames, fps, max_frames)
    try:
        frames = reader.get_batch(list(indices)).asnumpy()
    except Exception as error:
        raise MediaError(f"video decoding failed (truncated?): {str(error).splitlines()[0][:200]}") from None
    span_s = max(float(indices[-1] - indices[0]), 1.0) / average_fps
    fps = (len(indices) - 1) / span_s if len(indices) > 1 else average_fps
    return Frames([Image.fromarray(frame) for frame in frames], fps=fps)
