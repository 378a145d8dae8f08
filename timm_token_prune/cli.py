"""Command line: `timm-token-prune demo | benchmark | visualize | export | push | info` (each has --help;
a bare `timm-token-prune` or `python -m timm_token_prune` prints the usage)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .files import atomic_file


class CommandError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def _demo(args: argparse.Namespace) -> int:
    from .benchmark import compare, format_table

    _check_model_name(args.model)
    print(f"Building {args.model} (random weights, offline), patching it at budget {args.budget}, calibrating...")
    results = compare(args.model, args.budget, args.batch, args.repeats, args.threads, max_repeats=args.max_repeats)
    print(format_table(results))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    import json

    from .benchmark import compare, format_table

    _check_model_name(args.model)
    results = compare(args.model, args.budget, args.batch, args.repeats, args.threads,
                      static=args.static, compile=args.compile, max_repeats=args.max_repeats)
    print(format_table(results))
    if args.json:
        _write_atomic(args.json, lambda path: Path(path).write_text(json.dumps(results, indent=2)))
    return 0


def _check_model_name(name: str) -> None:
    import timm

    from .benchmark import HF_VIT_S

    if name != HF_VIT_S and not timm.is_model(name):
        raise CommandError(f"unknown model {name!r}: give a timm model name (timm.list_models()) or {HF_VIT_S}")


def _open(source: str, budget: float, pretrained: bool):
    """(model, calibrated): a checkpoint folder or Hub repo (from_pretrained; calibrated), or a timm model
    name built and patched at `budget` (not calibrated yet)."""
    import os

    import timm

    from .api import patch_model
    from .hub import from_pretrained

    if os.path.isdir(source) or "/" in source:
        return from_pretrained(source), True
    if not timm.is_model(source):
        raise CommandError(
            f"{source!r} is not a checkpoint folder, a Hub repo id (user/name) or a timm model name"
        )
    model = timm.create_model(source, pretrained=pretrained).eval()
    return patch_model(model, budget=budget), False


def _load(source: str, budget: float, pretrained: bool):
    """A pruned model: a checkpoint (see `_open`), or a timm name patched and calibrated on random images."""
    import torch

    from .adapters import patched_adapter
    from .api import calibrate

    model, calibrated = _open(source, budget, pretrained)
    if not calibrated:
        adapter, _ = patched_adapter(model)
        calibrate(model, [torch.randn(16, *adapter.input_size(model)) for _ in range(2)])
    return model


def _visualize(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from .api import calibrate, get_pruner
    from .visualize import kept_patch_counts, prepare_image, visualize

    out_format = _image_format(args.out)
    try:
        image = Image.open(args.image)
        image.load()
    except UnidentifiedImageError as error:
        raise CommandError(f"{args.image} is not an image file that PIL can read") from error
    model, calibrated = _open(args.model, args.budget, args.pretrained)
    if not calibrated and not args.pretrained:
        print(f"note: {args.model} has random weights (--pretrained takes timm's, from the Hub): the patches it "
              "keeps show how pruning works, not what a trained model would keep.")
    pixels = prepare_image(model, image)
    if not calibrated or args.calibrate_on_image:
        stats = calibrate(model, [pixels])
        print(f"thresholds calibrated on {args.image}: it runs at {stats.flops_ratio:.2f} of the dense FLOPs "
              f"(budget {get_pruner(model).config.budget:g})")
    picture = visualize(model, pixels[0])
    _write_atomic(args.out, lambda path: picture.save(path, format=out_format))
    print(f"wrote {args.out}; {_counts_text(kept_patch_counts(model))}")
    return 0


def _counts_text(counts: list[tuple[int, int, int]]) -> str:
    """The kept-patch counts as one line, as the captions show them (patches only)."""
    stages = ", ".join(f"before block {location} {kept}/{total}" for location, kept, total in counts)
    return f"patches kept (prefix tokens such as the class token not counted): {stages}"


def _image_format(path: str) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise CommandError(f"--out {path}: not an image file name PIL can write (use .png or .jpg)")
    return fmt


def _export(args: argparse.Namespace) -> int:
    import torch

    from .adapters import patched_adapter
    from .api import last_stats
    from .export import export_onnx
    from .static import freeze

    model = _load(args.model, args.budget, args.pretrained)
    adapter, pruner = patched_adapter(model)
    size = adapter.input_size(model)
    batches = [torch.randn(16, *size) for _ in range(2)]
    if pruner.fixed_counts:  # a checkpoint saved frozen
        with torch.no_grad():
            adapter.forward_images(model.eval(), batches[0])  # an image-text model: its image path
        stats = last_stats(model)
    else:
        stats = freeze(model, batches)
    path = export_onnx(model, args.onnx, torch.randn(1, *size))
    print(f"wrote {path}: static counts {stats.kept_mean} tokens per stage, {stats.gflops:.3f} GFLOPs per image")
    return 0


def _write_atomic(path: str, write) -> None:
    """`write(temporary path)`, then rename it to `path` (see `files.atomic_file`): a failure never leaves a
    half-written file, and the file gets the permissions the umask allows."""
    with atomic_file(path) as tmp:
        write(str(tmp))


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


_MAX_REPEATS = "while the ratios to dense are unstable, repeat up to this many times (default: 3 x --repeats)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timm-token-prune", description="Adaptive token pruning for ViTs.",
        epilog="Start with `timm-token-prune demo` (a few minutes on a CPU); `COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="patch a timm ViT, calibrate it and print dense vs pruned GFLOPs, kept tokens and img/s"
    )
    demo.add_argument("--model", default="deit_small_patch16_224", help="a timm model name (built without weights)")
    demo.add_argument("--budget", type=float, default=0.65, help="fraction of the dense FLOPs to keep")
    demo.add_argument("--batch", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (medians)")
    demo.add_argument("--max-repeats", type=int, default=None, help=_MAX_REPEATS)
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    demo.set_defaults(run=_demo)
    bench = commands.add_parser("benchmark", help="dense vs pruned img/s and batch-1 latency of a timm model")
    bench.add_argument("model", help="a timm model name (random weights), or hf:vit-small")
    bench.add_argument("--budget", type=float, default=0.65)
    bench.add_argument("--batch", type=int, default=32)
    bench.add_argument("--repeats", type=int, default=6, help="interleaved timing repeats (medians)")
    bench.add_argument("--max-repeats", type=int, default=None, help=_MAX_REPEATS)
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
    vis.add_argument("--calibrate-on-image", action="store_true",
                     help="for a checkpoint: set its thresholds on this image (a timm model name always is)")
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
        parser.print_help()
        return 0
    if getattr(args, "repeats", 1) < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if hasattr(args, "budget") and not 0.0 < args.budget <= 1.0:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    from .errors import CheckpointError, NotPatchedError, UnsupportedModelError

    try:
        return args.run(args)
    except (CommandError, CheckpointError, UnsupportedModelError, NotPatchedError, OSError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, no traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
