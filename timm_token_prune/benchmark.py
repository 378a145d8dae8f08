"""Dense vs pruned speed, measured in one process with interleaved repeats (medians and ratios).

Each repeat times every variant in turn, so each repeat gives its own ratio to dense; the spread of
those ratios says whether the medians mean anything. Repeats are added while the spread is too large
(up to `max_repeats`); if it stays large the ratios are reported as unreliable, not printed.
Used by `timm-token-prune demo` / `benchmark` and `benchmarks/throughput.py`.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .api import calibrate, last_stats, patch_model


def seconds_per_call(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    """Mean seconds of `model(x)` over `iters` calls, after one warm-up call."""
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        return (time.perf_counter() - start) / iters


MAX_SPREAD = 0.1  # a median ratio is trusted when the per-repeat ratios deviate from it by at most 10%
KINDS = {"batch": "img/s", "single": "bs1 ms"}  # what is timed, and its column in the table


def ratio_spread(dense: list[float], variant: list[float]) -> float | None:
    """How much the per-repeat ratios dense / variant (paired: timed in the same repeat) disagree: their
    median absolute deviation over their median (0.1 = 10%; one outlying repeat in three does not count).
    None with fewer than two repeats."""
    if len(dense) < 2:
        return None
    ratios = [d / v for d, v in zip(dense, variant)]
    middle = statistics.median(ratios)
    return statistics.median(abs(r - middle) for r in ratios) / middle


def timing_spread(times: dict[tuple[str, str], list[float]], max_spread: float = MAX_SPREAD) -> dict:
    """Per kind of timing ('batch', 'single'): the largest `ratio_spread` over the variants and whether
    the ratios to dense are reliable (None: one repeat, not known)."""
    report = {}
    for kind in KINDS:
        variants = [v for (v, k) in times if k == kind and v != "dense"]
        spreads = [ratio_spread(times[("dense", kind)], times[(v, kind)]) for v in variants]
        worst = None if not spreads or None in spreads else max(spreads)
        report[kind] = {"spread": worst, "reliable": None if worst is None else worst <= max_spread}
    return report


def is_stable(times: dict[tuple[str, str], list[float]], max_spread: float = MAX_SPREAD) -> bool:
    """Whether every ratio to dense is reliable (False with one repeat)."""
    return all(t["reliable"] for t in timing_spread(times, max_spread).values())


def timing_lines(timing: dict, repeats: int) -> list[str]:
    """The lines under the table: the spread of the ratios, and a plain warning for unreliable ones."""
    if any(t["spread"] is None for t in timing.values()):
        return ["One repeat: the timings' spread is not known; use --repeats 3 or more to check it."]
    spreads = ", ".join(f"{KINDS[k]} ±{100 * t['spread']:.0f}%" for k, t in timing.items())
    lines = [f"Spread of the ratios to dense between {repeats} interleaved repeats: {spreads} (median deviation)."]
    bad = [KINDS[k] for k, t in timing.items() if not t["reliable"]]
    if bad:
        lines.append(
            f"TIMING UNRELIABLE: the machine is too busy for the {' and '.join(bad)} ratios to mean anything "
            f"(spread over ±{100 * MAX_SPREAD:.0f}%), so they are not shown ('-'); this is not a slowdown. "
            "Rerun on a quiet machine, or with more --repeats.")
    return lines


HF_VIT_S = "hf:vit-small"  # a ViT-S sized transformers ViTForImageClassification


def _dense_model(name: str) -> tuple[nn.Module, tuple[int, int]]:
    """A model with random weights and its input size: a timm name, or HF_VIT_S."""
    if name == HF_VIT_S:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
            image_size=224, patch_size=16, num_labels=1000,
        )
        return ViTForImageClassification(config).eval(), (224, 224)
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    return model, tuple(model.patch_embed.img_size)


def build_variants(
    name: str, budget: float, calib_images: int = 64, seed: int = 0, static: bool = False
) -> tuple[dict[str, nn.Module], tuple[int, int]]:
    """The dense model (random weights), its pruned copy calibrated on random images to `budget`, a copy
    patched at budget 1.0 (the cost of the machinery alone) and, with `static`, a frozen copy of the
    pruned one (fixed counts); and the input size."""
    from .static import freeze

    torch.manual_seed(seed)
    dense, size = _dense_model(name)
    pruned = patch_model(copy.deepcopy(dense), budget=budget)
    calibration = [torch.randn(16, 3, *size) for _ in range(max(1, calib_images // 16))]
    calibrate(pruned, calibration)
    full = patch_model(copy.deepcopy(dense), budget=1.0)
    variants = {"dense": dense, f"pruned@{budget:g}": pruned, "patched@1": full}
    if static:
        variants[f"static@{budget:g}"] = copy.deepcopy(pruned)
        freeze(variants[f"static@{budget:g}"], calibration)
    return variants, size


def compare(
    name: str = "deit_small_patch16_224",
    budget: float = 0.65,
    batch: int = 32,
    repeats: int = 5,
    threads: int | None = None,
    calib_images: int = 64,
    single_iters: int = 5,
    static: bool = False,
    compile: bool = False,
    max_repeats: int | None = None,
) -> dict:
    """Images/s at `batch` and latency at batch 1 for each variant (medians over interleaved repeats, see
    `time_variants`), their ratios to dense, and `timing`: the ratios' spread and whether they are reliable."""
    if threads:
        torch.set_num_threads(threads)
    models, size = build_variants(name, budget, calib_images, static=static)
    if compile:  # torch.compile (inductor) of the dense and, when built, the static model
        for variant in [v for v in models if v == "dense" or v.startswith("static")]:
            models[f"{variant}+compile"] = torch.compile(models[variant])
    torch.manual_seed(1)
    inputs = {"batch": torch.randn(batch, 3, *size), "single": torch.randn(1, 3, *size)}
    times = time_variants(models, inputs, repeats, max_repeats, single_iters)
    median = {key: statistics.median(values) for key, values in times.items()}
    done = len(times[("dense", "batch")])
    results = {
        "model": name,
        "budget": budget,
        "batch": batch,
        "repeats": done,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "timing": timing_spread(times),
        "variants": {},
    }
    for variant, model in models.items():
        row = {
            "images_per_s": batch / median[(variant, "batch")],
            "latency_ms": 1e3 * median[(variant, "single")],
            "throughput_ratio": median[("dense", "batch")] / median[(variant, "batch")],
            "latency_speedup": median[("dense", "single")] / median[(variant, "single")],
        }
        if not variant.startswith("dense"):
            with torch.inference_mode():
                model(inputs["batch"])
            stats = last_stats(getattr(model, "_orig_mod", model))
            row.update(gflops=stats.gflops, flops_ratio=stats.flops_ratio, kept_tokens=stats.kept_mean)
            results["dense_gflops"] = stats.dense_gflops
            results["tokens"] = stats.tokens
        results["variants"][variant] = row
    for variant, row in results["variants"].items():
        if variant.startswith("dense"):
            row.update(gflops=results["dense_gflops"], flops_ratio=1.0, kept_tokens=None)
    return results


