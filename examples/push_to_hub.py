"""Patch a timm ViT, calibrate it, save it and push it to the Hugging Face Hub, then load it back.

    python examples/push_to_hub.py --repo-id you/deit-s-asvit-65            # needs `huggingface-cli login`
    python examples/push_to_hub.py --save-only out/deit-s-asvit-65          # offline: write the folder only

Random weights and random calibration images keep the example offline; use pretrained=True and real
images (and fine-tune with a FLOPs budget) for a model worth sharing.
"""

from __future__ import annotations

import argparse

import timm
import torch

import timm_token_prune as ttp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--budget", type=float, default=0.65)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="user/name on the Hub")
    target.add_argument("--save-only", metavar="DIR", help="write the checkpoint folder, push nothing")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()

    model = timm.create_model(args.model, pretrained=False).eval()
    size = tuple(model.patch_embed.img_size)
    ttp.patch_model(model, budget=args.budget)
    stats = ttp.calibrate(model, [torch.randn(8, 3, *size) for _ in range(4)])
    print(f"calibrated: {stats.gflops:.2f} of {stats.dense_gflops:.2f} GFLOPs, tokens per stage {stats.kept_mean}")

    if args.save_only:
        ttp.save_pretrained(model, args.save_only, stats=stats)
        print(f"saved to {args.save_only}; load with ttp.from_pretrained({args.save_only!r})")
        source = args.save_only
    else:
        commit = ttp.push_to_hub(model, args.repo_id, private=args.private, stats=stats)
        print(f"pushed: {commit.commit_url}")
        source = args.repo_id
    loaded = ttp.from_pretrained(source)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        print("round trip identical:", torch.equal(loaded(x), model(x)))


if __name__ == "__main__":
    main()
