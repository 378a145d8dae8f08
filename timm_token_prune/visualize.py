"""Which patches a pruned model kept: the input with dropped patches greyed out, one panel per stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import patched_adapter


def prepare_image(model: nn.Module, image) -> torch.Tensor:
    """A PIL image as the model takes it: resized to its input size, scaled to [0, 1] and normalised with
    its mean / std (timm's pretrained config; for transformers the family's, ImageNet's by default).
    Returns a (1, C, H, W) float tensor."""
    from PIL import Image

    adapter, _ = patched_adapter(model, "visualize")
    if not isinstance(image, Image.Image):
        raise TypeError(f"prepare_image expects a PIL image, got {type(image).__name__}")
    channels, height, width = adapter.input_size(model)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"cannot turn a PIL image into the {channels} channels this model takes: pass a tensor")
    image = image.convert(mode).resize((width, height), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, channels)
    mean, std = adapter.normalization(model)
    pixels = pixels.permute(2, 0, 1).float() / 255
    return ((pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@torch.no_grad()
def visualize(model: nn.Module, image, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              scale: int = 2):
    """A PIL image: `image` shown once per pruning stage (at most four, evenly spaced and the last, see
    `shown_stages`) with the patches pruned before that stage greyed out and the kept ones outlined, the
    kept count in each panel's title. A model patched with
    `restore_tokens` gets one more panel, the restored grid: filled positions tinted blue, each joined by a
    line to the kept patch its fill is read from ('nearest' / 'offset'; 'dropped' fills read themselves).

    `image` is a PIL image (resized and normalised for the model, see `prepare_image`) or a normalised
    tensor (C, H, W) or (1, C, H, W); `mean` / `std` undo its normalisation for display (default: the
    model's own)."""
    from PIL import Image, ImageDraw

    adapter, pruner = patched_adapter(model, "visualize")
    if isinstance(image, Image.Image):
        image = prepare_image(model, image)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"visualize takes a PIL image or an image tensor (C, H, W), got {type(image).__name__}")
    x = image[None] if image.ndim == 3 else image
    channels = adapter.input_size(model)[0]
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != channels:
        raise ValueError(
            f"visualize takes one image of shape ({channels}, H, W) or (1, {channels}, H, W), got {tuple(image.shape)}"
        )
    adapter.check_images(model, x)
    default_mean, default_std = adapter.normalization(model)
    mean = default_mean if mean is None else mean
    std = default_std if std is None else std
    x = x.to(pruner.thresholds.device)
    was_training = model.training
    model.eval()
    try:
        adapter.forward_images(model, x)  # an image-text or vision-language model: its vision tower only
    finally:
        model.train(was_training)
    prefix = pruner.num_prefix_tokens
    patches = pruner.state.num_tokens - prefix
    height, width = x.shape[-2:]
    grid_w = _grid_width(patches, height, width)
    grid_h = patches // grid_w
    pixels = (x[0].cpu() * torch.as_tensor(std)[:, None, None] + torch.as_tensor(mean)[:, None, None]).clamp(0, 1)
    rgb = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels[:3]
    grey = rgb.mean(0, keepdim=True).expand(3, -1, -1) * 0.25 + 0.55
    panels = [("input", rgb, None, None)]
    ph, pw = height // grid_h, width // grid_w
    kept_by_stage = _kept_patches(pruner)
    for stage in shown_stages(len(kept_by_stage)):
        kept_patches = kept_by_stage[stage]
        mask = torch.zeros(patches, dtype=torch.bool)
        mask[kept_patches] = True
        cells = mask.view(grid_h, grid_w)
        mask = cells.repeat_interleave(ph, 0).repeat_interleave(pw, 1)
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1], 0, height - mask.shape[0]))
        title = f"before block {pruner.locations[stage]}: {len(kept_patches)}/{patches}"
        panels.append((title, torch.where(mask, rgb, grey), cells, None))
    if pruner.config.restore_tokens:
        panels.append(_restored_panel(pruner, rgb, grid_h, grid_w, (ph, pw)))
    title_h, pad = 18, 6
    w, h = width * scale, height * scale
    canvas = Image.new("RGB", (len(panels) * (w + pad) + pad, h + title_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, tensor, cells, links) in enumerate(panels):
        panel = Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        left, top = pad + i * (w + pad), title_h + pad
        canvas.paste(panel.resize((w, h), Image.NEAREST), (left, top))
        draw.text((left, pad // 2), title, fill="black")
        if cells is not None and scale > 1:  # outline kept patches (grey alone is ambiguous on grey images)
            for r, c in cells.nonzero().tolist():
                x0, y0 = left + c * pw * scale, top + r * ph * scale
                draw.rectangle([x0, y0, x0 + pw * scale - 1, y0 + ph * scale - 1], outline=(230, 80, 20))
        for source, target in links or ():  # restored grid: from the kept patch to the position it fills
            (r0, c0), (r1, c1) = divmod(source, grid_w), divmod(target, grid_w)
            centre = [left + (c + 0.5) * pw * scale for c in (c0, c1)], [top + (r + 0.5) * ph * scale for r in (r0, r1)]
            draw.line([(centre[0][0], centre[1][0]), (centre[0][1], centre[1][1])], fill=(230, 80, 20), width=1)
            draw.ellipse([centre[0][0] - 1, centre[1][0] - 1, centre[0][0] + 1, centre[1][0] + 1], fill=(230, 80, 20))
    return canvas


def kept_patch_counts(model: nn.Module) -> list[tuple[int, int, int]]:
    """(block, patches kept before it, patches) per pruning stage of the first image of the last eval
    forward: the counts in `visualize`'s captions (patches only; class and other prefix tokens not counted)."""
    _, pruner = patched_adapter(model, "count the kept patches of")
    patches = pruner.state.num_tokens - pruner.num_prefix_tokens
    return [(location, len(kept), patches) for location, kept in zip(pruner.locations, _kept_patches(pruner))]


def _kept_patches(pruner) -> list[torch.Tensor]:
    """Per stage: the patch indices (prefix tokens left out) that entered it, for the first image."""
    prefix, out = pruner.num_prefix_tokens, []
    for positions, valid in pruner.kept_positions():
        kept = positions[0] if valid is None else positions[0][valid[0]]
        out.append((kept[kept >= prefix] - prefix).cpu())
    return out


def shown_stages(stages: int, most: int = 4) -> list[int]:
    """The stages that get a panel: all of up to `most`, else `most` of them evenly spaced, the last included
    (a model pruned after every block has a stage per block)."""
    if stages <= most:
        return list(range(stages))
    return sorted({round((i + 1) * stages / most) - 1 for i in range(most)})


def _restored_panel(pruner, rgb: torch.Tensor, grid_h: int, grid_w: int, patch: tuple[int, int]):
    """The restored-grid panel: pruned positions tinted, with (source, target) patch links."""
    prefix, fill = pruner.num_prefix_tokens, pruner.config.restore_fill
    sources = pruner.restored_sources()
    patches = grid_h * grid_w
    own = torch.arange(patches)
    sources = own if sources is None else sources[0, prefix:].cpu() - prefix
    filled = torch.zeros(patches, dtype=torch.bool)
    if pruner.state.layout.restore is not None:
        filled = pruner.state.layout.restore.pruned[0, prefix:].cpu()
    mask = filled.view(grid_h, grid_w).repeat_interleave(patch[0], 0).repeat_interleave(patch[1], 1)
    mask = torch.nn.functional.pad(mask, (0, rgb.shape[2] - mask.shape[1], 0, rgb.shape[1] - mask.shape[0]))
    tinted = torch.where(mask, 0.5 * rgb + 0.5 * torch.tensor([0.2, 0.4, 0.9])[:, None, None], rgb)
    links = [(int(sources[t]), t) for t in filled.nonzero().flatten().tolist() if fill != "dropped"]
    return f"restored ({fill}): {int(filled.sum())} filled", tinted, None, links


def _grid_width(patches: int, height: int, width: int) -> int:
    """Patch-grid width for `patches` patches of an H x W image (square patches)."""
    side = (patches * width / height) ** 0.5
    for w in sorted(range(1, patches + 1), key=lambda c: abs(c - side)):
        if patches % w == 0:
            return w
    return patches
