"""Token Merging (ToMe) for timm VisionTransformer models: a benchmark peer.

Clean-room reimplementation written from the paper only (Bolya et al., "Token Merging: Your
ViT But Faster", ICLR 2023, arXiv 2210.09461), not from ToMe's published code, which is under
a non-commercial licence (CC-BY-NC). It is a baseline for the benchmarks, not part of the
``timm_token_prune`` library.

In every block, after the attention residual and before the MLP, ``r`` tokens are merged by
bipartite soft matching on the head-averaged attention keys; merged tokens are size-weighted
averages, and every attention adds ``log(size)`` of each key to its logits (proportional
attention). The model is patched in place by swapping ``__class__`` (weights and state_dict
keys unchanged)::

    apply_tome(model, r=4)          # or a list with one r per block
    set_merges(model, [4] * 6 + [3] * 6)
    remove_tome(model)
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

__all__ = [
    "apply_tome",
    "remove_tome",
    "set_merges",
    "last_sizes",
    "tome_macs",
    "merges_for_budget",
    "proportional_attention",
    "bipartite_soft_matching",
    "merge_wavg",
    "clamp_merges",
]

Merges = Union[int, Sequence[int]]
MergeFn = Callable[[torch.Tensor], torch.Tensor]
_POOLS = ("token", "avg")


# --------------------------------------------------------------------------- core ops


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """SDPA over (B, H, N, D) with ``log(size)`` of each key added to the logits.

    ``size`` is (B, N, 1) or (B, N); ``None`` means every token has size 1 (no bias).
    """
    mask = None
    if size is not None:
        mask = size.reshape(size.shape[0], 1, 1, -1).log().to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def clamp_merges(r: int, num_tokens: int, num_prefix_tokens: int) -> int:
    """Merges actually done for ``r`` requested on ``num_tokens`` tokens.

    At most the number of non-prefix tokens in set A (even positions), which is about half
    the non-prefix tokens, and 0 when set B has no mergeable token.
    """
    mergeable_a = (num_tokens + 1) // 2 - (num_prefix_tokens + 1) // 2
    mergeable_b = num_tokens // 2 - num_prefix_tokens // 2
    if mergeable_b <= 0:
        return 0
    return max(0, min(int(r), mergeable_a))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix_tokens: int = 1) -> Tuple[MergeFn, int]:
    """Match tokens by cosine similarity of ``metric`` (B, N, C); return ``(merge, r_done)``.

    Set A is the even positions, set B the odd ones. Each A token picks its most similar B
    token; the ``r`` A tokens with the highest similarity are merged into their match. Prefix
    tokens neither merge nor receive merges. ``merge(t)`` (t: (B, N, ...)) sums merged rows into
    their destination and returns prefix tokens (original order), unmerged A tokens (original
    order), then B tokens: N - r_done rows. Use :func:`merge_wavg` for size-weighted averages.
    """
    B, N, _ = metric.shape
    p = num_prefix_tokens
    r = clamp_merges(r, N, p)
    if r == 0:
        return (lambda t: t), 0
    pa, pb = (p + 1) // 2, p // 2  # prefix tokens in A and in B
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        scores[:, :pa, :] = -math.inf
        scores[:, :, :pb] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # best B for each A
        order = node_max.argsort(dim=-1, descending=True)
        src_idx = order[:, :r]  # merged A tokens (prefix A rows are -inf, so never here)
        unm_idx = order[:, r:].sort(dim=-1).values[:, pa:]  # unmerged non-prefix A, in order
        dst_idx = node_idx.gather(1, src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        tail = t.shape[2:]
        ones = (1,) * len(tail)

        def take(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return src.gather(1, idx.view(B, -1, *ones).expand(B, idx.shape[1], *tail))

        src, dst = t[:, ::2], t[:, 1::2]
        moved = take(src, src_idx)
        index = dst_idx.view(B, r, *ones).expand(B, r, *tail)
        dst = dst.scatter_add(1, index, moved)
        return torch.cat([t[:, :p], take(src, unm_idx), dst[:, pb:]], dim=1)

    return merge, r


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` (B, N, C); ``size`` (B, N, 1), ``None`` = all ones."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    x = merge(x * size)
    size = merge(size)
    return x / size, size


# --------------------------------------------------------------------------- patched modules


class ToMeAttention(Attention):
    """timm Attention with proportional attention; returns ``(out, metric)``, metric = keys
    averaged over heads (B, N, head_dim)."""

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        B, N, _ = x.shape
        attn_dim = self.num_heads * self.head_dim
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = proportional_attention(q, k, v, size, dropout_p=dropout_p, scale=self.scale)
        out = self.norm(out.transpose(1, 2).reshape(B, N, attn_dim))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return out, k.mean(dim=1)


class ToMeBlock(Block):
    """timm Block that merges ``self._tome_r`` tokens between attention and MLP; takes and
    returns ``(x, size)``."""

    _tome_r: int = 0
    _tome_prefix: int = 1

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:  # type: ignore[override]
        attn_out, metric = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(attn_out))
        if self._tome_r > 0:
            merge, done = bipartite_soft_matching(metric, self._tome_r, self._tome_prefix)
            if done > 0:
                x, size = merge_wavg(merge, x, size)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size


class _ToMeModel:
    """Mixin put in front of the model's own class: runs the blocks with explicit sizes
    (fresh every forward) and size-weights 'avg' pooling."""

    def _tome_forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = None  # all ones; state starts fresh on every call
        ckpt = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for blk in self.blocks:
            if ckpt:
                x, size = checkpoint(blk, x, size, use_reentrant=False)
            else:
                x, size = blk(x, size)
        x = self.norm(x)
        self._tome_sizes = None if size is None else size.detach()
        return x, size

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("ToMe does not support attn_mask / is_causal (merging changes the tokens)")
        return self._tome_forward_features(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.global_pool != "avg":
            return super().forward_head(x, pre_logits=pre_logits)
        if size is None:
            size = self._tome_sizes
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        if size.shape[:2] != x.shape[:2]:
            raise ValueError(f"sizes {tuple(size.shape[:2])} do not match tokens {tuple(x.shape[:2])}")
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        size = size.to(x.dtype)
        x = (x * size).sum(dim=1) / size.sum(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("ToMe does not support attn_mask / is_causal (merging changes the tokens)")
        x, size = self._tome_forward_features(x)
        return self.forward_head(x, size=size)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates is not supported with ToMe (merging changes the token grid)")


_MODEL_CLASSES: dict = {}


def _tome_class(cls: type) -> type:
    if cls not in _MODEL_CLASSES:
        _MODEL_CLASSES[cls] = type(f"ToMe{cls.__name__}", (_ToMeModel, cls), {"__module__": __name__})
    return _MODEL_CLASSES[cls]


# --------------------------------------------------------------------------- public API


def _is_patched(model: nn.Module) -> bool:
    return isinstance(model, _ToMeModel) or any(isinstance(m, (ToMeBlock, ToMeAttention)) for m in model.modules())


def _check_supported(model: nn.Module) -> None:
    if _is_patched(model):
        raise ValueError("model is already patched by ToMe; call remove_tome(model) first")
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"ToMe supports timm VisionTransformer models only (incl. VisionTransformerDistilled), got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(
                f"ToMe supports blocks of exactly timm.models.vision_transformer.Block with timm.layers.Attention; "
                f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
        raise ValueError(
            f"ToMe supports global_pool in {_POOLS} without attention pooling, got {model.global_pool!r}")


def _per_block(model: nn.Module, r: Merges) -> List[int]:
    depth = len(model.blocks)
    if isinstance(r, bool):
        raise TypeError("r must be an int or a list of ints")
    if isinstance(r, int):
        rs = [r] * depth
    else:
        rs = list(r)
        if len(rs) != depth:
            raise ValueError(f"r has {len(rs)} entries, the model has {depth} blocks")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in rs):
        raise TypeError("r must be an int or a list of ints")
    if any(v < 0 for v in rs):
        raise ValueError("merges per block must be >= 0")
    return rs


def apply_tome(model: nn.Module, r: Merges) -> nn.Module:
    """Patch a timm VisionTransformer in place with ToMe; ``r`` merges per block (int or
    one int per block). Returns the model."""
    _check_supported(model)
    rs = _per_block(model, r)
    model._tome_orig_class = type(model)
    model._tome_sizes = None
    for blk in model.blocks:
        blk.__class__ = ToMeBlock
        blk.attn.__class__ = ToMeAttention
        blk._tome_prefix = model.num_prefix_tokens
    model.__class__ = _tome_class(model._tome_orig_class)
    set_merges(model, rs)
    return model


def set_merges(model: nn.Module, r: Merges) -> None:
    """Set the merges per block of a ToMe-patched model."""
    if not isinstance(model, _ToMeModel):
        raise ValueError("model is not patched by ToMe; call apply_tome first")
    for blk, v in zip(model.blocks, _per_block(model, r)):
        blk._tome_r = v


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome` in place (original classes restored). Returns the model."""
    if not isinstance(model, _ToMeModel):
        raise ValueError("model is not patched by ToMe")
    for blk in model.blocks:
        blk.__class__ = Block
        blk.attn.__class__ = Attention
        for name in ("_tome_r", "_tome_prefix"):
            blk.__dict__.pop(name, None)
    model.__class__ = model._tome_orig_class
    for name in ("_tome_orig_class", "_tome_sizes"):
        model.__dict__.pop(name, None)
    return model


