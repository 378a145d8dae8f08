"""ONNX export of a pruned model in static-shape mode (see `static.freeze`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .adapters import patched_adapter
from .files import atomic_file


class _Output(nn.Module):
    """One plain tensor out: class logits (timm returns them; transformers wraps them in an output object),
    or a feature model's pooled features."""

    def __init__(self, model: nn.Module, classifier: bool, adapter) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.adapter = adapter  # runs the image path (an image-text model: get_image_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from .batches import logits_of

        output = self.adapter.forward_images(self.model, pixel_values)
        if self.classifier or isinstance(output, torch.Tensor):
            return logits_of(output)
        for key in _FEATURES:
            if getattr(output, key, None) is not None:
                return getattr(output, key)
        raise ValueError(
            f"export_onnx exports class logits or pooled features; this {type(self.model).__name__} returns "
            "neither: export a model with a classification head"
        )


_FEATURES = ("image_embeds", "pooler_output")  # what a transformers feature model's output is, in order


def export_onnx(model: nn.Module, path: str | os.PathLike, example: torch.Tensor, *, opset: int = 17) -> Path:
    """Export a frozen (static-shape) pruned model to ONNX with a dynamic batch dimension; input
    "pixel_values", output "logits" (a classifier) or "features" (the pooled features of a model without
    a head). Written to a temporary file, then renamed; the file gets the permissions the umask allows."""
    adapter, pruner = patched_adapter(model, "export")
    adapter.check_exportable(model)
    if not pruner.fixed_counts:
        raise ValueError(
            "ONNX needs static shapes: call timm_token_prune.freeze(model, batches) first "
            "(adaptive per-image token counts are data-dependent)"
        )
    adapter.check_images(model, example)
    if len(example) == 0:
        raise ValueError(
            "export_onnx needs an example batch of at least one image, got an empty one (shape "
            f"{tuple(example.shape)}): it would trace the dense path; pass e.g. torch.randn(1, C, H, W)"
        )
    classifier = adapter.is_classifier(model)
    output_name = "logits" if classifier else "features"
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with atomic_file(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about Python ints taken from shapes (token counts): fixed in static mode
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                _Output(model, classifier, adapter), (example,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["pixel_values"], output_names=[output_name],
                dynamic_axes={"pixel_values": {0: "batch"}, output_name: {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return path

