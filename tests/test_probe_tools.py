"""The probe's training examples and the accuracy benchmark, end to end on a tiny CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

from benchmarks import probe_data
from benchmarks import scenes
from benchmarks import train_probe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A few CPU training steps of the small probe: a real checkpoint, not a good one."""
    out = tmp_path_factory.mktemp("probe") / "scene-probe"
    subprocess.run([sys.executable, "-m", "benchmarks.train_probe", "--out", str(out), "--minutes",
                    "0.05", "--small", "--workers", "0", "--batch-size", "2", "--eval-n", "8",
                    "--archive", str(out.parent / "parts")], check=True, capture_output=True, cwd=REPO)
    return out


@pytest.mark.slow
def test_only_answer_tokens_are_learned(checkpoint):
    from sparsevlm.preprocess import QwenVLProcessor

    processor = QwenVLProcessor.from_pretrained(checkpoint)
    for index in (0, 6):  # an image and a video question
        sample = scenes.sample_at(3, index)
        example = probe_data.encode(processor, sample)
        prompt = probe_data.encode(processor, sample, with_answer=False)
        n_prompt = prompt["input_ids"].shape[1]
        assert torch.equal(example["input_ids"][:, :n_prompt], prompt["input_ids"])  # inference sees this prompt
        learned = example["labels"][example["labels"] != -100]
        assert processor.tokenizer.decode(learned) == sample.answer + "<|im_end|>"
        assert (example["labels"][:, :n_prompt] == -100).all()


@pytest.mark.slow
def test_training_examples_equal_what_inference_sees(checkpoint):
    """The fast training path (uint8 frames, patchified on the device) against the processor."""
    from sparsevlm.preprocess import QwenVLProcessor, normalization_table

    processor = QwenVLProcessor.from_pretrained(checkpoint)
    tables = {kind: torch.from_numpy(normalization_table(cfg))
              for kind, cfg in (("image", processor.image_cfg), ("video", processor.video_cfg))}
    samples = [scenes.sample_at(4, i) for i in (0, 1, 6, 7)]  # two images (448-672 px), two videos
    reference = [probe_data.encode(processor, s) for s in samples]
    examples = [probe_data.encode_scene(processor, [s]) for s in samples]
    for ref, example in zip(reference, examples):
        assert torch.equal(example["input_ids"], ref["input_ids"][0])
        assert torch.equal(example["labels"], ref["labels"][0])
        assert torch.equal(example["mm_token_type_ids"], ref["mm_token_type_ids"][0])
    batch = probe_data.collate(examples, pad_id=0)
    inputs = probe_data.gpu_pixels(batch, processor, tables, torch.device("cpu"))
    assert torch.equal(inputs["pixel_values"], torch.cat([r["pixel_values"] for r in reference[:2]]))
    assert torch.equal(inputs["image_grid_thw"], torch.cat([r["image_grid_thw"] for r in reference[:2]]))
    assert torch.equal(inputs["pixel_values_videos"], torch.cat([r["pixel_values_videos"] for r in reference[2:]]))

    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    positions, _ = model.model.get_rope_index(  # the samples in the batch's order: images, then videos
        batch["input_ids"], image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"],
        attention_mask=(batch["branch"] >= 0).long(), mm_token_type_ids=batch["mm_token_type_ids"])
    assert torch.equal(batch["position_ids"], positions)



