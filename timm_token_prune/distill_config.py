"""`DistillConfig`: the options of `distill` (its own module, so that `checkpoints` can read it without
importing `distill`, which imports `checkpoints`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillConfig:
    """Fine-tuning options; defaults follow the AS-ViT reference recipe."""

    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    lr: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW), cosine-decayed to min_lr."})
    min_lr: float = field(default=2e-6, metadata={"help": "Final learning rate."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=1e-6, metadata={"help": "On weight matrices; none on thresholds, biases, norms."})
    threshold_lr: float | None = field(default=None, metadata={"help": "Learning rate of the thresholds (default: lr)."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy on labels."})
    flops_weight: float = field(default=2.0, metadata={"help": "Weight of the FLOPs-budget loss."})
    kd_weight: float = field(default=0.5, metadata={"help": "Weight of KL(student || teacher)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the distillation term."})
    grad_accum_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    amp: str | None = field(default=None, metadata={"help": "None, or 'bf16' for bfloat16 autocast."})
    log_every: int = field(default=10, metadata={"help": "Steps between metrics-log lines."})
    checkpoint_every: int | None = field(default=None, metadata={"help": "Steps between checkpoints (output_dir)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and dropout."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (rank 0)."})

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"epochs and max_steps must be >= 1, got {self.epochs}, {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
