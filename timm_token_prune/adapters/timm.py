"""timm adapters: `TimmAdapter` (what every timm family shares: timm's checkpoints, input size and
normalisation) and the `VisionTransformer` (and `VisionTransformerDistilled`) adapter for models built
from the standard `Block` / `Attention`. It knows timm's module names; the pruning itself lives in
`TokenPruner`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..config import PruneConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..flops import linear_macs
from ..locations import resolve_locations
from ..pruner import TokenPruner
from ..swap import restore_class, swap_class
from .base import IMAGENET_MEAN, IMAGENET_STD, Adapter
from .shared import check_pixels, pruned_layers
from .shared import new_pruner as _new_pruner

try:
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
except ImportError:  # timm not installed
    apply_rot_embed_cat = None

POOLS = ("token", "avg", "max", "avgmax", "map")
ADDED = ("_token_pruner", "_prune_stage")
WEIGHTS_NAME = "model.safetensors"


def _timm():
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import (
            Block,
            ResPostBlock,
            VisionTransformer,
        )
    except ImportError:  # timm not installed: this adapter matches nothing
        return None
    return VisionTransformer, (Block, ResPostBlock), Attention


class TimmAdapter(Adapter):
    """A family of timm models: saved and rebuilt by timm (`local-dir:` / `hf-hub:`), patched by swapping
    the classes of its blocks, attentions and model."""

    zoo = "timm"
    restores_tokens = True

    def unpatch(self, model: nn.Module) -> None:
        for block in model.blocks:
            restore_class(block.attn, *ADDED)
            restore_class(block, *ADDED)
        del model.token_pruner
        restore_class(model)

    def save_dense(self, model: nn.Module, folder: Path, state_dict: dict, model_args: dict | None) -> None:
        from safetensors.torch import save_file
        from timm.models._hub import save_config_for_hf

        if getattr(model, "pretrained_cfg", None) is None:
            raise ValueError(
                f"cannot save this {_base_class(model).__name__}: it was not built by timm.create_model, so timm "
                "cannot record how to rebuild it; build it with timm.create_model(name, ...) and load its weights"
            )
        save_file({k: v.contiguous() for k, v in state_dict.items()}, Path(folder) / WEIGHTS_NAME)
        save_config_for_hf(model, Path(folder) / "config.json", model_args=model_args)

    def load_dense(self, folder: Path, name: str) -> nn.Module:
        import timm

        if not (Path(folder) / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{name}: no {WEIGHTS_NAME}")
        return timm.create_model(f"local-dir:{folder}", pretrained=True)

    def architecture(self, model: nn.Module) -> str:
        return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or _base_class(model).__name__

    def base_model(self, model: nn.Module) -> str | None:
        return (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") or None

    def is_classifier(self, model: nn.Module) -> bool:
        return model.num_classes > 0

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        channels = model.patch_embed.proj.in_channels
        size = getattr(model.patch_embed, "img_size", None)
        if size is None:  # dynamic size without a default: the pretrained one
            size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (channels, 224, 224))[-2:]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (channels, *size)

    def normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))

    def check_images(self, model: nn.Module, images: torch.Tensor) -> None:
        check_images(model, images)


class VisionTransformerAdapter(TimmAdapter):
    name = "timm"
    supported = (
        "timm VisionTransformer / VisionTransformerDistilled (vit_*, deit_*, deit3_*, register-token, "
        "LayerScale and class-token-free models such as dinov2 or vit_*_gap / siglip) with global_pool "
        "'token', 'avg', 'max', 'avgmax' or 'map', and blocks of the standard timm.layers Block (or "
        "ResPostBlock) with Attention"
    )

    def model_classes(self) -> tuple[type, ...]:
        classes = _timm()
        return () if classes is None else (classes[0],)

    def check(self, model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
        _, blocks, Attention = _timm()
        reasons = pool_problems(model)
        if not isinstance(model.blocks, nn.Sequential):
            reasons.append(f"model.blocks is a {type(model.blocks).__name__}, not an nn.Sequential")
        else:
            reasons += block_problems(model, blocks, (Attention,), "the standard Block / Attention")
        return checked_locations(model, config, reasons, self.supported)

    def patch(self, model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
        attn = model.blocks[0].attn
        pruner = new_pruner(model, config, locations, attn_dim=attn.num_heads * attn.head_dim)
        swap_blocks(model, pruner, PruningAttention)
        swap_class(model, _PrunedVisionTransformer)
        return pruner


def _base_class(model: nn.Module) -> type:
    """The model's own class (not the generated Pruned<Base> of a patched model)."""
    return getattr(type(model), "_token_prune_base", type(model))


