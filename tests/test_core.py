"""The zoo-independent math against explicit N x N computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from timm_token_prune import core


def _qkv(batch=2, heads=3, tokens=9, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3)]


def test_soft_masked_attention_is_exact_when_pruned_keys_dominate():
    q, k, v = _qkv()
    k[:, :, 2] = q.mean(dim=2) * 50  # token 2 would take ~all of the softmax: pruned keys must not underflow kept ones
    mask = torch.ones(2, 9)
    mask[:, 2] = 0
    mask.requires_grad_(True)
    out = core.attend(q, k, v, soft_mask=mask)
    kept = [i for i in range(9) if i != 2]
    expected = F.scaled_dot_product_attention(q, k[:, :, kept], v[:, :, kept])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(mask.grad).all() and (mask.grad[:, kept] != 0).all()


def test_soft_mask_gradient_is_the_masked_softmax_gradient():
    q, k, v = _qkv(seed=1)
    mask = torch.ones(2, 9)
    mask[:, [1, 5]] = 0
    mask.requires_grad_(True)
    core.attend(q, k, v, soft_mask=mask).square().sum().backward()
    explicit = mask.detach().clone().requires_grad_(True)
    e = ((q @ k.transpose(-2, -1)) / 8**0.5).exp() * explicit[:, None, None, :]
    ((e / e.sum(-1, keepdim=True)) @ v).square().sum().backward()
    torch.testing.assert_close(mask.grad, explicit.grad, atol=1e-4, rtol=1e-4)


def test_received_attention_scores_match_the_explicit_mean_in_chunks():
    q, k, v = _qkv(tokens=11, seed=2)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 8:] = False
    context = core.attend(q, k, v, valid=valid)
    scores = core.token_scores(
        q, k, context, scale=8**-0.5, class_token=False, valid=valid, chunk_elements=2 * 3 * 11 * 3
    )
    for b, n in ((0, 11), (1, 8)):
        probs = ((q[b, :, :n] @ k[b, :, :n].transpose(-2, -1)) * 8**-0.5).softmax(-1)  # H, n, n
        norms = (probs @ v[b, :, :n]).norm(dim=-1)
        expected = ((norms / norms.sum(0)) * probs.mean(dim=1)).sum(0)
        torch.testing.assert_close(scores[b, :n], expected, atol=1e-6, rtol=1e-5)


def test_gathers_match_plain_indexing():
    positions = torch.tensor([[0, 1, 4, 6], [0, 2, 3, 5]])
    bias = torch.randn(1, 3, 7, 7)
    got = core.gather_bias(bias, positions)
    for b in range(2):
        p = positions[b]
        torch.testing.assert_close(got[b], bias[0][:, p][:, :, p])
    rope = torch.randn(6, 4)  # 6 patches after 1 prefix token
    torch.testing.assert_close(core.gather_rope(rope, positions, 1)[1, 0], rope[positions[1, 1:] - 1])
    per_head = torch.randn(3, 6, 4)
    torch.testing.assert_close(core.gather_rope(per_head, positions, 1)[0], per_head[:, positions[0, 1:] - 1])


def test_attention_groups_split_only_when_padding_would_cost():
    assert core.attention_groups([10] * 16) is None  # equal counts: nothing to save
    assert core.attention_groups([30, 5, 5, 5]) is None  # too few images to split
    counts = [40, 8, 9, 38, 10, 39, 7, 41, 8, 9, 10, 40]
    groups = core.attention_groups(counts)
    assert sorted(i for index, _ in groups for i in index) == list(range(len(counts)))
    assert all(length == max(counts[i] for i in index) for index, length in groups)
    assert sum(len(g) * n**2 for g, n in groups) < 0.6 * len(counts) * max(counts) ** 2


def test_grouped_attention_equals_one_padded_call_at_every_real_token():
    """Each group runs on its own images, cut to its longest one; a slow per-image loop is the reference."""
    batch, heads, tokens, dim = 10, 3, 12, 8
    q, k, v = _qkv(batch, heads, tokens, dim, seed=3)
    counts = [12, 3, 4, 11, 5, 12, 2, 6, 9, 3]
    valid = torch.arange(tokens) < torch.tensor(counts)[:, None]
    sizes = torch.rand(batch, tokens) * 3 + 1
    pairwise = torch.randn(batch, heads, tokens, tokens)  # a relative-position-style bias, one per image
    groups = [(torch.tensor(index), length) for index, length in core.attention_groups(counts, min_images=2)]
    assert len(groups) > 1
    for bias in (core.size_bias(sizes, q.dtype), pairwise):
        out = core.attend_grouped(q, k, v, groups, valid=valid, bias=bias)
        for b, n in enumerate(counts):
            own = bias[b : b + 1, ..., :n] if bias.shape[-2] == 1 else bias[b : b + 1, :, :n, :n]
            expected = F.scaled_dot_product_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], attn_mask=own)
            torch.testing.assert_close(out[b : b + 1, :, :n], expected, atol=1e-5, rtol=1e-5)
        padded = core.attend(q, k, v, valid=valid, bias=bias)
        torch.testing.assert_close(out[valid[:, None, :, None].expand_as(out)], padded[valid[:, None, :, None].expand_as(out)], atol=1e-5, rtol=1e-5)


def test_merging_after_the_gather_equals_merging_before_it():
    """`merge_gathered` (eval: only the leaving tokens are read) = `merge_into_kept` on every token, then
    the gather; rows that receive nothing are unchanged bit for bit."""
    generator = torch.Generator().manual_seed(5)
    batch, tokens, channels, prefix = 3, 12, 8, 1
    x = torch.randn(batch, tokens, channels, generator=generator)
    sizes = torch.randint(1, 4, (batch, tokens), generator=generator).float()
    keep = torch.rand(batch, tokens, generator=generator) < 0.5
    keep[:, :2] = True  # the prefix and at least one patch
    similarity = core.token_similarity(x)
    destination = core.nearest_kept(similarity, keep, prefix)
    merged, merged_sizes = core.merge_into_kept(x, keep, ~keep, sizes, prefix, destination=destination)
    order = core.kept_first(keep)
    most, fewest = int(keep.sum(1).max()), int(keep.sum(1).min())
    front, tail = order[:, :most], order[:, fewest:]
    slot = torch.zeros_like(order).scatter_(1, front, torch.arange(most).expand_as(front))
    got, got_sizes = core.merge_gathered(
        core.take_rows(x, front), sizes.gather(1, front), core.take_rows(x, tail),
        (sizes * ~keep).gather(1, tail), slot.gather(1, destination.gather(1, tail)),
    )
    assert torch.allclose(got, core.take_rows(merged, front), atol=1e-6)
    assert torch.equal(got_sizes, merged_sizes.gather(1, front))
    untouched = got_sizes == sizes.gather(1, front)
    assert untouched.any() and torch.equal(got[untouched], core.take_rows(x, front)[untouched])
    assert torch.equal(core.token_similarity(x, tail), core.take_rows(similarity, tail))
