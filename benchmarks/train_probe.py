"""Train the scene probe: a small Qwen2-VL-architecture VLM, from scratch, on procedural scene VQA.

    python -m benchmarks.train_probe --out jobs/models/scene-probe --minutes 16.5 --workers 15   # one GPU
        # (16 CPU cores keep an H100 / H200 GPU-bound; training.json says how the committed probe ran)
    python -m benchmarks.train_probe --out /tmp/probe --minutes 1 --small          # CPU smoke run
    python -m benchmarks.train_probe --out /tmp/probe --archive $OUT               # + the checkpoint as
        # probe.tar.gz.partNN files of at most 15 MiB; back on this side: cat probe.tar.gz.part* | tar xz
    python -m benchmarks.train_probe --out /tmp/robust --init-from jobs/models/scene-probe --drop-share 0.5 \
        --lr 3e-4 --minutes 7.5 --workers 15    # fine-tune with dropped visual tokens (README, Accuracy)

Fresh scenes every step (benchmarks/scenes.py, drawn in DataLoader workers, seeds disjoint
from the test seeds' range), each with all its questions as branches of one sequence
(benchmarks/probe_data.py: trains exactly as lone questions, tested), preprocessed as the
engine's processor does. Loss on the answer tokens plus two auxiliary targets: what lies under
each visual token, and where each visual token is. Writes a hub-style checkpoint (safetensors,
tokenizer with chat template, preprocessor configs) that `VLMEngine.from_pretrained` and the
jobs load, and `training.json` (command, steps, loss curve, held-out accuracy).
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
from torch.utils.data import DataLoader


from benchmarks import scenes
from benchmarks.probe_data import (
    COLOUR_IDS, SHAPE_IDS, TRAIN_SEED_BASE, WORD_IDS, SceneStream, collate, encode, gpu_pixels, grid_targets)

from sparsevlm.preprocess import QwenVLProcessor, normalization_table
from sparsevlm.tiny import build_tokenizer, vision_token_ids, write_preprocessor_configs

PIXELS = 448 * 448  # every scene is resized to 448x448: 256 visual tokens per image / frame pair
# head_dim 32 gives 16 rotary frequencies, theta^(-i/16); Qwen2-VL hands the first to time, then
# rows, then columns (the slowest). At the usual theta of 10000 columns turn <= 0.003 rad apart:
# no left and right. At 100 they turn 0.013-0.056, and the slowest frequencies still leave the
# answer's attention to visual tokens 20-50 positions back nearly position-free (content lookup).
# A trial at theta 30 (columns 0.04-0.15) lost that: exists, count and position all got worse
# (benchmarks/results/h200_probe_training_trial_*.log; README, "Accuracy").
ROPE_THETA = 100.0
MROPE_SECTION = (4, 6, 6)
GRID = 16  # merged tokens per side at 448x448
VISION_ATTENTION = "probe_chunked_flash"  # "flash" in the name: transformers then passes cu_seqlens
# Auxiliary targets, weighted against the answer loss. Regions: what lies under each visual token
# (colour, shape, word). Selecting "the triangle" among 256 tokens by attention learns slowly while
# the tokens do not yet say what they show; this dense signal teaches them that early. Labelled
# tokens are few, so background counts a tenth in the word target. Grid: each visual token's row and
# column from the decoder's hidden state after GRID_LAYER, so positions travel in what attention
# moves. Both heads are dropped after training (not in the checkpoint).
REGION_LOSS_WEIGHT = 0.5
GRID_LOSS_WEIGHT = 0.5
GRID_LAYER = 1
BACKGROUND_WORD_WEIGHT = 0.1


def model_config(tokenizer, small: bool):
    from transformers import Qwen2VLConfig

    ids = vision_token_ids(tokenizer)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden, layers, heads = (64, 4, 2) if small else (192, 8, 6)  # 4: SparseVLM never prunes before layer 2
    if hidden // heads != 2 * sum(MROPE_SECTION):
        raise ValueError(f"M-RoPE sections {MROPE_SECTION} must cover head_dim {hidden // heads} / 2")
    # one key/value head per query head: matching a question's words to regions needs distinct keys
    text = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, max_position_embeddings=4096, rms_norm_eps=1e-6, vocab_size=len(tokenizer),
                tie_word_embeddings=True, eos_token_id=eos, bos_token_id=pad, pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                                 "mrope_section": list(MROPE_SECTION)})
    vision = dict(depth=2 if small else 6, embed_dim=32 if small else 128, hidden_size=hidden,
                  num_heads=2 if small else 4, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids), (eos, pad)


class AuxiliaryHeads(torch.nn.Module):
    """Linear read-outs for the auxiliary targets (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = [len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1, len(WORD_IDS) + 1]
        self.regions = torch.nn.Linear(hidden, sum(self.sizes))
        self.grid = torch.nn.Linear(hidden, 2 * GRID)
        self.register_buffer("word_weight", torch.tensor([BACKGROUND_WORD_WEIGHT] + [1.0] * len(WORD_IDS)))

    def region_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        return list(self.regions(features.float()).split(self.sizes, dim=-1))

    def region_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of colour, shape and word under each visual token (N, hidden) vs (3, N)."""
        colour, shape, word = self.region_logits(features)
        cross_entropy = torch.nn.functional.cross_entropy
        return (cross_entropy(colour, targets[0]) + cross_entropy(shape, targets[1])
                + cross_entropy(word, targets[2], weight=self.word_weight)) / 3

    def grid_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each visual token's row and column: (B, L, hidden) vs (2, B, L), -100 ignored."""
        rows, columns = self.grid(hidden.float()).split(GRID, dim=-1)
        cross_entropy = torch.nn.functional.cross_entropy
        return (cross_entropy(rows.flatten(0, 1), targets[0].flatten())
                + cross_entropy(columns.flatten(0, 1), targets[1].flatten())) / 2

    @torch.no_grad()
    def accuracies(self, features, regions, hidden, grid) -> dict[str, float]:
        """Training diagnostics: words read on labelled tokens, rows and columns placed."""
        word = self.region_logits(features)[2].argmax(-1)
        labelled = regions[2] > 0
        rows, columns = self.grid(hidden.float()).split(GRID, dim=-1)
        visual = grid[0] >= 0
        return {"words": float((word[labelled] == regions[2][labelled]).float().mean()) if labelled.any() else 0.0,
                "rows": float((rows.argmax(-1)[visual] == grid[0][visual]).float().mean()),
                "columns": float((columns.argmax(-1)[visual] == grid[1][visual]).float().mean())}


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


def _architecture(config) -> list[dict]:
    """What must match for --init-from: the text and vision settings (not the stored dtype)."""
    parts = (config.text_config, config.vision_config)
    return [{k: v for k, v in part.to_dict().items() if k != "dtype"} for part in parts]


def _drop_visual_tokens(model, kind: str, kept: dict[str, list[torch.Tensor]]) -> None:
    """Make `model.get_{kind}_features` return only the features `kept[kind]` (one boolean mask
    per example) selects, matching sequences whose dropped visual tokens were taken out. Training
    only: deleting the instance attribute restores the method."""
    name = f"get_{kind}_features"
    original = getattr(model, name)

    def selected(*args, **kwargs):
        output = original(*args, **kwargs)
        per_example = output.pooler_output if hasattr(output, "pooler_output") else output
        chosen = tuple(features[mask] for features, mask in zip(per_example, kept[kind], strict=True))
        if hasattr(output, "pooler_output"):
            output.pooler_output = chosen
            return output
        return chosen

    setattr(model, name, selected)


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
    parser.add_argument("--log-every", type=int, default=100, help="steps between loss lines")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of steps 30-39")
    parser.add_argument("--archive", type=Path, help="also write the checkpoint here as .tar.gz parts of <= 15 MiB")
    parser.add_argument("--drop-share", type=float, default=0.0,
                        help="share of examples that keep only 10-60%% of their visual tokens (robustness to pruning)")
    parser.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (fine-tuning)")
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
    if args.init_from:
        model = AutoModelForImageTextToText.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        if _architecture(model.config) != _architecture(config):
            raise SystemExit(f"{args.init_from} is not a checkpoint of this script's model configuration")
    else:
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(device)
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    AttentionInterface.register(VISION_ATTENTION, chunked_vision_attention)
    processor = QwenVLProcessor.from_pretrained(args.out)
    tables = {"image": torch.from_numpy(normalization_table(processor.image_cfg)).to(device),
              "video": torch.from_numpy(normalization_table(processor.video_cfg)).to(device)}
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters on {device}", flush=True)

    stream = SceneStream(args.out, TRAIN_SEED_BASE + args.seed, args.drop_share)
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=lambda e: collate(e, pad), persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers else None, pin_memory=device.type == "cuda")
    heads = AuxiliaryHeads(config.text_config.hidden_size).to(device)
    # one forward's vision tower outputs (a call for images, then one for videos) and decoder state
    seen: dict[str, list[torch.Tensor]] = {"visual": [], "hidden": []}

    def keep(key, output):
        if key == "visual":
            seen[key].append(output.pooler_output)
        else:
            seen[key].append(output[0] if isinstance(output, tuple) else output)

    hooks = [model.model.visual.register_forward_hook(lambda module, args, output: keep("visual", output)),
             model.model.language_model.layers[GRID_LAYER].register_forward_hook(
                 lambda module, args, output: keep("hidden", output))]
    kept: dict[str, list[torch.Tensor]] = {}  # per kind, per example: which visual tokens stay
    if args.drop_share:
        for kind in ("image", "video"):
            _drop_visual_tokens(model.model, kind, kept)
    trained = [*model.parameters(), *heads.parameters()]
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
        regions = regions.to(device, non_blocking=True)
        if args.drop_share:
            kept.update({kind: [k.to(device, non_blocking=True) for k in batch[f"{kind}_keep"]]
                         for kind in ("image", "video") if f"{kind}_keep" in batch})
        grid = grid_targets(inputs["position_ids"], inputs["mm_token_type_ids"])
        seen["visual"].clear(), seen["hidden"].clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**inputs).loss
            visual, hidden = torch.cat(seen["visual"]), seen["hidden"][0]
            region_aux = heads.region_loss(visual, regions)
            grid_aux = heads.grid_loss(hidden, grid)
        optimizer.zero_grad(set_to_none=True)
        (loss + REGION_LOSS_WEIGHT * region_aux + GRID_LOSS_WEIGHT * grid_aux).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        losses.append(torch.stack([loss.detach(), region_aux.detach(), grid_aux.detach()]))
        answers += int((batch["labels"] != -100).sum())
        step += 1
        if step % args.log_every == 0:
            mean, mean_regions, mean_grid = torch.stack(losses).mean(0).tolist()
            losses.clear()
            read = heads.accuracies(visual, regions, hidden, grid)
            curve.append({"step": step, "seconds": round(elapsed, 1), "loss": round(mean, 4),
                          "region_loss": round(mean_regions, 4), "grid_loss": round(mean_grid, 4),
                          **{f"{k}_accuracy": round(v, 3) for k, v in read.items()}})
            print(f"step {step:6d} {elapsed:6.0f}s loss {mean:.4f} regions {mean_regions:.4f} grid {mean_grid:.4f} "
                  f"(words {read['words']:.2f} rows {read['rows']:.2f} columns {read['columns']:.2f})  "
                  f"{step / elapsed:5.2f} steps/s  waiting for data {waited / elapsed:4.0%}", flush=True)

    for hook in hooks:
        hook.remove()
    for kind in ("image", "video"):
        model.model.__dict__.pop(f"get_{kind}_features", None)  # back to the class's own (no dropping)
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
