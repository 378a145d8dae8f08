"""`DistillationTrainer`: the distillation + FLOPs-budget loss inside a Hugging Face `transformers.Trainer`,
for users who already train with it (needs `transformers` and `accelerate`).

    trainer = DistillationTrainer(model=patched, args=TrainingArguments(...), train_dataset=ds)
    trainer.train()
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .api import budget_loss, get_pruner, unpatch_model
from .batches import logits_of
from .distill import DistillConfig, _check_teacher, _modes_kept, distillation_loss


class DistillationTrainer(Trainer):
    """A `Trainer` whose loss is `distillation_loss` (CE + FLOPs budget + KL to the dense teacher).

    `teacher`: the dense model (default: a dense copy of `model` as given); it runs in eval mode without
    gradients, and a teacher you pass keeps its train/eval and requires_grad flags (it is moved to the
    inputs' device). `distill_config`: the loss weights and KD temperature (`DistillConfig`; its optimiser
    fields are ignored, `TrainingArguments` rules). The thresholds get no weight decay.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, distill_config: DistillConfig | None = None,
                 **kwargs: Any) -> None:
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        get_pruner(model)
        _check_teacher(model, teacher)
        super().__init__(*args, **kwargs)
        self.teacher = teacher if teacher is not None else unpatch_model(copy.deepcopy(model)).requires_grad_(False)
        self.distill_config = distill_config or DistillConfig()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        self.teacher.to(inputs["pixel_values"].device)
        with torch.no_grad(), _eval_mode(self.teacher):
            teacher_logits = logits_of(self.teacher(**inputs))
        student = self.accelerator.unwrap_model(model)
        loss, _ = distillation_loss(logits_of(outputs), teacher_logits, labels, budget_loss(student), self.distill_config)
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("token_pruner.thresholds")]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the block; every submodule's flag restored after it."""
    with _modes_kept(module):
        module.eval()
        yield
