"""Command line: `timm-token-prune demo | push DIR REPO_ID | info REPO_ID_OR_DIR`
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
    if args.command == "demo" and not 0.0 < args.budget <= 1.0:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    from .errors import CheckpointError

    try:
        return args.run(args)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
