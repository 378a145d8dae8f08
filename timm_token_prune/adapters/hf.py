"""Hugging Face transformers (5.x) adapter: ViT, DeiT, Dinov2 (with registers), ViT-MSN, CLIP vision, SigLIP.

No class of the model is replaced (a renamed `PreTrainedModel` would lose its checkpoint key mapping):
- each attention module after the first pruning point gets its own copy of the config whose
  `_attn_implementation` names `"timm_token_prune"`, an `AttentionInterface` function that masks,
  scores and unpacks; it hands everything else to the model's own implementation;
- forward hooks: the base model's pre-hook starts a forward, each scoring layer's hook prunes its
  output, the last layer's hook unpacks a packed batch; Dinov2's classifier (class token + mean of
  patch tokens) gets the mean over kept tokens only; SigLIP's attention-pooling head gets a key
  padding mask of the kept tokens. Their handles live on the pruner; unpatch removes them.
- with `restore_tokens` (eval): the last layer's hook returns the restored grid (before the final norm),
  so `last_hidden_state` is (B, N, C); heads that read more than the prefix tokens get the kept tokens
  instead; `output_hidden_states=True` gets each layer's grid, restored when that layer ran.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import core
from ..config import PruneConfig
from ..errors import AlreadyPatchedError, CheckpointError, UnsupportedModelError
from ..flops import linear_macs
from ..locations import resolve_locations
from ..pruner import TokenPruner
from ..swap import restore_class
from .base import IMAGENET_MEAN, IMAGENET_STD, Adapter
from .shared import check_pixels, new_pruner, pruned_layers

ATTN_IMPLEMENTATION = "timm_token_prune"
_ADDED = ("_token_pruner", "_prune_stage", "_token_prune_config", "_token_prune_fallback", "_layer_index")
_HANDLES = "_token_prune_hooks"  # on the pruner: the RemovableHandles of the hooks patch registered


@dataclass(frozen=True)
class _Family:
    layers: str  # path from the base model to its nn.ModuleList of layers
    attention: str  # attribute of a layer
    conv: str  # path from the base model to the patch-embedding Conv2d
    registers: bool = False  # prefix = class token (+ distillation) + config.num_register_tokens
    distillation: bool = False
    class_token: bool = True  # False: no prefix token, scores from the mean attention received


_FAMILIES = {
    "ViTModel": _Family("layers", "attention", "embeddings.patch_embeddings.projection"),
    "ViTMSNModel": _Family("layers", "attention", "embeddings.patch_embeddings.projection"),
    "DeiTModel": _Family("layers", "attention", "embeddings.patch_embeddings.projection", distillation=True),
    "Dinov2Model": _Family("encoder.layer", "attention", "embeddings.patch_embeddings.projection"),
    "Dinov2WithRegistersModel": _Family(
        "encoder.layer", "attention", "embeddings.patch_embeddings.projection", registers=True
    ),
    "CLIPVisionModel": _Family("encoder.layers", "self_attn", "embeddings.patch_embedding"),
    "SiglipVisionModel": _Family("encoder.layers", "self_attn", "embeddings.patch_embedding", class_token=False),
    # relative position bias gathered at the kept tokens: hf_beit.py
    "BeitModel": _Family("layers", "attention", "embeddings.patch_embeddings.projection"),
    "Data2VecVisionModel": _Family("encoder.layer", "attention", "embeddings.patch_embeddings.projection"),
    # NaFlex (padded batches of patchified images, a linear patch embedding): hf_siglip2.py
    "Siglip2VisionModel": _Family("encoder.layers", "self_attn", "embeddings.patch_embedding", class_token=False),
}
# top-level classes whose head averages patch tokens: the module whose output it averages
_MEAN_POOL_SOURCE = {
    "Dinov2ForImageClassification": "dinov2.layernorm",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers.layernorm",
    "CLIPForImageClassification": None,  # averages the last layer's output
    "SiglipForImageClassification": "vision_model.post_layernorm",
}
# base model -> (mean, std) its checkpoints are trained with, when not ImageNet's
_NORMALIZATION = {
    "CLIPVisionModel": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "SiglipVisionModel": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "Siglip2VisionModel": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "BeitModel": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "Data2VecVisionModel": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_REASONS = {
    "BeitForMaskedImageModeling": "its head predicts every patch position",
    "BeitForSemanticSegmentation": "its decoder reads every layer's full token grid",
    "Data2VecVisionForSemanticSegmentation": "its decoder reads every layer's full token grid",
    "ViTMAEModel": "its embeddings shuffle and mask patches at random",
}


class TransformersAdapter(Adapter):
    name = "transformers"
    zoo = "transformers"
    supported = (
        "transformers ViTModel / ViTForImageClassification, DeiTModel / DeiTForImageClassification(WithTeacher), "
        "Dinov2Model / Dinov2ForImageClassification, Dinov2WithRegisters*, ViTMSN*, CLIPVisionModel / "
        "CLIPVisionModelWithProjection / CLIPForImageClassification, SiglipVisionModel / SiglipForImageClassification, "
        "BeitModel / BeitForImageClassification, Data2VecVisionModel / Data2VecVisionForImageClassification, "
        "Siglip2VisionModel / Siglip2ForImageClassification (NaFlex)"
    )
    restores_tokens = True

    def model_classes(self) -> tuple[type, ...]:
        transformers = sys.modules.get("transformers")  # a transformers model has imported it
        return () if transformers is None else (transformers.PreTrainedModel,)

    def check(self, model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
        name = type(model).__name__
        base = _base(model)
        if base is None or name in _REASONS:
            reason = _REASONS.get(name) or next(
                (_REASONS[type(c).__name__] for c in model.children() if type(c).__name__ in _REASONS),
                "no supported vision transformer inside it",
            )
            raise UnsupportedModelError(f"cannot patch {name}: {reason}. Supported: {self.supported}.")
        if any("_token_pruner" in m.__dict__ for m in base.modules()):  # patched as part of a larger model
            raise AlreadyPatchedError(
                f"cannot patch {name}: it is already patched as part of the model that holds it (e.g. the vision "
                "tower of a CLIPModel or a LLaVA model): call unpatch_model on that model first"
            )
        layers = _get(base, _FAMILIES[type(base).__name__].layers)
        if len({linear_macs(layer) for layer in layers}) > 1:
            raise UnsupportedModelError(f"cannot patch {name}: its layers differ in width. Supported: {self.supported}.")
        hidden = getattr(base.config, "output_hidden_states", False) and not config.restore_tokens
        if hidden or getattr(base.config, "output_attentions", False):
            raise UnsupportedModelError(
                f"cannot patch {name}: its config asks for output_hidden_states / output_attentions, whose shapes "
                "token pruning changes; set them to False"
            )
        return resolve_locations(config.prune_locations, len(layers), name)

    def patch(self, model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
        from . import hf_beit, hf_siglip2

        if hf_beit.is_family(_base(model)):
            return hf_beit.patch(model, config, locations)
        if hf_siglip2.is_family(_base(model)):
            return hf_siglip2.patch(model, config, locations)
        return _patch(model, config, locations)

    def unpatch(self, model: nn.Module) -> None:
        for handle in model.token_pruner.__dict__.get(_HANDLES, ()):
            handle.remove()
        for module in model.modules():
            original = module.__dict__.get("_token_prune_config")
            if original is not None:
                module.config = original
            for name in _ADDED:
                module.__dict__.pop(name, None)
            restore_class(module)  # hf_beit: Data2VecVision's swapped self-attentions
        del model.token_pruner

    def save_dense(self, model: nn.Module, folder: Path, state_dict: dict, model_args: dict | None) -> None:
        if model_args is not None:
            raise ValueError("model_args is for timm models; a transformers model records its config in config.json")
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    def load_dense(self, folder: Path, name: str) -> nn.Module:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            raise CheckpointError(f"{name}: config.json names no transformers architecture ({architectures})")
        model, info = cls.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
        if problems:
            raise CheckpointError(f"{name}: the weights do not fit {cls.__name__}: {problems}")
        return model

    def architecture(self, model: nn.Module) -> str:
        return type(model).__name__

    def base_model(self, model: nn.Module) -> str | None:
        name = getattr(model.config, "_name_or_path", "") or ""
        return name if name and not Path(name).exists() else None

    def is_classifier(self, model: nn.Module) -> bool:
        return "ForImageClassification" in type(model).__name__  # ...WithTeacher has two heads, no .classifier

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        from . import hf_siglip2

        if hf_siglip2.is_family(_base(model)):
            return hf_siglip2.input_size(_base(model))
        config = _base(model).config
        size = config.image_size
        return (config.num_channels, *((size, size) if isinstance(size, int) else size))

    def normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
        base = _base(model)
        mean, std = _NORMALIZATION.get(type(base).__name__, (IMAGENET_MEAN, IMAGENET_STD))
        config = base.config
        return tuple(getattr(config, "image_mean", None) or mean), tuple(getattr(config, "image_std", None) or std)

    def check_exportable(self, model: nn.Module) -> None:
        from . import hf_siglip2

        if hf_siglip2.is_family(_base(model)):
            raise ValueError(
                f"export_onnx cannot export {type(model).__name__} yet: SigLIP 2 NaFlex batches carry a patch mask "
                "and per-image grid shapes, and its padded batches keep data-dependent token counts"
            )

    def forward_images(self, model: nn.Module, images) -> object:
        from . import hf_siglip2

        hf_siglip2.check_batch(_base(model), images)
        return super().forward_images(model, images)

    def check_images(self, model: nn.Module, images: torch.Tensor) -> None:
        from . import hf_siglip2

        if hf_siglip2.is_family(_base(model)):
            return hf_siglip2.check_patches(_base(model), images)
        check_pixels(images, _base(model).config.num_channels, "pixel_values")


def _base(model: nn.Module) -> nn.Module | None:
    if type(model).__name__ in _FAMILIES:
        return model
    for child in model.children():
        if type(child).__name__ in _FAMILIES:
            return child
    return None


def _get(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _patch(model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
    _register_attention()
    base = _base(model)
    family = _FAMILIES[type(base).__name__]
    layers = _get(base, family.layers)
    attn = getattr(layers[0], family.attention)
    heads = getattr(attn, "num_attention_heads", None) or attn.num_heads
    pool = getattr(getattr(base, "head", None), "attention", None)  # SigLIP's attention pooling
    pool_kv = 0 if pool is None else 2 * pool.embed_dim * pool.kdim  # its key / value projections, per token
    prefix = int(family.class_token) + int(family.distillation)
    prefix += base.config.num_register_tokens if family.registers else 0
    image, patch_size = base.config.image_size, base.config.patch_size
    pruner = new_pruner(
        config,
        locations,
        patch_conv=_get(base, family.conv),
        layers=layers,
        head_macs=linear_macs(model) - sum(linear_macs(layer) for layer in layers) + pool_kv // 2,
        attn_dim=heads * attn.head_dim,
        class_token=family.class_token,
        num_prefix_tokens=prefix,
        num_patches=(image // patch_size) ** 2 if isinstance(image, int) else 196,
        pool_per_token=pool_kv,
    )
    fallback = base.config._attn_implementation or "eager"

    def attend(layer: nn.Module, stage: int | None) -> None:
        use_implementation(getattr(layer, family.attention), pruner, stage, ATTN_IMPLEMENTATION, fallback)

    handles = hook_layers(base, layers, pruner, config, locations, attend)
    if type(model).__name__ in _MEAN_POOL_SOURCE:
        source = _MEAN_POOL_SOURCE[type(model).__name__]
        source = _get(model, source) if source else layers[-1]
        _set(source, _token_pruner=pruner)
        handles.append(source.register_forward_hook(_keep_pool_source))
        _set(model.classifier, _token_pruner=pruner)
        handles.append(model.classifier.register_forward_pre_hook(_mean_over_kept_tokens))
    if pool is not None:
        _set(pool, _token_pruner=pruner)
        handles.append(pool.register_forward_pre_hook(_pool_kept_keys, with_kwargs=True))
        if config.restore_tokens:  # the attention-pooling head reads the normed kept tokens
            norm = base.post_layernorm
            _set(norm, _token_pruner=pruner)
            handles.append(norm.register_forward_hook(_keep_head_source))
    if config.restore_tokens:
        handles.append(base.register_forward_hook(_restore_hidden_states))
    # a plain attribute: copies and pickles of the model carry the handles along with the hook dicts they
    # point to, so unpatching a copy removes the copy's hooks
    _set(pruner, **{_HANDLES: handles})
    model.add_module("token_pruner", pruner)
    return pruner


def use_implementation(attention: nn.Module, pruner: TokenPruner, stage: int | None, name: str, fallback: str) -> None:
    """Give `attention` its own config copy whose `_attn_implementation` is `name` (a registered
    AttentionInterface function); `fallback` is the model's own implementation, for the work it hands back."""
    own = copy.copy(attention.config)
    own._attn_implementation = name
    _set(attention, _token_pruner=pruner, _prune_stage=stage, _token_prune_fallback=fallback)
    _set(attention, _token_prune_config=attention.config)
    attention.config = own