def block_problems(model: nn.Module, blocks: tuple[type, ...], attentions: tuple[type, ...], expected: str) -> list[str]:
    """Why a timm model's blocks cannot be patched (empty: they can)."""
    odd = sorted({type(b).__name__ for b in model.blocks if type(b) not in blocks})
    odd += sorted({type(b.attn).__name__ for b in model.blocks if type(b) in blocks and type(b.attn) not in attentions})
    if odd:
        return [f"it uses {', '.join(odd)} instead of {expected}"]
    if len({linear_macs(b) for b in model.blocks}) > 1:
        return ["its blocks differ in width"]
    return []


def checked_locations(model: nn.Module, config: PruneConfig, reasons: list[str], supported: str) -> tuple[int, ...]:
    """Raise `UnsupportedModelError` with `reasons`, if any; else the pruning locations."""
    name = type(model).__name__
    if reasons:
        raise UnsupportedModelError(f"cannot patch {name}: {'; '.join(reasons)}. Supported: {supported}.")
    return resolve_locations(config.prune_locations, len(model.blocks), name)


def swap_blocks(model: nn.Module, pruner: TokenPruner, attention: type) -> None:
    """Swap the attention of every block from the first scoring one on (mixin `attention`), make the scoring
    blocks prune their output, and attach the pruner."""
    for _, block, stage in pruned_layers(model.blocks, pruner.locations):
        swap_class(block.attn, attention, _token_pruner=pruner, _prune_stage=stage)
        if stage is not None:
            swap_class(block, _ScoringBlock, _token_pruner=pruner, _prune_stage=stage)
    model.add_module("token_pruner", pruner)


