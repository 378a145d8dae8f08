"""`PruneConfig`: every option of the pruning method, validated and JSON-serialisable."""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TEMPERATURES = {"mass": 0.003, "threshold": 0.01}  # measured: benchmarks/train_throughput.py, docs/benchmarks.md
FORMAT_VERSION = 3  # 2: pruned_tokens, novelty, 'mass', score_gradient, scale-free thresholds; 3: named schedules
LOCATION_SCHEDULES = ("every_block", "every_other_block", "paper")
DEFAULT_LOCATIONS = "every_block"  # measured: benchmarks/peers.py, docs/benchmarks.md
SCORES = ("head_norm", "mean")
KEEP_POLICIES = ("mass", "threshold", "topk")
PRUNED_TOKENS = ("merge", "drop")
RESTORE_FILLS = ("dropped", "nearest", "offset")
# The paper's threshold initialisation, for 196 patch tokens (224 px, patch 16).
REFERENCE_THRESHOLDS = (0.001, 0.002, 0.003)
REFERENCE_NUM_PATCHES = 196


@dataclass
class PruneConfig:
    """Options of adaptive token pruning (AS-ViT). See docs/how-it-works.md for the method."""

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
        _check_booleans(self)
        self.budget = _number("budget", self.budget, "in (0, 1]")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(
                f"budget must be in (0, 1] (the fraction of dense FLOPs to keep), got {self.budget!r}; "
                "use e.g. budget=0.65, or 1.0 to keep every token"
            )
        self.prune_locations = validated_locations(self.prune_locations)
        for name, allowed in (("score", SCORES), ("pruned_tokens", PRUNED_TOKENS), ("keep_policy", KEEP_POLICIES),
                              ("restore_fill", RESTORE_FILLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.temperature is not None:
            self.temperature = _number("temperature", self.temperature, "> 0 (or None for the policy's default)")
            if not math.isfinite(self.temperature) or self.temperature <= 0:
                raise ValueError(
                    f"temperature must be > 0 and finite (or None for the policy's default), got {self.temperature!r}"
                )
        if self.threshold_init is not None:
            self.threshold_init = _thresholds(self.threshold_init)
        if self.keep_ratios is not None:
            self.keep_ratios = _keep_ratios(self.keep_ratios, self.keep_policy)
        self.min_keep = _min_keep(self.min_keep)
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


def _check_booleans(config: PruneConfig) -> None:
    """Every bool option must be True or False: a string such as 'no' would read as True."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "bool" and not isinstance(value, bool):
            raise TypeError(f"{f.name} must be True or False, got {value!r}")


def _number(name: str, value: Any, wanted: str) -> float:
    """`value` as a float; TypeError unless it is a number (not a bool, not a string)."""
    if isinstance(value, (bool, str)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number {wanted}, got {value!r}")
    return float(value)


def _whole(value: Any) -> int | None:
    """`value` as an int if it is a whole number type (int, numpy / torch integer; not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def validated_locations(locations: Any) -> tuple[int, ...] | str:
    """A schedule name, or strictly increasing whole block indices >= 1 (None: the default schedule)."""
    if locations is None:
        return DEFAULT_LOCATIONS
    if isinstance(locations, str):
        if locations not in LOCATION_SCHEDULES:
            raise ValueError(f"prune_locations must be block indices or one of {LOCATION_SCHEDULES}, got {locations!r}")
        return locations
    try:
        values = tuple(locations)
    except TypeError:
        values = None
    if values is None:
        raise TypeError(f"prune_locations must be block indices or one of {LOCATION_SCHEDULES}, got {locations!r}")
    values = tuple(_whole(i) for i in values)
    if None in values:
        raise TypeError(f"prune_locations must be whole block indices (ints, not truncated), got {locations!r}")
    if not values or list(values) != sorted(set(values)) or values[0] < 1:
        raise ValueError(f"prune_locations must be strictly increasing block indices >= 1, got {locations!r}")
    return values


def _thresholds(values: Any) -> tuple[float, ...]:
    """threshold_init: one finite number per stage (NaN or inf would keep one patch, or all, per image)."""
    thresholds = tuple(_number("threshold_init", t, "per stage") for t in values)
    if not all(math.isfinite(t) for t in thresholds):
        raise ValueError(f"threshold_init must hold finite numbers, got {values!r}")
    return thresholds


def _keep_ratios(values: Any, policy: str) -> tuple[float, ...]:
    """keep_ratios: fractions in (0, 1], for keep_policy='topk' only (the other policies have thresholds)."""
    if policy != "topk":
        raise ValueError(
            f"keep_ratios={values!r} applies to keep_policy='topk' only (fixed keep fractions); with "
            f"keep_policy={policy!r} the thresholds decide: pass keep_policy='topk', or drop keep_ratios"
        )
    ratios = tuple(_number("keep_ratios", r, "in (0, 1]") for r in values)
    if any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"keep_ratios must each be in (0, 1], got {values!r}")
    return ratios


def _min_keep(value: Any) -> int:
    """min_keep: a whole number >= 1 (checked against the model's patch count at patch time)."""
    count = _whole(value)
    if count is None:
        raise TypeError(f"min_keep must be a whole number >= 1 (patch tokens always kept per image), got {value!r}")
    if count < 1:
        raise ValueError(f"min_keep must be >= 1 so pooling never sees an empty set, got {value!r}")
    return count


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
