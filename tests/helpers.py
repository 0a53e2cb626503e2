"""Sample builders shared by the tests."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat(processor, *parts, text: str) -> str:
    content = [{"type": part} for part in parts] + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def same_size_samples(processor, count: int, seed: int) -> list[dict]:
    """`count` random images of one size under one prompt: a prefill pack whose samples are all of
    one length at every layer (what batched prefill attention takes)."""
    rng = np.random.default_rng(seed)
    return [processor(text=[chat(processor, "image", text="Caption the picture.")], images=[random_image(rng, 56, 84)])
            for _ in range(count)]


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


def mixed_requests(engine, seed: int) -> tuple[list[dict], list]:
    """`mixed_samples` with mixed SamplingParams: greedy, seeded sampling, and stop tokens (taken
    from a greedy run) that end some answers early."""
    from sparsevlm import EngineConfig, SamplingParams, VLMEngine

    samples = mixed_samples(engine.processor, seed=seed)
    plain = VLMEngine(engine.model, engine.processor, engine_config=EngineConfig(decode_ahead=False))
    greedy = plain.generate(samples, SamplingParams(max_new_tokens=10, ignore_eos=True))
    params = []
    for i, result in enumerate(greedy):
        if i % 3 == 0:  # stops on its own third token
            params.append(SamplingParams(max_new_tokens=10, stop_token_ids=(result.token_ids[2],)))
        elif i % 3 == 1:
            params.append(SamplingParams(max_new_tokens=4 + i, temperature=1.2, top_k=40, seed=7 + i))
        else:
            params.append(SamplingParams(max_new_tokens=3 + i, ignore_eos=True))
    return samples, params


def streamed(engine, samples: list[dict], params: list) -> list[list[int]]:
    """Token ids per sample through `engine.step()`: half the requests first, the rest joining
    after three steps, while the first half decodes."""
    ids, tokens, steps = {}, {}, 0
    half = len(samples) // 2
    for i in range(half):
        ids[engine.add_request(samples[i], params[i])] = i
    while engine.has_unfinished() or len(ids) < len(samples):
        steps += 1
        if steps == 4:
            for i in range(half, len(samples)):
                ids[engine.add_request(samples[i], params[i])] = i
        for request_id, result in engine.step():
            assert result.error is None, result.error
            tokens[ids[request_id]] = result.token_ids
    return [tokens[i] for i in range(len(samples))]


def throughput_report(tmp_path, monkeypatch, *flags: str) -> dict:
    """`python -m benchmarks.throughput` on two `vqa-256` samples, once, without vLLM or the HF
    baseline, plus `flags`; the JSON report it writes."""
    import json
    import sys

    from benchmarks import throughput

    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["throughput", "--workloads", "vqa-256", "--num-samples", "2", "--repeats", "1",
                                      "--hf-batch-sizes", "", "--vllm", "off", *flags, "--json", str(out)])
    throughput.main()
    return json.loads(out.read_text())
