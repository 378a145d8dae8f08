"""One thin adapter per family of models, each an `Adapter` (see base.py for the contract) in a registry.

`find_adapter(model)` picks the most specific registered adapter that matches; `register_adapter`
adds one (a new family, or a replacement of a built-in one by name)."""

from .base import (
    ADAPTERS,
    Adapter,
    adapter_for_zoo,
    adapter_named,
    find_adapter,
    patched_adapter,
    register_adapter,
    supported_models,
    wrapper_hint,
)
from .hf import TransformersAdapter
from .hf_towers import VisionTowerAdapter
from .timm import TimmAdapter, VisionTransformerAdapter
from .timm_beit import BeitAdapter
from .timm_eva import EvaAdapter

# VisionTowerAdapter after TransformersAdapter: of two equally specific adapters, the one registered last wins
for _adapter in (
    VisionTransformerAdapter(), EvaAdapter(), BeitAdapter(), TransformersAdapter(), VisionTowerAdapter()
):
    register_adapter(_adapter)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BeitAdapter",
    "EvaAdapter",
    "TimmAdapter",
    "TransformersAdapter",
    "VisionTowerAdapter",
    "VisionTransformerAdapter",
    "adapter_for_zoo",
    "adapter_named",
    "find_adapter",
    "patched_adapter",
    "register_adapter",
    "supported_models",
    "wrapper_hint",
]
