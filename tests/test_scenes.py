"""The scene-VQA generator: deterministic, and every answer re-derived here from what was drawn
(positions, words, motion) and, for colours, from the pixels themselves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

from benchmarks import scenes


def named(things, colour, shape):
    found = [t for t in things if t.colour == colour and t.shape == shape]
    assert len(found) == 1, "a question must name exactly one object"
    return found[0]


def derive(sample: scenes.Sample) -> str:
    """The answer, from the drawn objects, written apart from scenes._ask."""
    q, things = sample.question, sample.things
    if m := re.fullmatch(r"What colour is the (?:(small|large) )?(\w+)\?", q):
        found = [t for t in things if t.shape == m[2] and (m[1] is None or t.size == m[1])]
        assert len(found) == 1
        return found[0].colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        (found,) = [t for t in things if t.colour == m[1]]
        return found.shape
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        return "yes" if any(t.colour == m[1] and t.shape == m[2] for t in things) else "no"
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        thing, half = named(things, m[1], m[2]), sample.frames[0].width / 2
        assert min(abs(thing.x - half), abs(thing.y - half)) > thing.r / 2, "no borderline quadrants"
        return ("top" if thing.y < half else "bottom") + " " + ("left" if thing.x < half else "right")
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return scenes.NUMBERS[sum(t.shape == m[1] for t in things)]
    if m := re.fullmatch(r"What word is on the (\w+) sign\?", q):
        return named(things, m[1], "sign").word
    if m := re.fullmatch(r"Which way does the (\w+) (\w+) move\?", q):
        vx, vy = named(things, m[1], m[2]).velocity
        return ("right" if vx > 0 else "left") if abs(vx) > abs(vy) else ("down" if vy > 0 else "up")
    if m := re.fullmatch(r"Which appears first, the (\w+) (\w+) or the (\w+) (\w+)\?", q):
        a, b = named(things, m[1], m[2]), named(things, m[3], m[4])
        assert a.appears_at != b.appears_at
        return a.name if a.appears_at < b.appears_at else b.name
    raise AssertionError(f"unexpected question {q!r}")


@pytest.fixture(scope="module")
def samples():
    return scenes.generate(seed=11, n=80)


def test_answers_follow_from_the_scene(samples):
    assert {s.qtype for s in samples} == set(scenes.IMAGE_TYPES + scenes.VIDEO_TYPES)
    for sample in samples:
        assert derive(sample) == sample.answer, sample.question
        assert 1 <= len(sample.answer.split()) <= 2


def test_colours_are_in_the_pixels(samples):
    for sample in (s for s in samples if s.qtype == "colour"):
        found = [t for t in sample.things if t.colour == sample.answer]
        pixels = np.asarray(sample.frames[0])
        assert any(tuple(pixels[int(t.y + 0.5 * t.r), int(t.x)]) == scenes.COLOURS[t.colour] for t in found)


def test_signs_show_a_coloured_rim_and_a_dark_word_on_white(samples):
    signs = [t for s in samples for t in s.things if t.shape == scenes.SIGN]
    assert signs, "read questions draw signs"
    for sample in (s for s in samples if s.qtype == "read"):
        pixels = np.asarray(sample.frames[0]).astype(int)
        for sign in (t for t in sample.things if t.shape == scenes.SIGN):
            x, y = int(sign.x), int(sign.y)
            half_width, half_height = sign.r, sign.r * scenes.SIGN_HALF_SIZE[1] / scenes.SIGN_HALF_SIZE[0]
            assert tuple(pixels[int(y - 0.9 * half_height), x]) == scenes.COLOURS[sign.colour]
            inner = pixels[int(y - 0.6 * half_height):int(y + 0.6 * half_height),
                           int(x - 0.7 * half_width):int(x + 0.7 * half_width)].sum(-1)
            assert (inner == 3 * 255).mean() > 0.4 and (inner < 100).mean() > 0.05, "white plate, black text"


def test_sizes_and_frames(samples):
    for sample in samples:
        width, height = sample.frames[0].size
        assert width == height and 448 <= width <= 672
        assert len(sample.frames) == (scenes.VIDEO_FRAMES if sample.kind == "video" else 1)
    motion = next(s for s in samples if s.qtype == "motion")
    assert np.any(np.asarray(motion.frames[0]) != np.asarray(motion.frames[-1]))


def test_same_seed_same_scenes_other_seed_other_scenes():
    again = [scenes.sample_at(11, i) for i in (0, 5, 7)]
    first = scenes.generate(seed=11, n=8)
    for sample, index in zip(again, (0, 5, 7)):
        assert sample.question == first[index].question and sample.answer == first[index].answer
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(sample.frames, first[index].frames))
    other = scenes.generate(seed=12, n=8)
    assert [s.question for s in other] != [s.question for s in first]


def test_command_line_writes_pictures_and_questions(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.scenes", "--seed", "2", "--n", "3",
                    "--out", str(tmp_path)], check=True, capture_output=True, cwd=REPO)
    listing = json.loads((tmp_path / "questions.json").read_text())
    assert len(listing) == 3 and all((tmp_path / f"{i:04d}.png").exists() for i in range(3))


def test_parquet_is_a_job_input_with_references(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.media import decode_image

    scenes.write_parquet(tmp_path / "scenes.parquet", seed=4, n=6, kind="image")
    table = pq.read_table(tmp_path / "scenes.parquet")
    assert table.column_names == ["id", "image", "prompt", "answer", "type"]
    expected = scenes.generate(4, 6, scenes.IMAGE_TYPES)
    assert table.column("answer").to_pylist() == [s.answer for s in expected]
    image = decode_image(table.column("image")[0].as_py(), 10**8)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected[0].frames[0]))
