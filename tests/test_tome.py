"""Tests for the ToMe benchmark peer (benchmarks/tome.py) against independent references."""

from __future__ import annotations

import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import tome  # noqa: E402

SMALL = dict(pretrained=False, img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=4, num_classes=5)
NUM_PATCHES = (32 // 8) ** 2
# name -> (timm model name, extra kwargs)
CASES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "layerscale_qknorm": ("vit_tiny_patch16_224", dict(init_values=0.1, qk_norm=True)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_tiny_patch16_224", dict(reg_tokens=2, class_token=True)),
    "avg_pool": ("vit_tiny_patch16_224", dict(global_pool="avg")),
}


def make(case: str, **kw) -> torch.nn.Module:
    name, extra = CASES[case]
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **extra, **kw}).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_zero_merges_match_unpatched_and_remove_restores(case):
    model, x = make(case), images()
    with torch.no_grad():
        ref = model(x)
        tome.apply_tome(model, 0)
        assert (model(x) - ref).abs().max() < 1e-5
        tome.set_merges(model, 2)
        assert (model(x) - ref).abs().max() > 1e-4  # merging does change the output
        tome.remove_tome(model)
        assert type(model).__name__ in ("VisionTransformer", "VisionTransformerDistilled")
        assert torch.equal(model(x), ref)


def test_zero_merges_match_unfused_attention():
    model, x = make("layerscale_qknorm"), images()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        ref = model(x)
        tome.apply_tome(model, [0, 0, 0, 0])
        assert (model(x) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_sizes_after_merging(case):
    model, x = make(case), images()
    p = model.num_prefix_tokens
    rs = [3, 2, 2, 1]
    tome.apply_tome(model, rs)
    with torch.no_grad():
        feats = model.forward_features(x)
    sizes = tome.last_sizes(model)
    assert feats.shape[1] == p + NUM_PATCHES - sum(rs) == sizes.shape[1]
    assert torch.equal(sizes[:, :p], torch.ones(2, p))
    assert torch.equal(sizes[:, p:].sum(1), torch.full((2,), float(NUM_PATCHES)))
    assert (sizes >= 1).all() and sizes.max() > 1


def test_state_does_not_leak_between_calls():
    model, x = make("vit"), images(3)
    tome.apply_tome(model, 3)
    with torch.no_grad():
        full = model(x)
        one = model(x[:1])
        again = model(x)
    assert torch.allclose(one, full[:1], atol=1e-5)
    assert torch.equal(again, full)


def test_proportional_attention_equals_repeated_keys():
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 3, 6, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    size = torch.tensor([[1, 3, 1, 2, 1, 4], [2, 1, 1, 1, 5, 1]], dtype=torch.float64)
    out = tome.proportional_attention(q, k, v, size[..., None])
    for b in range(B):
        reps = size[b].long()
        kr, vr = k[b].repeat_interleave(reps, dim=1), v[b].repeat_interleave(reps, dim=1)
        attn = torch.softmax(q[b] @ kr.transpose(-1, -2) / D ** 0.5, dim=-1)
        torch.testing.assert_close(out[b], attn @ vr)
    torch.testing.assert_close(tome.proportional_attention(q, k, v, torch.ones(B, N)), tome.proportional_attention(q, k, v))


def loop_reference(metric, x, size, r, p):
    """Per image: each A token (even position) picks its most similar B token (odd position);
    the r most similar A tokens merge into their pick, size-weighted."""
    B, N, _ = metric.shape
    outs = []
    for b in range(B):
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        a_pos = [i for i in range(0, N, 2) if i >= p]
        b_pos = [j for j in range(1, N, 2) if j >= p]
        best = {}
        for i in a_pos:
            sims = [(float(m[i] @ m[j]), j) for j in b_pos]
            best[i] = max(sims)
        chosen = sorted(a_pos, key=lambda i: -best[i][0])[:r]
        groups = {j: [j] for j in b_pos}
        for i in chosen:
            groups[best[i][1]].append(i)
        rows, sizes = [], []
        for i in range(p):
            rows.append(x[b, i]), sizes.append(size[b, i])
        for i in a_pos:
            if i not in chosen:
                rows.append(x[b, i]), sizes.append(size[b, i])
        for j in b_pos:
            s = sum(size[b, i] for i in groups[j])
            rows.append(sum(size[b, i] * x[b, i] for i in groups[j]) / s), sizes.append(s)
        outs.append((torch.stack(rows), torch.stack(sizes)))
    return outs


@pytest.mark.parametrize("p,r", [(0, 4), (1, 3), (2, 5), (3, 2), (1, 100)])
def test_matching_matches_loop_reference(p, r):
    g = torch.Generator().manual_seed(p * 10 + r)
    B, N, C, D = 2, 15, 8, 5
    metric = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1), generator=g).double()
    size[:, :p] = 1
    merge, done = tome.bipartite_soft_matching(metric, r, p)
    assert done == min(r, (N + 1) // 2 - (p + 1) // 2)
    out_x, out_s = tome.merge_wavg(merge, x, size)
    assert out_x.shape == (B, N - done, D)
    for b, (ref_x, ref_s) in enumerate(loop_reference(metric, x, size, done, p)):
        # prefix tokens come first, in order, untouched
        torch.testing.assert_close(out_x[b, :p], x[b, :p])
        assert torch.equal(out_s[b, :p], torch.ones(p, 1, dtype=torch.float64))
        got = torch.cat([out_x[b], out_s[b]], 1)
        want = torch.cat([ref_x, ref_s], 1)
        got, want = got[got[:, 0].argsort()], want[want[:, 0].argsort()]  # canonical order
        torch.testing.assert_close(got, want)


def test_identical_tokens_merge_without_change():
    g = torch.Generator().manual_seed(3)
    B, N, C, D = 1, 11, 16, 6
    metric = torch.randn(B, N, C, generator=g)
    x = torch.randn(B, N, D, generator=g)
    metric[:, 4], x[:, 4] = metric[:, 7], x[:, 7]  # A token 4 is a copy of B token 7
    merge, done = tome.bipartite_soft_matching(metric, 1, 1)
    out_x, out_s = tome.merge_wavg(merge, x)
    assert done == 1 and out_x.shape[1] == N - 1
    keep = [i for i in range(N) if i != 4]
    got = {round(float(v), 5): (row, s) for row, s, v in zip(out_x[0], out_s[0], out_x[0, :, 0])}
    for i in keep:
        row, s = got[round(float(x[0, i, 0]), 5)]
        torch.testing.assert_close(row, x[0, i])
        assert float(s) == (2.0 if i == 7 else 1.0)


def test_avg_pool_is_size_weighted():
    model, x = make("avg_pool"), images()
    tome.apply_tome(model, [4, 3, 2, 1])
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        sizes = tome.last_sizes(model)
        p = model.num_prefix_tokens
        pooled = torch.stack([f[p:].repeat_interleave(s[p:].long(), 0).mean(0) for f, s in zip(feats, sizes)])
        ref = model.head(model.fc_norm(pooled))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_refusals():
    model = make("vit")
    tome.apply_tome(model, 1)
    with pytest.raises(ValueError, match="remove_tome"):
        tome.apply_tome(model, 1)
    with pytest.raises(ValueError, match="blocks"):
        tome.set_merges(model, [1, 2])
    with pytest.raises(TypeError, match="VisionTransformer"):
        tome.apply_tome(torch.nn.Linear(3, 3), 1)
    with pytest.raises(ValueError, match="global_pool"):
        tome.apply_tome(make("vit", global_pool="max"), 1)
    other = make("vit")
    other.blocks[1] = torch.nn.Identity()
    with pytest.raises(TypeError, match="Block"):
        tome.apply_tome(other, 1)
    with pytest.raises(ValueError, match="not patched"):
        tome.remove_tome(other)


def counted_macs(model, x) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]  # FLOPs = 2 x MACs


