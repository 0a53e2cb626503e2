"""Rebuild the sample data shipped with the jobs (a maintainer's tool, not run by the jobs).

    pip download --no-deps scikit-image -d /tmp/skw && unzip -o /tmp/skw/*.whl 'skimage/data/*' -d /tmp/skw
    pip install av
    python jobs/sample_data/make_sample_data.py /tmp/skw/skimage/data

Photos come from scikit-image's bundled data (licences in LICENSES.md); videos are slow
pans / zooms over them, encoded MPEG-4 (decord reads them); both are packed into Parquet
with the columns the jobs read (`id`, `image` or `video` as bytes, optional `prompt`).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HERE = Path(__file__).resolve().parent
PHOTOS = {  # id -> (file in skimage/data, question)
    "astronaut": ("astronaut.png", "What is the person wearing?"),
    "chelsea": ("chelsea.png", "What animal is this?"),
    "coffee": ("coffee.png", None),
    "rocket": ("rocket.jpg", "Is it day or night?"),
}


def jpeg(image: Image.Image, longest: int = 640) -> bytes:
    image = image.convert("RGB")
    image.thumbnail((longest, longest))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def pan_video(image: Image.Image, frames: int = 24, size: int = 224, fps: int = 8) -> bytes:
    """A slow zoom-in towards the centre: real pixels, real motion, a few KB."""
    image = image.convert("RGB")
    width, height = image.size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            scale = 1.0 - 0.4 * i / (frames - 1)
            box_w, box_h = width * scale, height * scale
            left, top = (width - box_w) / 2, (height - box_h) / 2
            crop = image.resize((size, size), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(crop), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def main(source: Path) -> None:
    photos = {name: Image.open(source / file) for name, (file, _) in PHOTOS.items()}
    images = pa.table({"id": list(PHOTOS), "image": [jpeg(photos[n]) for n in PHOTOS],
                       "prompt": [question for _, question in PHOTOS.values()]})
    pq.write_table(images, HERE / "images.parquet")
    videos = pa.table({"id": [f"{n}-zoom" for n in ("astronaut", "chelsea", "rocket")],
                       "video": [pan_video(photos[n]) for n in ("astronaut", "chelsea", "rocket")]})
    pq.write_table(videos, HERE / "videos.parquet")
    print(f"wrote {HERE / 'images.parquet'} ({len(images)} rows) and {HERE / 'videos.parquet'} ({len(videos)} rows)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
