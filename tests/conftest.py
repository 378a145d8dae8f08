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


def spy_packed_attention(monkeypatch, pruner) -> list:
    """Packed inference forces packing (`TokenLayout.pack_min_gain` 0); returns a list that grows by one per
    call of `TokenPruner.attention_packed` (attention read straight from the packed tokens)."""
    from timm_token_prune.layout import TokenLayout

    monkeypatch.setattr(TokenLayout, "pack_min_gain", 0)
    calls = []
    packed = type(pruner).attention_packed
    monkeypatch.setattr(type(pruner), "attention_packed", lambda self, *a, **k: calls.append(1) or packed(self, *a, **k))
    return calls


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


def reference_prune(
    t, rep, probs, head_norms, *, class_token: bool, threshold: float, prefix: int, merge: bool,
    policy: str = "mass", novelty: bool = True, patches: int | None = None,
):
    """One pruning point of the slow loops, for one image, written without the library's size bias.

    A merged token of size s is kept as s identical rows (`rep[row]`: the original position of the token
    the row stands for), so the unpatched blocks, attention and pooling see it s-fold, exactly what the
    library's log-size key bias computes. Group scores add up over their rows; with `novelty` a group's
    score is scaled by 1 - its highest cosine similarity (>= 0) to a patch group scoring higher. The
    policy's statistic: the score times `patches` ('threshold'), or the share of the score mass held by the
    group and all that rank below it ('mass'). Kept: prefix, statistic > threshold, and the best patch.
    Merging replaces a kept group and the groups merged into it (each into the kept patch whose row is most
    similar, cosine) by their mean; without merging, pruned rows are removed. Returns (t, rep)."""
    received = probs[:, :, 0, :] if class_token else probs.mean(dim=2)  # every row counts: size-weighted
    per_row = ((head_norms / (head_norms.sum(1, keepdim=True) + 1e-8)) * received).sum(1)[0]
    groups = sorted(set(rep.tolist()))
    row = {g: int((rep == g).nonzero()[0]) for g in groups}
    unit = torch.nn.functional.normalize(t[0], dim=-1)
    cos = {(a, b): float(unit[row[a]] @ unit[row[b]]) for a in groups for b in groups}
    score = {g: float(per_row[rep == g].sum()) for g in groups}
    patch_groups = [g for g in groups if g >= prefix]
    if novelty:
        score = {
            g: score[g] * (1 - max([0.0] + [cos[g, h] for h in patch_groups if score[h] > score[g]])) for g in groups
        }
    if policy == "threshold":
        stat = {g: score[g] * patches for g in groups}
    else:  # mass: ties ranked by position, like a stable sort
        total = sum(max(score[g], 0.0) for g in patch_groups)
        rank = sorted(patch_groups, key=lambda g: (-score[g], g))
        stat = {g: sum(max(score[h], 0.0) for h in rank[rank.index(g):]) / total for g in patch_groups}
    best = max(patch_groups, key=lambda g: (stat[g], -g))
    keep = {g for g in groups if g < prefix or stat[g] > threshold} | {best}
    if not merge:
        rows = torch.tensor([int(r) in keep for r in rep])
        return t[:, rows], rep[rows]
    t, rep = t.clone(), rep.clone()
    kept_patches = [g for g in patch_groups if g in keep]
    for dropped in (g for g in patch_groups if g not in keep):
        destination = max(kept_patches, key=lambda k: cos[dropped, k])
        rep[rep == dropped] = destination
    for k in kept_patches:
        rows = rep == k
        t[0, rows] = t[0, rows].mean(dim=0)
    return t, rep


@pytest.fixture(params=sorted(TIMM_CASES))
def case(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """One torch thread: much quicker than two on a shared, busy machine (the CLI and examples time models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
