"""ONNX export of a pruned model in static-shape mode (see `static.freeze`)."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .api import get_pruner


class _Logits(nn.Module):
    """The model's class logits as a plain tensor (timm returns one; transformers returns an output object)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from .batches import logits_of

        return logits_of(self.model(pixel_values))


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor, *, opset: int = 17) -> Path:
    """Export a frozen (static-shape) pruned model to ONNX with a dynamic batch dimension; input
    "pixel_values", output "logits". Written to a temporary file, then renamed."""
    pruner = get_pruner(model)
    if not pruner.fixed_counts:
        raise ValueError(
            "ONNX needs static shapes: call timm_token_prune.freeze(model, batches) first "
            "(adaptive per-image token counts are data-dependent)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about Python ints taken from shapes (token counts): fixed in static mode
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                _Logits(model), (example,), tmp, dynamo=False, opset_version=opset,
                input_names=["pixel_values"], output_names=["logits"],
                dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
