"""Dense vs pruned throughput (batch 32) and latency (batch 1), measured in one run, interleaved.

    python benchmarks/throughput.py                      # deit_small_patch16_224, budget 0.65, CPU
    python benchmarks/throughput.py --model hf:vit-small   # transformers ViTForImageClassification, ViT-S size
    python benchmarks/throughput.py --repeats 15 --out results.json

Random weights are fine for speed; thresholds are calibrated on random images to the budget. Each
repeat times every variant once, in turn, so machine noise hits all alike; medians and ratios are
reported. Targets (2-core CPU): >= 1.5x images/s at batch 32, >= 1.25x faster at batch 1, and the
patched model at budget 1.0 within 3% of dense.
"""

from __future__ import annotations

import argparse
import os

from timm_token_prune.benchmark import compare, format_table, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm name, or hf:vit-small")
    parser.add_argument("--budget", type=float, default=0.65)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<model>.json)")
    args = parser.parse_args()
    if args.out is None:
        name = args.model.replace(":", "_").replace("/", "_")
        args.out = os.path.join(os.path.dirname(__file__), "results", f"throughput_{name}.json")
    results = compare(args.model, args.budget, args.batch, args.repeats, args.threads, args.calib_images)
    print(format_table(results))
    write_json(results, args.out)


if __name__ == "__main__":
    main()
