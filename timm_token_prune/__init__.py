"""timm-token-prune: learnable adaptive token pruning (AS-ViT) for timm and Hugging Face ViTs."""

from .adapters import Adapter, register_adapter
from .api import budget_loss, calibrate, get_pruner, last_stats, patch_model, unpatch_model
from .config import PruneConfig
from .distill import DistillConfig, distill, evaluate
from .errors import AlreadyPatchedError, CheckpointError, NotPatchedError, UnsupportedModelError
from .export import export_onnx
from .hub import from_pretrained, push_to_hub, save_pretrained
from .pruner import PruneStats, TokenPruner
from .static import freeze, unfreeze
from .visualize import prepare_image, visualize

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AlreadyPatchedError",
    "CheckpointError",
    "DistillConfig",
    "NotPatchedError",
    "PruneConfig",
    "PruneStats",
    "TokenPruner",
    "UnsupportedModelError",
    "budget_loss",
    "calibrate",
    "distill",
    "evaluate",
    "export_onnx",
    "freeze",
    "from_pretrained",
    "get_pruner",
    "last_stats",
    "patch_model",
    "prepare_image",
    "push_to_hub",
    "register_adapter",
    "save_pretrained",
    "unfreeze",
    "unpatch_model",
    "visualize",
]
