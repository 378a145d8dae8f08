"""transformers models that hold a supported vision tower: only the tower is patched.

Two kinds, recognised by their attributes (not by class name), so that any model built the same way is
covered once its tower's family is supported (see hf.py):
- image-text (dual-tower) models: CLIPModel, SiglipModel, Siglip2Model, ... a `vision_model` that is a
  supported tower, next to a `text_model`. `get_image_features`, `image_embeds` and `logits_per_image`
  come from the pruned tower; the text tower is not touched. The FLOPs model covers the vision tower and
  its `visual_projection` (CLIP's), not the text tower.
- vision-language models: LlavaForConditionalGeneration and others whose `vision_tower` (transformers 5:
  `model.model.vision_tower`) is a supported tower. The language model reads one embedding per patch from
  `hidden_states[vision_feature_layer]` of the tower, so these are patched with `restore_tokens=True` only:
  the selected layer's grid is restored, the projector gets (B, N, C), and the prompt keeps its number of
  image tokens. Restoring works in eval mode only, so such a model runs patched in eval only.
  FLOPs: the tower's (patch embedding, every layer, its pooling), not the projector's or the language
  model's. With `vision_feature_layer=-2` (LLaVA's default) the tower still runs its last layer, whose
  output nothing reads: transformers does not cut the tower, so that layer is counted and the ratio is that
  of the work the tower does. A pruning point in front of that last layer (location depth - 1) saves only
  that discarded work, yet its merge still changes the kept tokens of the grid the language model reads:
  for such models, `prune_locations` without depth - 1 are the better trade.

The tower is patched as the transformers adapter patches a standalone tower; its pruner then moves to the
top-level model (`model.token_pruner`), so that saving, loading, unpatching and the statistics work on the
whole model. Calibration and `measure` run only the image path: `get_image_features(pixel_values=...)` of
an image-text model, the tower alone for a vision-language model, so batches of `{"pixel_values": ...}`
with no text work.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import AlreadyPatchedError, UnsupportedModelError
from ..flops import linear_macs
from ..pruner import TokenPruner
from . import hf, hf_siglip2
from .hf import TransformersAdapter

_VLM_PATHS = ("vision_tower", "model.vision_tower")  # transformers 5 keeps it on the inner model
_PROJECTIONS = ("visual_projection",)  # per-image projection of the pooled image features (CLIP, AltCLIP, ...)


@dataclasses.dataclass(frozen=True)
class Tower:
    kind: str  # "dual" (image-text) or "vlm" (vision-language)
    path: str  # from the top-level model
    module: nn.Module

    @property
    def supported(self) -> bool:
        return hf._base(self.module) is not None


def find_tower(model: nn.Module) -> Tower | None:
    """The vision tower of an image-text or vision-language model (supported or not), else None."""
    vision, text = getattr(model, "vision_model", None), getattr(model, "text_model", None)
    if isinstance(vision, nn.Module) and isinstance(text, nn.Module):
        return Tower("dual", "vision_model", vision)
    for path in _VLM_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.Module):
            return Tower("vlm", path, module)
    return None


class VisionTowerAdapter(TransformersAdapter):
    name = "transformers-tower"
    zoo = "transformers"
    supported = (
        "transformers image-text models whose vision_model is a supported tower (CLIPModel, SiglipModel, ...: the "
        "vision tower only) and vision-language models whose vision_tower is one (LlavaForConditionalGeneration, "
        "...: with restore_tokens=True)"
    )
    restores_tokens = True

    def matches(self, model: nn.Module) -> bool:
        return super().matches(model) and find_tower(model) is not None

    def check(self, model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
        name, tower = type(model).__name__, find_tower(model)
        if not tower.supported:
            raise UnsupportedModelError(
                f"cannot patch {name}: its vision tower ({tower.path}, a {type(tower.module).__name__}) is not a "
                f"supported vision transformer. Supported towers: {TransformersAdapter.supported}."
            )
        if any("_token_pruner" in m.__dict__ or isinstance(m, TokenPruner) for m in tower.module.modules()):
            raise AlreadyPatchedError(
                f"the vision tower of this {name} ({tower.path}) is already patched: call unpatch_model on what you "
                "patched before patching the whole model"
            )
        if tower.kind == "vlm" and not config.restore_tokens:
            raise UnsupportedModelError(
                f"cannot patch {name} without restore_tokens=True: its language model reads one embedding per patch "
                f"from the vision tower's hidden_states[vision_feature_layer], which pruning shortens. Pass "
                "restore_tokens=True: patch_model(model, budget, restore_tokens=True)"
            )
        return super().check(tower.module, config)

    def patch(self, model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
        tower = find_tower(model)
        pruner = super().patch(tower.module, config, locations)  # hooks and attention on the tower
        delattr(tower.module, "token_pruner")  # the pruner belongs to the whole model
        if tower.kind == "dual":
            projections = [getattr(model, n, None) for n in _PROJECTIONS]
            extra = sum(linear_macs(m) for m in projections if isinstance(m, nn.Module))  # per image, like a head
            pruner.flops = dataclasses.replace(pruner.flops, head=pruner.flops.head + extra)
        model.add_module("token_pruner", pruner)
        return pruner

    def is_classifier(self, model: nn.Module) -> bool:
        return False

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return super().input_size(find_tower(model).module)

    def normalization(self, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return super().normalization(find_tower(model).module)

    def check_images(self, model: nn.Module, images: torch.Tensor) -> None:
        super().check_images(find_tower(model).module, images)

    def forward_images(self, model: nn.Module, images: torch.Tensor) -> object:
        tower = find_tower(model)
        hf_siglip2.check_batch(hf._base(tower.module), images)
        inputs = images if isinstance(images, dict) else {"pixel_values": images}  # NaFlex: mask and grid shapes too
        if tower.kind == "dual" and hasattr(model, "get_image_features"):
            return model.get_image_features(**inputs)
        return tower.module(**inputs)
