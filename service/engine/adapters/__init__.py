"""The adapter table with every source registered (service/engine/adapters/base.py says what an adapter
and an anatomy are). Importing this package imports each source module, which registers its attention
adapters and its describer: a new source is one import line here, and the engine reads models only through
`describe` and `attention_of`."""

from __future__ import annotations

from service.engine.adapters import timm_models as _timm_models  # noqa: F401  (registers the timm source)
from service.engine.adapters import transformers_models as _transformers_models  # noqa: F401
from service.engine.adapters.base import (
    ADAPTERS,
    QKV,
    SOURCES,
    Adapter,
    Anatomy,
    Pooling,
    UnsupportedModel,
    attention_of,
    describe,
    register_adapter,
    register_source,
)

__all__ = ["ADAPTERS", "QKV", "SOURCES", "Adapter", "Anatomy", "Pooling", "UnsupportedModel", "attention_of",
           "describe", "register_adapter", "register_source"]
