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
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention where masked-out tokens are hidden as keys.

    `valid` (bool, B x N): padding of a batch with per-image token counts (inference).
    `soft_mask` (float, B x N, straight-through 0/1 values): tokens pruned in training. The output is
    sum_j m_j e_ij v_j / sum_j m_j e_ij (DynamicViT's masked softmax), computed in one fused call by
    appending m_j as an extra value channel, so it stays differentiable in m without an N x N matrix.
    """
    if soft_mask is not None:
        m = soft_mask[:, None, :, None].to(v.dtype)
        out = F.scaled_dot_product_attention(
            q, k, torch.cat([v * m, m.expand(*v.shape[:-1], 1)], dim=-1), dropout_p=dropout_p, scale=scale
        )
        head_dim = v.shape[-1]
        return out[..., :head_dim] / out[..., head_dim:].clamp_min(_EPS)
    attn_mask = None if valid is None else valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def class_token_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    context: torch.Tensor,
    *,
    scale: float,
    method: str = "head_norm",
    valid: torch.Tensor | None = None,
    soft_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token importance S_i = sum_h R_h,i A_h[cls, i] (AS-ViT), or the head mean of A[cls, i] (EViT).

    Only the class token's attention row is computed (q_cls K^T: O(N d) per head); R_h,i is the L2 norm
    of head h's output for token i divided by its sum over heads.
    """
    logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * scale  # B, H, N
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    attn = logits.softmax(dim=-1)
    if soft_mask is not None:
        attn = attn * soft_mask[:, None, :]
        attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    if method == "mean":
        return attn.mean(dim=1)
    norms = context.norm(dim=-1)  # B, H, N
    weights = norms / (norms.sum(dim=1, keepdim=True) + _EPS)
    return (weights * attn).sum(dim=1)


def _top_patches(scores: torch.Tensor, eligible: torch.Tensor, num_prefix: int, k: int) -> torch.Tensor:
    """Indices (B, k) of the k best eligible patch tokens."""
    patch_scores = scores[:, num_prefix:].masked_fill(~eligible[:, num_prefix:], float("-inf"))
    return patch_scores.topk(k, dim=1, sorted=False).indices + num_prefix


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
    if k == 1 and eligible is None:
        keep |= scores >= scores[:, num_prefix:].amax(dim=1, keepdim=True)
    elif k > 0:
        if eligible is None:
            eligible = torch.ones_like(keep)
        keep.scatter_(1, _top_patches(scores, eligible, num_prefix, k), True)
    return keep


def topk_keep(scores: torch.Tensor, *, num_prefix: int, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, N): prefix tokens and the k best patches of each image."""
    if eligible is None:
        eligible = torch.ones_like(scores, dtype=torch.bool)
    keep = torch.zeros_like(eligible)
    keep[:, :num_prefix] = True
    return keep.scatter_(1, _top_patches(scores, eligible, num_prefix, k), True)


def straight_through_mask(
    scores: torch.Tensor, threshold: torch.Tensor, temperature: float, hard: torch.Tensor
) -> torch.Tensor:
    """`hard` (0/1) in the forward pass, the gradient of sigmoid((S - theta) / T) in the backward pass."""
    soft = torch.sigmoid((scores - threshold) / temperature)
    return hard.to(soft.dtype) + soft - soft.detach()


def gather_kept(x: torch.Tensor, keep: torch.Tensor, max_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each image's kept tokens to the front (original order) and cut to `max_count`.

    Returns the gathered tokens (B, max_count, C) and their source indices (B, max_count).
    """
    order = torch.argsort(keep.logical_not().to(torch.int8), dim=1, stable=True)[:, :max_count]
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), order


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
