"""Train the scene probe: a small Qwen2-VL-architecture VLM, from scratch, on procedural scene VQA.

    python benchmarks/train_probe.py --out jobs/models/scene-probe --minutes 16.5 --workers 15   # one GPU
        # (the committed probe: an H200, 5,134 steps; 16 CPU cores keep it GPU-bound)
    python benchmarks/train_probe.py --out /tmp/probe --minutes 1 --small          # CPU smoke run
    python benchmarks/train_probe.py --out /tmp/probe --archive $OUT               # + the checkpoint as
        # probe.tar.gz.partNN files of at most 15 MiB; back on this side: cat probe.tar.gz.part* | tar xz

Fresh scenes every step (benchmarks/scenes.py, drawn in DataLoader workers, seeds disjoint
from the test seeds' range), each with all its questions as branches of one sequence
(`encode_scene`: trains exactly as lone questions, tested), preprocessed as the engine's
processor does, loss on the answer tokens plus an auxiliary per-region target. Writes a hub-style checkpoint (safetensors,
tokenizer with chat template, preprocessor configs) that `VLMEngine.from_pretrained` and
the jobs load, and `training.json` (command, steps, loss curve, held-out accuracy).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenes  # noqa: E402

from sparsevlm.preprocess import (  # noqa: E402
    TOKEN_TYPE_IMAGE, TOKEN_TYPE_VIDEO, QwenVLProcessor, _to_rgb_uint8, normalization_table, normalize_frames, patchify,
    resize_frame, smart_resize)
from sparsevlm.tiny import build_tokenizer, vision_token_ids, write_preprocessor_configs  # noqa: E402

PIXELS = 448 * 448  # every scene is resized to 448x448: 256 visual tokens per image / frame pair
TRAIN_SEED_BASE = 1_000_000  # training scenes use seeds from here on; tests and benchmarks use small seeds
PROMPT_SUFFIX = " Answer with one or two words."
# With head_dim 32 and the usual theta of 10000, M-RoPE's width section turns by ~0.003 rad per
# column at most: the decoder could not tell left from right. At 100 it turns 0.013-0.056.
ROPE_THETA = 100.0
VIDEO_SHARE = 0.3  # of training examples; an image example carries ~9 questions, a video one
VISION_ATTENTION = "probe_chunked_flash"
# Auxiliary training target: what lies under each visual token. Selecting "the triangle" among
# 256 tokens by attention learns slowly while the tokens do not yet say what they show; this
# dense signal teaches them that early. The head is dropped after training (not in the checkpoint).
REGION_LOSS_WEIGHT = 0.5
COLOUR_IDS = {name: i + 1 for i, name in enumerate(scenes.COLOURS)}
SHAPE_IDS = {name: i + 1 for i, name in enumerate(scenes.SHAPES)}
WORD_IDS = {name: i + 1 for i, name in enumerate(scenes.WORDS)}  # "flash" in the name: transformers then passes cu_seqlens


def model_config(tokenizer, small: bool):
    from transformers import Qwen2VLConfig

    ids = vision_token_ids(tokenizer)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden, layers, heads = (64, 2, 4) if small else (192, 8, 6)
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # t, h, w: sums to head_dim / 2
    # one key/value head per query head: matching a question's words to regions needs distinct keys
    text = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-6, vocab_size=len(tokenizer),
                tie_word_embeddings=True, eos_token_id=eos, bos_token_id=pad, pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": section})
    vision = dict(depth=2 if small else 4, embed_dim=32 if small else 128, hidden_size=hidden,
                  num_heads=2 if small else 4, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids), (eos, pad)


def encode(processor: QwenVLProcessor, sample: scenes.Sample, with_answer: bool = True) -> dict:
    """One training (or inference, without the answer) example, exactly as the jobs build prompts."""
    content = [{"type": sample.kind}, {"type": "text", "text": sample.question + PROMPT_SUFFIX}]
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


def encode_scene(processor: QwenVLProcessor, samples: list[scenes.Sample]) -> dict:
    """Questions on one scene as ONE sequence that trains exactly as that many single-question
    examples: the shared prefix (system prompt, user turn up to the media's end) once, then per
    question a branch (the rest of the prompt, the answer, <|im_end|>) that sees the prefix and
    itself only (`branch`: 0 prefix, j for question j; `tree_attention_mask` builds the mask)
    and is positioned right after the prefix, as inference positions it. Only answers and their
    <|im_end|> are learned. Pixels stay uint8 frames resized as the processor resizes them;
    `gpu_pixels` normalises and patchifies them on the device, bit for bit as the processor."""
    first, tokenizer = samples[0], processor.tokenizer
    cfg = processor.image_cfg if first.kind == "image" else processor.video_cfg
    frames = [_to_rgb_uint8(f) for f in first.frames]
    size = smart_resize(frames[0].height, frames[0].width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.stack([resize_frame(f, size) for f in frames])
    grid = (-(-len(frames) // cfg.temporal_patch_size), size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    pad_id = processor.video_token_id if first.kind == "video" else processor.image_token_id
    n_visual = grid[0] * grid[1] * grid[2] // cfg.merge_size ** 2

    prefix_text, prefix = None, []
    ids, labels, branch, positions = [], [], [], []
    for number, sample in enumerate(samples, start=1):
        content = [{"type": first.kind}, {"type": "text", "text": sample.question + PROMPT_SUFFIX}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        cut = prompt.index("<|vision_end|>") + len("<|vision_end|>")
        if prefix_text is None:
            prefix_text = prompt[:cut]
            prefix = tokenizer.encode(prefix_text, add_special_tokens=False)
            at = prefix.index(pad_id)  # the template's one pad token becomes one per visual token
            prefix[at:at + 1] = [pad_id] * n_visual
            ids, labels, branch = list(prefix), [-100] * len(prefix), [0] * len(prefix)
        elif prompt[:cut] != prefix_text:
            raise AssertionError("questions on one scene must share the prompt up to the media")
        question = tokenizer.encode(prompt[cut:], add_special_tokens=False)
        answer = tokenizer.encode(sample.answer + "<|im_end|>", add_special_tokens=False)
        ids += question + answer
        labels += [-100] * len(question) + answer
        branch += [number] * (len(question) + len(answer))
        if number == 1:  # every branch continues the prefix's positions from where its text stops
            prefix_ids = torch.tensor(prefix)
            positions.append(mrope_positions(_token_types(prefix_ids, pad_id, first.kind), [grid], cfg.merge_size))
            start = int(positions[0][0, -1]) + 1  # the prefix ends on text (<|vision_end|>)
        positions.append(torch.arange(start, start + len(question) + len(answer)).expand(3, -1))
    input_ids = torch.tensor(ids)
    regions = region_targets(first, grid[0], grid[1] // cfg.merge_size, grid[2] // cfg.merge_size)
    return {"kind": first.kind, "frames": torch.from_numpy(resized), "grid": torch.tensor(grid), "regions": regions,
            "input_ids": input_ids, "labels": torch.tensor(labels), "branch": torch.tensor(branch),
            "mm_token_type_ids": _token_types(input_ids, pad_id, first.kind), "position_ids": torch.cat(positions, 1)}


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


def region_targets(sample: scenes.Sample, groups: int, rows: int, columns: int) -> torch.Tensor:
    """(3, groups*rows*columns) class ids of the object under each visual token's centre, in
    token order: colour (0 = background, then COLOURS), shape (0, then SHAPES), word (0 = none,
    then WORDS). A video's frame group is labelled by its later frame."""
    size = sample.frames[0].width
    centres_y = ((np.arange(rows) + 0.5) * size / rows).astype(int)
    centres_x = ((np.arange(columns) + 0.5) * size / columns).astype(int)
    lookup = np.zeros((3, len(sample.things) + 1), dtype=np.int64)
    for index, thing in enumerate(sample.things, start=1):
        lookup[:, index] = (COLOUR_IDS[thing.colour], SHAPE_IDS[thing.shape], WORD_IDS.get(thing.word, 0))
    targets = []
    for group in range(groups):
        frame = min(2 * group + 1, len(sample.frames) - 1)
        covering = np.asarray(scenes.object_map(sample.things, size, frame))[centres_y][:, centres_x]
        targets.append(lookup[:, covering.reshape(-1)])
    return torch.from_numpy(np.concatenate(targets, axis=1))


def region_loss(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of colour, shape and word under each visual token, from what the decoder sees."""
    logits = head(features.float()).split([len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1, len(WORD_IDS) + 1], dim=-1)
    return sum(torch.nn.functional.cross_entropy(lg, t) for lg, t in zip(logits, targets)) / 3


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
    """Endless fresh examples; each worker draws from its own seed."""

    def __init__(self, checkpoint: Path, seed: int):
        self.checkpoint, self.seed = checkpoint, seed

    def __iter__(self):
        worker = get_worker_info()
        processor = QwenVLProcessor.from_pretrained(self.checkpoint)
        rng = random.Random(self.seed * 1_000_003 + (worker.id if worker else 0))
        while True:
            yield encode_scene(processor, training_example(rng))


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


def chunked_vision_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Vision attention for training: every frame group of a batch has the same number of patches
    (all scenes are resized to 448x448), so the packed sequence is a batch of equal chunks and
    one SDPA call (flash, with backward) covers them; transformers' default would run one SDPA
    per image and sync the host to split. (1, H, T, D) -> ((1, T, H, D), None)."""
    heads, total, dim = query.shape[1:]
    chunk = int(max_length_q)
    if total % chunk:
        raise ValueError(f"{total} patches are not equal chunks of {chunk}; train on one image size")

    def chunks(t):
        return t[0].view(heads, total // chunk, chunk, dim).transpose(0, 1)

    out = torch.nn.functional.scaled_dot_product_attention(chunks(query), chunks(key), chunks(value), scale=scaling)
    return out.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None


def evaluate(model, processor, device, seed: int, n: int) -> dict:
    """Greedy answers of held-out scenes with transformers' own generate (the engine is checked
    against it elsewhere); exact match after normalisation, per question type."""
    model.eval()
    answered = []
    with torch.no_grad():
        for sample in scenes.generate(seed, n):
            inputs = {k: v.to(device) for k, v in encode(processor, sample, with_answer=False).items()}
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            text = processor.decode(out[0, inputs["input_ids"].shape[1]:])
            answered.append((sample, text))
    model.train()
    return scenes.score(answered)


def archive(folder: Path, into: Path, part_bytes: int = 15 * 2**20) -> list[Path]:
    """`folder` as a .tar.gz split into parts of at most `part_bytes` (the device returns files <= 16 MiB)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    data, parts = buffer.getvalue(), []
    into.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(data), part_bytes)):
        parts.append(into / f"{folder.name}.tar.gz.part{index:02d}")
        parts[-1].write_bytes(data[start:start + part_bytes])
    return parts


def _profile(running, device):
    """Start a profiler, or stop `running` and print where the steps' time went."""
    from torch.profiler import ProfilerActivity, profile

    if running is None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        running = profile(activities=activities)
        running.__enter__()
        return running
    running.__exit__(None, None, None)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(running.key_averages().table(sort_by=key, row_limit=25), flush=True)
    return None


def main() -> None:
    from transformers import AttentionInterface, AutoModelForImageTextToText, GenerationConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=64, help="examples (scenes) per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--eval-n", type=int, default=400)
    parser.add_argument("--small", action="store_true", help="a smaller model (CPU smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of steps 30-39")
    parser.add_argument("--archive", type=Path, help="also write the checkpoint here as .tar.gz parts of <= 15 MiB")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        # cuDNN's attention builds a plan per new sequence length on the host (~8 ms a call here,
        # which made the steps host-bound); the memory-efficient kernel takes the tree mask as well
        torch.backends.cuda.enable_cudnn_sdp(False)

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=384, corpus=scenes.corpus())
    tokenizer.save_pretrained(args.out)
    write_preprocessor_configs(args.out, "qwen2_vl", min_pixels=PIXELS, max_pixels=PIXELS)
    config, (eos, pad) = model_config(tokenizer, args.small)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(device)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    AttentionInterface.register(VISION_ATTENTION, chunked_vision_attention)
    processor = QwenVLProcessor.from_pretrained(args.out)
    tables = {"image": torch.from_numpy(normalization_table(processor.image_cfg)).to(device),
              "video": torch.from_numpy(normalization_table(processor.video_cfg)).to(device)}
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters on {device}", flush=True)

    stream = SceneStream(args.out, TRAIN_SEED_BASE + args.seed)
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=lambda e: collate(e, pad), persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers else None, pin_memory=device.type == "cuda")
    region_head = torch.nn.Linear(config.text_config.hidden_size,
                                  len(COLOUR_IDS) + len(SHAPE_IDS) + len(WORD_IDS) + 3).to(device)
    seen: list[torch.Tensor] = []  # the vision tower's outputs of one forward: images, then videos
    hook = model.model.visual.register_forward_hook(lambda module, args, output: seen.append(output.pooler_output))
    trained = [*model.parameters(), *region_head.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    budget_s, warmup = args.minutes * 60, 200
    curve, step, answers, waited, train_started = [], 0, 0, 0.0, time.perf_counter()
    losses = []
    model.model.visual.config._attn_implementation = VISION_ATTENTION
    model.train()
    batches, profiler = iter(loader), None
    while (elapsed := time.perf_counter() - train_started) < budget_s:
        if args.profile and step in (30, 40):
            profiler = _profile(profiler if step == 40 else None, device)
        wait_started = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - wait_started
        # linear warm-up, then cosine over the time budget (steps are not known in advance)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget_s)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * max(scale, 0.02)
        inputs = gpu_pixels(batch, processor, tables, device)
        regions = torch.cat([batch[k] for k in ("image_regions", "video_regions") if k in batch], dim=1)
        seen.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**inputs).loss
            aux = region_loss(region_head, torch.cat(seen), regions.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        (loss + REGION_LOSS_WEIGHT * aux).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        losses.append(torch.stack([loss.detach(), aux.detach()]))
        answers += int((batch["labels"] != -100).sum())
        step += 1
        if step % 100 == 0:
            mean, mean_aux = torch.stack(losses).mean(0).tolist()
            losses.clear()
            curve.append({"step": step, "seconds": round(elapsed, 1), "loss": round(mean, 4),
                          "region_loss": round(mean_aux, 4)})
            print(f"step {step:6d} {elapsed:6.0f}s loss {mean:.4f} regions {mean_aux:.4f}  {step / elapsed:5.2f} steps/s  "
                  f"waiting for data {waited / elapsed:4.0%}", flush=True)

    hook.remove()
    model.model.visual.config._attn_implementation = "sdpa"
    model.save_pretrained(args.out, safe_serialization=True)
    result = evaluate(model, processor, device, seed=99, n=args.eval_n)
    print(json.dumps(result), flush=True)
    (args.out / "training.json").write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "device": str(torch.cuda.get_device_name(device)
                                                                   if device.type == "cuda" else "cpu"),
        "parameters": params, "steps": step, "batch_size": args.batch_size, "answer_tokens_learned": answers,
        "train_seconds": round(time.perf_counter() - train_started, 1),
        "seconds": round(time.perf_counter() - started, 1), "data_wait_fraction": round(waited / max(elapsed, 1e-9), 3),
        "loss_curve": curve, "held_out": {"seed": 99, **result}}, indent=2))
    if args.archive:
        print("archive:", *archive(args.out, args.archive))


if __name__ == "__main__":
    main()