@pytest.mark.slow
def test_a_scene_trains_exactly_as_its_single_questions(checkpoint):
    """One sequence, several questions: each branch sees what a lone example would (tokens,
    positions, attention), so its logits equal the lone example's (fp32, CPU)."""
    import random

    from transformers import AutoModelForImageTextToText

    from sparsevlm.preprocess import QwenVLProcessor

    processor = QwenVLProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    questions = scenes.scene_questions(random.Random(7))
    assert len(questions) >= 6 and len({id(q.frames) for q in questions}) == 1  # one render
    scene = probe_data.encode_scene(processor, questions)
    batch = probe_data.collate([scene], pad_id=0)
    inputs = probe_data.gpu_pixels(batch, processor, {"image": _table(processor.image_cfg)}, torch.device("cpu"))
    with torch.no_grad():
        tree_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0]
    branch, prefix = scene["branch"], int((scene["branch"] == 0).sum())
    assert torch.equal(branch[:prefix], torch.zeros(prefix, dtype=branch.dtype))
    for number, question in enumerate(questions, start=1):
        lone = probe_data.encode(processor, question)
        mine = torch.cat([torch.arange(prefix), (branch == number).nonzero()[:, 0]])
        assert torch.equal(scene["input_ids"][mine], lone["input_ids"][0])
        assert torch.equal(scene["labels"][mine], lone["labels"][0])
        positions, _ = model.model.get_rope_index(lone["input_ids"], image_grid_thw=lone["image_grid_thw"],
                                                  mm_token_type_ids=lone["mm_token_type_ids"])
        assert torch.equal(scene["position_ids"][:, mine], positions[:, 0])
        with torch.no_grad():
            lone_logits = model(**{k: v for k, v in lone.items() if k != "labels"}).logits[0]
        torch.testing.assert_close(tree_logits[mine], lone_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_dropped_visual_tokens_train_as_pruned_inputs(checkpoint):
    """Training with dropped visual tokens (--drop-share): the sequence loses exactly the dropped
    tokens, the rest keep their positions and grid targets, and the model's logits equal a plain
    forward on the kept features placed by hand (fp32, CPU)."""
    import random

    from transformers import AutoModelForImageTextToText

    from sparsevlm.preprocess import QwenVLProcessor

    processor = QwenVLProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    samples = [scenes.sample_at(4, 0), scenes.sample_at(4, 6)]  # an image, a video
    full = [probe_data.encode_scene(processor, [s]) for s in samples]
    dropped = [probe_data.encode_scene(processor, [s], keep_ratio=0.3, rng=random.Random(i))
               for i, s in enumerate(samples)]
    for whole, part in zip(full, dropped):
        visual = whole["mm_token_type_ids"] != 0
        assert int(part["keep"].sum()) == round(0.3 * int(visual.sum())) and not part["keep"].all()
        in_sequence = torch.ones_like(visual)
        in_sequence[visual] = part["keep"]
        for key in ("input_ids", "labels", "branch", "mm_token_type_ids"):
            assert torch.equal(part[key], whole[key][in_sequence]), key
        assert torch.equal(part["position_ids"], whole["position_ids"][:, in_sequence])
        whole_grid = probe_data.grid_targets(whole["position_ids"][:, None], whole["mm_token_type_ids"][None])
        part_grid = probe_data.grid_targets(part["position_ids"][:, None], part["mm_token_type_ids"][None])
        assert torch.equal(part_grid, whole_grid[:, :, in_sequence])
        assert sorted(set(whole_grid[0, 0, visual].tolist())) == list(range(16))  # 448x448: 16 rows

    batch = probe_data.collate(dropped, pad_id=0)
    tables = {"image": _table(processor.image_cfg), "video": _table(processor.video_cfg)}
    inputs = probe_data.gpu_pixels(batch, processor, tables, torch.device("cpu"))
    inputs.pop("labels")
    with torch.no_grad():
        features = [model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0],
                    model.model.get_video_features(inputs["pixel_values_videos"],
                                                   inputs["video_grid_thw"]).pooler_output[0]]
        kept = {"image": batch["image_keep"], "video": batch["video_keep"]}
        for kind in kept:
            train_probe._drop_visual_tokens(model.model, kind, kept)
        logits = model(**inputs).logits
        for kind in kept:
            model.model.__dict__.pop(f"get_{kind}_features")
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        for row, (feature, keep) in enumerate(zip(features, (batch["image_keep"][0], batch["video_keep"][0]))):
            embeds[row, inputs["mm_token_type_ids"][row] != 0] = feature[keep]
        reference = model(inputs_embeds=embeds, position_ids=inputs["position_ids"],
                          attention_mask=inputs["attention_mask"], mm_token_type_ids=inputs["mm_token_type_ids"]).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_init_from_starts_from_the_checkpoint_and_refuses_another_architecture(checkpoint, tmp_path):
    """--init-from: at learning rate 0 the written weights are the checkpoint's own (a fresh
    model would be random); a checkpoint of another configuration stops the run."""
    from safetensors.torch import load_file

    command = [sys.executable, "-m", "benchmarks.train_probe", "--init-from", str(checkpoint),
               "--minutes", "0.02", "--workers", "0", "--batch-size", "2", "--eval-n", "8", "--lr", "0"]
    subprocess.run([*command, "--out", str(tmp_path / "again"), "--small", "--drop-share", "1.0"],
                   check=True, capture_output=True, cwd=REPO)
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    refused = subprocess.run([*command, "--out", str(tmp_path / "other")], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "is not a checkpoint of this script's model configuration" in refused.stderr


def _table(cfg):
    from sparsevlm.preprocess import normalization_table

    return torch.from_numpy(normalization_table(cfg))


@pytest.mark.slow
def test_chunked_vision_attention_matches_transformers(checkpoint):
    from transformers import AttentionInterface, AutoModelForImageTextToText

    from sparsevlm.preprocess import QwenVLProcessor

    AttentionInterface.register(train_probe.VISION_ATTENTION, train_probe.chunked_vision_attention)
    processor = QwenVLProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoded = [probe_data.encode(processor, scenes.sample_at(5, i)) for i in (0, 2, 6)]  # 2 images, a video
    pixels = torch.cat([e.get("pixel_values", e.get("pixel_values_videos")) for e in encoded])
    grids = torch.cat([e.get("image_grid_thw", e.get("video_grid_thw")) for e in encoded])
    visual = model.model.visual
    with torch.no_grad():
        reference = visual(pixels, grid_thw=grids).pooler_output
        visual.config._attn_implementation = train_probe.VISION_ATTENTION
        chunked = visual(pixels, grid_thw=grids).pooler_output
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)  # fp32, same math in another order


