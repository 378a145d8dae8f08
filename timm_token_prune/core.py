"""The pruning math, independent of any model zoo: scores, masks, masked attention, token selection.

Shapes: q, k, v and the attention context are (B, heads, N, head_dim); scores and masks are (B, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    soft_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention where masked-out tokens are hidden as keys.

    `valid` (bool, B x N): padding of a batch with per-image token counts (inference).
    `soft_mask` (float, B x N, straight-through 0/1 values): tokens pruned in training. The output is
    sum_j m_j e_ij v_j / sum_j m_j e_ij (DynamicViT's masked softmax). Its value is computed with the
    hard mask as a key mask (exact even where pruned keys dominate the softmax); its gradient in m
    comes from a second fused call on detached q, k, v with m appended as an extra value channel, so it
    stays differentiable in m without an N x N matrix.
    `bias` (float, B or 1 x heads x N x N): an additive attention bias (relative position bias).
    """
    if soft_mask is not None:
        hard = soft_mask.detach() > 0.5
        out = attend(q, k, v, valid=hard if valid is None else valid & hard, bias=bias, dropout_p=dropout_p, scale=scale)
        if not soft_mask.requires_grad:
            return out
        m = soft_mask[:, None, :, None].to(v.dtype)
        v = v.detach()
        extended = torch.cat([v * m, m.expand(*v.shape[:-1], 1)], dim=-1)
        masked = F.scaled_dot_product_attention(q.detach(), k.detach(), extended, attn_mask=bias, scale=scale)
        masked = masked[..., :-1] / masked[..., -1:].clamp_min(_EPS)
        return out + (masked - masked.detach())
    attn_mask = bias
    if valid is not None:
        keys = valid[:, None, None, :]
        attn_mask = keys if bias is None else bias.masked_fill(~keys, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def attention_groups(counts: list[int], min_images: int = 8) -> list[tuple[list[int], int]] | None:
    """How to split a padded batch whose images hold `counts` tokens so that attention pads each group only to
    its own longest image: (image indices, length) per group, images sorted by count, or None when one group
    (the whole padded batch) costs about as little. Attention costs about images x length^2 per group, and
    each further group a fixed share of a call (`_GROUP_CALL_COST`)."""
    if len(counts) < min_images:
        return None
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    best, best_cost = None, len(counts) * max(counts) ** 2
    for groups in (2, 3, 4):
        bounds = [round(g * len(order) / groups) for g in range(groups + 1)]
        split = [order[a:b] for a, b in zip(bounds, bounds[1:])]
        cost = sum(len(g) * counts[g[0]] ** 2 for g in split) * (1 + _GROUP_CALL_COST * (groups - 1))
        if cost < best_cost:
            best, best_cost = [(g, counts[g[0]]) for g in split], cost
    return best


_GROUP_CALL_COST = 0.05


def attend_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: list[tuple[torch.Tensor, int]],
    *,
    valid: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`attend` (inference: no soft mask, no dropout) on a padded batch, one call per group of images (see
    `attention_groups`), each cut to its own length: the same values at every real token, zeros past each
    group's length."""
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])
    for index, length in groups:
        part = [t[:, :, :length].index_select(0, index) for t in (q, k, v)]
        group_bias = None
        if bias is not None:
            group_bias = bias[..., :length] if bias.shape[-2] == 1 else bias[..., :length, :length]
            if group_bias.shape[0] > 1:
                group_bias = group_bias.index_select(0, index)
        context = attend(*part, valid=valid[:, :length].index_select(0, index), bias=group_bias, scale=scale)
        out[:, :, :length].index_copy_(0, index, context)
    return out


