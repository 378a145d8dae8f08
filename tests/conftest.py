"""Tiny timm models (random weights, no downloads) shared by the tests."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

pytest_plugins = ["hub_server"]  # the `hub` fixture: a local fake of the Hugging Face Hub

IMG = 32
TINY = dict(img_size=IMG, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)
LOCATIONS = (2, 3, 5)

# name -> (class, extra kwargs): the supported timm families, in miniature
TIMM_CASES = {
    "vit": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "registers": (VisionTransformer, dict(reg_tokens=4, no_embed_class=True)),
    "layerscale_dinov2": (VisionTransformer, dict(init_values=1e-1, reg_tokens=2)),
    "deit3_qknorm": (VisionTransformer, dict(init_values=1e-1, no_embed_class=True, qk_norm=True)),
    "avg_pool": (VisionTransformer, dict(global_pool="avg", fc_norm=True)),
    "avg_pool_prefix": (VisionTransformer, dict(global_pool="avg", pool_include_prefix=True)),
    "no_class_token_avg": (VisionTransformer, dict(class_token=False, global_pool="avg", fc_norm=True)),
    "no_class_token_map": (VisionTransformer, dict(class_token=False, global_pool="map")),
    "registers_no_class_token_max": (VisionTransformer, dict(class_token=False, reg_tokens=2, global_pool="max")),
}


def make_model(case: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cls, extra = TIMM_CASES[case]
    torch.manual_seed(seed)
    model = cls(**{**TINY, **extra, **overrides}).eval()
    _spread_weights(model)
    return model


def _spread_weights(model: torch.nn.Module) -> None:
    """Random init leaves the class-token attention almost uniform; sharpen it so scores vary across
    tokens and images like those of a trained model."""
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(getattr(block, "attn", None), "qkv"):  # other block types: only checked as unsupported
                block.attn.qkv.weight.mul_(4.0)


def images(batch: int, seed: int = 1, size: int = IMG) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 3, size, size, generator=g)
    # per-image contrast makes keep counts differ across the batch
    return base * torch.linspace(0.3, 3.0, batch)[:, None, None, None]


def reference_keep(probs: torch.Tensor, head_norms: torch.Tensor, class_token: bool, threshold: float, prefix: int):
    """The slow loops' keep decision for one image from its full attention (1, H, N, N) and head-output
    norms (1, H, N): the class token's row, or without one the attention each token receives averaged
    over queries, weighted per head; S > threshold, prefix tokens and the best patch always kept."""
    received = probs[:, :, 0, :] if class_token else probs.mean(dim=2)
    score = ((head_norms / (head_norms.sum(1, keepdim=True) + 1e-8)) * received).sum(1)[0]
    keep = score > threshold
    keep[:prefix] = True
    keep[prefix + int(score[prefix:].argmax())] = True
    return keep


@pytest.fixture(params=sorted(TIMM_CASES))
def case(request) -> str:
    return request.param
