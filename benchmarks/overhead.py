"""What patching costs when nothing is pruned. One model object, so that its weights stay where they are
in memory: each round times it plain, plain again (a control: the noise floor) and patched in place at
budget 1.0 (patched before and unpatched after that forward, outside the timing), in a rotating order;
medians of the per-round ratios to the plain model.

    python benchmarks/overhead.py                                    # deit_small and vit_medium gap, b1 and b32
    python benchmarks/overhead.py --models deit_small_patch16_224 --batches 1 --rounds 300 --threads 1

Target (issue 12): patched at 1.0 within 2 % of the plain model at batch 1 and 32, with and without a class
token. Random weights; writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch

import timm_token_prune as ttp
from timm_token_prune.benchmark import write_json


def measure(name: str, batch: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, *model.patch_embed.img_size)
    names = ["plain", "plain again", "patched 1.0"]
    times = {key: [] for key in names}

    def timed(key: str) -> float:
        if key == "patched 1.0":
            ttp.patch_model(model, budget=1.0).eval()
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)
            elapsed = time.perf_counter() - start
        if key == "patched 1.0":
            ttp.unpatch_model(model)
        return elapsed

    for key in names:
        for _ in range(3):
            timed(key)
    for r in range(rounds):
        for key in names[r % len(names) :] + names[: r % len(names)]:
            times[key].append(timed(key))
    row = {f"{key} ms": 1e3 * statistics.median(t) for key, t in times.items()}
    for key in names[1:]:
        row[f"{key} x plain"] = statistics.median([a / b for a, b in zip(times["plain"], times[key])])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_medium_patch16_gap_256"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=150, help="rounds at batch 1 (a tenth, at least 10, above)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__, "rows": {}}
    for name in args.models:
        for batch in args.batches:
            rounds = args.rounds if batch == 1 else max(10, args.rounds // 10)
            row = results["rows"][f"{name} b{batch}"] = measure(name, batch, rounds)
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    write_json(results, args.out)


if __name__ == "__main__":
    main()