def hook_layers(
    base: nn.Module, layers: nn.ModuleList, pruner: TokenPruner, config: PruneConfig, locations: tuple[int, ...],
    attend, *, prune=None, record=None, unpack=None, begin=None,
) -> list:
    """The hooks every transformers family needs; returns their handles. `attend(layer, stage)` sets up each
    patched layer's attention; the scoring layers' outputs are pruned (`prune`), with restore_tokens each
    layer's grid is recorded (`record`), the last layer's output is unpacked (`unpack`), and the base model's
    pre-hook starts each forward (`begin`). Defaults: this module's hooks (a family whose layers return tuples,
    or whose forward starts padded, passes its own)."""
    handles = []
    for index, layer, stage in pruned_layers(layers, locations):
        attend(layer, stage)
        if stage is not None:
            _set(layer, _token_pruner=pruner, _prune_stage=stage)
            handles.append(layer.register_forward_hook(prune or _prune_output))
        if config.restore_tokens:
            _set(layer, _token_pruner=pruner, _layer_index=index)
            handles.append(layer.register_forward_hook(record or _record_grid))
    _set(layers[-1], _token_pruner=pruner)
    handles.append(layers[-1].register_forward_hook(unpack or _unpack_output))
    _set(base, _token_pruner=pruner)
    handles.append(base.register_forward_pre_hook(begin or _begin_forward, with_kwargs=True))
    return handles