def _attention_rows(
    q: torch.Tensor,
    keys_t: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    valid: torch.Tensor | None,
    soft_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention of the (scaled) queries `q` (B, H, R, d) over the keys `keys_t` (B, H, d, N) that
    `valid` and the (detached, 0/1) `soft_mask` leave, as in `attend`; pruned keys are excluded before
    the softmax, never after, so that kept keys cannot underflow."""
    logits = q @ keys_t
    if bias is not None:
        logits += bias
    keys = valid
    if soft_mask is not None:
        keys = soft_mask > 0.5 if keys is None else keys & (soft_mask > 0.5)
    if keys is not None:
        logits.masked_fill_(~keys[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def _weigh_heads(attn: torch.Tensor, context: torch.Tensor, method: str) -> torch.Tensor:
    """(B, H, N) attention received per head -> (B, N) scores: the head mean (EViT), or each head
    weighted by R_h,i = ||context_h,i|| / sum_h' ||context_h',i|| (AS-ViT)."""
    if method == "mean":
        return attn.mean(dim=1)
    norms = context.norm(dim=-1)  # B, H, N
    weights = norms / (norms.sum(dim=1, keepdim=True) + _EPS)
    return (weights * attn).sum(dim=1)


def token_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    context: torch.Tensor,
    *,
    scale: float,
    method: str = "head_norm",
    class_token: bool = True,
    valid: torch.Tensor | None = None,
    soft_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    chunk_elements: int = 1 << 20,
) -> torch.Tensor:
    """Token importance S_i = sum_h R_h,i A_h[cls, i] (AS-ViT), or the head mean of A[cls, i] (EViT);
    R_h,i is the L2 norm of head h's output for token i divided by its sum over heads.

    With a class token (token 0) only its attention row is computed (q_cls K^T: O(N d) per head).
    Without one (`class_token=False`), A[cls, i] becomes mean_j A[j, i], the attention token i receives
    averaged over the (real, kept) queries j: with global average pooling every token contributes
    alike, so the mean row stands in for the class row. That costs one Q K^T (O(N^2 d) per head),
    computed in blocks of query rows so at most `chunk_elements` attention weights exist at a time.
    `sizes` (B, N): merged tokens count as that many queries (their key weight is already in `bias`).
    """
    batch, heads, tokens, _ = q.shape
    if class_token:
        row_bias = None if bias is None else bias[..., :1, :]
        keys_t = k.transpose(-2, -1)
        attn = _attention_rows(q[:, :, :1] * scale, keys_t, bias=row_bias, valid=valid, soft_mask=soft_mask)
        return _weigh_heads(attn.squeeze(2), context, method)
    if soft_mask is not None:
        query_weights = soft_mask
    elif valid is not None:
        query_weights = valid.to(q.dtype)
    else:
        query_weights = None  # every query counts once
    if sizes is not None:
        query_weights = sizes.to(q.dtype) if query_weights is None else query_weights * sizes
    # blocks of query rows small enough to stay in cache (about 4 MB of float32 weights each)
    rows = max(8, chunk_elements // max(1, batch * heads * tokens))
    q, keys_t = q * scale, k.transpose(-2, -1).contiguous()  # once, not per block of rows
    received = q.new_zeros(batch, heads, 1, tokens)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        row_bias = bias if bias is None or bias.shape[-2] == 1 else bias[..., start:stop, :]
        attn = _attention_rows(q[:, :, start:stop], keys_t, bias=row_bias, valid=valid, soft_mask=soft_mask)
        if query_weights is None:
            received += attn.sum(dim=2, keepdim=True)
        else:  # a weighted sum over the rows as a matrix-vector product: no weighted copy of attn
            received += query_weights[:, None, None, start:stop].to(attn.dtype) @ attn
    count = tokens if query_weights is None else query_weights.sum(dim=1).clamp_min(_EPS)[:, None, None]
    return _weigh_heads(received.squeeze(2) / count, context, method)


def gather_bias(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows and columns of an attention bias (B or 1, H, N0, N0) at `positions` (B, N): (B, H, N, N)."""
    batch, tokens = positions.shape
    full = bias.expand(batch, -1, -1, -1)
    heads, size = full.shape[1], full.shape[-1]
    rows = full.gather(2, positions[:, None, :, None].expand(-1, heads, -1, size))
    return rows.gather(3, positions[:, None, None, :].expand(-1, heads, tokens, -1))


def gather_rope(rope: torch.Tensor, positions: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Rotary embeddings of the patches at `positions` (B, N; prefix tokens first, then patches by
    original index). `rope` is (P, D), (H, P, D) or (B, H, P, D) over all P patches; the result, over the
    N - num_prefix patches of each image, broadcasts against q / k (B, H, N - num_prefix, d)."""
    index = positions[:, num_prefix:] - num_prefix  # B, n
    if rope.ndim == 2:
        return rope[index][:, None]  # B, 1, n, D
    if rope.ndim == 3:
        return rope[:, index].transpose(0, 1)  # B, H, n, D
    if rope.ndim == 4:
        full = rope.expand(index.shape[0], -1, -1, -1)
        return full.gather(2, index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1]))
    raise ValueError(f"rotary embeddings of shape {tuple(rope.shape)} are not supported")


def _top_patches(scores: torch.Tensor, eligible: torch.Tensor | None, num_prefix: int, k: int) -> torch.Tensor:
    """Indices (B, k) of the k best eligible patch tokens (a NaN score ranks last among the eligible ones;
    `eligible` None: all are)."""
    return _patch_ranking(scores, eligible, num_prefix).topk(k, dim=1, sorted=False).indices + num_prefix


def _patch_ranking(scores: torch.Tensor, eligible: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """The patch scores (B, N - prefix) to rank: NaN last among the eligible, ineligible below everything."""
    lowest = torch.finfo(scores.dtype).min
    patch_scores = scores[:, num_prefix:].nan_to_num(nan=lowest, neginf=lowest)
    if eligible is not None:
        patch_scores = patch_scores.masked_fill(~eligible[:, num_prefix:], float("-inf"))
    return patch_scores


def mass_share(scores: torch.Tensor, eligible: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """For each patch token, the share of its image's (eligible patch) score mass held by it and by every
    patch that scores lower or the same: (B, N) in (0, 1], differentiable. A threshold theta on it keeps
    the fewest best patches holding at least 1 - theta of the mass. Prefix tokens get 1."""
    s = scores.clamp_min(0)
    if eligible is not None:
        s = s * eligible
    s[:, :num_prefix] = 0
    ordered, order = s.sort(dim=1, descending=True, stable=True)
    total = ordered.sum(dim=1, keepdim=True)
    share = (total - (ordered.cumsum(dim=1) - ordered)) / total.clamp_min(_EPS)
    share = torch.empty_like(share).scatter(1, order, share)
    share[:, :num_prefix] = 1
    return share


def hard_keep(
    scores: torch.Tensor,
    threshold: torch.Tensor,
    *,
    num_prefix: int,
    min_keep: int,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool (B, N): prefix tokens, patches scoring above `threshold`, and the `min_keep` best patches."""
    keep = scores > threshold
    if eligible is not None:
        keep &= eligible
    keep[:, :num_prefix] = True
    k = min(min_keep, scores.shape[1] - num_prefix)
    if k > 0:
        keep.scatter_(1, _top_patches(scores, eligible, num_prefix, k), True)
        if eligible is not None:  # an image with fewer than min_keep eligible patches keeps only those
            keep[:, num_prefix:] &= eligible[:, num_prefix:]
    return keep


def topk_keep(scores: torch.Tensor, *, num_prefix: int, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, N): prefix tokens and the k best patches of each image."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[:, :num_prefix] = True
    return keep.scatter_(1, _top_patches(scores, eligible, num_prefix, k), True)


def topk_keep_per_image(
    scores: torch.Tensor, *, num_prefix: int, k: torch.Tensor, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool (B, N): prefix tokens and the k[b] best eligible patches of image b (k: B integers)."""
    order = _patch_ranking(scores, eligible, num_prefix).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep = rank < k[:, None]
    if eligible is not None:
        keep &= eligible[:, num_prefix:]
    return torch.cat([torch.ones_like(keep[:, :num_prefix]), keep], dim=1)


def straight_through_mask(
    scores: torch.Tensor, threshold: torch.Tensor, temperature: float, hard: torch.Tensor
) -> torch.Tensor:
    """`hard` (0/1) in the forward pass, the gradient of sigmoid((S - theta) / T) in the backward pass."""
    soft = torch.sigmoid((scores - threshold) / temperature)
    return hard.to(soft.dtype) + soft - soft.detach()


def token_similarity(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity (B, N, N) of the tokens x (B, N, C), without gradient; with `rows` (B, R), only
    those tokens' rows (B, R, N)."""
    unit = F.normalize(x.detach().float(), dim=-1)
    return (unit if rows is None else take_rows(unit, rows)) @ unit.transpose(1, 2)


def novelty(scores: torch.Tensor, similarity: torch.Tensor, eligible: torch.Tensor | None, num_prefix: int):
    """1 - the highest cosine similarity (floored at 0) of each token to an eligible patch token that scores
    higher: (B, N). A near copy of a better token adds little once it is merged into it."""
    rivals = scores.clone()  # prefix and ineligible tokens score above no one
    rivals[:, :num_prefix] = float("-inf")
    if eligible is not None:
        rivals.masked_fill_(~eligible, float("-inf"))
    higher = rivals[:, None, :] > scores[:, :, None]  # [b, j, i]: token i is a rival scoring above token j
    # each row holds a 0 (a token never scores above itself), so the maximum is never below 0
    return 1 - torch.where(higher, similarity, 0.0).amax(dim=-1)


def nearest_kept(similarity: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """For every row of `similarity` (B, R, N: tokens against all N), the index (B, R) of the kept patch
    token (`keep`: B, N) most similar to it."""
    targets = keep.clone()
    targets[:, :num_prefix] = False
    return similarity.masked_fill(~targets[:, None, :], float("-inf")).argmax(dim=-1)


def merge_into_kept(
    x: torch.Tensor,
    keep: torch.Tensor,
    dropped: torch.Tensor,
    sizes: torch.Tensor,
    num_prefix: int,
    similarity: torch.Tensor | None = None,
    destination: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each `dropped` token of x (B, N, C) into the kept patch token most similar to it (cosine of
    the tokens themselves, `token_similarity`; or given as `destination`, see `nearest_kept`), as a
    size-weighted mean; the kept token's size (B, N) grows by the merged ones' (later attentions count a
    token of size s as s copies: `size_bias`). Prefix tokens neither merge nor receive. Returns (x, sizes);
    rows that receive nothing stay unchanged, bit for bit."""
    if destination is None:
        destination = nearest_kept(token_similarity(x) if similarity is None else similarity, keep, num_prefix)
    weights = sizes * dropped.to(sizes.dtype)  # prefix tokens are kept, so never dropped
    added = torch.zeros_like(sizes).scatter_add_(1, destination, weights)
    summed = torch.zeros_like(x).scatter_add_(
        1, destination[..., None].expand_as(x), weights.to(x.dtype)[..., None] * x
    )
    receives = added > 0  # only kept patch tokens are destinations
    new_sizes = torch.where(receives, sizes + added, sizes)
    merged = (sizes.to(x.dtype)[..., None] * x + summed) / new_sizes.to(x.dtype)[..., None]
    return torch.where(receives[..., None], merged, x), new_sizes


def size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias (B, 1, 1, N) = log(size): attention to a merged token of size s counts s-fold."""
    return sizes.log().to(dtype)[:, None, None, :]


def key_weights_bias(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pooling weights (B, N: 0 for hidden tokens, else the token's size; detached) as an additive key
    bias (B, 1, 1, N): -inf hides a token, log(size) weighs a merged one."""
    return weights.detach().to(dtype).log()[:, None, None, :]


def _flat_rows(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """Row indices (B, M) into each image's `tokens` rows -> indices (B * M,) into the flattened batch."""
    if index.shape[0] == 1 and not torch.jit.is_tracing():  # one image: no offsets (a traced batch may grow)
        return index.flatten()
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * tokens).flatten()


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) at `index` (B, M): (B, M, C). Whole rows by index_select (on CPU several times faster
    than gather with an index expanded over C)."""
    batch, tokens, channels = x.shape
    flat = _flat_rows(index, tokens)
    return x.reshape(batch * tokens, channels).index_select(0, flat).view(batch, index.shape[1], channels)


def kept_first(keep: torch.Tensor) -> torch.Tensor:
    """The order (B, N) that puts each image's kept tokens first, then the others, each in original order."""
    return torch.argsort(keep.logical_not().to(torch.int8), dim=1, stable=True)


def merge_gathered(
    kept: torch.Tensor, kept_sizes: torch.Tensor, tail: torch.Tensor, tail_weights: torch.Tensor, destination: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_into_kept` after the gather: the kept tokens (B, M, C) of sizes (B, M) take in the `tail`
    tokens (B, R, C) of weights (B, R: their sizes where they merge, 0 elsewhere) at `destination` (B, R,
    indices into M), as size-weighted means. Only receiving rows are touched (each gains
    sum_j w_j (x_j - x_d) / (s_d + sum_j w_j)); the others stay unchanged, bit for bit."""
    added = torch.zeros_like(kept_sizes).scatter_add_(1, destination, tail_weights)
    sizes = kept_sizes + added
    share = (tail_weights / sizes.gather(1, destination)).to(tail.dtype)  # 0 where nothing merges
    batch, count, channels = kept.shape
    flat, rows = _flat_rows(destination, count), kept.reshape(batch * count, channels)
    step = (tail.reshape(-1, channels) - rows.index_select(0, flat)).mul_(share.reshape(-1, 1))
    if torch.jit.is_tracing():  # ONNX has no index_add
        step = step.view_as(tail)
        return kept.scatter_add_(1, destination[..., None].expand_as(step), step), sizes
    # index_add over whole rows: on CPU several times faster than scatter_add with an expanded index
    return rows.index_add_(0, flat, step).view(batch, count, channels), sizes


def packing(valid: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between a padded batch and its `total` real tokens packed in (B * N) order, without a
    host sync: the flat positions of the real tokens, and for every position the packed row it reads
    (padding reads its image's first token)."""
    flat = valid.flatten()
    pack = torch.argsort(flat.logical_not().to(torch.int8), stable=True)[:total]
    rank = flat.cumsum(0) - 1
    first = (valid.sum(1).cumsum(0) - valid.sum(1)).repeat_interleave(valid.shape[1])
    return pack, torch.where(flat, rank, first)


def masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x (B, N, C) weighted by `weights` (B, N)."""
    w = weights.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(_EPS)
