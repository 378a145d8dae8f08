"""Where to prune: the named schedules and the validation of given block indices, shared by all adapters."""

from __future__ import annotations

from .errors import UnsupportedModelError


def schedule(name: str, depth: int) -> tuple[int, ...]:
    """Block indices of a named schedule (see `PruneConfig.prune_locations`) for a model of `depth` blocks."""
    if name == "every_block":
        return tuple(range(1, depth))
    if name == "every_other_block":
        return tuple(range(2, depth, 2)) or tuple(range(1, depth))
    if name == "paper":  # AS-ViT: about depth/4, depth/2, 3 depth/4 (blocks 4, 7, 10 of 12)
        return tuple(sorted({s * depth // 4 + 1 for s in (1, 2, 3)} & set(range(1, depth))))
    raise ValueError(f"unknown pruning schedule {name!r}")


def resolve_locations(locations: tuple[int, ...] | str, depth: int, model_name: str) -> tuple[int, ...]:
    """Block indices before which tokens are pruned: a named schedule's, or the given ones, checked."""
    if depth < 2:
        raise UnsupportedModelError(f"{model_name} has {depth} block(s): token pruning needs at least 2")
    if isinstance(locations, str):
        return schedule(locations, depth)
    if locations[-1] >= depth:
        raise ValueError(
            f"prune_locations {locations} must be block indices in [1, {depth - 1}] for {model_name} "
            f"with {depth} blocks (tokens are pruned before those blocks)"
        )
    return locations