def _set(module: nn.Module, **attributes) -> None:
    for name, value in attributes.items():
        object.__setattr__(module, name, value)  # plain attributes: not submodules, not in state_dict


# ---- hooks (module-level functions, so deep copies and pickles of the model stay consistent) ----------
def _begin_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    pruner = module._token_pruner
    hidden = _check_output_flags(module, pruner, kwargs)
    if kwargs.get("attention_mask") is not None or kwargs.get("bool_masked_pos") is not None:
        raise NotImplementedError("attention_mask / bool_masked_pos cannot be combined with token pruning")
    pixels = args[0] if args else kwargs.get("pixel_values")
    check_pixels(pixels, module.config.num_channels, "pixel_values")
    _register_attention()  # a model unpickled in a new process
    pruner.begin(len(pixels))
    _start_hidden_grids(module, pruner, hidden)


def _check_output_flags(module: nn.Module, pruner: TokenPruner, kwargs: dict):
    """Refuse output_hidden_states / output_attentions that pruning cannot serve; returns output_hidden_states."""
    hidden = kwargs.get("output_hidden_states")
    hidden = getattr(module.config, "output_hidden_states", False) if hidden is None else hidden
    if hidden is not None and hidden is not False and pruner.restoring:
        if hidden is not True and _selected_layers(module, hidden) is None:
            raise NotImplementedError(
                f"output_hidden_states={hidden!r}: a token-pruned model restores all layers' grids, or those of "
                "the layers an int or a list of ints selects; pass output_hidden_states=True"
            )
        return_dict = kwargs.get("return_dict")
        if not (getattr(module.config, "return_dict", True) if return_dict is None else return_dict):
            raise NotImplementedError(
                "output_hidden_states=True with return_dict=False on a model patched with restore_tokens: the "
                "restored grids are written into the output object; pass return_dict=True"
            )
    elif hidden:
        why = "restore_tokens works in eval mode only: call model.eval()" if pruner.config.restore_tokens else (
            "patch the model with restore_tokens=True to get full grids, or call timm_token_prune.unpatch_model(model)"
        )
        raise NotImplementedError(f"output_hidden_states={hidden!r} on a token-pruned model: pruned layers hold fewer tokens; {why}")
    if kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
        raise NotImplementedError(
            "output_attentions=True is not supported on a token-pruned model: pruned layers hold fewer tokens. "
            "Call timm_token_prune.unpatch_model(model) to get them"
        )
    return hidden


