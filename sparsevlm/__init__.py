"""SparseVLM: batched, packed VLM inference that drops the visual tokens a question does not need.

Usable without Ray:

    from sparsevlm import VLMEngine, SamplingParams
    engine = VLMEngine.from_pretrained(path)
    results = engine.generate(samples, SamplingParams(max_new_tokens=16))

The engine (torch, transformers) loads on first use, so that `sparsevlm.config` (plain
dataclasses, the sparsity grammar) is light to import: the job schema builds on it.
"""

from .config import EngineConfig, SamplingParams, SparsityConfig

__all__ = ["EngineConfig", "GenerationResult", "SampleStats", "SamplingParams", "SparsityConfig", "VLMEngine"]


def __getattr__(name: str):
    if name in ("VLMEngine", "GenerationResult"):
        from . import engine

        return getattr(engine, name)
    if name == "SampleStats":
        from .stats import SampleStats

        return SampleStats
    raise AttributeError(f"module 'sparsevlm' has no attribute {name!r}")
