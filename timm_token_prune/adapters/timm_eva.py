"""timm eva adapter: `Eva` (eva02, eva_giant, vit_*rope*, dinov3, pe_*, ...), rotary position embeddings
included. The blocks and attentions are patched as for `VisionTransformer`; the model's forward hands
every block the rotary embeddings of the tokens it actually holds (`TokenPruner.gather_rope`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import PruneConfig
from ..pruner import TokenPruner
from ..swap import swap_class
from . import timm as timm_adapter


def _eva():
    try:
        from timm.layers import AttentionRope
        from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    except ImportError:  # timm not installed (or too old): this adapter matches nothing
        return None
    return Eva, (EvaBlock, EvaBlockPostNorm), (EvaAttention, AttentionRope)


class EvaAdapter(timm_adapter.TimmAdapter):
    name = "timm-eva"
    supported = (
        "timm Eva (eva02_*, eva_giant_*, vit_*rope*, dinov3 and other eva-built models) with EvaBlock / "
        "EvaBlockPostNorm and EvaAttention / AttentionRope, rotary embeddings or none, any global_pool of "
        f"{timm_adapter.POOLS}"
    )

    def model_classes(self) -> tuple[type, ...]:
        classes = _eva()
        return () if classes is None else (classes[0],)

    def check(self, model: nn.Module, config: PruneConfig) -> tuple[int, ...]:
        _, blocks, attentions = _eva()
        reasons = timm_adapter.pool_problems(model)
        reasons += timm_adapter.block_problems(model, blocks, attentions, "EvaBlock / EvaAttention / AttentionRope")
        if not reasons and any(b.attn.num_prefix_tokens != model.num_prefix_tokens for b in model.blocks):
            reasons.append("its attentions' num_prefix_tokens differ from the model's")
        return timm_adapter.checked_locations(model, config, reasons, self.supported)

    def patch(self, model: nn.Module, config: PruneConfig, locations: tuple[int, ...]) -> TokenPruner:
        attn = model.blocks[0].attn
        pruner = timm_adapter.new_pruner(model, config, locations, attn_dim=attn.num_heads * attn.head_dim)
        timm_adapter.swap_blocks(model, pruner, timm_adapter.PruningAttention)
        swap_class(model, _PrunedEva)
        return pruner


class _PrunedEva(timm_adapter.PrunedModel):
    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        self.start_forward(x, attn_mask, is_causal)
        return self._blocks_and_norm(x)

    def _embed(self, x: torch.Tensor):
        pruner = self.token_pruner
        x, rope = self._pos_embed(self.patch_embed(x))
        per_block = getattr(self, "rope_mixed", False) and rope is not None  # (depth, ...): one per block

        def run(index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            block_rope = rope[index] if per_block else rope
            return block(x, rope=None if block_rope is None else pruner.gather_rope(block_rope))

        return self.norm_pre(x), run

    def _pool_includes_prefix(self) -> bool:
        return self.attn_pool is not None
