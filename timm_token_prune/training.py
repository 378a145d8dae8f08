"""Where a `distill` run stands: the typed state that its epochs advance and its checkpoints save."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RunningTotals:
    """Image-weighted sums of the per-batch metrics of the current epoch; their mean is what gets logged."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, metrics: dict[str, float], n: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.count += n

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def postfix(self) -> dict[str, str]:
        """The short form the progress bar shows."""
        m = self.mean()
        keys = {"loss": "loss", "acc": "acc", "kept_ratio": "kept", "flops_ratio": "flops"}
        return {short: f"{m[k]:.3g}" for k, short in keys.items() if k in m}


@dataclass
class TrainState:
    """What resuming needs besides the weights, the optimiser and the scheduler."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the current epoch, from 0
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    epoch_rng: torch.Tensor | None = None  # the torch RNG state the epoch started with: it fixes the data order
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per finished epoch
    totals: RunningTotals = field(default_factory=RunningTotals)  # of the current epoch so far

    def finish_epoch(self, record: dict[str, Any]) -> None:
        """Record the epoch's metrics and move to the start of the next one."""
        self.history.append(record)
        self.epoch += 1
        self.batches_in_epoch = 0
        self.epoch_rng = None
        self.totals = RunningTotals()
