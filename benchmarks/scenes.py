"""Procedural scene VQA: images and short videos whose answers live in one region.

Deterministic by seed: sample i of seed s is drawn from its own `random.Random`, so any
subset regenerates identically. Images are square, 448-672 px: a few objects (shape,
colour, size) and sometimes a sign with a short word, on a cluttered background. Questions:

    colour    What colour is the large triangle?          -> red
    shape     What shape is the blue object?              -> circle
    exists    Is there a green square?                    -> yes / no
    position  Where is the red circle?                    -> top left   (the quadrant of its centre)
    count     How many triangles are there?               -> two
    read      What word is on the yellow sign?            -> cat       (signs: white plates, coloured rims)
    motion    Which way does the red circle move?         -> left      (videos)
    order     Which appears first, the red circle or the blue square?  -> red circle   (videos)

Every object a question names is unique under its description (colour + shape, or the
words used), so each answer is determined by one region of the image.

    python -m benchmarks.scenes --seed 0 --n 8 --out /tmp/scenes    # writes PNGs and questions.json
    python -m benchmarks.scenes --seed 0 --n 256 --parquet /tmp/scenes.parquet --kind image
        # a job / cost-report input: id, image (PNG bytes), prompt, answer (the cost report scores it)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 200, 30),
           "purple": (148, 70, 180), "orange": (245, 130, 20)}
SIZES = {"small": (26, 34), "large": (52, 66)}  # half-extent in px at 448; scaled with the image
WORDS = ("cat", "dog", "sun", "box", "car", "bus", "cup", "hat", "pen", "key")  # three letters: one sign's width
SIGN = "sign"  # not one of SHAPES: signs are only asked about by "read"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
DIRECTIONS = ("left", "right", "up", "down")
IMAGE_TYPES = ("colour", "shape", "exists", "position", "count", "read")
VIDEO_TYPES = ("motion", "order")
VIDEO_SIZE, VIDEO_FRAMES = 448, 8
PROMPT_SUFFIX = " Answer with one or two words."  # after every question, in training and in use
# Sign text, px at 448 (scaled with the image): letters about two 14-px patches wide. The probe's
# small vision tower did not learn to read 22-44 px labels drawn on the shapes in its training
# budget; it reads these (README, Accuracy).
FONT_SIZE = 48
SIGN_HALF_SIZE = (60, 40)  # half width, half height, px at 448
QUADRANT_MARGIN = 0.5  # a position question's object centre is >= this many radii off both midlines


@dataclass
class Thing:
    shape: str
    colour: str
    size: str
    x: float  # centre, px
    y: float
    r: float  # half-extent, px
    word: str | None = None
    appears_at: int = 0  # first video frame it is visible in
    velocity: tuple[float, float] = (0.0, 0.0)  # px per frame
    scene_size: int = 448  # the image's side, px

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def quadrant(self) -> str:
        """Where its centre lies: "top left", "top right", "bottom left" or "bottom right"."""
        half = self.scene_size / 2
        return f"{'top' if self.y < half else 'bottom'} {'left' if self.x < half else 'right'}"


@dataclass
class Sample:
    kind: str  # image or video
    question: str
    answer: str
    qtype: str
    frames: list[Image.Image] = field(repr=False)  # one for an image
    things: list[Thing] = field(default_factory=list, repr=False)  # what was drawn (for checks)

    @property
    def media(self) -> Image.Image | list[Image.Image]:
        return self.frames[0] if self.kind == "image" else self.frames


# --- drawing -------------------------------------------------------------------------------


def _background(rng: random.Random, size: int) -> Image.Image:
    """Muted clutter: it must look like texture, never like an object."""
    base = tuple(rng.randint(150, 200) for _ in range(3))
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(30, 60)):
        shade = tuple(max(0, min(255, c + rng.randint(-45, 45))) for c in base)
        x0, y0 = rng.uniform(0, size), rng.uniform(0, size)
        if rng.random() < 0.6:
            angle, length = rng.uniform(0, math.pi), rng.uniform(20, size / 3)
            draw.line([x0, y0, x0 + length * math.cos(angle), y0 + length * math.sin(angle)], fill=shade,
                      width=rng.randint(1, 3))
        else:
            r = rng.uniform(2, 6)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=shade)
    return image


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, x: float, y: float, font_size: int,
          fill: int | tuple | None = None) -> None:
    """The thing in its colour (a sign: white plate, coloured rim, black word), or (`fill` given)
    its silhouette alone in `fill`."""
    r, silhouette, fill = thing.r, fill is not None, COLOURS[thing.colour] if fill is None else fill
    if thing.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif thing.shape in ("square", SIGN):
        half_height = r * SIGN_HALF_SIZE[1] / SIGN_HALF_SIZE[0] if thing.shape == SIGN else r
        draw.rectangle([x - r, y - half_height, x + r, y + half_height], fill=fill)
        if thing.shape == SIGN and not silhouette:
            rim = 0.25 * half_height  # thick: the rim is all that says which sign it is
            inner = [x - r + rim, y - half_height + rim, x + r - rim, y + half_height - rim]
            draw.rectangle(inner, fill=(255, 255, 255))
            draw.text((x, y), thing.word, fill=(0, 0, 0), font=_font(font_size), anchor="mm")
    elif thing.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.85), (x - r, y + r * 0.85)], fill=fill)
    else:
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)


def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap fallback ignores `size`: other scenes
        raise RuntimeError("Pillow without FreeType: scenes would not render as on other machines")
    return font


def render(things: list[Thing], background: Image.Image, frame: int = 0) -> Image.Image:
    image = background.copy()
    draw = ImageDraw.Draw(image)
    font_size = max(14, round(background.width / 448 * FONT_SIZE))
    for thing in things:
        if frame >= thing.appears_at:
            x, y = thing.x + thing.velocity[0] * frame, thing.y + thing.velocity[1] * frame
            _draw(draw, thing, x, y, font_size)
    return image


def object_map(things: list[Thing], size: int, frame: int = 0) -> Image.Image:
    """Which object covers each pixel of `render(things, ..., frame)`: 0 for background, i + 1
    for things[i] (mode "L"). Training uses it for per-region targets."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for index, thing in enumerate(things):
        if frame >= thing.appears_at:
            _draw(draw, thing, thing.x + thing.velocity[0] * frame, thing.y + thing.velocity[1] * frame, 0,
                  fill=index + 1)
    return image


