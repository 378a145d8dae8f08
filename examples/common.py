"""Shared by the fine-tuning examples: data, a linear-probe head, the dense-vs-pruned report."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, random_split

import realdata
import timm_token_prune as ttp
from timm_token_prune.benchmark import seconds_per_call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="an ImageFolder root (with train/ and val/, or split 90/10); default: Fashion-MNIST")
    parser.add_argument("--img-size", type=int, default=None, help="default: 112 offline, 224 with --data")
    parser.add_argument("--budget", type=float, default=0.65)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=2000, help="offline default only")
    parser.add_argument("--test-images", type=int, default=1000, help="offline default only")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--resume", action="store_true")


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(train, test, number of classes)."""
    if args.data is None:
        size = args.img_size or 112
        train = realdata.fashion_mnist("train", limit=args.train_images, img_size=size)
        test = realdata.fashion_mnist("test", limit=args.test_images, img_size=size)
        return train, test, 10
    root, size = Path(args.data), args.img_size or 224
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, test = realdata.image_folder(root / "train", size), realdata.image_folder(root / "val", size)
        return train, test, len(train.classes)
    full = realdata.image_folder(root, size)
    n_test = max(1, len(full) // 10)
    train, test = random_split(full, [len(full) - n_test, n_test], generator=torch.Generator().manual_seed(0))
    return train, test, len(full.classes)


def fit_head(model: torch.nn.Module, head: torch.nn.Linear, loader: DataLoader, steps: int = 300) -> None:
    """Train only `head` on the frozen model's features (its inputs, captured by a hook): a linear probe."""
    captured = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    labels = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            x, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch[:2]
            model(x)
            labels.append(y)
    hook.remove()
    features, labels = torch.cat(captured), torch.cat(labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def report(dense: torch.nn.Module, pruned: torch.nn.Module, test: DataLoader, repeats: int = 5) -> None:
    """Top-1, GFLOPs and img/s of the dense and the pruned model (timed interleaved, medians)."""
    dense_eval = ttp.evaluate(dense, test)
    pruned_eval = ttp.evaluate(pruned, test)
    batch = next(iter(test))
    x = batch["pixel_values"] if isinstance(batch, dict) else batch[0]
    times = {"dense": [], "pruned": []}
    for r in range(repeats):
        for name, model in (("dense", dense), ("pruned", pruned))[:: 1 if r % 2 else -1]:
            times[name].append(seconds_per_call(model, x, 1))
    speed = {k: len(x) / statistics.median(v) for k, v in times.items()}
    print(f"{'':8}{'top-1':>8}{'GFLOPs':>9}{'img/s':>9}")
    print(f"{'dense':8}{dense_eval['top1']:>8.2f}{pruned_eval['dense_gflops']:>9.3f}{speed['dense']:>9.1f}")
    print(f"{'pruned':8}{pruned_eval['top1']:>8.2f}{pruned_eval['gflops']:>9.3f}{speed['pruned']:>9.1f}"
          f"   ({speed['pruned'] / speed['dense']:.2f}x, budget {ttp.get_pruner(pruned).config.budget})")
