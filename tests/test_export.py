"""export_onnx asks the adapter: classifiers export "logits", feature models their pooled "features"."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import images, make_model
from test_hf import main_output, make_hf

import timm_token_prune as ttp

onnxruntime = pytest.importorskip("onnxruntime")


def frozen_hf(case: str) -> torch.nn.Module:
    model = ttp.patch_model(make_hf(case), budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=10)])
    ttp.freeze(model, [images(16, seed=11)])
    return model


def exported_matches_eager(model, tmp_path):
    """Export `model`, check the ONNX output on another batch size against eager; returns the session."""
    path = ttp.export_onnx(model, tmp_path / "model.onnx", images(2))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(3, seed=5)
    (got,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = main_output(model(x))
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-3, rtol=1e-3)
    return session


@pytest.mark.parametrize(
    "case, output",
    [("vit_classifier", "logits"), ("clip_vision_projection", "features"), ("siglip_vision_map_head", "features")],
)
def test_export_names_and_matches_the_output(case, output, tmp_path):
    model = frozen_hf(case)
    session = exported_matches_eager(model, tmp_path)
    assert [o.name for o in session.get_outputs()] == [output]


def test_bad_example_and_wrapper_are_refused_before_export(tmp_path):
    model = frozen_hf("vit_classifier")
    with pytest.raises(ValueError, match=r"pixel_values of shape \(B, 3, H, W\)"):
        ttp.export_onnx(model, tmp_path / "model.onnx", torch.randn(1, 1, 32, 32))
    with pytest.raises(ttp.NotPatchedError, match="wrapper: export model.module"):
        ttp.export_onnx(torch.nn.DataParallel(model), tmp_path / "model.onnx", images(1))
    assert not list(tmp_path.iterdir())


def frozen_timm() -> torch.nn.Module:
    """A timm model with fixed counts from the start (top-k): exportable without calibrate or freeze."""
    return ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=(2, 3, 5), keep_policy="topk")


def test_an_empty_example_is_refused(tmp_path):
    """A batch of 0 takes the nothing-to-prune path: its trace would be the dense model."""
    with pytest.raises(ValueError, match=r"at least one image, got an empty one \(shape \(0, 3, 32, 32\)\)"):
        ttp.export_onnx(frozen_timm(), tmp_path / "model.onnx", torch.randn(0, 3, 32, 32))
    assert not list(tmp_path.iterdir())


def test_a_model_patched_with_restore_tokens_exports_its_logits(tmp_path):
    """Restoring records where pruned tokens go (not in place, so that ONNX has the operators); the logits
    do not depend on the grid."""
    model = ttp.patch_model(
        make_hf("vit_classifier"), budget=0.5, prune_locations=(2, 3, 5), keep_policy="topk", restore_tokens=True
    )
    exported_matches_eager(model, tmp_path)


def test_the_onnx_file_gets_the_permissions_the_umask_allows(tmp_path):
    """Not mkstemp's private 0o600: a serving account in the group can read it."""
    model = frozen_timm()
    old = os.umask(0o027)
    try:
        path = ttp.export_onnx(model, tmp_path / "model.onnx", images(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