def _start_hidden_grids(module: nn.Module, pruner: TokenPruner, hidden) -> None:
    """restore_tokens with output_hidden_states: collect the restored grids of this forward."""
    if not pruner.restoring:
        return
    selected = None if hidden is True else _selected_layers(module, hidden)
    if hidden is True or selected is not None:
        pruner.state.hidden_grids = {} if selected is None else _SelectedGrids(selected)


class _SelectedGrids(dict):
    """hidden_grids when output_hidden_states selects hidden states by index (LLaVA's vision_feature_layer):
    only the selected layers' grids are restored."""

    def __init__(self, layers: set[int]) -> None:
        super().__init__()
        self.layers = layers


def _selected_layers(module: nn.Module, hidden) -> set[int] | None:
    """The layer indices whose outputs an output_hidden_states of an int or ints selects (hidden state i is
    layer i - 1's output; 0 the embeddings, which no pruning changes); None for anything else."""
    indices = [hidden] if isinstance(hidden, int) else hidden
    if isinstance(hidden, bool) or not isinstance(indices, (list, tuple)) or not indices:
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return None
    count = len(_get(module, _FAMILIES[type(module).__name__].layers)) + 1
    return {i % count - 1 for i in indices if -count <= i < count}


def _prune_output(module: nn.Module, args: tuple, output):
    return module._token_pruner.prune(output, module._prune_stage)


