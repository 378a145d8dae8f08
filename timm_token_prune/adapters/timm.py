"""timm adapter: `VisionTransformer` (and `VisionTransformerDistilled`) built from the standard
`Block` / `Attention`. It knows timm's module names; the pruning itself lives in `TokenPruner`."""

from __future__ import annotations

import torch
from torch import nn

from .. import core
from ..config import PruneConfig
from ..errors import UnsupportedModelError
from ..flops import FlopsModel, linear_macs
from ..locations import resolve_locations
from ..pruner import TokenPruner
from ..swap import restore_class, swap_class

NAME = "timm"
SUPPORTED = (
    "timm VisionTransformer / VisionTransformerDistilled (vit_*, deit_*, deit3_*, register-token and "
    "LayerScale models such as dinov2) with a class token, global_pool 'token' or 'avg', and blocks of the "
    "standard timm.layers Block with Attention"
)
_POOLS = ("token", "avg")
_ADDED = ("_token_pruner", "_prune_stage")


def _timm():
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:  # timm not installed: this adapter matches nothing
        return None
    return VisionTransformer, Block, Attention


def matches(model: nn.Module) -> bool:
    classes = _timm()
    return classes is not None and isinstance(model, classes[0])


def check(model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
    """Raise `UnsupportedModelError` unless the model can be patched; return the pruning locations."""
    _, Block, Attention = _timm()
    name = type(model).__name__
    reasons = []
    if model.cls_token is None:
        reasons.append("it has no class token (class_token=False), and the AS-ViT score is the class token's attention")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
        reasons.append(f"global_pool={model.global_pool!r}: only {_POOLS} are supported")
    if not isinstance(model.blocks, nn.Sequential):
        reasons.append(f"model.blocks is a {type(model.blocks).__name__}, not an nn.Sequential")
    else:
        odd = sorted({type(b).__name__ for b in model.blocks if type(b) is not Block})
        odd += sorted({type(b.attn).__name__ for b in model.blocks if type(b) is Block and type(b.attn) is not Attention})
        if odd:
            reasons.append(f"it uses {', '.join(odd)} instead of the standard Block / Attention")
        elif len({linear_macs(b) for b in model.blocks}) > 1:
            reasons.append("its blocks differ in width")
    if reasons:
        raise UnsupportedModelError(f"cannot patch {name}: {'; '.join(reasons)}. Supported: {SUPPORTED}.")
    return resolve_locations(config.prune_locations, len(model.blocks), name)


def patch(model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
    attn = model.blocks[0].attn
    conv = model.patch_embed.proj
    flops = FlopsModel(
        embed_per_patch=conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1],
        head=linear_macs(model.head) + linear_macs(getattr(model, "head_dist", nn.Identity())),
        linear_per_token=linear_macs(model.blocks[0]),
        attn_per_pair=2 * attn.num_heads * attn.head_dim,
        score_per_token=attn.num_heads * attn.head_dim,
        depth=len(model.blocks),
        locations=locations,
    )
    pruner = TokenPruner(config, flops, model.num_prefix_tokens, model.patch_embed.num_patches)
    first_scoring = locations[0] - 1
    scoring = {loc - 1: stage for stage, loc in enumerate(locations)}
    for index, block in enumerate(model.blocks):
        if index < first_scoring:
            continue
        stage = scoring.get(index)
        swap_class(block.attn, _PrunedAttention, _token_pruner=pruner, _prune_stage=stage)
        if stage is not None:
            swap_class(block, _ScoringBlock, _token_pruner=pruner, _prune_stage=stage)
    model.add_module("token_pruner", pruner)
    swap_class(model, _PrunedVisionTransformer)
    return pruner


def unpatch(model: nn.Module) -> None:
    for block in model.blocks:
        restore_class(block.attn, *_ADDED)
        restore_class(block, *_ADDED)
    del model.token_pruner
    restore_class(model)


class _PrunedVisionTransformer:
    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask / is_causal cannot be combined with token pruning")
        if self.grad_checkpointing and self.training:
            raise NotImplementedError(
                "gradient checkpointing re-runs blocks, which token pruning does not support: "
                "call model.set_grad_checkpointing(False)"
            )
        _check_images(self, x)
        self.token_pruner.begin()
        return self.token_pruner.unpack(super().forward_features(x), zero_padding=True)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        weights = self.token_pruner.pool_weights()
        if weights is None or pool_type == "token":
            return super().pool(x, pool_type)
        if pool_type != "avg":
            raise NotImplementedError(f"pool_type {pool_type!r} is not supported with token pruning")
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        return core.masked_mean(x[:, start:], weights[:, start:])

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "forward_intermediates returns spatial feature maps, which pruned tokens no longer form: "
            "call timm_token_prune.unpatch_model(model) first"
        )


class _ScoringBlock:
    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self._token_pruner.prune(x, self._prune_stage)


class _PrunedAttention:
    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        pruner = self._token_pruner
        if self._prune_stage is None and not pruner.masking():
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask / is_causal cannot be combined with token pruning")
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = pruner.unpack(self.qkv(x))  # a packed batch (see TokenPruner.pack) back to (B, N, 3 C)
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = pruner.attention(q, k, v, scale=self.scale, dropout_p=dropout_p, stage=self._prune_stage)
        x = self.norm(pruner.pack(x.transpose(1, 2).reshape(B, N, -1)))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def _check_images(model: nn.Module, x: torch.Tensor) -> None:
    embed = model.patch_embed
    channels = embed.proj.in_channels
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a batch of images of shape (B, {channels}, H, W), got {shape}")
    size = tuple(x.shape[-2:])
    if getattr(embed, "strict_img_size", False) and not getattr(model, "dynamic_img_size", False):
        if embed.img_size is not None and size != tuple(embed.img_size):
            raise ValueError(
                f"{type(model).__name__} takes {tuple(embed.img_size)} images, got {size}: resize the input, "
                "or create the model with img_size=... or dynamic_img_size=True"
            )
    elif not getattr(embed, "dynamic_img_pad", False) and any(s % p for s, p in zip(size, embed.patch_size)):
        raise ValueError(f"image size {size} is not a multiple of the patch size {tuple(embed.patch_size)}")
