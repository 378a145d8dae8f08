"""Command line: `timm-token-prune demo` (also `python -m timm_token_prune`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .benchmark import compare, format_table

    print(f"Building {args.model} (random weights, offline), patching it at budget {args.budget}, calibrating...")
    results = compare(args.model, args.budget, args.batch, args.repeats, args.threads)
    print(format_table(results))
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    if not 0.0 < args.budget <= 1.0:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    try:
        import timm  # noqa: F401
    except ImportError:
        parser.error("the demo needs timm: pip install timm")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
