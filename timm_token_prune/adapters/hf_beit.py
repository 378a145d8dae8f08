"""transformers (5.x) BEiT and Data2VecVision: `BeitModel` / `BeitForImageClassification`,
`Data2VecVisionModel` / `Data2VecVisionForImageClassification`.

Both add a relative position bias (N0 x N0 per head, over the embedding's tokens: the layer's own one with
`use_relative_position_bias`, the model's shared one with `use_shared_relative_position_bias`) to every
attention. After pruning, each image's bias is the rows and columns of its current tokens
(`TokenPruner.gather_bias`, padded layout; the attention unpacks packed batches), as in the timm beit adapter.

- BEiT's layer adds both biases into the `attention_mask` it hands to `BeitAttention`, which dispatches
  through `ALL_ATTENTION_FUNCTIONS`: the generic transformers patch (`hf._patch`) is reused, and the pruned
  attentions get `"timm_token_prune_bias"`, an implementation that reads that mask as the bias over the
  original tokens and gathers it.
- Data2VecVision keeps the old SelfAttention classes (eager / sdpa, chosen at construction), which add the
  biases themselves and whose layers return tuples: the self-attentions of the pruned layers are swapped
  for a subclass (`swap.swap_class`; `unpatch` restores the class), the layer hooks take the tuple's first
  element.
- Both compute a bias with `dim_size=hidden_states.shape[1]` (used only with `interpolate_pos_encoding`,
  where the bias is resized to dim_size x dim_size); in a dense model that is always the window's tokens + 1,
  so a pre-hook on each bias module passes that, not the pruned count.
- `use_mean_pooling`: the pooler (`BeitPooler` / `Data2VecVisionPooler`) averages the kept patch tokens only
  (their padding, training masks and merge sizes weigh in as `pool_weights` says), as Dinov2's head does.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import core
from ..config import PruneConfig
from ..flops import linear_macs
from ..pruner import TokenPruner
from ..swap import swap_class
from . import hf
from .shared import new_pruner

FAMILIES = ("BeitModel", "Data2VecVisionModel")
BIAS_IMPLEMENTATION = "timm_token_prune_bias"


def patch(model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
    base = hf._base(model)
    if type(base).__name__ == "BeitModel":
        pruner = _patch_beit(model, config, locations)
    else:
        pruner = _patch_data2vec(model, base, config, locations)
    handles = pruner.__dict__[hf._HANDLES]
    for module in base.modules():
        if type(module).__name__.endswith("RelativePositionBias"):
            handles.append(module.register_forward_pre_hook(_full_dim_size, with_kwargs=True))
    pooler = getattr(base, "pooler", None)
    if pooler is not None and getattr(pooler, "layernorm", None) is not None:  # use_mean_pooling
        hf._set(base.layernorm, _token_pruner=pruner)  # an nn.Identity then
        handles.append(base.layernorm.register_forward_hook(hf._keep_pool_source))
        hf._set(pooler, _token_pruner=pruner)
        handles.append(pooler.register_forward_hook(_mean_over_kept_patches))
    return pruner


def _patch_beit(model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
    _register_attention()
    pruner = hf._patch(model, config, locations)
    for module in model.modules():  # the attentions hf._patch gave their own config copy
        if "_token_prune_config" in module.__dict__:
            module.config._attn_implementation = BIAS_IMPLEMENTATION
    base = hf._base(model)
    pruner.__dict__[hf._HANDLES].append(base.register_forward_pre_hook(_register_before_forward))
    return pruner


def _patch_data2vec(model: nn.Module, base: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
    layers = base.encoder.layer
    attention = layers[0].attention.attention
    image, patch_size = base.config.image_size, base.config.patch_size
    pruner = new_pruner(
        config,
        locations,
        patch_conv=base.embeddings.patch_embeddings.projection,
        layers=layers,
        head_macs=linear_macs(model) - sum(linear_macs(layer) for layer in layers),
        attn_dim=attention.all_head_size,
        class_token=True,
        num_prefix_tokens=1,
        num_patches=(image // patch_size) ** 2 if isinstance(image, int) else 196,
    )
    def attend(layer: nn.Module, stage: int | None) -> None:
        swap_class(layer.attention.attention, _PrunedData2VecVisionSelfAttention, _token_pruner=pruner, _prune_stage=stage)

    handles = hf.hook_layers(
        base, layers, pruner, config, locations, attend, prune=_prune_first, record=_record_first, unpack=_unpack_first
    )
    if config.restore_tokens:
        handles.append(base.register_forward_hook(hf._restore_hidden_states))
    hf._set(pruner, **{hf._HANDLES: handles})
    model.add_module("token_pruner", pruner)
    return pruner


# ---- hooks (module-level functions: deep copies and pickles of the model stay consistent) ------------
def _register_before_forward(module: nn.Module, args: tuple) -> None:
    _register_attention()  # a model unpickled in a new process


def _full_dim_size(module: nn.Module, args: tuple, kwargs: dict):
    """A relative position bias module's `dim_size` -> the window's tokens + 1 (the dense model's value),
    not the pruned layer's token count."""
    window = args[0] if args else kwargs["window_size"]
    return args, {**kwargs, "dim_size": int(window[0]) * int(window[1]) + 1}


def _prune_first(module: nn.Module, args: tuple, output):
    """Data2VecVision layers return (hidden_states, ...): `hf._prune_output` on the first element."""
    return (hf._prune_output(module, args, output[0]), *output[1:])


def _record_first(module: nn.Module, args: tuple, output) -> None:
    hf._record_grid(module, args, output[0])


def _unpack_first(module: nn.Module, args: tuple, output):
    return (hf._unpack_output(module, args, output[0]), *output[1:])


def _mean_over_kept_patches(module: nn.Module, args: tuple, output):
    """Mean pooling (`use_mean_pooling`): the pooler's layernorm of the mean over the kept patch tokens."""
    pruner: TokenPruner = module._token_pruner
    state = pruner.state
    if state.empty:
        return None
    weights = pruner.pool_weights()
    if weights is None and state.restored is None:  # the tokens it read are all real: its own mean is right
        return None
    tokens, prefix = state.pool_source, pruner.num_prefix_tokens
    if weights is None:
        mean = tokens[:, prefix:].mean(dim=1)
    else:
        mean = core.masked_mean(tokens[:, prefix:], weights[:, prefix:])
    return module.layernorm(mean)


# ---- BEiT: the attention implementation -----------------------------------------------------------
def _bias_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function for BEiT: `attention_mask` is the relative position bias (own +
    shared, (1, H, N0, N0)) over the embedding's tokens, or None; gathered at the current tokens."""
    pruner: TokenPruner = module._token_pruner
    stage = module._prune_stage
    bias = None if attention_mask is None else pruner.gather_bias(attention_mask)
    if pruner.plain_attention(stage):
        return hf._fallback(module)(module, query, key, value, bias, scaling=scaling, dropout=dropout, **kwargs)
    heads = query.shape[1]
    q, k, v = (hf._unpack_heads(pruner, t) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    context = pruner.attention(q, k, v, scale=scale, dropout_p=dropout, stage=stage, bias=bias)
    out = pruner.pack(hf._merge_heads(context))
    return out.reshape(*out.shape[:2], heads, -1), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf._register_attention()
    if ALL_ATTENTION_FUNCTIONS.get(BIAS_IMPLEMENTATION) is not _bias_attention:
        AttentionInterface.register(BIAS_IMPLEMENTATION, _bias_attention)


# ---- Data2VecVision: the self-attention -------------------------------------------------------------
class _PrunedData2VecVisionSelfAttention:
    """Data2VecVision's SelfAttention (eager or sdpa) on a pruned layout: its own relative position bias and
    the encoder's shared one, gathered at the kept tokens, added inside the pruner's attention."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        relative_position_bias: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int, int] | None = None,
    ):
        pruner: TokenPruner = self._token_pruner
        stage = self._prune_stage
        if pruner.plain_attention(stage) and pruner.state.layout.positions is None:
            return super().forward(
                hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution
            )
        bias = None
        if self.has_relative_position_bias:
            window = (resolution[0] // self.config.patch_size, resolution[1] // self.config.patch_size)
            bias = self.relative_position_bias(window, interpolate_pos_encoding, dim_size=window[0] * window[1] + 1)
        if relative_position_bias is not None:
            bias = relative_position_bias if bias is None else bias + relative_position_bias
        if bias is not None:
            bias = pruner.gather_bias(bias)
        heads, size = self.num_attention_heads, self.attention_head_size
        q, k, v = (
            _heads(pruner.unpack(projection(hidden_states)), heads, size) for projection in (self.query, self.key, self.value)
        )
        dropout_p = self.dropout.p if self.training else 0.0
        context = pruner.attention(q, k, v, scale=size**-0.5, dropout_p=dropout_p, stage=stage, bias=bias)
        out = pruner.pack(hf._merge_heads(context))
        return (out, None) if output_attentions else (out,)


def _heads(t: torch.Tensor, heads: int, size: int) -> torch.Tensor:
    """(B, N, H hd) -> (B, H, N, hd)."""
    return t.reshape(t.shape[0], t.shape[1], heads, size).transpose(1, 2)


def is_family(base: nn.Module | None) -> bool:
    return base is not None and type(base).__name__ in FAMILIES

