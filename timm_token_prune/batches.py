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
    raise TypeError(
        "batches must be image tensors, (images, labels[, teacher_logits]) tuples or dicts with 'pixel_values' "
        f"(and 'labels', 'teacher_logits'); got {type(batch).__name__}"
    )


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
