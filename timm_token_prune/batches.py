"""What a batch and a model output look like, across timm and transformers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(images, labels or None, cached teacher logits or None) from a tensor, an (images[, labels[,
    teacher_logits]]) tuple or an HF-style dict ('pixel_values', 'labels', 'teacher_logits')."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping) and "pixel_values" in batch:
        return batch["pixel_values"], batch.get("labels", batch.get("label")), batch.get("teacher_logits")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        rest = [b if isinstance(b, torch.Tensor) else None for b in batch[1:3]]
        return (batch[0], *rest, *[None] * (2 - len(rest)))
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    got = type(batch).__name__ + (f" whose first item is of type {type(first).__name__}" if first is not batch else "")
    hint = ": convert the images to a (B, 3, H, W) tensor first (the model's transform)" if "Image" in got else ""
    raise TypeError(
        "batches must be image tensors, (images, labels[, teacher_logits]) tuples or dicts with 'pixel_values' "
        f"(and 'labels', 'teacher_logits'); got {'an' if got[0] in 'AEIOUaeiou' else 'a'} {got}{hint}"
    )


_NAFLEX_INPUTS = ("pixel_attention_mask", "spatial_shapes")  # SigLIP 2: padded patches and each image's grid


def model_inputs(batch: Any) -> torch.Tensor | dict[str, Any]:
    """What calibrate and freeze pass to the model: the images, or, for a NaFlex dict batch ('pixel_values',
    'pixel_attention_mask', 'spatial_shapes'), those three as keywords. Anything else in a dict (labels,
    text inputs, ids) is not an image input and is left out."""
    if isinstance(batch, Mapping) and "pixel_values" in batch and any(k in batch for k in _NAFLEX_INPUTS):
        return {k: batch[k] for k in ("pixel_values", *_NAFLEX_INPUTS) if k in batch}
    return split_batch(batch)[0]


def run_model(model: Any, inputs: torch.Tensor | Mapping[str, Any]) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def images_in(inputs: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
    return inputs["pixel_values"] if isinstance(inputs, Mapping) else inputs


def map_inputs(inputs: torch.Tensor | Mapping[str, Any], fn) -> torch.Tensor | dict[str, Any]:
    """`fn` applied to the images, or to every tensor of a dict of model inputs (all have the batch first)."""
    if isinstance(inputs, Mapping):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return fn(inputs)


def cat_inputs(batches: list) -> torch.Tensor | dict[str, Any]:
    """Batches of model inputs (all tensors, or all dicts with the same keys and shapes) as one."""
    if isinstance(batches[0], Mapping):
        return {k: torch.cat([b[k] for b in batches]) if isinstance(v, torch.Tensor) else v for k, v in batches[0].items()}
    return torch.cat(batches)


def logits_of(output: Any) -> torch.Tensor:
    """Class logits from a timm output (a tensor, or the two heads of distilled DeiT) or an HF output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output):
        return (output[0] + output[1]) / 2
    value = getattr(output, "logits", None)
    if value is None:
        raise TypeError(f"cannot find class logits in a {type(output).__name__}: distill needs a classifier")
    return value
