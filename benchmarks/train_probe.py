"""Train the scene probe: a small Qwen2-VL-architecture VLM, from scratch, on procedural scene VQA.

    python benchmarks/train_probe.py --out jobs/models/scene-probe --minutes 15     # one H100
    python benchmarks/train_probe.py --out /tmp/probe --minutes 1 --small          # CPU smoke run
    python benchmarks/train_probe.py --out /tmp/probe --archive $OUT               # + the checkpoint as
        # probe.tar.gz.partNN files of at most 15 MiB; back on this side: cat probe.tar.gz.part* | tar xz

Fresh scenes every step (benchmarks/scenes.py, drawn in DataLoader workers, seeds disjoint
from the test seeds' range), preprocessed by the same processor the engine uses at
inference, loss on the answer tokens only. Writes a hub-style checkpoint (safetensors,
tokenizer with chat template, preprocessor configs) that `VLMEngine.from_pretrained` and
the jobs load, and `training.json` (command, steps, loss curve, held-out accuracy).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenes  # noqa: E402

from sparsevlm.preprocess import QwenVLProcessor  # noqa: E402
from sparsevlm.tiny import build_tokenizer, vision_token_ids, write_preprocessor_configs  # noqa: E402

PIXELS = 448 * 448  # every scene is resized to 448x448: 256 visual tokens per image / frame pair
TRAIN_SEED_BASE = 1_000_000  # training scenes use seeds from here on; tests and benchmarks use small seeds
PROMPT_SUFFIX = " Answer with one or two words."


def model_config(tokenizer, small: bool):
    from transformers import Qwen2VLConfig

    ids = vision_token_ids(tokenizer)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden, layers, heads = (64, 2, 4) if small else (192, 8, 6)
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # t, h, w: sums to head_dim / 2
    text = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, vocab_size=len(tokenizer),
                tie_word_embeddings=True, eos_token_id=eos, bos_token_id=pad, pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
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


class SceneStream(IterableDataset):
    """Endless fresh examples; each worker draws its own disjoint seed range."""

    def __init__(self, checkpoint: Path, seed: int):
        self.checkpoint, self.seed = checkpoint, seed

    def __iter__(self):
        worker = get_worker_info()
        processor = QwenVLProcessor.from_pretrained(self.checkpoint)
        seed = self.seed + (worker.id if worker else 0)
        index = 0
        while True:
            yield encode(processor, scenes.sample_at(seed, index))
            index += 1


def collate(examples: list[dict], pad_id: int) -> dict:
    length = max(e["input_ids"].shape[1] for e in examples)

    def padded(key, value):
        rows = [torch.nn.functional.pad(e[key][0], (0, length - e[key].shape[1]), value=value) for e in examples]
        return torch.stack(rows)

    batch = {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0),
             "mm_token_type_ids": padded("mm_token_type_ids", 0), "labels": padded("labels", -100)}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        having = [e for e in examples if pixels in e]
        if having:
            batch[pixels] = torch.cat([e[pixels] for e in having])
            batch[grid] = torch.cat([e[grid] for e in having])
    return batch


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


def main() -> None:
    from transformers import AutoModelForImageTextToText, GenerationConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--eval-n", type=int, default=400)
    parser.add_argument("--small", action="store_true", help="a smaller model (CPU smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--archive", type=Path, help="also write the checkpoint here as .tar.gz parts of <= 15 MiB")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=384, corpus=scenes.corpus())
    tokenizer.save_pretrained(args.out)
    write_preprocessor_configs(args.out, "qwen2_vl", min_pixels=PIXELS, max_pixels=PIXELS)
    config, (eos, pad) = model_config(tokenizer, args.small)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(device)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    processor = QwenVLProcessor.from_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters on {device}", flush=True)

    stream = SceneStream(args.out, TRAIN_SEED_BASE + args.seed * 1000)
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=lambda e: collate(e, pad), persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget_s, warmup = args.minutes * 60, 200
    curve, step, train_started = [], 0, time.perf_counter()
    model.train()
    for batch in loader:
        elapsed = time.perf_counter() - train_started
        if elapsed > budget_s:
            break
        # linear warm-up, then cosine over the time budget (steps are not known in advance)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget_s)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * max(scale, 0.02)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            curve.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4)})
            print(f"step {step} {elapsed:6.0f}s loss {loss.item():.4f}", flush=True)

    model.save_pretrained(args.out, safe_serialization=True)
    result = evaluate(model, processor, device, seed=99, n=args.eval_n)
    print(json.dumps(result), flush=True)
    (args.out / "training.json").write_text(json.dumps({
        "command": " ".join(["python", *sys.argv]), "device": str(torch.cuda.get_device_name(device)
                                                                   if device.type == "cuda" else "cpu"),
        "parameters": params, "steps": step, "batch_size": args.batch_size, "seconds": time.perf_counter() - started,
        "loss_curve": curve, "held_out": {"seed": 99, **result}}, indent=2))
    if args.archive:
        print("archive:", *archive(args.out, args.archive))


if __name__ == "__main__":
    main()
