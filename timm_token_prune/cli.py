"""Command line: `timm-token-prune demo | benchmark | visualize | export | push | info` (each has --help)
(`python -m timm_token_prune` runs the demo)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .benchmark import compare, format_table

    print(f"Building {args.model} (random weights, offline), patching it at budget {args.budget}, calibrating...")
    results = compare(args.model, args.budget, args.batch, args.repeats, args.threads)
    print(format_table(results))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import json

    from .benchmark import compare, format_table

    results = compare(args.model, args.budget, args.batch, args.repeats, args.threads,
                      static=args.static, compile=args.compile)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _load(source: str, budget: float, pretrained: bool):
    """A pruned model: a checkpoint folder or Hub repo (from_pretrained), or a timm name patched and
    calibrated on random images."""
    import os

    import torch

    from .api import calibrate, patch_model
    from .hub import from_pretrained

    if os.path.isdir(source) or "/" in source:
        return from_pretrained(source)
    import timm

    model = timm.create_model(source, pretrained=pretrained).eval()
    size = tuple(model.patch_embed.img_size)
    patch_model(model, budget=budget)
    calibrate(model, [torch.randn(16, 3, *size) for _ in range(2)])
    return model


def _input_size(model) -> tuple[int, int]:
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        return tuple(embed.img_size)
    size = model.config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _visualize(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from .api import calibrate, last_stats
    from .visualize import visualize

    model = _load(args.model, args.budget, args.pretrained)
    size = _input_size(model)
    image = Image.open(args.image).convert("RGB").resize(size[::-1], Image.BICUBIC)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).view(*size, 3).permute(2, 0, 1) / 255
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    if args.calibrate_on_image:
        calibrate(model, [pixels[None]])
    visualize(model, pixels).save(args.out)
    print(f"wrote {args.out}; tokens entering the pruned stages: {last_stats(model).kept_mean}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_onnx
    from .static import freeze

    model = _load(args.model, args.budget, args.pretrained)
    size = _input_size(model)
    stats = freeze(model, [torch.randn(16, 3, *size) for _ in range(2)])
    path = export_onnx(model, args.onnx, torch.randn(1, 3, *size))
    print(f"wrote {path}: static counts {stats.kept_mean} tokens per stage, {stats.gflops:.3f} GFLOPs per image")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import upload_folder

    commit = upload_folder(
        args.folder, args.repo_id, private=args.private or None, token=args.token,
        commit_message=args.message, revision=args.revision, create_pr=args.create_pr,
    )
    print(f"pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from .hub import info

    print(json.dumps(info(args.repo, revision=args.revision), indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-token-prune", description="Adaptive token pruning for ViTs.")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser(
        "demo", help="patch a timm ViT, calibrate it and print dense vs pruned GFLOPs, kept tokens and img/s"
    )
    demo.add_argument("--model", default="deit_small_patch16_224", help="a timm model name (built without weights)")
    demo.add_argument("--budget", type=float, default=0.65, help="fraction of the dense FLOPs to keep")
    demo.add_argument("--batch", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (medians)")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    demo.set_defaults(run=_demo)
    bench = commands.add_parser("benchmark", help="dense vs pruned img/s and batch-1 latency of a timm model")
    bench.add_argument("model", help="a timm model name (random weights), or hf:vit-small")
    bench.add_argument("--budget", type=float, default=0.65)
    bench.add_argument("--batch", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=6)
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--static", action="store_true", help="also time the frozen (fixed-count) model")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile of dense and static")
    bench.add_argument("--json", default=None, help="write the results here")
    bench.set_defaults(run=_benchmark)
    vis = commands.add_parser("visualize", help="a PNG of the patches kept at each pruning stage")
    vis.add_argument("model", help="a pruned checkpoint (folder or Hub repo), or a timm model name")
    vis.add_argument("image", help="an image file")
    vis.add_argument("--out", default="kept_tokens.png")
    vis.add_argument("--budget", type=float, default=0.65, help="for a timm model name")
    vis.add_argument("--pretrained", action="store_true", help="timm weights for a model name (needs the Hub)")
    vis.add_argument("--calibrate-on-image", action="store_true", help="set the thresholds on this image")
    vis.set_defaults(run=_visualize)
    export = commands.add_parser("export", help="freeze to fixed counts and export to ONNX")
    export.add_argument("model", help="a pruned checkpoint (folder or Hub repo), or a timm model name")
    export.add_argument("--onnx", required=True, help="output .onnx path")
    export.add_argument("--budget", type=float, default=0.65, help="for a timm model name")
    export.add_argument("--pretrained", action="store_true")
    export.set_defaults(run=_export)
    push = commands.add_parser("push", help="upload a folder written by timm_token_prune.save_pretrained")
    push.add_argument("folder", help="the folder (with token_prune_config.json)")
    push.add_argument("repo_id", help="user/name on the Hub; created if missing")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument("--revision", default=None, help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.set_defaults(run=_push)
    show = commands.add_parser("info", help="print a pruned checkpoint's token_prune_config.json")
    show.add_argument("repo", help="a Hub repo id or a local folder")
    show.add_argument("--revision", default=None)
    show.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    if hasattr(args, "budget") and not 0.0 < args.budget <= 1.0:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    from .errors import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
