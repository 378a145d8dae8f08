"""Where to prune: default locations and their validation, shared by all adapters."""

from __future__ import annotations

from .errors import UnsupportedModelError


def resolve_locations(locations: tuple[int, ...] | None, depth: int, model_name: str) -> tuple[int, ...]:
    """Block indices before which tokens are pruned: the given ones, checked, or about depth/4, depth/2,
    3 depth/4 (floor(s * depth / 4) + 1: blocks 4, 7, 10 of 12, as the AS-ViT paper)."""
    if locations is None:
        locations = tuple(sorted({s * depth // 4 + 1 for s in (1, 2, 3)} & set(range(1, depth))))
        if not locations:
            raise UnsupportedModelError(f"{model_name} has {depth} block(s): token pruning needs at least 2")
        return locations
    if locations[-1] >= depth:
        raise ValueError(
            f"prune_locations {locations} must be block indices in [1, {depth - 1}] for {model_name} "
            f"with {depth} blocks (tokens are pruned before those blocks)"
        )
    return locations
