"""`TokenLayout`: where each image's tokens are during one forward pass, apart from why they are there.

After a pruning point every image holds a different subset of its tokens, in a new order. The layout
tracks, for the current tokens: the original position of each (`positions`), which rows of a padded
batch are real (`valid`) and the packed form of such a batch (`pack` / `unpack`), how many tokens each
merged one stands for (`sizes`), the order taken at each stage (`kept`, for `kept_positions`), and where
every original position lives (`restore`, for `restore_tokens`). It gathers what follows the tokens:
attention biases, rotary embeddings, training masks. The thresholds, keep policy and FLOPs that decide
which tokens go live in `TokenPruner`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import core
from .restore import RestoreMap


Merge = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PackedGroup:
    """One group of a packed batch's attention (see `TokenLayout.packed_groups`)."""

    index: torch.Tensor  # (G,) the images of the group
    length: int  # tokens of its longest image
    valid: torch.Tensor  # bool (G, length): real tokens
    rows: torch.Tensor  # (G * length,) the packed row each padded position reads
    targets: torch.Tensor  # (G * length,) the packed row each position's output goes to (padding: past the end)


class TokenLayout:
    """The token layout of one forward pass; starts as the embedding's (every token, in order)."""

    # A padded batch is packed when padding x channels exceeds this x its real tokens: packing moves every
    # token's activations (memory, ~C per token) to save the linear layers' work on padding (~C^2 per token)
    pack_min_gain = 32

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None  # eval, bool (B, N): real tokens of a padded batch
        self.pack_index: torch.Tensor | None = None  # eval: flat positions in (B * N) of the packed tokens
        self.unpack_index: torch.Tensor | None = None  # eval: packed row read by each of the B * N positions
        self.positions: torch.Tensor | None = None  # (B, N): original index of each token; None: unmoved
        self.sizes: torch.Tensor | None = None  # merging, float (B, N): tokens each one stands for; None: all 1
        self.kept: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []  # per stage: (order, valid)
        self.restore: RestoreMap | None = None  # eval, restore_tokens: where each original position lives
        self.groups: list[tuple[torch.Tensor, int]] | None = None  # padded batches: attention's image groups
        self.initial_valid: torch.Tensor | None = None  # a batch that arrived padded: its real tokens (B, N0)
        self._packed_groups: list[PackedGroup] | None = None  # `packed_groups`' cache, for the current layout
        self._rope: dict = {}  # gather_rope's cache: (id, stage) -> (rope, gathered rope)

    def begin_padded(self, valid: torch.Tensor) -> None:
        """The batch arrives padded (images of different sizes): `valid` (bool B, N0) marks its real tokens, in
        place (not packed). Padding is hidden as keys from the first patched attention on, and restored grids
        hold zeros there."""
        self.valid = self.initial_valid = valid

    # ---- moving tokens ----------------------------------------------------------------------------
    def unmoved(self) -> None:
        """A pruning point that kept every token where it was."""
        self.kept.append((None, None))

    def move(self, order: torch.Tensor, tokens: int, sizes: torch.Tensor | None = None) -> None:
        """The layout of `tokens` tokens per image was gathered by `order` (B, M): new token m is old token
        order[:, m]. Positions, sizes (or the given new `sizes`) and the restore map follow; `valid` must
        already be the new one."""
        self.kept.append((order, self.valid))
        self.positions = order if self.positions is None else self.positions.gather(1, order)
        if sizes is not None:
            self.sizes = sizes
        elif self.sizes is not None:
            self.sizes = self.sizes.gather(1, order)
        if self.restore is not None:
            self.restore.moved(order, tokens)

    def gather(
        self, x: torch.Tensor, remain: torch.Tensor, merge: Merge | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Move each image's `remain` tokens (bool B, N) of x (B, N, C) to the front and cut the batch to
        the longest; a batch whose images keep different counts is padded, and packed when that saves
        enough (see `pack`). `merge(order, kept, fewest)`, if given, does the moving instead and folds the
        leaving tokens in: `order` (B, N) puts each image's remaining tokens first, `kept` of them are taken,
        `fewest` is the smallest count; it returns the tokens and their sizes. Returns the tokens and the
        order taken (None: nothing moved)."""
        tokens = remain.shape[1]
        counts = remain.sum(dim=1)
        per_image = counts.tolist()  # the one host sync of a pruning point
        most, fewest, total = max(per_image), min(per_image), sum(per_image)
        if fewest == tokens:  # nothing removed, no padding
            self.unmoved()
            return x, None
        order = core.kept_first(remain)
        sizes = None
        if merge is None:
            x = core.take_rows(x, order[:, :most])
        else:
            x, sizes = merge(order, most, fewest)
        self.groups = self._packed_groups = None
        self.valid = self.pack_index = self.unpack_index = None
        if most != fewest:
            self.valid = torch.arange(most, device=x.device) < counts[:, None]
            padding = len(per_image) * most - total
            if padding * x.shape[-1] > self.pack_min_gain * total:
                self.pack_index, self.unpack_index = core.packing(self.valid, total)
            groups = core.attention_groups(per_image)
            if groups is not None:
                self.groups = [(torch.tensor(index, device=x.device), length) for index, length in groups]
        self.move(order[:, :most], tokens, sizes)
        return self.pack(x), order[:, :most]

    def follow(self, values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Per-token values (B, N) of the layout before `gather` -> the new layout's (padding zeroed)."""
        values = values.gather(1, order)
        return values if self.valid is None else values * self.valid

    # ---- packed batches ---------------------------------------------------------------------------
    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) padded tokens -> (1, T, C) with only the real ones, when the batch is packed (padded,
        with enough padding to be worth it: `pack_min_gain`).

        Blocks then run their linear layers on real tokens only; attention unpacks them (`unpack`)."""
        return x if self.pack_index is None else x.flatten(0, 1).index_select(0, self.pack_index)[None]

    def unpack(self, x: torch.Tensor, zero_padding: bool = False) -> torch.Tensor:
        """Inverse of `pack`: (1, T, C) -> (B, N, C). Padding holds a copy of the image's first token
        (finite, and hidden as a key), or zeros with `zero_padding`."""
        if self.pack_index is None:
            return x if not zero_padding or self.valid is None else x.masked_fill(~self.valid[..., None], 0)
        batch, tokens = self.valid.shape
        if zero_padding:
            out = x.new_zeros(batch * tokens, x.shape[-1]).index_copy_(0, self.pack_index, x[0])
        else:
            out = x[0].index_select(0, self.unpack_index)
        return out.view(batch, tokens, -1)

    def packed_groups(self) -> list[PackedGroup]:
        """A packed batch whose attention runs in groups (`groups`): for each group, where its padded rows
        come from and go to in the packed tokens, so attention reads and writes packed rows directly (no
        unpacking of the whole batch, no copies per group of q, k and v). Cached for the current layout."""
        if self._packed_groups is None:
            batch, tokens = self.valid.shape
            unpacked = self.unpack_index.view(batch, tokens)
            total = self.pack_index.shape[0]
            self._packed_groups = []
            for index, length in self.groups:
                valid = self.valid[:, :length].index_select(0, index)
                rows = unpacked[:, :length].index_select(0, index).flatten()
                # padding rows read the image's first token; their outputs go to spare rows past the end
                spare = torch.arange(total, total + rows.shape[0], device=rows.device)
                self._packed_groups.append(PackedGroup(index, length, valid, rows, rows.where(valid.flatten(), spare)))
        return self._packed_groups

    # ---- what follows the tokens ------------------------------------------------------------------
    def gather_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """An attention bias over the original tokens (B or 1, H, N0, N0) -> the current tokens' rows and
        columns (B, H, N, N); unchanged while no token has moved."""
        return bias if self.positions is None else core.gather_bias(bias, self.positions)

    def gather_rope(self, rope: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """Rotary embeddings over the original patches -> those of each image's current patches (cached per
        layout, so blocks sharing one rope tensor gather it once)."""
        if self.positions is None:
            return rope
        key = (id(rope), len(self.kept))  # the cache holds `rope` itself, so its id stays unique
        cached = self._rope.get(key)
        if cached is None or cached[0] is not rope:
            cached = self._rope[key] = (rope, core.gather_rope(rope, self.positions, num_prefix))
        return cached[1]

    def pool_weights(self, soft_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Weights (B, N) of the current tokens for average pooling, or None when all count equally."""
        weights = soft_mask if soft_mask is not None else self.valid
        if self.sizes is None:
            return weights
        return self.sizes if weights is None else weights * self.sizes

    # ---- reading the layout -----------------------------------------------------------------------
    def kept_positions(self, num_tokens: int, batch: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """For each stage, the original token positions (B, N_s) that entered it and their validity mask
        (None: all valid)."""
        index = torch.arange(num_tokens, device=device).expand(batch, -1)
        positions, valid = [], self.initial_valid
        for order, stage_valid in self.kept:
            if order is not None:
                index, valid = index.gather(1, order), stage_valid
            positions.append((index, valid))
        return positions

    def record_merge(
        self, fill: str, leaving: torch.Tensor, destination: torch.Tensor, rows: torch.Tensor, fills: torch.Tensor | None
    ) -> None:
        """restore_tokens: the tokens `leaving` (B, N) went to their `destination` (B, N) kept token;
        `rows` (B, R) and `fills` (B, R, C): see `RestoreMap.record`."""
        if self.restore is None:
            self.restore = RestoreMap(leaving.shape[0], leaving.shape[1], fill, leaving.device)
        self.restore.record(leaving, destination, rows, fills)

    def restored(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens x of the current layout (packed or padded) -> (B, N0, C) in the original order, each
        pruned position filled (see `RestoreMap`); x unpacked when nothing was pruned. Padding of a batch that
        arrived padded (`begin_padded`) is zeros."""
        x = self.unpack(x)
        grid = x if self.restore is None else self.restore.restore(x)
        if self.initial_valid is not None:
            grid = grid.masked_fill(~self.initial_valid[..., None], 0)
        return grid

    def restored_sources(self, fill: str) -> torch.Tensor | None:
        """The original position (B, N0) each restored position's fill comes from (itself when kept or with
        fill 'dropped'); None when nothing was pruned."""
        if self.restore is None:
            return None
        anchor = self.restore.anchor
        own = torch.arange(anchor.shape[1], device=anchor.device).expand_as(anchor)
        if fill == "dropped":
            return own
        return self.restore.sources(own if self.positions is None else self.positions)
