"""The adapter contract and its registry.

An adapter teaches the library one family of models: how to check, patch and unpatch them, and
everything the save, load, export, visualize and CLI paths need to know about them (which zoo saves
and rebuilds the dense model, its architecture name, input size, normalisation, image checks).
Those paths ask the adapter; none of them guesses from the model's attributes.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import NotPatchedError, UnsupportedModelError
from ..pruner import TokenPruner

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Adapter(ABC):
    """One family of models. Subclass it, set the three class attributes, implement the abstract
    methods and `register_adapter(MyAdapter())`."""

    name: ClassVar[str]  # unique, recorded in saved checkpoints ("timm", "timm-eva", ...)
    zoo: ClassVar[str]  # the library that saves and rebuilds the dense model: "timm" or "transformers"
    supported: ClassVar[str]  # what it patches, for error messages
    restores_tokens: ClassVar[bool] = False  # whether its patched models serve `restore_tokens`

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}, zoo {self.zoo!r}>"

    # ---- matching and patching -------------------------------------------------------------------
    @abstractmethod
    def model_classes(self) -> tuple[type, ...]:
        """The model classes this adapter patches (empty when its zoo is not installed)."""

    def matches(self, model: nn.Module) -> bool:
        classes = _model_classes(self)
        return bool(classes) and isinstance(model, classes)

    @abstractmethod
    def check(self, model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
        """The pruning locations; raise `UnsupportedModelError` (changing nothing) if `model` cannot be patched."""

    @abstractmethod
    def patch(self, model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
        """Patch a checked model in place and return its pruner (added as `model.token_pruner`)."""

    @abstractmethod
    def unpatch(self, model: nn.Module) -> None:
        """Restore exactly what `patch` changed, `model.token_pruner` included."""

    # ---- the dense model on disk ------------------------------------------------------------------
    @abstractmethod
    def save_dense(
        self, model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor], model_args: dict | None
    ) -> None:
        """Write the dense weights `state_dict` and config as the zoo's own loader reads them."""

    @abstractmethod
    def load_dense(self, folder: Path, name: str) -> nn.Module:
        """Rebuild the dense model that `save_dense` wrote (`name`: the checkpoint, for errors)."""

    @abstractmethod
    def architecture(self, model: nn.Module) -> str:
        """The architecture name recorded with a checkpoint (timm model name or transformers class)."""

    @abstractmethod
    def base_model(self, model: nn.Module) -> str | None:
        """The Hub repo the weights came from, if known (the model card's base_model)."""

    @abstractmethod
    def is_classifier(self, model: nn.Module) -> bool:
        """Whether the model's output holds class logits."""

    # ---- images -----------------------------------------------------------------------------------
    @abstractmethod
    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model takes."""

    def normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel that images are normalised with before the model sees them."""
        return IMAGENET_MEAN, IMAGENET_STD

    @abstractmethod
    def check_images(self, model: nn.Module, images: torch.Tensor) -> None:
        """Raise `ValueError` saying what is wrong unless `images` is a batch the model takes."""

    def check_exportable(self, model: nn.Module) -> None:
        """Raise `ValueError` saying why if `export_onnx` cannot export this model (default: it can)."""

    def forward_images(self, model: nn.Module, images: torch.Tensor) -> object:
        """Run the patched model on a batch of images alone (calibrate, measure, freeze): `model(images)`. A
        model that takes more than images (a text tower, a language model) runs only what reads the images.
        `images` may be a dict of keyword inputs (`batches.model_inputs`): `model(**images)`."""
        from ..batches import run_model

        return run_model(model, images)


ADAPTERS: list[Adapter] = []  # in registration order; see find_adapter for which one a model gets