@pytest.mark.parametrize("case", ["vit", "distilled", "registers"])
def test_dense_macs_match_flop_counter(case):
    model = make(case)
    for blk in model.blocks:
        blk.attn.fused_attn = False  # so that q @ k^T and attn @ v are counted
    n = model.num_prefix_tokens + NUM_PATCHES
    assert tome.tome_macs(model, 0, n) == counted_macs(model, images(1))


def test_macs_with_merges_by_hand_and_counter():
    model = make("vit")  # dim 64, mlp 256, head_dim 16, 4 blocks, 17 tokens, 5 classes
    dense = tome.tome_macs(model, 0, 17)
    attn_lin, mlp_lin = 64 * 192 + 64 * 64, 2 * 64 * 256
    # r = 2 in block 0 only: block 0's MLP runs on 15 tokens, blocks 1-3 run on 15 tokens,
    # and block 0 pays for matching 9 A tokens against 8 B tokens of width 16.
    saved = 2 * mlp_lin + 3 * (2 * attn_lin + 2 * mlp_lin + 2 * (17 ** 2 - 15 ** 2) * 64)
    assert tome.tome_macs(model, [2, 0, 0, 0], 17) == dense - saved + 9 * 8 * 16
    # against the counter: it sees linears and matching but not the (CPU) SDPA kernel
    rs = [3, 2, 1, 1]
    tome.apply_tome(model, rs)
    tokens = [17, 14, 12, 11]
    sdpa = sum(2 * n * n * 64 for n in tokens)
    assert tome.tome_macs(model, rs, 17) == counted_macs(model, images(1)) + sdpa


def test_merges_for_budget():
    with torch.device("meta"):  # real DINOv2-S widths, no weights materialised
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112)
    n = model.num_prefix_tokens + model.patch_embed.num_patches
    assert n == 65
    dense = tome.tome_macs(model, 0, n)
    for budget in (0.65, 0.5):
        rs = tome.merges_for_budget(model, budget, n)
        assert len(rs) == 12
        assert abs(tome.tome_macs(model, rs, n) / dense - budget) <= 0.02
        assert all(a >= b for a, b in zip(rs, rs[1:])) and rs[0] - rs[1] <= 1
    assert tome.merges_for_budget(model, 1.0, n) == [0] * 12
    with pytest.raises(ValueError, match="budget"):
        tome.merges_for_budget(model, 0.01, n)


def test_train_forward_backward():
    model = make("layerscale_qknorm", drop_path_rate=0.1)
    tome.apply_tome(model, 2).train()
    out = model(images())
    out.square().mean().backward()
    for blk in model.blocks:
        grad = blk.attn.qkv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
