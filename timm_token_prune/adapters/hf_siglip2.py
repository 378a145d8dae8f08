"""transformers (5.x) SigLIP 2 NaFlex: `Siglip2VisionModel` and `Siglip2ForImageClassification` (and, through
hf_towers.py, the vision tower of `Siglip2Model`).

NaFlex batches images of different sizes: `pixel_values` (B, N, C p p) are already patchified, each image's
patches first (row-major over its own grid `spatial_shapes[b]`), then padding up to N; `pixel_attention_mask`
(B, N) marks the real patches. No class token (scores: the mean attention a patch receives, as SigLIP), an
attention-pooling head (or the classifier's masked mean).

- The mask becomes the pruner's initial layout (`TokenPruner.begin(valid=mask)`): padding patches do not exist
  for pruning. They are never kept, scored, merged into real tokens, pooled or counted in FLOPs; each image's
  keep rule and FLOPs (dense and pruned) are over its own real patches, so an image gives the same output
  alone and unpadded as padded in a batch with larger images.
- The model builds its own 4-D attention mask from the pixel mask. The pruned attentions (their own
  `"timm_token_prune_naflex"` implementation) hand that mask on unchanged while no token has moved (so budget
  1.0 is the unpatched model) and ignore it from then on: the layout's validity mask hides the padding.
  Likewise the pooling head gets its own mask until tokens move, then the kept tokens' key weights.
- `Siglip2ForImageClassification` averages `last_hidden_state` with the pixel mask itself; the patched model
  hands the mask to the vision tower only and averages the kept tokens (weighted by `pool_weights`).
- FLOPs per patch of the embedding: the linear patch embedding plus the bilinear resize of the position
  embeddings (one (num_patches x width) product per patch), as FlopCounterMode counts them.
- `restore_tokens=True`: each image's grid comes back in the padded layout, its real patches at their own
  positions; padding positions hold zeros (in `last_hidden_state` too, after the final norm), not the values
  the dense model computes for tokens that nothing reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .. import core
from ..config import PruneConfig
from ..flops import linear_macs
from ..pruner import TokenPruner
from . import hf
from .shared import new_pruner

FAMILIES = ("Siglip2VisionModel",)
NAFLEX_IMPLEMENTATION = "timm_token_prune_naflex"
_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
_PENDING = "_naflex_pixel_mask"  # on the pruner: the classifier's pixel mask, on its way to the vision tower


def is_family(base: nn.Module | None) -> bool:
    return base is not None and type(base).__name__ in FAMILIES


def input_size(base: nn.Module) -> tuple[int, int, int]:
    """The square image of the model's default patch count (NaFlex takes any grid up to its max patches)."""
    side = int(round(base.config.num_patches**0.5)) * base.config.patch_size
    return (base.config.num_channels, side, side)


def check_batch(base: nn.Module | None, inputs: object) -> None:
    """Before running a sample batch (calibrate, measure, freeze): a NaFlex tower needs the patch mask and grid
    shapes with the pixels, as its image processor returns them; other towers pass."""
    if is_family(base) and not isinstance(inputs, dict):
        raise ValueError(
            "a SigLIP 2 (NaFlex) model takes dict batches {'pixel_values', 'pixel_attention_mask', "
            "'spatial_shapes'}, as Siglip2ImageProcessor returns them; got a "
            f"{type(inputs).__name__}: pass the processor's output"
        )


def check_patches(base: nn.Module, pixels: object) -> None:
    """Raise `ValueError` unless `pixels` is (B, N, channels x patch x patch), NaFlex's patchified images."""
    config = base.config
    width = config.num_channels * config.patch_size**2
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3 or pixels.shape[-1] != width:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(
            f"expected pixel_values of shape (B, N, {width}) (patchified by the Siglip2 image processor, with "
            f"pixel_attention_mask and spatial_shapes), got {shape}"
        )


