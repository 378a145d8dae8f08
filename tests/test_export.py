"""export_onnx asks the adapter: classifiers export "logits", feature models their pooled "features"."""

from __future__ import annotations

import pytest
import torch
from conftest import images
from test_hf import main_output, make_hf

import timm_token_prune as ttp

onnxruntime = pytest.importorskip("onnxruntime")


def frozen_hf(case: str) -> torch.nn.Module:
    model = ttp.patch_model(make_hf(case), budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=10)])
    ttp.freeze(model, [images(16, seed=11)])
    return model


@pytest.mark.parametrize(
    "case, output",
    [("vit_classifier", "logits"), ("clip_vision_projection", "features"), ("siglip_vision_map_head", "features")],
)
def test_export_names_and_matches_the_output(case, output, tmp_path):
    model = frozen_hf(case)
    path = ttp.export_onnx(model, tmp_path / "model.onnx", images(2))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [output]
    x = images(3, seed=5)
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = main_output(model(x))
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-3, rtol=1e-3)


def test_bad_example_and_wrapper_are_refused_before_export(tmp_path):
    model = frozen_hf("vit_classifier")
    with pytest.raises(ValueError, match=r"pixel_values of shape \(B, 3, H, W\)"):
        ttp.export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 1, 32, 32))
    with pytest.raises(ttp.NotPatchedError, match="wrapper: export model.module"):
        ttp.export_onnx(torch.nn.DataParallel(model), tmp_path / "model.onnx", images(1))
    assert not list(tmp_path.iterdir())