def _place(rng: random.Random, things: list[Thing], size: int, r: float, margin: float) -> tuple[float, float] | None:
    for _ in range(200):
        x, y = rng.uniform(margin + r, size - margin - r), rng.uniform(margin + r, size - margin - r)
        if all(math.hypot(x - t.x, y - t.y) > r + t.r + 10 for t in things):
            return x, y
    return None


def _scene(rng: random.Random, size: int, count: int, margin: float = 0.0, signs: int = 0) -> list[Thing]:
    """`count` objects, distinct (colour, shape) pairs, not overlapping, then up to `signs` signs
    of distinct colours, each with a distinct word."""
    scale = size / 448
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    things: list[Thing] = []
    for colour, shape in pairs:
        size_name = rng.choice(list(SIZES))
        r = rng.uniform(*SIZES[size_name]) * scale
        spot = _place(rng, things, size, r, margin)
        if spot is not None:
            things.append(Thing(shape, colour, size_name, spot[0], spot[1], r, scene_size=size))
    for colour, word in zip(rng.sample(list(COLOURS), signs), rng.sample(WORDS, signs)):
        r = SIGN_HALF_SIZE[0] * scale
        spot = _place(rng, things, size, r, margin)
        if spot is not None:
            things.append(Thing(SIGN, colour, "large", spot[0], spot[1], r, word=word, scene_size=size))
    return things


# --- questions -----------------------------------------------------------------------------


def _unique(things: list[Thing], **attrs) -> list[Thing]:
    """Objects that are the only one with their values of `attrs` (e.g. shape and size)."""
    keys = [tuple(getattr(t, a) for a in attrs) for t in things]
    return [t for t, k in zip(things, keys) if keys.count(k) == 1]