@pytest.mark.slow
def test_training_writes_a_checkpoint_the_accuracy_benchmark_reads(checkpoint, tmp_path):
    training = json.loads((checkpoint / "training.json").read_text())
    assert training["steps"] >= 1 and training["held_out"]["n"] == 8
    out = tmp_path / "accuracy.json"
    subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--model", str(checkpoint), "--seed",
                    "5", "--n", "8", "--method", "sparsevlm", "--preset", "64", "--json", str(out)],
                   check=True, capture_output=True, cwd=REPO)
    result = json.loads(out.read_text())
    assert result["n"] == 8 and 0.0 <= result["accuracy"] <= 1.0 and result["method"] == "sparsevlm-64"
    assert set(result["by_type"]) == set(scenes.IMAGE_TYPES + scenes.VIDEO_TYPES)
    assert result["equiv_visual_tokens_mean"] < result["visual_tokens_mean"]


@pytest.mark.slow
def test_archive_parts_rebuild_the_checkpoint(checkpoint, tmp_path):
    import tarfile

    parts = sorted((checkpoint.parent / "parts").glob("scene-probe.tar.gz.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    joined = tmp_path / "probe.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path, filter="data")
    for original in checkpoint.iterdir():
        assert (tmp_path / "scene-probe" / original.name).read_bytes() == original.read_bytes()

    small = train_probe.archive(checkpoint, tmp_path / "small-parts", part_bytes=100_000)
    assert len(small) > 1 and b"".join(p.read_bytes() for p in small)[:2] == b"\x1f\x8b"  # gzip, split


def test_region_targets_name_what_is_drawn_under_each_token():
    import numpy as np

    sample = scenes.sample_at(9, 5)  # a read question: one labelled object
    targets = probe_data.region_targets(sample, 1, 16, 16)
    image, size = np.asarray(sample.frames[0]), sample.frames[0].width
    centres = ((np.arange(16) + 0.5) * size / 16).astype(int)
    colours = {probe_data.COLOUR_IDS[name]: rgb for name, rgb in scenes.COLOURS.items()}
    ink = {(0, 0, 0), (255, 255, 255)}
    labelled = 0
    for token, (colour, shape, word) in enumerate(targets.T.tolist()):
        pixel = tuple(int(c) for c in image[centres[token // 16], centres[token % 16]])
        if colour:
            labelled += 1
            assert shape and (pixel == colours[colour] or word), (token, pixel)  # words draw over their object
        else:
            assert shape == word == 0 and pixel not in colours.values() and pixel not in ink
    assert labelled >= 4 and (targets[2] > 0).any()
    video = scenes.sample_at(9, 6)  # motion: the mover's tokens shift between frame groups
    groups = probe_data.region_targets(video, 4, 16, 16)[0].view(4, 256)
    assert groups.shape == (4, 256) and not torch.equal(groups[0], groups[3])


def test_coverage_finds_the_objects_a_question_names():
    from benchmarks import coverage

    for index in range(32):
        sample = scenes.sample_at(13, index)
        asked = [sample.things[i - 1] for i in coverage.asked_objects(sample)]
        if sample.qtype == "exists" and sample.answer == "no" or sample.qtype == "count" and sample.answer == "zero":
            assert not asked
        elif sample.qtype == "count":
            assert len(asked) == scenes.NUMBERS.index(sample.answer)
        elif sample.qtype == "order":
            named = sample.question[:-1].split("first, the ")[1].split(" or the ")
            assert sorted(t.name for t in asked) == sorted(named)
        else:
            assert len(asked) == 1, (sample.question, [t.name for t in sample.things])
            thing = asked[0]
            expected = {"colour": thing.colour, "shape": thing.shape, "read": thing.word, "exists": "yes",
                        "position": thing.quadrant}
            if sample.qtype in expected:
                assert sample.answer == expected[sample.qtype]
            if sample.qtype == "motion":
                assert thing.velocity != (0.0, 0.0)
