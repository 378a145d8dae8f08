"""What the adapters share: the pruner with its FLOPs model, which layers score which stage, pixel checks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..config import PruneConfig
from ..flops import FlopsModel, linear_macs
from ..pruner import TokenPruner


def new_pruner(
    config: PruneConfig,
    locations: tuple[int, ...],
    *,
    patch_conv: nn.Conv2d,
    layers: Sequence[nn.Module],
    head_macs: int,
    attn_dim: int,
    class_token: bool,
    num_prefix_tokens: int,
    num_patches: int,
    pool_per_token: int = 0,
) -> TokenPruner:
    """The `TokenPruner` of a ViT and its FLOPs model. `head_macs`: per image, after the blocks;
    `attn_dim`: heads x head dim; `pool_per_token`: an attention pool's key / value MACs per token."""
    kernel = patch_conv.kernel_size[0] * patch_conv.kernel_size[1]
    flops = FlopsModel(
        embed_per_patch=patch_conv.out_channels * patch_conv.in_channels // patch_conv.groups * kernel,
        head=head_macs,
        linear_per_token=linear_macs(layers[0]),
        attn_per_pair=2 * attn_dim,
        score_per_token=attn_dim if class_token else 0,
        score_per_pair=0 if class_token else attn_dim,
        pool_per_token=pool_per_token,
        depth=len(layers),
        locations=locations,
    )
    return TokenPruner(config, flops, num_prefix_tokens, num_patches, class_token=class_token)


def pruned_layers(layers: Sequence[nn.Module], locations: tuple[int, ...]) -> Iterator[tuple[int, nn.Module, int | None]]:
    """(index, layer, stage) for every layer from the first scoring one on. `stage` is the pruning stage
    whose scores the layer computes (the layer just before each location), else None."""
    scoring = {location - 1: stage for stage, location in enumerate(locations)}
    for index, layer in enumerate(layers):
        if index >= locations[0] - 1:
            yield index, layer, scoring.get(index)


def check_pixels(x: object, channels: int, what: str) -> None:
    """Raise `ValueError` unless `x` is a (B, channels, H, W) tensor (`what` names it in the message)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected {what} of shape (B, {channels}, H, W), got {shape}")
