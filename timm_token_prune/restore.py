"""`RestoreMap`: where every original token position lives in a pruned token layout, so that the tokens of
any later point can be put back on the full grid (`restore_tokens`). Zoo-independent; eval only.

Each original position p has an anchor: the index, in the current layout, of the token that stands for it.
A kept token anchors itself. When the token anchoring p leaves at a pruning point (dropped or merged),
the anchor moves to its destination, the kept patch token most similar to it there (the one it merges
into); chains across stages resolve because anchors always point at tokens still present. Per fill:
- 'dropped': p's own representation when it left (recorded once, at its first pruning point);
- 'nearest': the anchor's current token;
- 'offset': the anchor's current token plus p's offset from it, summed over the pruning points where
  p's anchor moved (each time: the leaving token minus its destination after merging, so that the
  destination's later updates carry p along).
Memory: (B, N0) anchors, plus one (B, N0, C) tensor for 'dropped' or 'offset'; no N x N matrix is kept.
"""

from __future__ import annotations

import torch

from .core import take_rows as _rows


class RestoreMap:
    """Anchors and fill data of one forward pass; created at its first pruning point."""

    def __init__(self, batch: int, tokens: int, fill: str, device: torch.device) -> None:
        self.fill = fill
        self.anchor = torch.arange(tokens, device=device).expand(batch, -1)  # (B, N0) -> current index
        self.pruned = torch.zeros(batch, tokens, dtype=torch.bool, device=device)  # left at some point
        self.values: torch.Tensor | None = None  # (B, N0, C): 'dropped' representations or 'offset' sums

    def record(self, before: torch.Tensor, arrived: torch.Tensor, leaving: torch.Tensor, destination: torch.Tensor) -> None:
        """One pruning point: tokens `before` (B, N, C), bool `leaving` (B, N) the tokens that leave,
        `destination` (B, N) their kept token, `arrived` (B, N, C) the value of each token's destination
        once merged (or before, when dropping); only the leaving rows of `arrived` are read."""
        moves = leaving.gather(1, self.anchor)  # (B, N0): p's anchor leaves now
        if self.fill == "dropped":
            current = _rows(before, self.anchor)
            self.values = current if self.values is None else torch.where((moves & ~self.pruned)[..., None], current, self.values)
        if self.fill == "offset":  # the step per current token (0 for those staying), then per position
            step = _rows((before - arrived).mul_(leaving[..., None]), self.anchor)
            self.values = step if self.values is None else self.values.add_(step)
        self.anchor = torch.where(moves, destination.gather(1, self.anchor), self.anchor)
        self.pruned = self.pruned | moves  # not in place: ONNX has no in-place or (export_onnx)

    def moved(self, order: torch.Tensor, tokens: int) -> None:
        """The layout of `tokens` tokens was gathered: new token m is old token order[:, m] (a prefix of a
        permutation). Anchors point at kept tokens only, which the gather keeps."""
        batch, count = order.shape
        inverse = self.anchor.new_zeros(batch, tokens)
        inverse.scatter_(1, order, torch.arange(count, device=order.device).expand(batch, -1))
        self.anchor = inverse.gather(1, self.anchor)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens x (B, N, C) in the current (unpacked) layout -> (B, N0, C) in the original order."""
        grid = _rows(x, self.anchor)
        if self.values is None:
            return grid
        if self.fill == "dropped":
            return torch.where(self.pruned[..., None], self.values.to(grid.dtype), grid)
        return torch.where(self.pruned[..., None], grid + self.values.to(grid.dtype), grid)

    def sources(self, positions: torch.Tensor) -> torch.Tensor:
        """The original position (B, N0) of the token that each position's fill is read from, given the
        current tokens' original `positions` (B, N); a kept position reads itself."""
        return positions.gather(1, self.anchor)
