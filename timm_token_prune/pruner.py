"""`TokenPruner`: the learnable thresholds and the per-forward state shared by a model's patched blocks.

Adapters call three hooks from the patched modules:
`begin()` at the start of the model's forward, `attention()` in each attention after the first
pruning point (and in the scoring ones), `prune()` at the end of each scoring block.
The pruner decides which tokens go (scores, keep policy, thresholds, training masks, FLOPs); where the
remaining tokens are (order, padding, packing, sizes, the restore map) is the `TokenLayout`'s business.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import core
from .config import REFERENCE_NUM_PATCHES, REFERENCE_THRESHOLDS, PruneConfig
from .flops import FlopsModel, solve_keep_ratio
from .layout import Merge, TokenLayout

_KEEP_ALL = -1.0  # every policy's statistic is >= 0, so this threshold keeps every token
FAR_IN_TEMPERATURES = 20.0  # training: pruned tokens this far below their threshold leave the forward
# 'mass': the temperature is at most this fraction of the stage's threshold, so a threshold that holds little
# of the score mass (DINOv2 puts most class attention on a few tokens) gets a proportionally sharp mask
MASS_RELATIVE_TEMPERATURE: float | None = 0.025
_MASS_STEP = 0.05  # 'mass' thresholds before calibration: 5%, 10%, 15% of the score mass may go


class StopForward(Exception):
    """Raised by `prune()` at `state.stop_after` to end a calibration pass early."""


class ForwardState:
    """What one forward pass knows about its tokens; replaced by `TokenPruner.begin()`."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.num_tokens: int | None = None  # tokens per image before any pruning
        # a batch begun with padding (`begin(valid=...)`): each image's real tokens (B,) before any pruning
        self.tokens_per_image: torch.Tensor | None = None
        self.layout = TokenLayout()  # where the tokens are: order, padding, packing, sizes, restore map
        self.soft_mask: torch.Tensor | None = None  # train, float (B, N): straight-through keep mask
        self.scores: torch.Tensor | None = None  # scores of the current scoring block
        self.counts: list[torch.Tensor] = []  # tokens per image entering each pruned stage
        self.stage_scores: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (scores, eligible)
        self.pool_source: torch.Tensor | None = None  # adapters: tokens a mean-pooling head reads
        self.restored: torch.Tensor | None = None  # adapters: the restored grid last returned (see pool_source)
        self.kept_final: torch.Tensor | None = None  # transformers, restoring: the last layer's kept tokens
        self.head_source: torch.Tensor | None = None  # transformers, restoring: normed kept tokens for a head
        self.hidden_grids: dict[int, torch.Tensor] | None = None  # transformers: layer index -> restored grid
        self.stop_after = stop_after
        self.scored = True  # False: every threshold kept every token, nothing was scored (costs no score FLOPs)
        self.training = False  # whether the pass ran in training mode (no eval-only answers then)
        self.empty = False  # a batch of 0 images: nothing to score or prune


@dataclass
class PruneStats:
    """Statistics of the last forward pass (see `last_stats`)."""

    locations: tuple[int, ...]  # block indices where the pruned stages start
    tokens: int  # tokens per image before pruning, prefix tokens included
    kept_mean: list[float]  # per stage: tokens per image entering it (prefix included), batch mean
    kept_min: list[float]
    kept_max: list[float]
    gflops: float  # GMACs per image, batch mean
    gflops_per_image: list[float]
    dense_gflops: float  # GMACs per image of the unpatched model
    flops_ratio: float  # gflops / dense_gflops (a padded batch: the mean of each image's ratio)
    dense_gflops_per_image: list[float] | None = None  # each image's dense cost (a padded batch: its real tokens)


