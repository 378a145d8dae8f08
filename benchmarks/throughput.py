"""Dense vs pruned throughput (batch 32) and latency (batch 1), measured in one run, interleaved.

    python benchmarks/throughput.py                      # deit_small_patch16_224, budget 0.65, CPU
    python benchmarks/throughput.py --repeats 15 --out results.json

Random weights are fine for speed; thresholds are calibrated on random images to the budget. Each
repeat times every variant once, in turn, so machine noise hits all alike; medians and ratios are
reported. Targets (2-core CPU): >= 1.5x images/s at batch 32, >= 1.25x faster at batch 1, and the
patched model at budget 1.0 within 3% of dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import timm
import torch

import timm_token_prune as ttp


def _time(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """Seconds per forward pass (mean over `iters` after one warm-up)."""
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        return (time.perf_counter() - start) / iters


def build(name: str, budget: float, calib_images: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    dense = timm.create_model(name, pretrained=False).eval()
    size = dense.patch_embed.img_size
    calib = [torch.randn(16, 3, *size) for _ in range(max(1, calib_images // 16))]
    pruned = ttp.patch_model(copy.deepcopy(dense), budget=budget)
    ttp.calibrate(pruned, calib)
    full = ttp.patch_model(copy.deepcopy(dense), budget=1.0)
    return {"dense": dense, f"pruned@{budget}": pruned, "patched@1.0": full}


def run(name: str, budget: float, batch: int, repeats: int, threads: int, calib_images: int) -> dict:
    torch.set_num_threads(threads)
    models = build(name, budget, calib_images)
    size = models["dense"].patch_embed.img_size
    torch.manual_seed(1)
    inputs = {"batch": torch.randn(batch, 3, *size), "single": torch.randn(1, 3, *size)}
    times = {(v, k): [] for v in models for k in inputs}
    for _ in range(repeats):
        for variant, model in models.items():
            times[(variant, "batch")].append(_time(model, inputs["batch"], 1))
            times[(variant, "single")].append(_time(model, inputs["single"], 5))
    results = {"model": name, "budget": budget, "batch": batch, "repeats": repeats, "threads": threads, "variants": {}}
    dense_t = {k: statistics.median(times[("dense", k)]) for k in inputs}
    for variant, model in models.items():
        with torch.inference_mode():
            model(inputs["batch"])
        if variant == "dense":
            gflops, kept = results["variants"].get("_dense_gflops"), None
        else:
            stats = ttp.last_stats(model)
            gflops, kept = stats.gflops, [round(k, 1) for k in stats.kept_mean]
            results["dense_gflops"] = stats.dense_gflops
        t = {k: statistics.median(times[(variant, k)]) for k in inputs}
        results["variants"][variant] = {
            "gflops_per_image": gflops,
            "kept_tokens_mean": kept,
            "images_per_s": batch / t["batch"],
            "latency_ms": 1e3 * t["single"],
            "throughput_ratio": dense_t["batch"] / t["batch"],
            "latency_speedup": dense_t["single"] / t["single"],
        }
    results["variants"]["dense"]["gflops_per_image"] = results["dense_gflops"]
    return results


def print_table(results: dict) -> None:
    print(
        f"{results['model']}  batch {results['batch']}  {results['threads']} threads  "
        f"median of {results['repeats']} interleaved repeats"
    )
    print(f"{'variant':<14}{'GFLOPs':>8}{'kept tokens/stage':>22}{'img/s':>9}{'x dense':>9}{'bs1 ms':>9}{'x dense':>9}")
    for variant, r in results["variants"].items():
        kept = "-" if r["kept_tokens_mean"] is None else "/".join(f"{k:.0f}" for k in r["kept_tokens_mean"])
        print(
            f"{variant:<14}{r['gflops_per_image']:>8.2f}{kept:>22}{r['images_per_s']:>9.1f}"
            f"{r['throughput_ratio']:>9.2f}{r['latency_ms']:>9.1f}{r['latency_speedup']:>9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--budget", type=float, default=0.65)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "throughput.json"))
    args = parser.parse_args()
    results = run(args.model, args.budget, args.batch, args.repeats, args.threads, args.calib_images)
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
