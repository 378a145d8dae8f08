"""Deployment speed: dense vs adaptive vs static (frozen) pruning, eager and torch.compile, and onnxruntime.

    python benchmarks/deploy.py                  # deit_small_patch16_224, budget 0.65, CPU
    python benchmarks/deploy.py --no-compile     # skip torch.compile (inductor needs a C++ compiler)

PyTorch: images/s at batch 32 and batch-1 latency, all variants timed in one run, interleaved with a
rotating order (medians). onnxruntime (CPU): the dense model and the static pruned model exported with
`export_onnx`, timed the same way. Targets at budget 0.65: static >= adaptive and >= 1.5x dense at
batch 32; onnxruntime pruned >= 1.4x dense.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from timm_token_prune.benchmark import compare, format_table, write_json
from timm_token_prune.export import _Logits, export_onnx


def onnx_speed(models: dict, size: tuple[int, int], batch: int, repeats: int, threads: int) -> dict:
    """img/s (batch) and ms (batch 1) of onnxruntime sessions of each model, interleaved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = os.path.join(tmp, f"{name}.onnx")
            if hasattr(model, "token_pruner"):
                export_onnx(model, path, torch.randn(1, 3, *size))
            else:
                torch.onnx.export(_Logits(model).eval(), (torch.randn(1, 3, *size),), path, dynamo=False,
                                  input_names=["pixel_values"], output_names=["logits"],
                                  dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = {"batch": torch.randn(batch, 3, *size).numpy(), "single": torch.randn(1, 3, *size).numpy()}
    times = {(n, k): [] for n in sessions for k in inputs}
    names = list(sessions)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for key, x in inputs.items():
                sessions[name].run(None, {"pixel_values": x})
                iters = 1 if key == "batch" else 5
                start = time.perf_counter()
                for _ in range(iters):
                    sessions[name].run(None, {"pixel_values": x})
                times[(name, key)].append((time.perf_counter() - start) / iters)
    median = {k: statistics.median(v) for k, v in times.items()}
    dense = names[0]
    return {
        name: {
            "images_per_s": batch / median[(name, "batch")],
            "latency_ms": 1e3 * median[(name, "single")],
            "throughput_ratio": median[(dense, "batch")] / median[(name, "batch")],
            "latency_speedup": median[(dense, "single")] / median[(name, "single")],
        }
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--budget", type=float, default=0.65)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "deploy.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"pytorch": compare(args.model, args.budget, args.batch, args.repeats, args.threads,
                                  static=True, compile=not args.no_compile)}
    print(format_table(results["pytorch"]))
    from timm_token_prune.benchmark import build_variants

    models, size = build_variants(args.model, args.budget, static=True)
    onnx_models = {"dense": models["dense"], f"static@{args.budget:g}": models[f"static@{args.budget:g}"]}
    results["onnxruntime"] = onnx_speed(onnx_models, size, args.batch, args.repeats, args.threads)
    print(f"onnxruntime CPU, {args.threads} threads: {'variant':<14}{'img/s':>9}{'x dense':>9}{'bs1 ms':>9}{'x dense':>9}")
    for name, row in results["onnxruntime"].items():
        print(f"{'':35}{name:<14}{row['images_per_s']:>9.1f}{row['throughput_ratio']:>9.2f}"
              f"{row['latency_ms']:>9.1f}{row['latency_speedup']:>9.2f}")
    write_json(results, args.out)


if __name__ == "__main__":
    main()