class PrunedModel:
    """What every patched timm model class shares: input checks, and token outputs restored to the full
    grid with restore_tokens (eval): blocks run on the kept tokens, the final tokens are put back in the
    original order with pruned positions filled (`TokenPruner.restore`), then the final norm runs on the
    grid. Pooling and the heads still read the kept tokens, so logits are those of restore_tokens=False,
    bit for bit. A family gives `_embed` (timm's forward_features before the blocks)."""

    def start_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> None:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask / is_causal cannot be combined with token pruning")
        if self.grad_checkpointing and self.training:
            raise NotImplementedError(
                "gradient checkpointing re-runs blocks, which token pruning does not support: "
                "call model.set_grad_checkpointing(False)"
            )
        check_images(self, x)
        self.token_pruner.begin(len(x))

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[int, nn.Module, torch.Tensor], torch.Tensor]]:
        """timm's forward_features before the blocks: the tokens, and how block `index` runs on them."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        self.start_forward(x, attn_mask, is_causal)
        if not self.token_pruner.restoring:
            return self.token_pruner.unpack(super().forward_features(x), zero_padding=True)
        return self._blocks_and_norm(x)

    def _blocks_and_norm(self, x: torch.Tensor) -> torch.Tensor:
        """forward_features after `start_forward`: the blocks on the kept tokens, then the final norm."""
        x, run = self._embed(x)
        for index, block in enumerate(self.blocks):
            x = run(index, block, x)
        return self._final(x)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        """The final tokens -> normed, padded tokens; with restore_tokens the normed grid, the kept tokens
        normed as without restoring kept for the head (see `_head_input`)."""
        pruner = self.token_pruner
        kept = pruner.unpack(self.norm(x), zero_padding=True)
        if not pruner.restoring:
            return kept
        state = pruner.state
        state.pool_source = kept
        state.restored = self.norm(pruner.restore(x))
        return state.restored

    def _head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The grid the last forward_features returned -> its kept tokens, which pooling reads. Any other
        tensor must hold as many tokens as were kept (a copy of the grid would pool its fills)."""
        state = self.token_pruner._state
        if state is None or state.restored is None:
            return x
        if x is state.restored:
            return state.pool_source
        check_pool_input(x, state.pool_source[..., 0])
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return super().forward_head(self._head_input(x), pre_logits=pre_logits)

    def _pool_includes_prefix(self) -> bool:
        """Whether this family's pooling reads the prefix tokens too (for families with a `pool` method)."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        weights = self.token_pruner.pool_weights()
        if weights is None:
            return super().pool(x, pool_type)
        check_pool_input(x, weights)
        return pool_kept(self, x, weights, pool_type, self._pool_includes_prefix())

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask=None,
        is_causal: bool = False,
    ):
        """timm's forward_intermediates on restored grids (restore_tokens, eval): every requested block's
        output, before or after a pruning point, in the original token order (see `forward_features`)."""
        pruner = self.token_pruner
        if not pruner.config.restore_tokens:
            raise NotImplementedError(
                "forward_intermediates returns spatial feature maps, which pruned tokens no longer form: "
                "patch the model with restore_tokens=True, or call timm_token_prune.unpatch_model(model) first"
            )
        if self.training:
            raise NotImplementedError("forward_intermediates of a pruned model restores tokens in eval mode only: call model.eval()")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        from timm.models._features import feature_take_indices

        take, last = feature_take_indices(len(self.blocks), indices)
        self.start_forward(x, attn_mask, is_causal)
        batch, (height, width) = len(x), x.shape[-2:]
        x, run = self._embed(x)
        grids = []
        for index, block in enumerate(self.blocks[: last + 1] if stop_early else self.blocks):
            x = run(index, block, x)
            if index in take:
                grid = pruner.restore(x)
                grids.append(self.norm(grid) if norm else grid)
        prefix = self.num_prefix_tokens
        prefixes = [g[:, :prefix] for g in grids] if prefix else None
        grids = [g[:, prefix:] for g in grids]
        if output_fmt == "NCHW":
            rows, cols = self.patch_embed.dynamic_feat_size((height, width))
            grids = [g.reshape(batch, rows, cols, g.shape[-1]).permute(0, 3, 1, 2).contiguous() for g in grids]
        if output_dict:
            result = {"image_intermediates": grids}
            if prefixes is not None and return_prefix_tokens:
                result["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                result["image_features"] = self._final(x)
            return result
        if return_prefix_tokens and prefixes is not None:
            grids = list(zip(grids, prefixes))
        return grids if intermediates_only else (self._final(x), grids)


class _PrunedVisionTransformer(PrunedModel):
    def _embed(self, x: torch.Tensor):
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x)))), _run_block

    def _pool_includes_prefix(self) -> bool:
        return self.pool_include_prefix


def _run_block(index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def check_pool_input(x: torch.Tensor, weights: torch.Tensor) -> None:
    """Pruned models pool the kept tokens of their last forward: `x` must be those."""
    if weights.shape[1] != x.shape[1]:
        raise ValueError(
            f"pool got {x.shape[1]} tokens, the last forward kept {weights.shape[1]}: pruned models pool "
            "their kept tokens; pass forward_features' own output to forward_head (a restored grid is "
            "recognised as long as it is the same tensor)"
        )


class _ScoringBlock:
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = super().forward(x, *args, **kwargs)
        return self._token_pruner.prune(x, self._prune_stage)


class PruningAttention:
    """timm's Attention, and eva's EvaAttention / AttentionRope, on a pruned token layout: projections on
    packed tokens, attention on the padded batch with padding / pruned tokens hidden as keys (an inference
    batch in groups: straight from and to the packed tokens, `TokenPruner.attention_packed`)."""

    def forward(self, x: torch.Tensor, rope=None, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        pruner = self._token_pruner
        if pruner.plain_attention(self._prune_stage):
            extra = {} if rope is None else {"rope": rope}  # timm's Attention takes no rope argument
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, **extra)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask / is_causal cannot be combined with token pruning")
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = fused_qkv(self, x)
        if qkv is not None and rope is None and getattr(self, "num_kv_groups", 1) == 1 and pruner.attends_packed():
            x = pruner.attention_packed(
                qkv, self.num_heads, scale=self.scale, stage=self._prune_stage, q_norm=self.q_norm, k_norm=self.k_norm
            )
            x = self.norm(x)
            return self.proj_drop(self.proj(x if gate is None else x * gate))
        q, k, v = project(self, x, pruner, qkv)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # eva: rotary embeddings of the patch tokens (already in this layout)
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        B, _, N, _ = q.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = pruner.attention(q, k, v, scale=self.scale, dropout_p=dropout_p, stage=self._prune_stage)
        x = self.norm(pruner.pack(x.transpose(1, 2).reshape(B, N, -1)))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def fused_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """q | k | v (..., 3 C) of tokens `x` from the attention's fused projection; None when it has three."""
    if getattr(attn, "qkv", None) is None:
        return None
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(x)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)


