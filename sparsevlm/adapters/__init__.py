"""Model-family adapters. Adding a family = one module with a `ModelAdapter` subclass, listed here."""

from __future__ import annotations

from .base import ModelAdapter, PreparedSample, VisualFeatures
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (QwenVLAdapter, LlavaAdapter, LlavaOnevisionAdapter)
SUPPORTED_MODEL_TYPES = tuple(t for adapter in ADAPTERS for t in adapter.model_types)


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(f"model family {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                     "(a new family needs an adapter in sparsevlm/adapters/)")


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "ModelAdapter", "PreparedSample", "VisualFeatures",
           "adapter_class_for"]