class TokenPruner(nn.Module):
    """Holds the per-stage thresholds (the only new parameters) and the state of the last forward."""

    def __init__(
        self,
        config: PruneConfig,
        flops: FlopsModel,
        num_prefix_tokens: int,
        num_patches: int,
        class_token: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        if config.pruned_tokens == "merge" or config.novelty or config.restore_tokens:  # the token similarity
            flops = dataclasses.replace(flops, merge_per_pair=flops.attn_per_pair // 2)
        self.flops = flops
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = num_patches  # at the model's default image size
        # with a class token (token 0) scores are its attention row; without, the mean attention received
        self.class_token = class_token
        stages = len(flops.locations)
        if config.min_keep > num_patches:
            raise ValueError(
                f"min_keep={config.min_keep} is more than the {num_patches} patch tokens this model has at its "
                f"input size, so nothing could be pruned: pass a min_keep of at most {num_patches}"
            )
        if config.threshold_init is not None:
            if len(config.threshold_init) != stages:
                raise ValueError(
                    f"threshold_init has {len(config.threshold_init)} values for {stages} pruning stages "
                    f"(prune_locations={flops.locations}): give one per stage"
                )
            init = list(config.threshold_init)
        elif config.budget >= 1.0:
            init = [_KEEP_ALL] * stages
        else:
            # the paper's three thresholds, spread over however many stages there are
            step = _MASS_STEP if config.keep_policy == "mass" else REFERENCE_THRESHOLDS[0] * REFERENCE_NUM_PATCHES
            init = [step * 3 * (s + 1) / stages for s in range(stages)]
        self.thresholds = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        ratios = config.keep_ratios
        if ratios is not None and len(ratios) != stages:
            raise ValueError(f"keep_ratios needs one value per pruning stage ({stages}), got {ratios}")
        if ratios is None and config.keep_policy == "topk":
            tokens = num_prefix_tokens + num_patches
            rho = solve_keep_ratio(flops, config.budget, tokens, num_patches, num_prefix_tokens, config.min_keep)
            ratios = (rho,) * stages
        # run-time state, saved with the thresholds: the top-k fractions (set by `calibrate` and `freeze`; 0:
        # unset) and whether `freeze` switched an adaptive model to those fixed counts
        self.register_buffer("keep_ratios", torch.tensor(ratios or (0.0,) * stages, dtype=torch.float32))
        self.register_buffer("static", torch.tensor(config.keep_policy == "topk"))
        # whether the thresholds were set for this model (calibrate, a checkpoint, or given): distill calibrates
        # them on its first batches otherwise
        given = config.threshold_init is not None or config.budget >= 1.0 or config.keep_policy == "topk"
        self.register_buffer("calibrated", torch.tensor(given))
        self._mirror_buffers()
        self._state: ForwardState | None = None
        # training forward: pruned tokens far from their threshold leave it (False: all stay, hidden as keys)
        self.drop_in_training = True
        self._keeps_all: tuple[int, bool] = (-1, False)  # (thresholds version, every threshold keeps all)
        self.stop_after: int | None = None  # calibration: end forward passes at this stage's scores
        # calibration in one pass: (statistic, eligible) -> the stage's threshold, set as the forward reaches it
        self.calibrating: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | float] | None = None
        # eval: warn once, at the end of the first forward, when the thresholds were never set (`_check_budget`);
        # False while `calibrate` runs, and once warned
        self.warn_if_uncalibrated = True
        self._initial_thresholds = tuple(init)  # other values since: trained (e.g. by a Trainer) or set by hand

    def set_counts(self, keep_ratios: tuple[float, ...] | None, static: bool) -> None:
        """Set the top-k fractions (None: unset) and whether every image keeps those fixed counts."""
        with torch.no_grad():
            self.keep_ratios.copy_(torch.tensor(keep_ratios or (0.0,) * len(self.locations)))
            self.static.fill_(static or self.config.keep_policy == "topk")
        self._mirror_buffers()

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def mark_calibrated(self) -> None:
        with torch.no_grad():
            self.calibrated.fill_(True)
        self._mirror_buffers()

    def _mirror_buffers(self) -> None:
        """Plain-Python copies of the count buffers, so forward passes read them without a device sync."""
        self._ratios = tuple(self.keep_ratios.tolist())
        self._static = bool(self.static)
        self._calibrated = bool(self.calibrated)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mirror_buffers()

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's tensors (they may be part of an autograd graph)."""
        state = self.__dict__.copy()
        state["_state"] = None
        state["_keeps_all"] = (-1, False)  # the copy's thresholds count versions afresh
        return state

    @property
    def locations(self) -> tuple[int, ...]:
        return self.flops.locations

    @property
    def state(self) -> ForwardState:
        if self._state is None:
            raise RuntimeError("no forward pass has run through the patched model yet: call model(images) first")
        return self._state

    def begin(self, batch_size: int | None = None, valid: torch.Tensor | None = None) -> None:
        """Start a forward pass. An empty batch (0 images) runs the zoo's own code, which returns empty outputs.

        `valid` (bool B x N, prefix tokens included): the real tokens of a batch that arrives padded (images of
        different sizes, e.g. NaFlex); padding tokens do not exist for pruning: never kept, merged, scored,
        pooled or counted in FLOPs, and each image's budget is taken over its own real tokens. One host sync."""
        self._state = ForwardState(self.stop_after)
        self._state.empty = batch_size == 0
        self._state.training = self.training
        if valid is not None and not self._state.empty:
            valid = valid.to(torch.bool)
            self._state.tokens_per_image = valid.sum(dim=1)
            if not bool(valid.all()):
                self._state.layout.begin_padded(valid)

    @property
    def merging(self) -> bool:
        """Whether pruned tokens are merged into kept ones (else dropped)."""
        return self.config.pruned_tokens == "merge"

    @property
    def restoring(self) -> bool:
        """Whether this forward records where pruned tokens go, to restore the full grid (eval only)."""
        return self.config.restore_tokens and not self.training

    def plain_attention(self, stage: int | None) -> bool:
        """Whether the zoo's own attention can stand in: nothing to hide or weigh, and no score wanted."""
        return (stage is None or not self.scoring() or self.state.empty) and not self.masking()

    def scoring(self) -> bool:
        """Whether scoring attentions compute scores: not when every threshold keeps every token (budget 1.0),
        so a model patched at 1.0 runs the zoo's own attention throughout. Calibration passes always score."""
        if self.fixed_counts or self.stop_after is not None or self.calibrating is not None:
            return True
        version = self.thresholds._version  # bumped by every in-place change: optimiser steps, copy_, fill_
        if self._keeps_all[0] != version:
            self._keeps_all = (version, bool((self.thresholds < 0).all()))
        return not self._keeps_all[1]

    def masking(self) -> bool:
        """Whether attentions must hide or weigh some keys (padding in eval, pruned tokens in training, merged
        tokens), so that the zoo's own attention cannot stand in."""
        state = self.state
        return state.layout.valid is not None or state.soft_mask is not None or state.layout.sizes is not None

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        dropout_p: float,
        stage: int | None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked fused attention; a scoring attention (`stage` set) also records the token scores.
        `bias`: an additive attention bias in the current token layout (see `gather_bias`)."""
        state, layout = self.state, self.state.layout
        if state.num_tokens is None:
            state.num_tokens = int(q.shape[2])  # a plain int, also when traced for export
        if layout.sizes is not None:
            sizes = core.size_bias(layout.sizes, q.dtype)
            bias = sizes if bias is None else bias + sizes
        if layout.groups is not None and state.soft_mask is None and not dropout_p:  # a padded inference batch
            context = core.attend_grouped(q, k, v, layout.groups, valid=layout.valid, bias=bias, scale=scale)
        else:
            context = core.attend(
                q, k, v, valid=layout.valid, soft_mask=state.soft_mask, bias=bias, dropout_p=dropout_p, scale=scale
            )
        if stage is not None:
            # earlier masks enter the score detached: a threshold must not steer later stages through the
            # re-normalised class attention (see _mask)
            earlier = None if state.soft_mask is None else state.soft_mask.detach()
            state.scores = self._scores(q, k, context, scale, layout.valid, bias, layout.sizes, earlier)
        return context

    def _scores(self, q, k, context, scale: float, valid, bias, sizes, soft_mask=None) -> torch.Tensor:
        """The token scores (B, N) of a scoring attention (`core.token_scores` with this config's score)."""
        return core.token_scores(
            q, k, context, scale=scale, method=self.config.score, class_token=self.class_token,
            valid=valid, soft_mask=soft_mask, bias=bias, sizes=sizes,
        )

    def attends_packed(self) -> bool:
        """Whether attention may read q, k, v straight from packed tokens (`attention_packed`): an inference
        batch that is packed and attends in groups of images."""
        layout = self.state.layout
        return not self.training and layout.groups is not None and layout.pack_index is not None

    def attention_packed(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        *,
        scale: float,
        stage: int | None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """`attention` on a packed batch (`attends_packed`), from the packed q | k | v (1, T, 3 C) to the packed
        context (1, T, C): one fused attention per group of images, each reading its rows from the packed
        tokens and writing its real rows back, so the batch is never unpacked whole."""
        state, layout = self.state, self.state.layout
        flat = qkv[0]
        total, channels = flat.shape[0], flat.shape[1] // 3
        groups = layout.packed_groups()
        out = flat.new_empty(total + max(len(g.rows) for g in groups), channels)  # past `total`: padding rows
        scores = None if stage is None else flat.new_zeros(layout.valid.shape)
        for group in groups:
            images = len(group.index)
            q, k, v = flat.index_select(0, group.rows).view(images, group.length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            sizes = None if layout.sizes is None else layout.sizes[:, : group.length].index_select(0, group.index)
            bias = None if sizes is None else core.size_bias(sizes, q.dtype)
            context = core.attend(q, k, v, valid=group.valid, bias=bias, scale=scale)
            if scores is not None:
                part = self._scores(q, k, context, scale, group.valid, bias, sizes)
                scores[:, : group.length].index_copy_(0, group.index, part)
            out.index_copy_(0, group.targets, context.transpose(1, 2).reshape(-1, channels))
        if scores is not None:
            state.scores = scores
        return out[:total][None]

    def gather_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """See `TokenLayout.gather_bias`."""
        return self.state.layout.gather_bias(bias)

    def gather_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """See `TokenLayout.gather_rope`."""
        return self.state.layout.gather_rope(rope, self.num_prefix_tokens)

    def prune(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Drop or merge (eval) or mask (train) the tokens of `x` that the last scoring attention rated low."""
        x = self._prune(x, stage)
        if not self._calibrated and self.warn_if_uncalibrated and stage == len(self.locations) - 1:
            self._check_budget()
        return x

    def _check_budget(self) -> None:
        """Eval, thresholds never set (by calibrate, from_pretrained or threshold_init): warn once, with the
        FLOPs ratio this forward ran at. Only the uncalibrated path pays for the ratio's host sync."""
        if self.training or self.state.empty or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        self.warn_if_uncalibrated = False
        initial = torch.tensor(self._initial_thresholds, dtype=self.thresholds.dtype)
        if not torch.equal(self.thresholds.detach().cpu(), initial):  # set since patching, if not by calibrate
            return
        ratio = self._ratio(torch.float64).item()
        warnings.warn(
            "the pruning thresholds were never set (by calibrate, from_pretrained or threshold_init), so this "
            f"model runs at a FLOPs ratio of {ratio:.3f}, not its budget of {self.config.budget}: call "
            "calibrate(model, batches) on a few batches of your images first",
            UserWarning,
            stacklevel=_caller_level(),
        )

    def _prune(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        state = self.state
        if not self.scoring() or state.empty:  # every threshold keeps every token: nothing has moved
            if state.num_tokens is None:
                state.num_tokens = int(x.shape[1])
            real = state.tokens_per_image
            state.counts.append(torch.full(x.shape[:1], x.shape[1], device=x.device) if real is None else real)
            state.layout.unmoved()
            state.scored = False
            return x
        scores, state.scores = state.scores, None
        if scores is None:
            raise RuntimeError("prune() called without scores: the scoring attention did not run")
        eligible = state.layout.valid if not self.training or state.soft_mask is None else _hard(state.soft_mask)
        x = self.unpack(x)  # (B, N, C): eval batches may arrive packed
        # every pair's similarity: for novelty, and for merging / restoring by the full path (training, or
        # restoring dropped tokens); eval merging needs only the leaving tokens' rows (`_merger`)
        fused = self._fused_merge()
        wanted = self.config.novelty or (not fused and (self.merging or self.restoring))
        similarity = core.token_similarity(x) if wanted else None
        if self.config.novelty:
            scores = scores * core.novelty(scores.detach(), similarity, eligible, self.num_prefix_tokens)
        if not self.fixed_counts:  # top-k ranks the raw scores: the same order, and static for export
            scores = self._statistic(scores, eligible)
        state.stage_scores.append((scores.detach(), eligible))
        if self.calibrating is not None:  # `calibrate`'s one-pass mode: this stage's threshold from this batch
            with torch.no_grad():
                self.thresholds[stage] = self.calibrating(scores.detach(), eligible)
        if state.stop_after == stage:
            raise StopForward
        if not self.training and self.fixed_counts and state.tokens_per_image is None:
            return self._gather_topk(x, scores, stage, similarity)
        keep = self._keep(scores.detach(), stage, eligible)
        if self.training:
            self._mask(scores, stage, keep)
            remain = self._remaining_in_training(scores.detach(), stage, keep, eligible)
        else:
            state.counts.append(keep.sum(dim=1))
            remain = keep
        if fused:
            return self.state.layout.gather(x, remain, self._merger(x, keep, eligible, similarity))[0]
        if self.merging or self.restoring:
            x = self._merge(x, keep, eligible, similarity)
        return x if remain is None else self._gather(x, remain)

    def _fused_merge(self) -> bool:
        """Whether pruned tokens merge as the layout gathers (eval, merging; see `_merger`)."""
        return self.merging and not self.training

    def _merger(self, x: torch.Tensor, keep: torch.Tensor, eligible: torch.Tensor | None, similarity) -> Merge:
        """Eval merging fused with the gather (`TokenLayout.gather`): the kept tokens are gathered and only
        the tokens past each batch's smallest count (every leaving one is among them) are matched and folded
        in, so the cost grows with the tokens that leave, not with all of them. The same result as
        `_merge` then the gather, up to rounding."""
        layout, prefix = self.state.layout, self.num_prefix_tokens

        def merge(order: torch.Tensor, kept: int, fewest: int) -> tuple[torch.Tensor, torch.Tensor]:
            front, tail = order[:, :kept], order[:, fewest:]
            rows = core.token_similarity(x, tail) if similarity is None else core.take_rows(similarity, tail)
            destination = core.nearest_kept(rows, keep, prefix)  # (B, R): indices before the gather
            slot = torch.zeros_like(order).scatter_(1, front, torch.arange(kept, device=x.device).expand_as(front))
            sizes = layout.sizes if layout.sizes is not None else x.new_ones(keep.shape, dtype=torch.float32)
            leaving = ~keep if eligible is None else eligible & ~keep
            weights = (sizes * leaving).gather(1, tail)
            tail_tokens, arrival = core.take_rows(x, tail), slot.gather(1, destination)
            merged, new_sizes = core.merge_gathered(
                core.take_rows(x, front), sizes.gather(1, front), tail_tokens, weights, arrival
            )
            if self.restoring:  # every token's destination (itself unless it leaves), before the gather
                everywhere = torch.arange(order.shape[1], device=x.device).expand_as(order).scatter(1, tail, destination)
                fills = self._restore_fills(tail_tokens, merged, arrival)
                layout.record_merge(self.config.restore_fill, leaving, everywhere, tail, fills)
            return merged, new_sizes

        return merge

    def _remaining_in_training(
        self, statistic: torch.Tensor, stage: int, keep: torch.Tensor, eligible: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Training: the tokens that stay in the forward. Only pruned tokens of this stage near its threshold
        stay, hidden as keys, to carry the mask's gradient; the others leave as at inference (exactly: the
        masked path computes the same loss and gradients):
        - tokens pruned at an earlier stage: this stage's mask is 0 for them in the forward, so the mask
          product sends no gradient through them to any threshold from here on;
        - tokens of this stage `FAR_IN_TEMPERATURES` temperatures or more below the threshold: their mask's
          gradient is under 1e-8 of its in-band value;
        - with fixed counts, every pruned token (no threshold to learn).
        None: the masked path (all stay)."""
        if not self.drop_in_training:
            return None
        remove = ~keep
        if not self.fixed_counts:
            band = self.thresholds[stage].detach() - FAR_IN_TEMPERATURES * self._temperature(stage)
            near = statistic >= band
            remove &= ~(near if eligible is None else near & eligible)
        remove[:, : self.num_prefix_tokens] = False
        valid = self.state.layout.valid
        return ~remove if valid is None else ~remove & valid

    @property
    def fixed_counts(self) -> bool:
        """Whether every image keeps the same number of tokens (keep_policy 'topk', or after `freeze`)."""
        return self.config.keep_policy == "topk" or self._static

    def _statistic(self, scores: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
        """What the thresholds compare, scale-free so one calibration serves every image size: the share of
        the image's score mass held by a token and all that score lower ('mass'), or the score times the
        number of patches the image started with ('threshold': uniform attention gives about 1)."""
        if self.config.keep_policy == "mass":
            return core.mass_share(scores, eligible, self.num_prefix_tokens)
        if self.config.keep_policy == "threshold":
            real = self.state.tokens_per_image
            tokens = self.state.num_tokens if real is None else real[:, None].to(scores.dtype)
            return scores * (tokens - self.num_prefix_tokens)
        return scores

    def _merge(self, x: torch.Tensor, keep: torch.Tensor, eligible: torch.Tensor | None, similarity) -> torch.Tensor:
        """Fold the tokens `keep` drops (of those `eligible`) into their most similar kept ones (merging), and
        record where they went (restoring); x is (B, N, C)."""
        layout = self.state.layout
        dropped = ~keep if eligible is None else eligible & ~keep
        destination = core.nearest_kept(similarity, keep, self.num_prefix_tokens)
        before = x
        if self.merging:
            sizes = layout.sizes if layout.sizes is not None else x.new_ones(keep.shape, dtype=torch.float32)
            x, layout.sizes = core.merge_into_kept(
                x, keep, dropped, sizes, self.num_prefix_tokens, destination=destination
            )
        if self.restoring:
            every = torch.arange(x.shape[1], device=x.device).expand_as(destination)
            fills = self._restore_fills(before, x, destination)
            layout.record_merge(self.config.restore_fill, dropped, destination, every, fills)
        return x

    def _restore_fills(self, tokens: torch.Tensor, merged: torch.Tensor, destination: torch.Tensor) -> torch.Tensor | None:
        """restore_tokens: the fill data of `tokens` (B, R, C) whose destinations are the rows `destination`
        (B, R) of `merged` (see `RestoreMap.record`)."""
        fill = self.config.restore_fill
        if fill == "nearest":
            return None
        return tokens if fill == "dropped" else tokens - core.take_rows(merged, destination)

    def _gather_topk(self, x: torch.Tensor, scores: torch.Tensor, stage: int, similarity) -> torch.Tensor:
        """Static shapes: every image keeps its k best patches (k from the shapes and keep_ratios only),
        so no host sync, no padding, and nothing data-dependent for torch.compile or ONNX export."""
        state, prefix = self.state, self.num_prefix_tokens
        k = self.topk_counts(state.num_tokens - prefix)[stage]
        state.counts.append(torch.full_like(scores[:, 0], prefix + k, dtype=torch.long))
        if self._fused_merge():
            ranked = scores[:, prefix:].argsort(dim=1, descending=True) + prefix
            first = torch.arange(prefix, device=x.device).expand(ranked.shape[0], -1)
            order = torch.cat([first, ranked[:, :k].sort(dim=1).values, ranked[:, k:]], dim=1)
            front = order[:, : prefix + k]
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, front, torch.ones_like(front, dtype=torch.bool))
            x, sizes = self._merger(x, keep, None, similarity)(order, prefix + k, prefix + k)
            state.layout.move(front, scores.shape[1], sizes)
            return x
        best = scores[:, prefix:].topk(k, dim=1).indices.sort(dim=1).values + prefix
        order = torch.cat([torch.arange(prefix, device=x.device).expand(best.shape[0], -1), best], dim=1)
        if self.merging or self.restoring:
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, torch.ones_like(order, dtype=torch.bool))
            x = self._merge(x, keep, None, similarity)
        state.layout.move(order, x.shape[1])
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))

    def _keep(self, scores: torch.Tensor, stage: int, eligible: torch.Tensor | None) -> torch.Tensor:
        prefix = self.num_prefix_tokens
        real = self.state.tokens_per_image
        if self.fixed_counts and real is not None:  # each image's k of its own real patches
            counts = {n: self.topk_counts(n - prefix)[stage] for n in set(real.tolist())}
            k = torch.tensor([counts[n] for n in real.tolist()], device=scores.device)
            return core.topk_keep_per_image(scores, num_prefix=prefix, k=k, eligible=eligible)
        if self.fixed_counts:  # training: the same k as _gather_topk
            k = self.topk_counts(self.state.num_tokens - prefix)[stage]
            return core.topk_keep(scores, num_prefix=prefix, k=k, eligible=eligible)
        return core.hard_keep(
            scores, self.thresholds[stage], num_prefix=prefix, min_keep=self.config.min_keep, eligible=eligible
        )

    def topk_counts(self, num_patches: int) -> list[int]:
        """keep_policy 'topk': patch tokens kept at each stage, the same for every image."""
        if not all(r > 0 for r in self._ratios):
            raise RuntimeError("no keep ratios yet: call calibrate(model, batches) or freeze(model, batches)")
        counts, patches = [], num_patches
        for ratio in self._ratios:
            patches = min(patches, max(self.config.min_keep, round(ratio * patches)))
            counts.append(patches)
        return counts

    def _mask(self, scores: torch.Tensor, stage: int, keep: torch.Tensor) -> None:
        """Training: hide pruned tokens as keys from here on (masks multiply across stages).

        The straight-through mask carries gradients to this stage's threshold (and, with `score_gradient`,
        through the scores to the network), from the task loss (via the masked attention) and from the FLOPs
        loss (via the counts). Scores see earlier masks detached: through the re-normalised class attention,
        raising one stage's threshold lifts the next stages' scores, a path that a small temperature
        amplifies and that would make the FLOPs loss push thresholds the wrong way."""
        state = self.state
        if self.fixed_counts:
            mask = keep.to(scores.dtype)
        else:
            threshold, temperature = self.thresholds[stage], self._temperature(stage)
            scores = scores if self.config.score_gradient else scores.detach()
            mask = self._with_prefix(core.straight_through_mask(scores, threshold, temperature, keep))
        if state.soft_mask is not None:
            mask = mask * state.soft_mask
        elif state.layout.valid is not None:  # the padding of a batch that began padded
            mask = mask * state.layout.valid
        state.soft_mask = mask
        state.counts.append(mask.sum(dim=1))

    def _temperature(self, stage: int) -> torch.Tensor | float:
        """The soft mask's temperature at `stage`: the config's, capped for 'mass' at
        `MASS_RELATIVE_TEMPERATURE` x the stage's threshold (a tensor, so no host sync)."""
        temperature = self.config.soft_temperature
        if self.config.keep_policy != "mass" or MASS_RELATIVE_TEMPERATURE is None:
            return temperature
        relative = MASS_RELATIVE_TEMPERATURE * self.thresholds[stage].detach().clamp_min(1e-6)
        return relative.clamp_max(temperature)

    def _with_prefix(self, mask: torch.Tensor) -> torch.Tensor:
        prefix = self.num_prefix_tokens
        return torch.cat([torch.ones_like(mask[:, :prefix]), mask[:, prefix:]], dim=1)

    def _gather(self, x: torch.Tensor, remain: torch.Tensor) -> torch.Tensor:
        """Move each image's remaining tokens (and their training masks) to the front (`TokenLayout.gather`)."""
        state = self.state
        x, order = state.layout.gather(x, remain)
        if order is not None and state.soft_mask is not None:  # training: padding is hidden like a pruned token
            state.soft_mask = state.layout.follow(state.soft_mask, order)
        return x

    def kept_positions(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Eval: for each stage of the last forward, the original token positions (B, N_s) that entered
        it and their validity mask (None: all valid)."""
        state = self._eval_state("kept_positions")
        if state.num_tokens is None or len(state.layout.kept) != len(self.locations):
            raise RuntimeError("kept_positions needs a full forward pass in eval mode first")
        return state.layout.kept_positions(state.num_tokens, state.counts[0].shape[0], state.counts[0].device)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """restore_tokens, eval: the tokens of the last forward at any point after embedding (packed or
        padded; before the final norm, which adapters apply to the grid) -> (B, N0, C) in the original order,
        each pruned position filled as `restore_fill` says (see `RestoreMap`)."""
        if not self.config.restore_tokens:
            raise RuntimeError("this model was patched without restore_tokens: patch it with restore_tokens=True")
        if self.training:
            raise RuntimeError("restore_tokens works in eval mode only (training keeps tokens off the grid): call model.eval()")
        return self.state.layout.restored(x)

    def restored_sources(self) -> torch.Tensor | None:
        """restore_tokens, after an eval forward: the original position (B, N0) each position's fill comes
        from ('nearest' / 'offset': the kept token it was restored from; itself when kept or with 'dropped');
        None when nothing was pruned."""
        if not self.config.restore_tokens:
            raise RuntimeError(
                "restored_sources needs a model patched with restore_tokens=True: this one keeps no record of "
                "where pruned tokens went (patch it with restore_tokens=True)"
            )
        return self._eval_state("restored_sources").layout.restored_sources(self.config.restore_fill)

    def _eval_state(self, caller: str) -> ForwardState:
        """The last forward's state, which must have run in eval mode (`caller` names the asking method)."""
        state = self.state
        if state.training:
            raise RuntimeError(
                f"{caller} is eval only: the last forward ran in training mode, which keeps pruned tokens off "
                "the grid; call model.eval() and run the images again"
            )
        return state

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """See `TokenLayout.pack`."""
        return self.state.layout.pack(x)

    def unpack(self, x: torch.Tensor, zero_padding: bool = False) -> torch.Tensor:
        """See `TokenLayout.unpack`."""
        return self.state.layout.unpack(x, zero_padding)

    def pool_weights(self) -> torch.Tensor | None:
        """Weights (B, N) of the current tokens for average pooling, or None when all count equally."""
        return self.state.layout.pool_weights(self.state.soft_mask)

    # ---- FLOPs -------------------------------------------------------------------------------------
    def _macs(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """MACs per image and the dense MACs: one number, or per image (B,) for a batch begun padded, each
        image counted over its own real tokens."""
        state = self.state
        tokens = state.num_tokens
        if tokens is None or len(state.counts) != len(self.locations):
            raise RuntimeError("the last forward pass did not reach every pruning point: run a full forward first")
        if state.tokens_per_image is not None:
            tokens = state.tokens_per_image.double()
            patches = tokens - self.num_prefix_tokens
            dense = self.flops.macs([tokens] * len(self.locations), tokens, patches, scoring=False)
        else:
            patches = tokens - self.num_prefix_tokens
            dense = self.flops.dense_macs(tokens, patches)
        macs = self.flops.macs(state.counts, tokens, patches, scoring=state.scored)
        return macs, dense

    def _ratio(self, dtype: torch.dtype) -> torch.Tensor:
        """The batch mean of each image's MACs over its dense MACs."""
        macs, dense = self._macs()
        if isinstance(dense, torch.Tensor):
            return (torch.as_tensor(macs, dtype=dtype) / dense.to(dtype)).mean()
        return torch.as_tensor(macs, dtype=dtype).mean() / dense

    def budget_loss(self) -> torch.Tensor:
        if self.state.empty:  # no image, no cost: a zero that still reaches the thresholds
            return self.thresholds.sum() * 0.0
        ratio = self._ratio(torch.float32)
        return (ratio - self.config.budget).abs()

    def stats(self) -> PruneStats:
        if self.state.empty:
            raise ValueError("the last forward pass had no images: statistics need at least one")
        macs, dense = self._macs()
        state = self.state
        per_image = torch.as_tensor(macs, dtype=torch.float64).detach().flatten()
        counts = [c.detach().double() for c in state.counts]
        dense_per_image = torch.as_tensor(dense, dtype=torch.float64).detach().expand_as(per_image)
        ratio = self._ratio(torch.float64).item()
        if isinstance(dense, torch.Tensor):
            dense = dense_per_image.mean().item()
        return PruneStats(
            locations=self.locations,
            tokens=int(state.num_tokens),
            kept_mean=[c.mean().item() for c in counts],
            kept_min=[c.min().item() for c in counts],
            kept_max=[c.max().item() for c in counts],
            gflops=per_image.mean().item() / 1e9,
            gflops_per_image=(per_image / 1e9).tolist(),
            dense_gflops=dense / 1e9,
            flops_ratio=ratio,
            dense_gflops_per_image=(dense_per_image / 1e9).tolist(),
        )


_LIBRARIES = ("timm_token_prune", "torch", "timm", "transformers")


def _caller_level() -> int:
    """The stacklevel of the first frame outside this library and the zoos (the user's `model(x)`)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    return level


def _hard(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.detach() > 0.5