def register_adapter(adapter: Adapter) -> Adapter:
    """Add `adapter` to the registry (replacing one of the same name) and return it."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter expects an Adapter instance, got {type(adapter).__name__}")
    for attribute in ("name", "zoo", "supported"):
        if not isinstance(getattr(adapter, attribute, None), str) or not getattr(adapter, attribute):
            raise TypeError(f"{type(adapter).__name__}.{attribute} must be a non-empty string")
    ADAPTERS[:] = [a for a in ADAPTERS if a.name != adapter.name] + [adapter]
    _WARNED.discard(adapter.name)
    return adapter


def find_adapter(model: nn.Module) -> Adapter | None:
    """The most specific adapter that matches `model`: the one whose class comes first in the model's
    method resolution order (a subclass beats its base); among equals, the one registered last. An adapter
    that cannot answer (its `model_classes` or `matches` raises) is skipped, with a warning naming it."""
    mro = type(model).__mro__
    candidates = []
    for adapter in reversed(ADAPTERS):
        try:
            if adapter.matches(model):
                classes = _model_classes(adapter)
                candidates.append((min((mro.index(c) for c in classes if c in mro), default=len(mro)), adapter))
        except Exception as error:  # a third-party adapter's bug must not break the other models
            _skip(adapter, error)
    return min(candidates, key=lambda candidate: candidate[0], default=(None, None))[1]


def adapter_problems() -> list[str]:
    """One line per registered adapter that cannot say which models it patches (for error messages)."""
    problems = []
    for adapter in ADAPTERS:
        try:
            _model_classes(adapter)
        except Exception as error:
            problems.append(_problem(adapter, error))
    return problems


_WARNED: set[str] = set()  # adapters already reported as skipped


def _model_classes(adapter: Adapter) -> tuple[type, ...]:
    """`adapter.model_classes()`, checked: a tuple of classes."""
    classes = adapter.model_classes()
    if not isinstance(classes, tuple) or not all(isinstance(c, type) for c in classes):
        raise TypeError(f"model_classes() returned {classes!r}, not a tuple of classes")
    return classes


def _problem(adapter: Adapter, error: Exception) -> str:
    return (
        f"the {adapter.name!r} adapter ({type(adapter).__name__}) was skipped: {type(error).__name__}: {error} "
        "(fix it, or remove it from timm_token_prune.adapters.ADAPTERS)"
    )


def _skip(adapter: Adapter, error: Exception) -> None:
    if adapter.name not in _WARNED:
        _WARNED.add(adapter.name)
        warnings.warn(_problem(adapter, error), stacklevel=3)


def adapter_named(name: str) -> Adapter | None:
    return next((a for a in ADAPTERS if a.name == name), None)


def adapter_for_zoo(zoo: str) -> Adapter | None:
    """The first registered adapter that saves its dense models with `zoo`."""
    return next((a for a in ADAPTERS if a.zoo == zoo), None)


def supported_models() -> str:
    return "; ".join(a.supported for a in ADAPTERS)


def wrapper_hint(model: nn.Module, action: str = "patch") -> str | None:
    """If `model` only wraps a model we know (DataParallel / DistributedDataParallel `.module`, an
    nn.Sequential, a torch.compile wrapper, ...), the advice to `action` the inner one; else None."""

    def known(module: object) -> bool:
        return isinstance(module, nn.Module) and (find_adapter(module) is not None or _pruner(module) is not None)

    kind = type(model).__name__
    inner = getattr(model, "module", None)
    if known(inner):
        return f"this {kind} is a wrapper: {action} model.module (the {type(inner).__name__} inside) instead"
    indexed = isinstance(model, (nn.Sequential, nn.ModuleList))
    for key, child in model.named_children():
        if known(child):
            where = f"model[{key}]" if indexed else f"model.{key}"
            return f"this {kind} is a wrapper: {action} {where} (the {type(child).__name__} inside) instead"
    return None


def patched_adapter(model: nn.Module, action: str = "use") -> tuple[Adapter, TokenPruner]:
    """The adapter and pruner of a patched model; `NotPatchedError` (pointing at a wrapped model) otherwise."""
    pruner = _pruner(model)
    adapter = None if pruner is None else find_adapter(model)
    problems = adapter_problems() if adapter is None and pruner is not None else []
    if problems:  # patched, but its adapter now fails
        raise UnsupportedModelError(
            f"cannot {action} this {type(model).__name__}: no registered adapter answers for it; " + "; ".join(problems)
        )
    if adapter is None:
        message = f"this {type(model).__name__} is not patched: call patch_model(model, budget) first"
        hint = wrapper_hint(model, action) if isinstance(model, nn.Module) else None
        raise NotPatchedError(f"{message}; {hint}" if hint else message)
    return adapter, pruner


def _pruner(model: object) -> TokenPruner | None:
    pruner = getattr(model, "token_pruner", None)
    return pruner if isinstance(pruner, TokenPruner) else None
