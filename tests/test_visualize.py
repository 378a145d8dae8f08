"""visualize: PIL images in, prepared with the model's own input size and normalisation; clear errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
from conftest import images, make_model
from PIL import Image
from test_hf import make_hf

import timm_token_prune as ttp
from timm_token_prune.visualize import prepare_image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def photo(width: int = 57, height: int = 41) -> Image.Image:
    """A colourful test picture, larger than the model's input and not square."""
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(image: Image.Image, size: tuple[int, int], mean, std) -> torch.Tensor:
    """The model's input computed independently: numpy pixels of the resized image, normalised."""
    array = np.asarray(image.convert("RGB").resize(size[::-1], Image.BICUBIC), dtype=np.float64) / 255
    array = (array - np.array(mean)) / np.array(std)
    return torch.from_numpy(array).permute(2, 0, 1).float()[None]


def timm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=6).eval()
    ttp.patch_model(model, budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


def hf_model(case: str) -> torch.nn.Module:
    model = ttp.patch_model(make_hf(case), budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


@pytest.mark.parametrize(
    "build, normalization",
    [
        (timm_model, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),  # vit_tiny's pretrained_cfg
        (lambda: hf_model("vit_classifier"), IMAGENET),
        (lambda: hf_model("clip_vision"), ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))),
    ],
    ids=["timm", "transformers-vit", "transformers-clip"],
)
def test_a_pil_image_is_prepared_for_the_model(build, normalization):
    model = build()
    picture = photo()
    expected = reference(picture, (32, 32), *normalization)
    prepared = prepare_image(model, picture)
    assert prepared.shape == (1, 3, 32, 32)
    assert (prepared - expected).abs().max().item() < 1e-5
    from_pil = np.asarray(ttp.visualize(model, picture), dtype=int)
    kept = ttp.last_stats(model).kept_mean
    from_tensor = np.asarray(ttp.visualize(model, expected[0], mean=normalization[0], std=normalization[1]), dtype=int)
    assert ttp.last_stats(model).kept_mean == kept
    assert from_pil.shape == from_tensor.shape and np.abs(from_pil - from_tensor).max() <= 1  # rounding only


def test_bad_images_get_clear_errors():
    model = timm_model()
    with pytest.raises(TypeError, match="PIL image or an image tensor"):
        ttp.visualize(model, "cat.png")
    with pytest.raises(ValueError, match="one image"):
        ttp.visualize(model, images(2))
    with pytest.raises(ValueError, match=r"takes \(32, 32\) images"):
        ttp.visualize(model, images(1, size=48)[0])
    with pytest.raises(ttp.NotPatchedError, match="wrapper: visualize model.module"):
        ttp.visualize(torch.nn.DataParallel(model), photo())


def test_a_wrong_channel_count_reports_the_shape_the_caller_passed():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=(2, 3, 5), threshold_init=(0.1, 0.2, 0.3))
    for shape in ((1, 32, 32), (1, 1, 32, 32)):
        with pytest.raises(ValueError, match=rf"one image of shape \(3, H, W\) .*got {re.escape(str(shape))}$"):
            ttp.visualize(model, torch.rand(*shape))


def test_a_model_pruned_after_every_block_shows_four_stages_the_last_included():
    from timm_token_prune.visualize import shown_stages

    assert shown_stages(3) == [0, 1, 2]
    assert shown_stages(11) == [2, 5, 7, 10]
    assert shown_stages(5) == [0, 1, 3, 4]
