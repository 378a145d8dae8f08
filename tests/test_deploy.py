"""Static-shape mode, torch.compile, ONNX export and the kept-token picture."""

from __future__ import annotations

import pytest
import torch
from conftest import LOCATIONS, images, make_model

import timm_token_prune as ttp
from timm_token_prune.api import measure


def adaptive(case: str = "vit") -> torch.nn.Module:
    model = ttp.patch_model(make_model(case), budget=0.5, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


def frozen(case: str = "vit") -> torch.nn.Module:
    model = adaptive(case)
    ttp.freeze(model, [images(16, seed=s) for s in (12, 13)])
    return model


@pytest.mark.parametrize("case", ["vit", "deit_distilled", "avg_pool"])
def test_freeze_fixes_counts_at_the_adaptive_flops(case):
    model = adaptive(case)
    batches = [images(16, seed=s) for s in (12, 13)]
    adaptive_ratio = measure(model, ttp.get_pruner(model), batches).flops_ratio
    stats = ttp.freeze(model, batches)
    assert stats.kept_min == stats.kept_max
    assert stats.flops_ratio == pytest.approx(adaptive_ratio, abs=0.03)
    x = images(6, seed=3)
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert (batched - singles).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="unfreeze"):
        ttp.freeze(model, batches)
    ttp.unfreeze(model)
    with torch.no_grad():
        model(x)
    assert len(set(ttp.get_pruner(model).state.counts[-1].tolist())) > 1


@pytest.mark.slow  # torch.compile: several seconds
def test_static_mode_compiles_without_graph_breaks():
    model = frozen()
    x = images(4)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-4
    torch._dynamo.reset()


@pytest.mark.slow  # torch.compile: several seconds
def test_adaptive_mode_has_documented_graph_breaks():
    model = adaptive()
    explanation = torch._dynamo.explain(model)(images(4))
    assert explanation.graph_break_count >= len(LOCATIONS)  # one host sync per pruning point
    torch._dynamo.reset()


def test_onnx_export_matches_eager_with_a_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = frozen("deit_distilled")
    path = ttp.export_onnx(model, tmp_path / "model.onnx", images(2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(5, seed=4)
    (got,) = session.run(["logits"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert (torch.from_numpy(got) - expected).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="freeze"):
        ttp.export_onnx(adaptive(), tmp_path / "adaptive.onnx", images(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_visualize_greys_out_dropped_patches(tmp_path):
    model = adaptive("registers")
    picture = ttp.visualize(model, images(1, seed=9)[0], scale=1)
    stats = ttp.last_stats(model)
    assert picture.size[0] > 32 * (len(LOCATIONS) + 1)
    picture.save(tmp_path / "kept.png")
    # count grey (dropped) patches in the last panel: 8 x 8 patches of 4 x 4 pixels
    import numpy as np

    panels = np.asarray(picture)
    pad, top = 6, 18 + 6
    last = panels[top : top + 32, pad + len(LOCATIONS) * (32 + pad) : pad + len(LOCATIONS) * (32 + pad) + 32]
    tiles = last.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)
    grey = [(t[0::3] == t[1::3]).all() and (t[1::3] == t[2::3]).all() for t in tiles.astype(int)]
    kept_patches = int(stats.kept_mean[-1]) - model.num_prefix_tokens
    assert 64 - sum(grey) == kept_patches