def _record_grid(module: nn.Module, args: tuple, output) -> None:
    """restore_tokens with output_hidden_states: this layer's output restored to the grid, now."""
    state = module._token_pruner.state
    grids = state.hidden_grids
    if grids is not None and module._layer_index in getattr(grids, "layers", (module._layer_index,)):
        grids[module._layer_index] = module._token_pruner.restore(output)


def _unpack_output(module: nn.Module, args: tuple, output):
    pruner = module._token_pruner
    if not pruner.restoring:
        return pruner.unpack(output, zero_padding=True)
    state = pruner.state
    state.kept_final = pruner.unpack(output, zero_padding=True)
    state.restored = pruner.restore(output)
    return state.restored


def _keep_pool_source(module: nn.Module, args: tuple, output) -> None:
    state = module._token_pruner.state
    state.pool_source = output
    if state.restored is not None and output is state.restored:  # the last layer's grid: its kept tokens
        state.pool_source = state.kept_final
    elif state.restored is not None and args and args[0] is state.restored:  # the final norm of the grid
        state.pool_source = module.forward(state.kept_final)


def _keep_head_source(module: nn.Module, args: tuple, output) -> None:
    """restore_tokens: the final norm of the kept tokens, for an attention-pooling head."""
    state = module._token_pruner.state
    if state.restored is not None and args and args[0] is state.restored:
        state.head_source = module.forward(state.kept_final)


