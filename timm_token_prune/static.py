"""Static-shape mode: fixed per-stage keep counts for `torch.compile`, ONNX export and dense batching.

The adaptive mode gives each image its own token counts (the method's point, and batch invariant),
at the price of data-dependent shapes: one host sync per pruning point, padded/packed batches, graph
breaks. `freeze` replaces the thresholds' decisions by top-k with counts fixed per stage, chosen on
sample data so that the FLOPs match the adaptive model's mean; every image then costs the same.
`unfreeze` returns to the adaptive mode (the thresholds are kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .api import forward_images, get_pruner, measure, sample_images
from .pruner import PruneStats


@torch.no_grad()
def freeze(model: nn.Module, batches: Iterable[Any]) -> PruneStats:
    """Switch a patched model to fixed per-stage keep counts measured on `batches` (adaptive mode first).

    Returns the statistics of the frozen model on the same batches (its `flops_ratio` matches the
    adaptive mean within rounding to whole tokens)."""
    pruner = get_pruner(model)
    if pruner.fixed_counts:
        raise ValueError("this model already has fixed counts (keep_policy='topk' or frozen); call unfreeze(model) first")
    images = sample_images(pruner, batches, "freeze")
    was_training = model.training
    model.eval()
    try:
        counts, macs = [], []
        for x in images:
            forward_images(model, x)
            if pruner.state.layout.initial_valid is not None:
                raise ValueError(
                    "freeze samples must be unpadded batches (every image the same size): this one is a padded "
                    "NaFlex batch, whose per-image counts cannot be turned into one keep ratio per stage yet; "
                    "freeze on batches of full-size images"
                )
            counts.append(torch.stack([c.double() for c in pruner.state.counts], 1))
            macs.append(torch.as_tensor(pruner.stats().gflops_per_image))
        counts, target = torch.cat(counts).mean(0), torch.cat(macs).mean().item()
        tokens = pruner.state.num_tokens
        prefix = pruner.num_prefix_tokens
        patches = (counts - prefix).tolist()
        ratios = _ratios_for_macs(pruner, patches, tokens, target)
        pruner.set_counts(tuple(ratios), static=True)
        stats = measure(model, pruner, images)
    finally:
        model.train(was_training)
    return stats


def unfreeze(model: nn.Module) -> nn.Module:
    """Back to per-image adaptive counts from the (unchanged) thresholds."""
    pruner = get_pruner(model)
    if pruner.config.keep_policy == "topk":
        raise ValueError("keep_policy='topk' has fixed counts by design: there is no adaptive mode to return to")
    pruner.set_counts(None, static=False)
    return model


def _ratios_for_macs(pruner, patches: list[float], tokens: int, target_gmacs: float) -> list[float]:
    """Keep ratios (of the surviving patches, per stage) whose whole-token counts come closest to
    `target_gmacs` per image, scaling the measured mean counts by a common factor."""
    prefix, flops = pruner.num_prefix_tokens, pruner.flops
    total = tokens - prefix

    def counts_for(scale: float) -> list[int]:
        out, previous = [], total
        for p in patches:
            previous = min(previous, max(pruner.config.min_keep, round(p * scale)))
            out.append(previous)
        return out

    def gmacs(counts: list[int]) -> float:
        return float(flops.macs([prefix + c for c in counts], tokens, total)) / 1e9

    best = min((abs(gmacs(counts_for(s / 100)) - target_gmacs), counts_for(s / 100)) for s in range(80, 121))[1]
    ratios, previous = [], total
    for count in best:
        ratios.append(count / previous)
        previous = count
    return ratios