def last_sizes(model: nn.Module) -> Optional[torch.Tensor]:
    """Token sizes (B, N) after the blocks of the last forward; ``None`` if nothing merged."""
    if not isinstance(model, _ToMeModel):
        raise ValueError("model is not patched by ToMe")
    s = model._tome_sizes
    return None if s is None else s[..., 0]


# --------------------------------------------------------------------------- MACs


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every nn.Linear in ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _cost_model(model: nn.Module) -> Tuple[int, int, List[Tuple[int, int, int, int]]]:
    """(patch-embed MACs per patch, head MACs, per block: (attn linears/token, other
    linears/token, attention width, metric width))."""
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        kh, kw = proj.kernel_size
        embed = proj.in_channels // proj.groups * kh * kw * proj.out_channels
    elif isinstance(proj, nn.Linear):
        embed = proj.in_features * proj.out_features
    else:
        embed = 0
    head = sum(_linear_macs(getattr(model, n)) for n in ("head", "head_dist") if isinstance(getattr(model, n, None), nn.Module))
    blocks = []
    for blk in model.blocks:
        attn_lin = _linear_macs(blk.attn)
        blocks.append((attn_lin, _linear_macs(blk) - attn_lin, blk.attn.num_heads * blk.attn.head_dim, blk.attn.head_dim))
    return embed, head, blocks


