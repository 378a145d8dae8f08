"""timm families beyond VisionTransformer: eva (rotary embeddings, with and without a class token) and
beit (relative position bias), against the unpatched model and a slow single-image reference loop that
runs the *unpatched* blocks on the kept tokens, with timm's explicit (non-fused) attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import images, reference_prune
from test_timm import VARIANTS, _reference_options
from timm.models.beit import Beit
from timm.models.eva import Eva

import timm_token_prune as ttp

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=4, num_classes=10)
LOCATIONS = (2, 3, 5)
ROPE = dict(use_rot_pos_emb=True, ref_feat_shape=(8, 8))
CASES = {
    "eva02": (Eva, dict(ROPE, qkv_fused=False, swiglu_mlp=True, scale_mlp=True)),
    "eva_rope_mixed_token": (
        Eva, dict(ROPE, attn_type="rope", rope_type="mixed", use_abs_pos_emb=False, global_pool="token")
    ),
    "eva_gqa_registers_no_class_map": (
        Eva, dict(ROPE, attn_type="rope", qkv_fused=False, num_kv_heads=2, class_token=False, num_reg_tokens=2,
                  global_pool="map", no_embed_class=True),
    ),
    "eva_dinov3_registers": (Eva, dict(ROPE, rope_type="dinov3", num_reg_tokens=4, no_embed_class=True, init_values=0.1)),
    "eva_no_rope_qkv_bias": (Eva, dict(init_values=0.1)),
    "beit": (Beit, dict(use_rel_pos_bias=True, init_values=0.1)),
    "beit_shared_bias_token": (
        Beit, dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False, global_pool="token", use_fc_norm=False)
    ),
}


def make(case: str, seed: int = 0) -> torch.nn.Module:
    cls, extra = CASES[case]
    torch.manual_seed(seed)
    model = cls(**{**TINY, **extra}).eval()
    with torch.no_grad():  # sharpen the near-uniform random attention (see conftest._spread_weights)
        for block in model.blocks:
            for name in ("qkv", "q_proj", "k_proj"):
                if getattr(block.attn, name, None) is not None:
                    getattr(block.attn, name).weight.mul_(4.0)
        model.head.weight.normal_(0, 0.2)  # eva initialises its head near zero
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):  # beit starts them at zero
                param.normal_(0, 1.0)
    return model


def patched(case: str, budget: float = 0.5, **options) -> torch.nn.Module:
    model = ttp.patch_model(make(case), budget=budget, prune_locations=LOCATIONS, **options)
    if budget < 1.0:
        ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


@pytest.fixture(params=sorted(CASES))
def case(request) -> str:
    return request.param


def test_budget_one_equals_unpatched(case):
    model = make(case)
    x = images(4)
    with torch.no_grad():
        expected = model(x)
        ttp.patch_model(model, budget=1.0, prune_locations=LOCATIONS)
        assert (model(x) - expected).abs().max().item() <= 1e-5
        ttp.unpatch_model(model)
        assert torch.equal(model(x), expected)


def test_batch_invariance(case):
    model = patched(case)
    x = images(6, seed=3)
    with torch.no_grad():
        batched = model(x)
        counts = [c.tolist() for c in ttp.get_pruner(model).state.counts]
        singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert any(len(set(c)) > 1 for c in counts), f"keep counts should differ across the batch: {counts}"
    assert (batched - singles).abs().max().item() <= 1e-4


def test_batch_invariance_packed(case, monkeypatch):
    """Sixteen images, packed, attending in groups of similar counts where the counts are spread enough (from
    the packed tokens where the attention allows, `TokenPruner.attention_packed`): each image gets what it
    gets alone."""
    from timm_token_prune.layout import TokenLayout

    monkeypatch.setattr(TokenLayout, "pack_min_gain", 0)
    model = patched(case)
    x = torch.cat([images(8, seed=3), images(8, seed=4)])
    with torch.no_grad():
        batched = model(x)
        layout = ttp.get_pruner(model).state.layout
        assert layout.pack_index is not None
        singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert (batched - singles).abs().max().item() <= 1e-4


def _slow_reference(model, x: torch.Tensor, thresholds: list[float], **options) -> torch.Tensor:
    """One image through the unpatched model; each block sees the kept tokens (a merged one as one row per
    token it holds, see conftest.reference_prune), with the rotary embeddings / relative position bias of
    the positions those rows stand for picked by plain indexing."""
    prefix = model.num_prefix_tokens
    if isinstance(model, Eva):
        t, rope = model._pos_embed(model.patch_embed(x))
        t = model.norm_pre(t)
    else:
        t = torch.cat([model.cls_token, model.patch_embed(x)], dim=1)
        t = t if model.pos_embed is None else t + model.pos_embed
        rope = None
    rep = torch.arange(t.shape[1])  # the original position each row stands for
    options["patches"] = t.shape[1] - prefix
    for index, block in enumerate(model.blocks):
        attn, seen = block.attn, {}
        attn.fused_attn = False  # timm's explicit softmax(q k^T) path, whose probabilities we capture
        hooks = [attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("probs", i[0]))]
        out_module = attn.norm if isinstance(model, Eva) else attn.proj
        hooks.append(out_module.register_forward_hook(lambda m, i, o: seen.__setitem__("context", i[0])))
        if isinstance(model, Eva):
            block_rope = None if rope is None else (rope[index] if model.rope_mixed else rope)
            if block_rope is not None:
                block_rope = block_rope[..., rep[prefix:] - prefix, :]
            t = block(t, rope=block_rope)
        else:
            full = attn._get_rel_pos_bias
            if attn.relative_position_bias_table is not None:
                attn._get_rel_pos_bias = lambda full=full: full()[..., rep, :][..., rep]
            shared = None if model.rel_pos_bias is None else model.rel_pos_bias()[..., rep, :][..., rep]
            t = block(t, shared_rel_pos_bias=shared)
            vars(attn).pop("_get_rel_pos_bias", None)
        for hook in hooks:
            hook.remove()
        if index + 1 in LOCATIONS:
            probs = seen["probs"]  # 1, H, N, N
            heads = probs.shape[1]
            norms = seen["context"].reshape(1, probs.shape[2], heads, -1).norm(dim=-1).transpose(1, 2)
            threshold = thresholds[LOCATIONS.index(index + 1)]
            t, rep = reference_prune(
                t, rep, probs, norms, class_token=model.cls_token is not None, threshold=threshold, prefix=prefix,
                **options,
            )
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("variant", ["default", "paper"])
def test_matches_slow_reference_loop(case, variant):
    options = VARIANTS[variant]
    model = patched(case, **options)
    reference = make(case)
    thresholds = ttp.get_pruner(model).thresholds.tolist()
    x = images(3, seed=5)
    with torch.no_grad():
        for i in range(len(x)):
            got = model(x[i : i + 1])
            assert ttp.last_stats(model).kept_mean[-1] < ttp.last_stats(model).tokens
            expected = _slow_reference(reference, x[i : i + 1], thresholds, **_reference_options(options))
            assert (got - expected).abs().max().item() <= 1e-4


def test_training_masks_match_dropping_and_reach_thresholds(case):
    model = patched(case)
    x = images(5, seed=4)
    with torch.no_grad():
        dropped = model(x)
    model.train()
    masked = model(x)
    assert (masked - dropped).abs().max().item() <= 1e-4
    loss = F.cross_entropy(masked, torch.arange(5)) + 2.0 * ttp.budget_loss(model)
    loss.backward()
    grad = ttp.get_pruner(model).thresholds.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any()
