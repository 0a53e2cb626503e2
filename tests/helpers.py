"""Sample builders shared by the tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(processor, *parts, text: str) -> str:
    content = [{"type": part} for part in parts] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def mixed_samples(processor, seed: int = 0) -> list[dict]:
    """Eight samples covering what a real batch mixes: image sizes, two images, video, text only
    (a family without video gets an image where the video would be)."""
    rng = np.random.default_rng(seed)
    img = lambda h, w: random_image(rng, h, w)  # noqa: E731
    if "video" not in getattr(processor, "media_kinds", ("image", "video")):
        return [
            processor(text=[chat(processor, "image", text="What is in the picture?")], images=[img(60, 80)]),
            processor(text=[chat(processor, "image", "image", text="Compare the two photos.")],
                      images=[img(100, 50), img(200, 200)]),
            processor(text=[chat(processor, "image", text="Caption the picture.")], images=[img(64, 64)]),
            processor(text=[chat(processor, text="Tell me about a red car on a street.")]),
            processor(text=[chat(processor, "image", text="How many people are in the photo? Answer with one word.")],
                      images=[img(300, 120)]),
            processor(text=[chat(processor, "image", text="Read the sign.")], images=[img(28, 28)]),
            processor(text=[chat(processor, "image", "image", text="What happens after the ball falls?")],
                      images=[img(90, 120), img(120, 90)]),
            processor(text=[chat(processor, text="yes")]),
        ]
    return [
        processor(text=[chat(processor, "image", text="What is in the picture?")], images=[img(60, 80)]),
        processor(text=[chat(processor, "image", "image", text="Compare the two photos.")],
                  images=[img(100, 50), img(200, 200)]),
        processor(text=[chat(processor, "video", text="Caption the video.")], videos=[[img(64, 64)] * 3 + [img(64, 64)]]),
        processor(text=[chat(processor, text="Tell me about a red car on a street.")]),
        processor(text=[chat(processor, "image", text="How many people are in the photo? Answer with one word.")],
                  images=[img(300, 120)]),
        processor(text=[chat(processor, "image", text="Read the sign.")], images=[img(28, 28)]),
        processor(text=[chat(processor, "video", text="What happens after the ball falls? Which object moves first?")],
                  videos=[[img(90, 120) for _ in range(5)]]),
        processor(text=[chat(processor, text="yes")]),
    ]
