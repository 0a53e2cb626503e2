"""SparseVLM: batched, packed VLM inference that drops the visual tokens a question does not need.

Usable without Ray:

    from sparsevlm import VLMEngine, SamplingParams
    engine = VLMEngine.from_pretrained(path)
    results = engine.generate(samples, SamplingParams(max_new_tokens=16))
"""

from .config import EngineConfig, SamplingParams, SparsityConfig
from .engine import GenerationResult, VLMEngine
from .stats import SampleStats

__all__ = ["EngineConfig", "GenerationResult", "SampleStats", "SamplingParams", "SparsityConfig", "VLMEngine"]