def time_variants(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], repeats: int,
                  max_repeats: int | None = None, single_iters: int = 5) -> dict[tuple[str, str], list[float]]:
    """Seconds per call of every (variant, 'batch' / 'single') for each repeat. A repeat times all variants
    in turn, starting one further along each time, so machine noise and order effects hit them alike.
    With two or more `repeats`, repeats are added while the ratios to dense are unstable (`is_stable`),
    up to `max_repeats` (default: 3 * repeats)."""
    max_repeats = max(repeats, 3 * repeats if max_repeats is None else max_repeats)
    times: dict[tuple[str, str], list[float]] = {(v, k): [] for v in models for k in inputs}
    names = list(models)
    for repeat in range(max_repeats):
        if repeat >= repeats and (repeats < 2 or is_stable(times)):
            break
        for variant in names[repeat % len(names):] + names[: repeat % len(names)]:
            times[(variant, "batch")].append(seconds_per_call(models[variant], inputs["batch"], 1))
            times[(variant, "single")].append(seconds_per_call(models[variant], inputs["single"], single_iters))
    return times


def format_table(results: dict) -> str:
    """The results as a table, with the timings' spread under it; unreliable ratios shown as '-'."""
    timing = results.get("timing", {})
    shown = {kind: timing.get(kind, {}).get("reliable") is not False for kind in KINDS}
    lines = [
        f"{results['model']} (random weights, pruned by thresholds calibrated on random images), {results['threads']} threads, batch {results['batch']} and 1, "
        f"median of {results['repeats']} interleaved repeats",
        f"{'variant':<18}{'GFLOPs':>8}{'tokens per stage':>20}{'img/s':>9}{'x dense':>9}{'bs1 ms':>9}{'x dense':>9}",
    ]
    for variant, row in results["variants"].items():
        kept = row["kept_tokens"]
        kept = f"{results['tokens']} (all)" if kept is None else "/".join(f"{k:.0f}" for k in kept)
        batch_ratio = f"{row['throughput_ratio']:.2f}" if shown["batch"] else "-"
        single_ratio = f"{row['latency_speedup']:.2f}" if shown["single"] else "-"
        lines.append(
            f"{variant:<18}{row['gflops']:>8.2f} {kept:>19}{row['images_per_s']:>9.1f}"
            f"{batch_ratio:>9}{row['latency_ms']:>9.1f}{single_ratio:>9}"
        )
    lines.append("GFLOPs are multiply-accumulates per image; 'tokens per stage' is the batch mean entering each pruned stage.")
    if timing:
        lines += timing_lines(timing, results["repeats"])
    return "\n".join(lines)


def write_json(results: dict, path: str) -> None:
    """Write `results` to `path` atomically (`files.atomic_file`)."""
    import json

    from .files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
