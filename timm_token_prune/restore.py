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

    def record(self, leaving: torch.Tensor, destination: torch.Tensor, rows: torch.Tensor, fills: torch.Tensor | None) -> None:
        """One pruning point. `leaving` (bool B, N): the current tokens that leave now; `destination` (B, N):
        each token's kept token; `rows` (B, R): current tokens among which are all the leaving ones, and
        `fills` (B, R, C) their fill data: 'dropped' the tokens themselves, 'offset' each token minus its
        destination once merged (or as it was, when dropping); None for 'nearest'. Only the positions whose
        anchor leaves are written, so the cost grows with the tokens that leave."""
        moves = leaving.gather(1, self.anchor)  # (B, N0): p's anchor leaves now
        if fills is not None:
            # where each current token's fill data is in `fills` (R: nowhere, never read)
            count = rows.shape[1]
            slot = torch.full_like(destination, count).scatter_(1, rows, torch.arange(count, device=rows.device).expand_as(rows))
            written = moves if self.fill == "offset" else moves & ~self.pruned  # 'dropped': at p's first move only
            self._write(written, slot.gather(1, self.anchor), fills)
        self.anchor = torch.where(moves, destination.gather(1, self.anchor), self.anchor)
        self.pruned = self.pruned | moves  # not in place: ONNX has no in-place or (export_onnx)

    def _write(self, written: torch.Tensor, source: torch.Tensor, fills: torch.Tensor) -> None:
        """Add ('offset') or copy ('dropped') the rows `source` (B, N0) of `fills` (B, R, C) at the `written`
        positions (bool B, N0) of the fill data."""
        batch, count, channels = fills.shape
        if self.values is None:
            self.values = fills.new_zeros(batch, self.anchor.shape[1], channels)
        fills = fills.to(self.values.dtype)  # a later point may run in another dtype (autocast regions)
        # static shapes (tracing, torch.compile) or an accelerator (no host sync): every position reads a row,
        # a zero row where none is written; on CPU only the written rows are touched
        if torch.jit.is_tracing() or torch.compiler.is_compiling() or fills.device.type != "cpu":
            table = torch.cat([fills, fills.new_zeros(batch, 1, channels)], dim=1)
            picked = _rows(table, source.masked_fill(~written, count))
            self.values = self.values + picked if self.fill == "offset" else torch.where(written[..., None], picked, self.values)
            return
        image, position = written.nonzero(as_tuple=True)
        picked = fills.reshape(-1, channels).index_select(0, image * count + source[image, position])
        target, flat = image * self.anchor.shape[1] + position, self.values.view(-1, channels)
        if self.fill == "offset":
            flat.index_add_(0, target, picked)
        else:
            flat.index_copy_(0, target, picked)

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
