"""`PruneConfig`: every option of the pruning method, validated and JSON-serialisable."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TEMPERATURES = {"mass": 0.003, "threshold": 0.01}  # measured: benchmarks/train_throughput.py, README
FORMAT_VERSION = 3  # 2: pruned_tokens, novelty, 'mass', score_gradient, scale-free thresholds; 3: named schedules
LOCATION_SCHEDULES = ("every_block", "every_other_block", "paper")
DEFAULT_LOCATIONS = "every_block"  # measured: benchmarks/peers.py, README
SCORES = ("head_norm", "mean")
KEEP_POLICIES = ("mass", "threshold", "topk")
PRUNED_TOKENS = ("merge", "drop")
RESTORE_FILLS = ("dropped", "nearest", "offset")
# The paper's threshold initialisation, for 196 patch tokens (224 px, patch 16).
REFERENCE_THRESHOLDS = (0.001, 0.002, 0.003)
REFERENCE_NUM_PATCHES = 196


@dataclass
class PruneConfig:
    """Options of adaptive token pruning (AS-ViT). See the README for the method."""

    budget: float = field(
        default=0.65,
        metadata={"help": "Target fraction of the dense model's FLOPs, in (0, 1]; 1.0 keeps every token."},
    )
    prune_locations: tuple[int, ...] | str = field(
        default=DEFAULT_LOCATIONS,
        metadata={
            "help": "Block indices (0-based) before which tokens are pruned (the scores come from the block "
            "just before each), or a schedule: 'every_block' (1, 2, ..., depth - 1: a few tokens go after "
            "every block), 'every_other_block' (2, 4, ...), 'paper' (AS-ViT's three points, "
            "floor(s * depth / 4) + 1 for s = 1, 2, 3: 4, 7, 10 for 12 blocks). None: the default."
        },
    )
    score: str = field(
        default="head_norm",
        metadata={
            "help": "'head_norm': class-token attention weighted per head by the head output's L2 norm "
            "(AS-ViT); 'mean': class-token attention averaged over heads (EViT)."
        },
    )
    keep_policy: str = field(
        default="mass",
        metadata={
            "help": "'mass': each image keeps its best patches until they hold all but a learnable share "
            "(the stage's threshold) of its score mass, so flat score maps keep more tokens than peaked ones; "
            "'threshold': patches whose score times the number of patches exceeds a learnable threshold "
            "(AS-ViT; scale-free across image sizes); 'topk': a fixed fraction `keep_ratios` of the patches "
            "per stage (EViT-style, static shapes)."
        },
    )
    temperature: float | None = field(
        default=None,
        metadata={
            "help": "Temperature T of the training soft mask sigmoid((s - theta) / T), on the scale of the "
            "policy's statistic s. None: 0.003 for 'mass' (a share of the image's score mass; one token "
            "holds 1 / number of patches on average) and 0.01 for 'threshold' (a score times the number of "
            "patches; the paper's 1e-4 on raw scores at 196 patches is about 0.02). For 'mass' T is capped "
            "at 0.025 x the stage's threshold. Pruned tokens more than 20 T below their threshold leave the "
            "training forward, so a smaller T trains faster."
        },
    )
    score_gradient: bool = field(
        default=False,
        metadata={
            "help": "Training: let the soft mask's gradient reach the network through the scores (the paper). "
            "False: it reaches the thresholds only, and the network learns from the task on the kept tokens "
            "(measured better: the paper's path lets the task loss raise scores past the thresholds)."
        },
    )
    threshold_init: tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "Initial threshold per stage (`calibrate` and `distill` replace it). None: 'mass' "
            "(0.05, 0.1, 0.15); 'threshold' the paper's (0.001, 0.002, 0.003) at 196 patches, i.e. (0.196, "
            "0.392, 0.588); all -1 (keep everything) when budget is 1.0."
        },
    )
    keep_ratios: tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "For keep_policy='topk': fraction of the surviving patch tokens kept at each stage. "
            "None: solved from the FLOPs model at patch time, and set by `calibrate`."
        },
    )
    pruned_tokens: str = field(
        default="merge",
        metadata={
            "help": "What becomes of a pruned token: 'merge' folds it into the kept patch token most similar to it "
            "(cosine of the block outputs; size-weighted mean; later attentions count a merged token once per "
            "token it holds); "
            "'drop' removes it (the AS-ViT paper)."
        },
    )
    novelty: bool = field(
        default=True,
        metadata={
            "help": "Weigh each token's score by its novelty, 1 - its highest cosine similarity to a patch token "
            "that scores higher: near copies of better tokens go first (with merging they lose little)."
        },
    )
    restore_tokens: bool = field(
        default=False,
        metadata={
            "help": "Dense outputs (segmentation, depth): token outputs keep every position in the original "
            "order (timm forward_features / forward_intermediates), each pruned position filled as "
            "`restore_fill` says. Pooled outputs and logits are those of restore_tokens=False at the same thresholds "
            "(the FLOPs model counts the token similarity restoring needs, so calibration may pick others). "
            "Inference (eval mode) only."
        },
    )
    restore_fill: str = field(
        default="offset",
        metadata={
            "help": "With restore_tokens, what fills a pruned position: 'dropped' its own representation when it "
            "was pruned; 'nearest' a copy of the final token of the kept token most similar to it when it was "
            "pruned (the one it merged into); 'offset' that copy plus the token's own offset from that kept "
            "token when it was pruned. Each goes through the final norm."
        },
    )
    min_keep: int = field(default=1, metadata={"help": "Patch tokens always kept per image (highest scores)."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Serialisation format version."})

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise TypeError(f"budget must be a number in (0, 1], got {self.budget!r}")
        if not (0.0 < float(self.budget) <= 1.0) or math.isnan(self.budget):
            raise ValueError(
                f"budget must be in (0, 1] (the fraction of dense FLOPs to keep), got {self.budget!r}; "
                "use e.g. budget=0.65, or 1.0 to keep every token"
            )
        self.budget = float(self.budget)
        if self.prune_locations is None:
            self.prune_locations = DEFAULT_LOCATIONS
        if isinstance(self.prune_locations, str):
            if self.prune_locations not in LOCATION_SCHEDULES:
                raise ValueError(
                    f"prune_locations must be block indices or one of {LOCATION_SCHEDULES}, got {self.prune_locations!r}"
                )
        else:
            locations = tuple(int(i) for i in self.prune_locations)
            if not locations or list(locations) != sorted(set(locations)) or locations[0] < 1:
                raise ValueError(
                    f"prune_locations must be strictly increasing block indices >= 1, got {self.prune_locations!r}"
                )
            self.prune_locations = locations
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.pruned_tokens not in PRUNED_TOKENS:
            raise ValueError(f"pruned_tokens must be one of {PRUNED_TOKENS}, got {self.pruned_tokens!r}")
        if self.keep_policy not in KEEP_POLICIES:
            raise ValueError(f"keep_policy must be one of {KEEP_POLICIES}, got {self.keep_policy!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or None for the policy's default), got {self.temperature!r}")
        if self.threshold_init is not None:
            self.threshold_init = tuple(float(t) for t in self.threshold_init)
        if self.keep_ratios is not None:
            self.keep_ratios = tuple(float(r) for r in self.keep_ratios)
            if any(not 0.0 < r <= 1.0 for r in self.keep_ratios):
                raise ValueError(f"keep_ratios must each be in (0, 1], got {self.keep_ratios!r}")
        if not isinstance(self.restore_tokens, bool):
            raise TypeError(f"restore_tokens must be True or False, got {self.restore_tokens!r}")
        if self.restore_fill not in RESTORE_FILLS:
            raise ValueError(f"restore_fill must be one of {RESTORE_FILLS}, got {self.restore_fill!r}")
        if int(self.min_keep) < 1:
            raise ValueError(f"min_keep must be >= 1 so pooling never sees an empty set, got {self.min_keep!r}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this PruneConfig has format_version {self.format_version}, newer than this library's "
                f"{FORMAT_VERSION}: upgrade timm-token-prune"
            )

    @property
    def soft_temperature(self) -> float:
        """The training soft mask's temperature: `temperature`, or the keep policy's default."""
        if self.temperature is not None:
            return float(self.temperature)
        return DEFAULT_TEMPERATURES.get(self.keep_policy, 0.01)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        data = _upgrade(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"PruneConfig: ignoring unknown keys {unknown} (saved by a newer version?)", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "PruneConfig":
        return cls.from_dict(json.loads(text))


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved in an older format, with the meaning it had then."""
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version >= FORMAT_VERSION:
        return data
    data = dict(data)
    if version < 2:
        data.setdefault("pruned_tokens", "drop")
        data.setdefault("novelty", False)
        data.setdefault("keep_policy", "threshold")
        data.setdefault("score_gradient", True)
        # format 1 compared raw scores (which shrink as 1 / tokens); the thresholds are converted on load
        data.pop("temperature", None)
        data.pop("threshold_init", None)
    if version < 3 and data.get("prune_locations") is None:
        data["prune_locations"] = "paper"  # the default before format 3
    data["format_version"] = FORMAT_VERSION
    return data