def _macs(cost, rs: Sequence[int], num_tokens: int, prefix: int) -> Tuple[float, List[int]]:
    embed, head, blocks = cost
    total = (num_tokens - prefix) * embed + head
    n, done = num_tokens, []
    for (attn_lin, other_lin, attn_dim, metric_dim), r in zip(blocks, rs):
        total += n * attn_lin + 2 * n * n * attn_dim
        r = clamp_merges(r, n, prefix)
        if r > 0:
            total += ((n + 1) // 2) * (n // 2) * metric_dim
        n -= r
        total += n * other_lin
        done.append(r)
    return float(total), done


def tome_macs(model: nn.Module, r: Merges, num_tokens: int) -> float:
    """Analytic multiply-accumulates per image with ``r`` merges per block.

    ``num_tokens`` counts prefix tokens. Counts the patch-embedding projection, every
    nn.Linear of the blocks (attention linears on the tokens entering the block, the rest
    on the tokens after merging), the attention matmuls (2 N^2 width per block), the
    matching (|A| |B| head_dim per block that merges) and the head. Norms, activations,
    softmax and the merge averaging are not counted.
    """
    return _macs(_cost_model(model), _per_block(model, r), num_tokens, model.num_prefix_tokens)[0]


def merges_for_budget(
    model: nn.Module,
    budget: float,
    num_tokens: int,
    dense_macs_fn: Optional[Callable[[nn.Module, int], float]] = None,
    tol: float = 0.02,
) -> List[int]:
    """Merges per block whose MACs / dense MACs is closest to ``budget``.

    Candidates follow the paper: a constant r, refined by r+1 in the first k blocks. The
    returned list is what actually runs (clamped where tokens run out). Dense MACs are
    ``tome_macs(model, 0, num_tokens)`` unless ``dense_macs_fn(model, num_tokens)`` is given.
    Raises ValueError if no schedule is within ``tol`` of the budget.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    cost = _cost_model(model)
    dense = float(dense_macs_fn(model, num_tokens)) if dense_macs_fn is not None else _macs(cost, [0] * depth, num_tokens, prefix)[0]
    best: Optional[Tuple[float, float, List[int]]] = None
    for r in range(0, (num_tokens + 1) // 2 + 1):
        for k in range(depth):
            macs, done = _macs(cost, [r + 1] * k + [r] * (depth - k), num_tokens, prefix)
            ratio = macs / dense
            if best is None or abs(ratio - budget) < abs(best[0] - budget):
                best = (ratio, macs, done)
    ratio, _, done = best
    if abs(ratio - budget) > tol:
        raise ValueError(
            f"cannot reach a MACs budget of {budget:.3f} with ToMe on {num_tokens} tokens "
            f"(closest schedule gives {ratio:.3f})")
    return done
