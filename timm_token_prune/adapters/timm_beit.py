"""timm beit adapter: `Beit` (beit_*, beitv2_*), whose attention adds a relative position bias. After
pruning, each image's bias is the rows and columns of its kept tokens (`TokenPruner.gather_bias`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import PruneConfig
from ..pruner import TokenPruner
from ..swap import swap_class
from . import timm as timm_adapter

_POOLS = ("avg", "token")


def _beit():
    try:
        from timm.models.beit import Attention, Beit, Block
    except ImportError:  # timm not installed: this adapter matches nothing
        return None
    return Beit, Block, Attention


class BeitAdapter(timm_adapter.TimmAdapter):
    name = "timm-beit"
    supported = "timm Beit (beit_*, beitv2_*) with its Block / Attention and global_pool 'avg' or 'token'"

    def model_classes(self) -> tuple[type, ...]:
        classes = _beit()
        return () if classes is None else (classes[0],)

    def check(self, model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
        _, Block, Attention = _beit()
        reasons = []
        if model.global_pool not in _POOLS:
            reasons.append(f"global_pool={model.global_pool!r} returns every token; supported: {_POOLS}")
        reasons += timm_adapter.block_problems(model, (Block,), (Attention,), "beit's Block / Attention")
        return timm_adapter.checked_locations(model, config, reasons, self.supported)

    def patch(self, model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
        attn = model.blocks[0].attn
        pruner = timm_adapter.new_pruner(model, config, locations, attn_dim=attn.qkv.out_features // 3)
        timm_adapter.swap_blocks(model, pruner, _PrunedBeitAttention)
        swap_class(model, _PrunedBeit)
        return pruner


class _PrunedBeit(timm_adapter.PrunedModel):
    def _embed(self, x: torch.Tensor):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None

        def run(index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return block(x, shared_rel_pos_bias=bias)

        return self.pos_drop(x), run

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self._head_input(x)
        weights = self.token_pruner.pool_weights()
        if weights is None:
            return super().forward_head(x, pre_logits=pre_logits)
        timm_adapter.check_pool_input(x, weights)
        x = timm_adapter.pool_kept(self, x, weights, self.global_pool, include_prefix=False)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


class _PrunedBeitAttention:
    """beit's Attention on a pruned layout: the relative position bias (its own and the model's shared one)
    is gathered at the kept tokens' rows and columns, and added inside the fused attention."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        pruner = self._token_pruner
        if pruner.plain_attention(self._prune_stage) and pruner.state.layout.positions is None:
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        if bias is not None:
            bias = pruner.gather_bias(bias)
        q, k, v = timm_adapter.project(self, x, pruner)
        B, _, N, _ = q.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = pruner.attention(q, k, v, scale=self.scale, dropout_p=dropout_p, stage=self._prune_stage, bias=bias)
        return self.proj_drop(self.proj(pruner.pack(x.transpose(1, 2).reshape(B, N, -1))))