def project(attn: nn.Module, x: torch.Tensor, pruner: TokenPruner, qkv: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, heads, N, head_dim) of packed tokens `x`, as the timm / eva attention computes them
    (`qkv`: their fused projection, if already computed)."""
    heads = attn.num_heads
    if qkv is None:
        qkv = fused_qkv(attn, x)
    if qkv is not None:
        qkv = pruner.unpack(qkv)  # a packed batch (see TokenPruner.pack) back to (B, N, 3 C)
        B, N, _ = qkv.shape
        return qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = (pruner.unpack(proj(x)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    B, N, _ = q.shape
    return tuple(t.reshape(B, N, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))


def pool_problems(model: nn.Module) -> list[str]:
    """Why a timm model's pooling cannot follow pruned tokens (empty: it can)."""
    pool, attn_pool = model.global_pool, getattr(model, "attn_pool", None)
    if pool not in POOLS:
        why = "it returns every token" if not pool else "its pooling attends over all token positions"
        return [f"global_pool={pool!r}: {why}; supported: {POOLS}"]
    if pool == "map" and (type(attn_pool).__name__ != "AttentionPoolLatent" or attn_pool.pos_embed is not None):
        return [f"its attention pool {type(attn_pool).__name__} has per-position parameters or no key mask"]
    if pool == "token" and getattr(model, "cls_token", None) is None:
        return ["global_pool='token' without a class token"]
    return []


def new_pruner(model: nn.Module, config: PruneConfig, locations: tuple[int, ...], attn_dim: int) -> TokenPruner:
    """The `TokenPruner` of a timm ViT: its FLOPs model, prefix tokens and kind of score."""
    attn_pool = getattr(model, "attn_pool", None)
    pool_macs = 0 if attn_pool is None else linear_macs(attn_pool.kv)
    head = linear_macs(model.head) + linear_macs(getattr(model, "head_dist", nn.Identity()))
    return _new_pruner(
        config,
        locations,
        patch_conv=model.patch_embed.proj,
        layers=model.blocks,
        head_macs=head + (0 if attn_pool is None else linear_macs(attn_pool) - pool_macs),
        attn_dim=attn_dim,
        class_token=getattr(model, "cls_token", None) is not None,
        num_prefix_tokens=model.num_prefix_tokens,
        num_patches=model.patch_embed.num_patches,
        pool_per_token=pool_macs,
    )


def pool_kept(model: nn.Module, x: torch.Tensor, weights: torch.Tensor, pool_type: str, include_prefix: bool):
    """timm's pooling over the kept tokens only (`weights`: the pruner's pool weights)."""
    if pool_type == "token":
        return x[:, 0]
    start = 0 if include_prefix else model.num_prefix_tokens
    x, weights = x[:, start:], weights[:, start:]
    if getattr(model, "attn_pool", None) is not None:  # MAP: kept tokens as keys, weighted by their sizes
        return model.attn_pool(x, attn_mask=core.key_weights_bias(weights, x.dtype))
    if pool_type == "avg":
        return core.masked_mean(x, weights)
    if pool_type in ("max", "avgmax"):
        top = x.masked_fill(~(weights > 0.5)[..., None], float("-inf")).amax(dim=1)
        return top if pool_type == "max" else 0.5 * (top + core.masked_mean(x, weights))
    raise NotImplementedError(f"pool_type {pool_type!r} is not supported with token pruning")


def check_images(model: nn.Module, x: torch.Tensor) -> None:
    embed = model.patch_embed
    check_pixels(x, embed.proj.in_channels, "a batch of images")
    size = tuple(x.shape[-2:])
    if getattr(embed, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False):
        if embed.img_size is not None and size != tuple(embed.img_size):
            raise ValueError(
                f"{type(model).__name__} takes {tuple(embed.img_size)} images, got {size}: resize the input, "
                "or create the model with img_size=... or dynamic_img_size=True"
            )
    elif not getattr(embed, "dynamic_img_pad", False) and any(s % p for s, p in zip(size, embed.patch_size)):
        raise ValueError(f"image size {size} is not a multiple of the patch size {tuple(embed.patch_size)}")