def patch(model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
    _register_attention()
    base = hf._base(model)
    layers = base.encoder.layers
    attention = layers[0].self_attn
    head = base.head if getattr(base, "use_head", False) else None
    pool = None if head is None else head.attention
    pool_kv = 0 if pool is None else 2 * pool.embed_dim * pool.kdim  # its key / value projections, per token
    embed = base.embeddings.patch_embedding  # nn.Linear on patchified pixels
    # new_pruner reads a patch convolution's shape: here a linear layer (a 1 x 1 kernel over C p p inputs), plus
    # the position embeddings' resize (each patch: a weighted sum of num_patches embeddings of the same width)
    conv = SimpleNamespace(kernel_size=(1, 1), in_channels=embed.in_features + base.embeddings.num_patches,
                           out_channels=embed.out_features, groups=1)
    pruner = new_pruner(
        config,
        locations,
        patch_conv=conv,
        layers=layers,
        head_macs=linear_macs(model) - linear_macs(embed) - sum(linear_macs(layer) for layer in layers) + pool_kv // 2,
        attn_dim=attention.num_heads * attention.head_dim,
        class_token=False,
        num_prefix_tokens=0,
        num_patches=base.config.num_patches,
        pool_per_token=pool_kv,
    )
    fallback = base.config._attn_implementation or "eager"

    def attend(layer: nn.Module, stage: int | None) -> None:
        hf.use_implementation(layer.self_attn, pruner, stage, NAFLEX_IMPLEMENTATION, fallback)

    handles = hf.hook_layers(base, layers, pruner, config, locations, attend, unpack=_unpack_output, begin=_begin_forward)
    norm = base.post_layernorm
    hf._set(norm, _token_pruner=pruner)
    if head is not None:
        hf._set(head, _token_pruner=pruner)
        handles.append(head.register_forward_pre_hook(_head_mask, with_kwargs=True))
        hf._set(pool, _token_pruner=pruner)
        handles.append(pool.register_forward_pre_hook(_pool_keys, with_kwargs=True))
        if config.restore_tokens:  # the attention-pooling head reads the normed kept tokens
            handles.append(norm.register_forward_hook(hf._keep_head_source))
    if config.restore_tokens:
        handles.append(norm.register_forward_hook(_zero_padding))
        handles.append(base.register_forward_hook(hf._restore_hidden_states))
    if type(model).__name__ == "Siglip2ForImageClassification":
        hf._set(model, _token_pruner=pruner)
        handles.append(model.register_forward_pre_hook(_tower_takes_the_mask, with_kwargs=True))
        handles.append(norm.register_forward_hook(hf._keep_pool_source))
        hf._set(model.classifier, _token_pruner=pruner)
        handles.append(model.classifier.register_forward_pre_hook(_mean_over_kept_tokens))
    hf._set(pruner, **{hf._HANDLES: handles})
    model.add_module("token_pruner", pruner)
    return pruner


def _model_mask_holds(pruner: TokenPruner) -> bool:
    """Whether the masks the model built from the pixel mask still fit the tokens: none has moved, merged
    or been masked in training."""
    state = pruner.state
    return state.layout.positions is None and state.layout.sizes is None and state.soft_mask is None


# ---- hooks -------------------------------------------------------------------------------------------
def _begin_forward(module: nn.Module, args: tuple, kwargs: dict):
    """Start a forward with the pixel mask as the initial layout (padding = tokens that do not exist)."""
    pruner = module._token_pruner
    pending = pruner.__dict__.pop(_PENDING, None)  # first: a refused forward must not leave it for the next one
    hidden = hf._check_output_flags(module, pruner, kwargs)
    given = dict(zip(_INPUTS, args))
    given.update({k: kwargs[k] for k in _INPUTS if k in kwargs})
    pixels, mask = given.get("pixel_values"), given.get("pixel_attention_mask")
    changed = mask is None and pending is not None
    if changed:  # Siglip2ForImageClassification kept the mask from its own pooling: the tower gets it
        mask = pending
        if len(args) > 1:
            args = (args[0], mask, *args[2:])
        else:
            kwargs = {**kwargs, "pixel_attention_mask": mask}
    check_patches(module, pixels)
    if mask is not None and tuple(mask.shape) != tuple(pixels.shape[:2]):
        raise ValueError(
            f"pixel_attention_mask of shape {tuple(mask.shape)} does not fit pixel_values {tuple(pixels.shape)}: "
            "expected (B, N)"
        )
    _register_attention()  # a model unpickled in a new process
    pruner.begin(len(pixels), valid=None if mask is None else mask.to(torch.bool))
    hf._start_hidden_grids(module, pruner, hidden)
    return (args, kwargs) if changed else None


def _unpack_output(module: nn.Module, args: tuple, output):
    """The last layer: unpack (and restore) as hf does; while no token has moved, its output stays as the
    model computed it, padding rows included (budget 1.0 is the unpatched model)."""
    pruner = module._token_pruner
    if not pruner.restoring and _model_mask_holds(pruner):
        return None
    return hf._unpack_output(module, args, output)


def _tower_takes_the_mask(module: nn.Module, args: tuple, kwargs: dict):
    """Siglip2ForImageClassification: its own masked mean would read the pixel mask over tokens that pruning
    moved; the vision tower gets the mask (`_begin_forward`) and the classifier the kept tokens' mean."""
    if len(args) > 1:
        mask, args = args[1], (args[0], None, *args[2:])
    else:
        mask = kwargs.get("pixel_attention_mask")
        kwargs = {**kwargs, "pixel_attention_mask": None}
    hf._set(module._token_pruner, **{_PENDING: mask})
    return args, kwargs


def _mean_over_kept_tokens(module: nn.Module, args: tuple):
    """The classifier's input: the mean of the final (normed) tokens over the kept real ones, with the
    dense model's formula (sum of masked tokens / sum of mask)."""
    pruner = module._token_pruner
    tokens = pruner.state.pool_source
    weights = pruner.pool_weights()
    if weights is None:
        weights = tokens.new_ones(tokens.shape[:2])
    return (core.masked_mean(tokens, weights),)


def _head_mask(module: nn.Module, args: tuple, kwargs: dict):
    """The attention-pooling head: its own mask (from the pixel mask) while no token has moved; after that
    none, and `_pool_keys` hides padding and pruned tokens (and weighs merged ones) as keys."""
    if _model_mask_holds(module._token_pruner):
        return None
    if len(args) > 1:
        args = (args[0], None, *args[2:])
    return args, {**kwargs, "attention_mask": None} if "attention_mask" in kwargs else kwargs


def _pool_keys(module: nn.Module, args: tuple, kwargs: dict):
    # the head's own mask (transformers 5.24: attn_mask, 5.25: key_padding_mask): no token has moved (_head_mask)
    if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
        return None
    return hf._pool_kept_keys(module, args, kwargs)


def _zero_padding(module: nn.Module, args: tuple, output):
    """restore_tokens: the final norm of the restored grid is zero at padding positions."""
    state = module._token_pruner.state
    valid = state.layout.initial_valid
    if valid is None or state.restored is None or not args or args[0] is not state.restored:
        return None
    return output.masked_fill(~valid[..., None], 0)


# ---- the attention implementation ---------------------------------------------------------------
def _naflex_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own attention with its own mask while no token has moved and nothing is scored; else the
    pruner's, whose layout masks padding (the model's mask, over the original tokens, is left out)."""
    pruner: TokenPruner = module._token_pruner
    stage = module._prune_stage
    if _model_mask_holds(pruner) and (stage is None or not pruner.scoring() or pruner.state.empty):
        fallback = hf._fallback(module)
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return hf._token_prune_attention(module, query, key, value, None, scaling=scaling, dropout=dropout, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(NAFLEX_IMPLEMENTATION) is not _naflex_attention:
        AttentionInterface.register(NAFLEX_IMPLEMENTATION, _naflex_attention)
