"""The scene probe's training examples: scenes encoded as the engine's processor encodes them,
several questions per scene in one sequence, batched, and turned into model inputs on the device.

benchmarks/train_probe.py trains on these; tests/test_probe_tools.py checks each fast path
here against the plain one (the processor, transformers' own position and attention code).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from benchmarks import scenes

from sparsevlm.preprocess import (
    TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO, QwenVLProcessor, _to_rgb_uint8, normalize_frames, patchify, resize_frame,
    smart_resize)

TRAIN_SEED_BASE = 1_000_000  # training scenes use seeds from here on; tests and benchmarks use small seeds
VIDEO_SHARE = 0.3  # of training examples; an image example carries ~10 questions, a video one
COLOUR_IDS = {name: i + 1 for i, name in enumerate(scenes.COLOURS)}
SHAPE_IDS = {name: i + 1 for i, name in enumerate(scenes.SHAPES + (scenes.SIGN,))}
WORD_IDS = {name: i + 1 for i, name in enumerate(scenes.WORDS)}


def encode(processor: QwenVLProcessor, sample: scenes.Sample, with_answer: bool = True) -> dict:
    """One training (or inference, without the answer) example, exactly as the jobs build prompts."""
    content = [{"type": sample.kind}, {"type": "text", "text": sample.question + scenes.PROMPT_SUFFIX}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}])
    media = {"images": [sample.media]} if sample.kind == "image" else {"videos": [sample.media]}
    encoded = processor(text=[prompt], **media)
    if not with_answer:
        return encoded
    answer = torch.tensor([processor.tokenizer.encode(sample.answer + "<|im_end|>", add_special_tokens=False)])
    n_prompt = encoded["input_ids"].shape[1]
    encoded["input_ids"] = torch.cat([encoded["input_ids"], answer], dim=1)
    encoded["attention_mask"] = torch.ones_like(encoded["input_ids"])
    text_type = torch.zeros_like(answer, dtype=torch.int32)
    encoded["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"], text_type], dim=1)
    encoded["labels"] = encoded["input_ids"].clone()
    encoded["labels"][:, :n_prompt] = -100
    return encoded


def encode_scene(processor: QwenVLProcessor, samples: list[scenes.Sample], keep_ratio: float = 1.0,
                 rng: random.Random | None = None) -> dict:
    """Questions on one scene as ONE sequence that trains exactly as that many single-question
    examples: the shared prefix (system prompt, user turn up to the media's end) once, then per
    question a branch (the rest of the prompt, the answer, <|im_end|>) that sees the prefix and
    itself only (`branch`: 0 prefix, j for question j; `tree_attention_mask` builds the mask)
    and is positioned right after the prefix, as inference positions it. Only answers and their
    <|im_end|> are learned. Pixels stay uint8 frames resized as the processor resizes them;
    `gpu_pixels` normalises and patchifies them on the device, bit for bit as the processor.

    `keep_ratio` < 1 drops a random share of the visual tokens from the sequence (the rest keep
    their positions, as pruning keeps them); "keep" says which of the vision tower's outputs stay."""
    first, tokenizer = samples[0], processor.tokenizer
    cfg = processor.image_cfg if first.kind == "image" else processor.video_cfg
    frames = [_to_rgb_uint8(f) for f in first.frames]
    size = smart_resize(frames[0].height, frames[0].width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.stack([resize_frame(f, size) for f in frames])
    grid = (-(-len(frames) // cfg.temporal_patch_size), size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    pad_id = processor.video_token_id if first.kind == "video" else processor.image_token_id
    n_visual = grid[0] * grid[1] * grid[2] // cfg.merge_size ** 2

    prefix_text, prefix, branches = None, [], []
    for sample in samples:
        content = [{"type": first.kind}, {"type": "text", "text": sample.question + scenes.PROMPT_SUFFIX}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        cut = prompt.index("<|vision_end|>") + len("<|vision_end|>")
        if prefix_text is None:
            prefix_text = prompt[:cut]
            prefix = tokenizer.encode(prefix_text, add_special_tokens=False)
            at = prefix.index(pad_id)  # the template's one pad token becomes one per visual token
            prefix[at:at + 1] = [pad_id] * n_visual
        elif prompt[:cut] != prefix_text:
            raise AssertionError("questions on one scene must share the prompt up to the media")
        branches.append((tokenizer.encode(prompt[cut:], add_special_tokens=False),
                         tokenizer.encode(sample.answer + "<|im_end|>", add_special_tokens=False)))
    ids, labels, branch, lengths = pack_branches(prefix, branches)
    # every branch continues the prefix's positions from where its text stops (it ends on <|vision_end|>)
    positions = [mrope_positions(_token_types(torch.tensor(prefix), pad_id, first.kind), [grid], cfg.merge_size)]
    start = int(positions[0][0, -1]) + 1
    positions += [torch.arange(start, start + n).expand(3, -1) for n in lengths]
    input_ids = torch.tensor(ids)
    regions = region_targets(first, grid[0], grid[1] // cfg.merge_size, grid[2] // cfg.merge_size)
    keep = torch.ones(n_visual, dtype=torch.bool)
    if keep_ratio < 1.0:
        kept = (rng or random).sample(range(n_visual), max(1, round(keep_ratio * n_visual)))
        keep = torch.zeros(n_visual, dtype=torch.bool)
        keep[kept] = True
    in_sequence = torch.ones(len(input_ids), dtype=torch.bool)
    in_sequence[torch.nonzero(input_ids == pad_id)[:, 0]] = keep
    token_types = _token_types(input_ids, pad_id, first.kind)
    return {"kind": first.kind, "frames": torch.from_numpy(resized), "grid": torch.tensor(grid), "regions": regions,
            "keep": keep, "input_ids": input_ids[in_sequence], "labels": torch.tensor(labels)[in_sequence],
            "branch": torch.tensor(branch)[in_sequence], "mm_token_type_ids": token_types[in_sequence],
            "position_ids": torch.cat(positions, 1)[:, in_sequence]}


def pack_branches(prefix: list[int], branches: list[tuple[list[int], list[int]]]
                  ) -> tuple[list[int], list[int], list[int], list[int]]:
    """The shared prefix once, then each (question, answer) branch: -> input ids, labels (the
    answers only), branch numbers (0 the prefix, j question j) and each branch's length. Where
    a branch sits (its positions) is the caller's: M-RoPE or 1-D."""
    ids, labels, branch, lengths = list(prefix), [-100] * len(prefix), [0] * len(prefix), []
    for number, (question, answer) in enumerate(branches, start=1):
        ids += question + answer
        labels += [-100] * len(question) + answer
        branch += [number] * (len(question) + len(answer))
        lengths.append(len(question) + len(answer))
    return ids, labels, branch, lengths


def _token_types(input_ids: torch.Tensor, pad_id: int, kind: str) -> torch.Tensor:
    token_types = torch.zeros_like(input_ids, dtype=torch.int32)
    token_types[input_ids == pad_id] = TOKEN_TYPE_VIDEO if kind == "video" else TOKEN_TYPE_IMAGE
    return token_types


def tree_attention_mask(branch: torch.Tensor) -> torch.Tensor:
    """(B, L) branch ids (0 prefix, j question j, -1 padding) -> (B, 1, L, L) boolean mask: causal,
    and a branch sees the prefix and itself. Padding rows see the prefix (no empty rows)."""
    length = branch.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch.device).tril()
    query, key = branch[:, :, None], branch[:, None, :]
    return (causal & ((key == 0) | ((key == query) & (key > 0))))[:, None]


def objects_under_tokens(sample: scenes.Sample, groups: int, rows: int, columns: int) -> np.ndarray:
    """(groups*rows*columns,) in token order: 0 where a visual token's centre shows background,
    i + 1 where it shows sample.things[i]. A video's frame group is read at its later frame."""
    size = sample.frames[0].width
    centres_y = ((np.arange(rows) + 0.5) * size / rows).astype(int)
    centres_x = ((np.arange(columns) + 0.5) * size / columns).astype(int)
    per_group = []
    for group in range(groups):
        frame = min(2 * group + 1, len(sample.frames) - 1)
        per_group.append(np.asarray(scenes.object_map(sample.things, size, frame))[centres_y][:, centres_x].reshape(-1))
    return np.concatenate(per_group).astype(np.int64)


def region_targets(sample: scenes.Sample, groups: int, rows: int, columns: int) -> torch.Tensor:
    """(3, groups*rows*columns) class ids of the object under each visual token's centre, in
    token order: colour (0 = background, then COLOURS), shape (0, then SHAPES and SIGN), word
    (0 = none, then WORDS)."""
    lookup = np.zeros((3, len(sample.things) + 1), dtype=np.int64)
    for index, thing in enumerate(sample.things, start=1):
        lookup[:, index] = (COLOUR_IDS[thing.colour], SHAPE_IDS[thing.shape], WORD_IDS.get(thing.word, 0))
    return torch.from_numpy(lookup[:, objects_under_tokens(sample, groups, rows, columns)])



def mrope_positions(token_types: torch.Tensor, grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """Qwen2-VL's 3-D positions (t, h, w) of one unpadded sequence, (3, L): text counts on in all
    three, a visual block spans its merged grid from where the text stopped, and text resumes
    after the block's largest spatial side. Computed here, in the data workers, because
    transformers computes them per sample on the device with host syncs (tested equal to it)."""
    pieces, position, blocks = [], 0, iter(grids)
    for token_type, run in itertools.groupby(token_types.tolist()):
        length = len(list(run))
        if token_type == 0:
            pieces.append(torch.arange(position, position + length).expand(3, -1))
            position += length
            continue
        t, h, w = next(blocks)
        h, w = h // merge, w // merge
        t_index, h_index, w_index = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack([t_index.flatten(), h_index.flatten(), w_index.flatten()]) + position)
        position += max(h, w)
    return torch.cat(pieces, dim=1)


def training_example(rng: random.Random) -> list[scenes.Sample]:
    """A video with its one question, or an image scene with all of its questions."""
    if rng.random() < VIDEO_SHARE:
        return [scenes.make_video_sample(rng, rng.choice(scenes.VIDEO_TYPES))]
    return scenes.scene_questions(rng)


class SceneStream(IterableDataset):
    """Endless fresh examples; each worker draws from its own seed. A `drop_share` of them keep
    only 10-60% of their visual tokens, drawn at random (robustness to pruning)."""

    def __init__(self, checkpoint: Path, seed: int, drop_share: float = 0.0):
        self.checkpoint, self.seed, self.drop_share = checkpoint, seed, drop_share

    def __iter__(self):
        worker = get_worker_info()
        processor = QwenVLProcessor.from_pretrained(self.checkpoint)
        rng = random.Random(self.seed * 1_000_003 + (worker.id if worker else 0))
        while True:
            keep_ratio = rng.uniform(0.1, 0.6) if rng.random() < self.drop_share else 1.0
            yield encode_scene(processor, training_example(rng), keep_ratio, rng)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Text right-padded; frames of each kind concatenated (uint8), with their grids."""
    length = -(-max(len(e["input_ids"]) for e in examples) // 64) * 64  # few distinct shapes

    def padded(key, value):
        return torch.stack([torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=value)
                            for e in examples])

    positions = [torch.nn.functional.pad(e["position_ids"], (0, length - len(e["input_ids"]))) for e in examples]
    batch = {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", -100),
             "position_ids": torch.stack(positions, dim=1), "branch": padded("branch", -1),
             "mm_token_type_ids": padded("mm_token_type_ids", 0)}
    for kind in ("image", "video"):
        having = [e for e in examples if e["kind"] == kind]
        if having:
            batch[f"{kind}_frames"] = torch.cat([e["frames"] for e in having])
            batch[f"{kind}_grid_thw"] = torch.stack([e["grid"] for e in having])
            batch[f"{kind}_regions"] = torch.cat([e["regions"] for e in having], dim=1)
            batch[f"{kind}_keep"] = [e["keep"] for e in having]
    return batch


def gpu_pixels(batch: dict, processor: QwenVLProcessor, tables: dict, device) -> dict:
    """The model's inputs: uint8 frames -> normalised patches on `device`, equal to what the
    processor computes on the CPU (tests/test_probe_tools.py checks this). Frames of all samples
    of a kind are patchified at once: patches are time-major, so this equals concatenating the
    per-sample results (an image is its frame twice, as the processor pads it)."""
    inputs = {k: batch[k].to(device, non_blocking=True)
              for k in ("input_ids", "labels", "mm_token_type_ids", "position_ids")}
    inputs["attention_mask"] = tree_attention_mask(batch["branch"].to(device, non_blocking=True))
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        if f"{kind}_frames" not in batch:
            continue
        cfg = processor.image_cfg if kind == "image" else processor.video_cfg
        grids = batch[f"{kind}_grid_thw"]
        frames = batch[f"{kind}_frames"].to(device, non_blocking=True)
        per_sample = frames.shape[0] // len(grids)
        if per_sample % cfg.temporal_patch_size:  # images (and odd videos) repeat their last frame
            frames = frames.view(len(grids), per_sample, *frames.shape[1:])
            pad = cfg.temporal_patch_size - per_sample % cfg.temporal_patch_size
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1).flatten(0, 1)
        inputs[pixels_key] = patchify(normalize_frames(frames, tables[kind]), cfg)[0]
        inputs[grid_key] = grids.to(device)
    return inputs


def grid_targets(position_ids: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
    """(2, B, L) row and column of each visual token in its merged grid, -100 elsewhere, from the
    M-RoPE positions (3, B, L): a sequence's one visual block starts its rows and columns at the
    same offset, the first frame group's time position (still right when tokens are dropped,
    unless a whole first frame group is).
    RoPE leaves a token's absolute place out of what attention moves (values), so "where is the
    red circle" could only be read off attention weights; this target puts it in."""
    visual = token_types != 0
    spatial = position_ids[1:]
    offset = torch.where(visual, position_ids[0], torch.iinfo(spatial.dtype).max).amin(dim=1, keepdim=True)
    return torch.where(visual, spatial - offset, -100)