def _ask(rng: random.Random, qtype: str, things: list[Thing]) -> tuple[str, str] | None:
    objects = [t for t in things if t.shape != SIGN]
    if qtype == "colour":
        by_shape = _unique(objects, shape=1)
        if by_shape:
            t = rng.choice(by_shape)
            return f"What colour is the {t.shape}?", t.colour
        by_size = _unique(objects, shape=1, size=1)
        t = rng.choice(by_size) if by_size else None
        return (f"What colour is the {t.size} {t.shape}?", t.colour) if t else None
    if qtype == "shape":
        # "the red object": unique among signs too
        choices = [t for t in _unique(things, colour=1) if t.shape != SIGN]
        t = rng.choice(choices) if choices else None
        return (f"What shape is the {t.colour} object?", t.shape) if t else None
    if qtype == "exists":
        present = {(t.colour, t.shape) for t in objects}
        if rng.random() < 0.5 and present:
            colour, shape = rng.choice(sorted(present))
            return f"Is there a {colour} {shape}?", "yes"
        colour, shape = rng.choice(sorted({(c, s) for c in COLOURS for s in SHAPES} - present))
        return f"Is there a {colour} {shape}?", "no"
    if qtype == "position":
        clear = [t for t in objects if min(abs(t.x - t.scene_size / 2), abs(t.y - t.scene_size / 2))
                 > QUADRANT_MARGIN * t.r]  # no borderline cases
        t = rng.choice(clear) if clear else None
        return (f"Where is the {t.name}?", t.quadrant) if t else None
    if qtype == "count":
        shape = rng.choice(SHAPES)
        n = sum(t.shape == shape for t in objects)
        return f"How many {shape}s are there?", NUMBERS[n]
    if qtype == "read":
        signs = [t for t in things if t.shape == SIGN]
        t = rng.choice(signs) if signs else None
        return (f"What word is on the {t.name}?", t.word) if t else None
    raise ValueError(f"unknown question type {qtype!r}")


def make_image_sample(rng: random.Random, qtype: str) -> Sample:
    size = rng.randrange(448, 673, 28)
    while True:
        signs = rng.choice([1, 2]) if qtype == "read" else rng.choice([0, 0, 1])
        things = _scene(rng, size, rng.randint(3, 6), signs=signs)
        asked = _ask(rng, qtype, things)
        if asked:
            return Sample("image", asked[0], asked[1], qtype, [render(things, _background(rng, size))], things)


def scene_questions(rng: random.Random, objects: tuple[int, int] = (1, 6),
                    signs: tuple[int, ...] = (0, 1, 1, 2)) -> list[Sample]:
    """Training: one drawn image scene and every question that can be asked of it (position,
    exists, count and read twice), in random order: one render serves several answers. Scenes
    with fewer objects than the tests' 3-6 are easy cases that teach what to look for; the
    number of signs is drawn from `signs`."""
    size = rng.randrange(448, 673, 28)
    things = _scene(rng, size, rng.randint(*objects), signs=rng.choice(signs))
    frames = [render(things, _background(rng, size))]
    qtypes = list(IMAGE_TYPES + ("position", "exists", "count", "read"))
    rng.shuffle(qtypes)
    asked = [(qtype, _ask(rng, qtype, things)) for qtype in qtypes]
    return [Sample("image", qa[0], qa[1], qtype, frames, things) for qtype, qa in asked if qa]


