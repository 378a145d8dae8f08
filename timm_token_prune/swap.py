"""In-place class swapping: a patched module becomes an instance of a subclass of its own class that
mixes in the pruning behaviour. Weights, buffers and state_dict keys stay exactly as they were."""

from __future__ import annotations

import sys

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def pruned_class(base: type, mixin: type) -> type:
    """The class `Pruned<Base>` = (mixin, base), made once per pair and importable (picklable)."""
    key = (base, mixin)
    if key not in _CLASSES:
        module = sys.modules[mixin.__module__]
        name = f"Pruned{base.__name__}"
        while hasattr(module, name) and getattr(getattr(module, name), "_token_prune_base", None) is not base:
            name += "_"
        cls = type(name, (mixin, base), {"_token_prune_base": base, "__module__": mixin.__module__})
        setattr(module, name, cls)
        _CLASSES[key] = cls
    return _CLASSES[key]


def swap_class(module: nn.Module, mixin: type, **attributes) -> None:
    """Make `module` an instance of `pruned_class(type(module), mixin)`; set plain (unregistered) attributes."""
    module.__class__ = pruned_class(type(module), mixin)
    for name, value in attributes.items():
        object.__setattr__(module, name, value)  # a plain attribute: not a submodule, not in state_dict


def restore_class(module: nn.Module, *attributes: str) -> None:
    """Undo `swap_class`: back to the original class, the added attributes removed."""
    base = getattr(type(module), "_token_prune_base", None)
    if base is not None:
        module.__class__ = base
    for name in attributes:
        module.__dict__.pop(name, None)


def is_swapped(module: nn.Module) -> bool:
    return getattr(type(module), "_token_prune_base", None) is not None