def _restore_hidden_states(module: nn.Module, args: tuple, output):
    """restore_tokens: each pruned layer's entry of `hidden_states` -> its restored grid (the entry tied to
    last_hidden_state stays)."""
    grids = module._token_pruner.state.hidden_grids
    hidden = getattr(output, "hidden_states", None)
    if not grids or hidden is None:
        return None
    layers = len(_get(module, _FAMILIES[type(module).__name__].layers))
    hidden = list(hidden)
    for index, grid in grids.items():
        position = len(hidden) - layers + index
        if hidden[position] is not None and hidden[position] is not output.last_hidden_state:
            hidden[position] = grid
    output.hidden_states = tuple(hidden)
    return output


def _kept_pool_weights(pruner: TokenPruner) -> torch.Tensor | None:
    """Pooling weights of the kept tokens; all ones when they count equally but the head reads a restored
    grid (top-k without merging), None when the model's own pooling already sees just the kept tokens."""
    weights = pruner.pool_weights()
    state = pruner.state
    if weights is None and state.restored is not None and state.kept_final is not None:
        weights = state.kept_final.new_ones(state.kept_final.shape[:2])
    return weights


def _mean_over_kept_tokens(module: nn.Module, args: tuple):
    pruner = module._token_pruner
    weights = _kept_pool_weights(pruner)
    if weights is None:
        return None
    (features,) = args
    prefix = pruner.num_prefix_tokens
    tokens = pruner.state.pool_source
    mean = core.masked_mean(tokens[:, prefix:], weights[:, prefix:])
    return (torch.cat([features[:, : features.shape[1] - mean.shape[1]], mean], dim=1),)


def _pool_kept_keys(module: nn.Module, args: tuple, kwargs: dict):
    """nn.MultiheadAttention pooling (SigLIP's head): hide padding / pruned tokens as keys."""
    state = module._token_pruner.state
    weights = _kept_pool_weights(module._token_pruner)
    if weights is None:
        return None
    if kwargs.get("key_padding_mask") is not None or kwargs.get("attn_mask") is not None:
        raise NotImplementedError("the pooling head's own masks cannot be combined with token pruning")
    source = state.head_source
    if source is not None and state.restored is not None:  # restored grid in, kept tokens as keys
        args = (args[0], source, source, *args[3:])
    return args, {**kwargs, "key_padding_mask": core.key_weights_bias(weights, args[0].dtype)[:, 0, 0]}


# ---- the attention implementation ---------------------------------------------------------------
def _token_prune_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function: q, k, v are (B, H, N, hd); returns ((B, N, H, hd), None)."""
    pruner: TokenPruner = module._token_pruner
    stage = module._prune_stage
    if pruner.plain_attention(stage):
        return _fallback(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if attention_mask is not None:
        raise NotImplementedError("attention masks cannot be combined with token pruning")
    heads = query.shape[1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if not dropout and pruner.attends_packed():  # groups of images read straight from the packed tokens
        qkv = torch.cat([_merge_heads(t) for t in (query, key, value)], dim=-1)
        out = pruner.attention_packed(qkv, heads, scale=scale, stage=stage)
        return out.reshape(*out.shape[:2], heads, -1), None
    q, k, v = (_unpack_heads(pruner, t) for t in (query, key, value))
    context = pruner.attention(q, k, v, scale=scale, dropout_p=dropout, stage=stage)
    out = pruner.pack(_merge_heads(context))
    return out.reshape(*out.shape[:2], heads, -1), None


def _unpack_heads(pruner: TokenPruner, t: torch.Tensor) -> torch.Tensor:
    heads = t.shape[1]
    t = pruner.unpack(_merge_heads(t))
    return t.reshape(*t.shape[:2], heads, -1).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, hd) -> (B, N, H hd). reshape with traced sizes, not flatten / unflatten: their ONNX export
    bakes in the example's batch size."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _fallback(module):
    """The implementation the model was using (sdpa, eager, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(module._token_prune_fallback, eager)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(ATTN_IMPLEMENTATION) is not _token_prune_attention:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _token_prune_attention)
