"""Analytic FLOPs model of a ViT with token pruning, in multiply-accumulates (MACs).

Counts what dominates and what `torch.utils.flop_counter` counts: the patch-embedding convolution,
every linear layer of the blocks, both attention matmuls (Q K^T and A V: the N^2 terms), the class-row
score of each scoring block, and the classifier head. Norms, activations and softmax are left out,
as the papers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


def linear_macs(module: nn.Module) -> int:
    """MACs per token of every `nn.Linear` inside `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class FlopsModel:
    embed_per_patch: int  # patch-embedding MACs per patch
    head: int  # classifier MACs per image
    linear_per_token: int  # per block: qkv, proj, MLP (and any other linear)
    attn_per_pair: int  # per block: Q K^T + A V MACs per (query, key) pair = 2 * attention dim
    score_per_token: int  # per scoring block: q_cls . K^T
    depth: int
    locations: tuple[int, ...]  # block index where each pruning stage starts
    score_per_pair: int = 0  # per scoring block without a class token: the full Q K^T of the mean received attention
    pool_per_token: int = 0  # attention pooling (MAP): key / value projections of the final tokens
    merge_per_pair: int = 0  # per pruning point with merging or novelty: the similarity of every pair of its tokens

    def block_macs(self, n: torch.Tensor | float) -> torch.Tensor | float:
        return self.linear_per_token * n + self.attn_per_pair * n * n

    def macs(self, counts: Sequence[torch.Tensor | float], num_tokens: int, num_patches: int, scoring: bool = True):
        """MACs per image; `counts[s]` = tokens entering pruning stage s + 1 (per image), `num_tokens` before
        the first. `scoring=False` leaves out the score computation (the unpatched model)."""
        bounds = (0, *self.locations, self.depth)
        total = self.embed_per_patch * num_patches + self.head
        tokens = [num_tokens, *counts]
        for stage, n in enumerate(tokens):
            total = total + (bounds[stage + 1] - bounds[stage]) * self.block_macs(n)
            if scoring and stage < len(self.locations):
                total = total + self.score_per_token * n + (self.score_per_pair + self.merge_per_pair) * n * n
        pooled = tokens[-1] if self.pool_per_token else 0  # MAP reads the tokens, prefix tokens included
        return total + self.pool_per_token * pooled

    def dense_macs(self, num_tokens: int, num_patches: int) -> float:
        """MACs per image of the unpatched model."""
        return float(self.macs([num_tokens] * len(self.locations), num_tokens, num_patches, scoring=False))


def schedule_ratio(
    flops: FlopsModel, rho: float, num_tokens: int, num_patches: int, num_prefix: int, min_keep: int = 1
) -> float:
    """FLOPs ratio (to dense) of keeping the fraction rho of the surviving patch tokens at every stage (a
    geometric schedule: rho, rho^2, rho^3 of the patches remain), with equal counts per image."""
    counts = [num_prefix + max(min_keep, num_patches * rho ** (s + 1)) for s in range(len(flops.locations))]
    return float(flops.macs(counts, num_tokens, num_patches)) / flops.dense_macs(num_tokens, num_patches)


def solve_keep_ratio(
    flops: FlopsModel, budget: float, num_tokens: int, num_patches: int, num_prefix: int, min_keep: int = 1
) -> float:
    """The fraction rho of the geometric schedule (`schedule_ratio`) that meets `budget` x dense MACs."""

    def ratio(rho: float) -> float:
        return schedule_ratio(flops, rho, num_tokens, num_patches, num_prefix, min_keep)

    if budget >= 1.0:
        return 1.0
    if ratio(0.0) > budget:
        raise ValueError(
            f"budget {budget} is unreachable: keeping only the prefix tokens and min_keep patches at the "
            f"pruning locations {flops.locations} still costs {ratio(0.0):.3f} of the dense FLOPs; "
            "raise the budget or prune earlier (prune_locations)"
        )
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < budget else (lo, mid)
    return lo