def make_video_sample(rng: random.Random, qtype: str) -> Sample:
    size, frames = VIDEO_SIZE, VIDEO_FRAMES
    travel = size * 0.25  # over the clip: clearly visible motion
    things: list[Thing] = []
    while len(things) < 2:  # the margin leaves little room: draw again until two objects fit
        things = _scene(rng, size, rng.randint(2, 4), margin=travel)
    if qtype == "motion":
        mover = rng.choice(things)
        direction = rng.choice(DIRECTIONS)
        step = travel / (frames - 1)
        mover.velocity = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
        question, answer = f"Which way does the {mover.name} move?", direction
    else:
        first, second = rng.sample(things, 2)
        early = rng.randint(0, frames // 2 - 1)
        first.appears_at, second.appears_at = early, rng.randint(early + 2, frames - 2)
        for other in things:
            if other is not first and other is not second:
                other.appears_at = rng.randint(0, frames - 1)
        shown = [first, second] if rng.random() < 0.5 else [second, first]
        question = f"Which appears first, the {shown[0].name} or the {shown[1].name}?"
        answer = first.name
    background = _background(rng, size)
    return Sample("video", question, answer, qtype, [render(things, background, f) for f in range(frames)], things)


def generate(seed: int, n: int, qtypes: tuple[str, ...] = IMAGE_TYPES + VIDEO_TYPES) -> list[Sample]:
    """`n` samples cycling through `qtypes`; sample i depends on (seed, i) only."""
    return [sample_at(seed, i, qtypes) for i in range(n)]


def sample_at(seed: int, index: int, qtypes: tuple[str, ...] = IMAGE_TYPES + VIDEO_TYPES) -> Sample:
    rng = random.Random(seed * 1_000_003 + index)
    qtype = qtypes[index % len(qtypes)]
    return make_video_sample(rng, qtype) if qtype in VIDEO_TYPES else make_image_sample(rng, qtype)


def score(answered: list[tuple[Sample, str]]) -> dict:
    """Exact match of normalized answers, overall and per question type: {accuracy, n, by_type}."""
    from pipeline.cost.metrics import normalize_answer

    by_type: dict[str, list[bool]] = {}
    for sample, text in answered:
        by_type.setdefault(sample.qtype, []).append(normalize_answer(text) == normalize_answer(sample.answer))
    flat = [ok for oks in by_type.values() for ok in oks]
    return {"accuracy": sum(flat) / len(flat), "n": len(flat),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())}}


def corpus() -> list[str]:
    """Every word a question or answer can use: the probe's tokenizer is trained on it."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    lines = [f"What colour is the {z} {s}? What shape is the {c} object? Is there a {c} {s}? How many {s}s are there?"
             for c in COLOURS for s in SHAPES for z in SIZES]
    lines += [f"Where is the {a}? top left, top right, bottom left, bottom right. yes no" for a in names]
    lines += [f"What word is on the {c} {SIGN}? {' '.join(WORDS)}" for c in COLOURS]
    lines += [f"Which way does the {a} move? {' '.join(DIRECTIONS)} Which appears first, the {a} or the {b}?"
              for a in names[:8] for b in names[8:16]]
    lines += [" ".join(NUMBERS), PROMPT_SUFFIX.strip()]
    return lines


def write_parquet(path: Path, seed: int, n: int, kind: str) -> None:
    """n scenes of one kind as a job input: image as PNG bytes, video as an MP4 (needs PyAV)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    qtypes = IMAGE_TYPES if kind == "image" else VIDEO_TYPES
    rows = {"id": [], kind: [], "prompt": [], "answer": [], "type": []}
    for i, sample in enumerate(generate(seed, n, qtypes)):
        rows["id"].append(f"scene-{seed}-{i:05d}")
        rows[kind].append(_png(sample.frames[0]) if kind == "image" else _mp4(sample.frames))
        rows["prompt"].append(sample.question + PROMPT_SUFFIX)
        rows["answer"].append(sample.answer)
        rows["type"].append(sample.qtype)
    pq.write_table(pa.table(rows), path)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mp4(frames: list[Image.Image], fps: int = 4) -> bytes:
    import av  # optional: only for writing video datasets

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.options = {"crf": "12"}  # near-lossless: the probe trained on the rendered frames
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", type=Path, help="folder for PNGs and questions.json")
    parser.add_argument("--parquet", type=Path, help="write a job input Parquet instead")
    parser.add_argument("--kind", choices=["image", "video"], default="image", help="for --parquet")
    args = parser.parse_args()
    if args.parquet:
        write_parquet(args.parquet, args.seed, args.n, args.kind)
        print(f"wrote {args.n} {args.kind} scenes to {args.parquet}")
        return
    if not args.out:
        parser.error("give --out or --parquet")
    args.out.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, sample in enumerate(generate(args.seed, args.n)):
        sample.frames[0].save(args.out / f"{i:04d}.png")
        listing.append({"index": i, "kind": sample.kind, "type": sample.qtype, "question": sample.question,
                        "answer": sample.answer, "frames": len(sample.frames)})
    (args.out / "questions.json").write_text(json.dumps(listing, indent=2))
    print(json.dumps(listing, indent=2))


if __name__ == "__main__":
    main()
