"""Token agreement of our engine (one packed batch) with HF `generate` (each sample alone).

    python -m benchmarks.agreement                                   # CPU tiny fp32: must be 100%
    python -m benchmarks.agreement --model qwen2_5_vl_7b --json benchmarks/results/h100_agreement_vqa256.json

In bf16 the two differ in reduction order (packed vs single-sample matmuls, varlen vs
SDPA kernels), so near-tied logits of a random-weight model can flip a token and the
sequences diverge from there; the first generated token is what must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.workloads import WORKLOADS, device_for, load_model, make_samples

from sparsevlm import SamplingParams, VLMEngine


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen2_5_vl_7b"])
    parser.add_argument("--workload", default="vqa-256")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = device_for(args.model)
    model, processor = load_model(args.model, str(device))
    engine = VLMEngine(model, processor)
    workload = WORKLOADS[args.workload]
    samples = make_samples(processor, workload, args.num_samples, args.model, first_seed=1000)
    params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=True)
    ours = [r.token_ids for r in engine.generate(samples, params)]
    reference = []
    for sample in samples:
        out = model.generate(**{k: v.to(device) for k, v in sample.items()}, max_new_tokens=params.max_new_tokens,
                             min_new_tokens=params.max_new_tokens, do_sample=False)
        reference.append(out[0, sample["input_ids"].shape[1]:].tolist())
    prefixes = [common_prefix(a, b) for a, b in zip(ours, reference)]
    # how close the reference's top two first-step logits are: a flip is expected only on near-ties
    gaps = []
    for sample in samples:
        logits = model(**{k: v.to(device) for k, v in sample.items()}).logits[0, -1].float()
        top2 = logits.topk(2).values
        gaps.append(round((top2[0] - top2[1]).item(), 5))
    report = {
        "command": " ".join(["python", *sys.argv]), "model": args.model, "workload": args.workload,
        "dtype": str(model.dtype), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention_backend": engine.backend.name, "n": len(samples), "max_new_tokens": params.max_new_tokens,
        "first_token_agreement": sum(p > 0 for p in prefixes) / len(samples),
        "exact_sequence_agreement": sum(p == params.max_new_tokens for p in prefixes) / len(samples),
        "mean_common_prefix": sum(prefixes) / len(samples),
        "first_step_top2_logit_gap": gaps,
        "first_token_match": [p > 0 for p in prefixes],
        "token_agreement": sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(ours, reference))
        / (len(samples) * params.max_new_tokens),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
