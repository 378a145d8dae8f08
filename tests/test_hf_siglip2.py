"""SigLIP 2 NaFlex (transformers Siglip2VisionModel / Siglip2ForImageClassification / Siglip2Model): padded batches
of images of different sizes, checked against the unpatched model, each image run alone, and FlopCounterMode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import spy_packed_attention

import timm_token_prune as ttp

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Siglip2VisionModel"):
    pytest.skip("this transformers has no Siglip2VisionModel", allow_module_level=True)

PATCH, GRID = 4, 8  # 4 x 4 patches of 3 channels; position embeddings of an 8 x 8 grid
WIDTH = 3 * PATCH * PATCH
LOCATIONS = (2, 3, 5)
VISION = dict(
    hidden_size=48, num_hidden_layers=6, num_attention_heads=3, intermediate_size=96, patch_size=PATCH,
    num_patches=GRID * GRID,
)
SHAPES = [(8, 8), (5, 8), (4, 6), (7, 5)]  # 64, 40, 24, 35 real patches


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # random init gives near-uniform attention: sharpen it so scores vary
        for name, p in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and name.endswith("weight") and "text" not in name:
                p.mul_(4.0)
    return model.eval()


def vision_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _sharpen(transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION)))


def classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.Siglip2Config(
        vision_config=VISION,
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        num_labels=10,
    )
    return _sharpen(transformers.Siglip2ForImageClassification(config))


def naflex(shapes, max_patches: int | None = None, seed: int = 0, padding: float = 0.0) -> dict[str, torch.Tensor]:
    """Patchified images of the given grids (h, w), each padded to max_patches; padding patches hold `padding`
    times random values (the processor writes zeros)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = max_patches or max(h * w for h, w in shapes)
    pixels = padding * torch.randn(len(shapes), tokens, WIDTH, generator=generator)
    mask = torch.zeros(len(shapes), tokens, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        pixels[i, : h * w] = torch.randn(h * w, WIDTH, generator=generator)
        mask[i, : h * w] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor(shapes)}


def alone(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Image i of a padded batch by itself, without padding."""
    n = int(inputs["pixel_attention_mask"][i].sum())
    return {
        "pixel_values": inputs["pixel_values"][i : i + 1, :n],
        "pixel_attention_mask": inputs["pixel_attention_mask"][i : i + 1, :n],
        "spatial_shapes": inputs["spatial_shapes"][i : i + 1],
    }


CALIBRATION = [naflex(SHAPES * 2, seed=10)]
_CALIBRATED: dict = {}
# float32: the unpatched model itself differs by up to ~5e-6 between an image padded in a batch and alone
# (summation order), and merged tokens carry that on; in float64 the pruned model agrees to ~1e-13
ALONE_ATOL = 1e-4
ALONE_ATOL_64 = 1e-9


def patched(build=vision_model, budget: float = 0.6, **options) -> torch.nn.Module:
    """A calibrated copy (calibration runs once per kind of model)."""
    key = (build.__name__, budget, tuple(sorted(options.items())))
    if key not in _CALIBRATED:
        model = ttp.patch_model(build(), budget=budget, prune_locations=LOCATIONS, **options)
        if budget < 1.0:
            ttp.calibrate(model, CALIBRATION)
        _CALIBRATED[key] = model
    return copy.deepcopy(_CALIBRATED[key])


def real_patches(inputs) -> list[int]:
    return inputs["pixel_attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("build", [vision_model, classifier], ids=["vision", "classifier"])
def test_budget_one_equals_unpatched_on_a_padded_batch(build):
    model = build()
    x = naflex(SHAPES, seed=1, padding=1.0)
    with torch.no_grad():
        dense = model(**x)
        ttp.patch_model(model, budget=1.0, prune_locations=LOCATIONS)
        got = model(**x)
        for name in ("pooler_output", "last_hidden_state", "logits"):
            if getattr(dense, name, None) is not None:
                assert torch.equal(getattr(got, name), getattr(dense, name)), name
        assert ttp.last_stats(model).flops_ratio == pytest.approx(1.0)
        ttp.unpatch_model(model)
        again = model(**x)
    name = "logits" if getattr(dense, "logits", None) is not None else "pooler_output"
    assert torch.equal(getattr(again, name), getattr(dense, name))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "build, options",
    [(vision_model, {}), (vision_model, dict(keep_policy="topk")), (vision_model, dict(pruned_tokens="drop")),
     (classifier, {})],
    ids=["vision", "topk", "drop", "classifier"],
)
def test_each_image_as_if_alone_and_padding_content_ignored(build, options):
    """Padded with a larger image, an image keeps what it keeps alone and unpadded, gives the same output, and
    what the padding patches hold changes nothing (no padding token is kept, scored or merged in). In float64,
    so that the comparison is tight (float32: within ALONE_ATOL)."""
    model = patched(build, **options).double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in naflex(SHAPES, seed=3).items()}
    noisy = {k: v.double() if v.is_floating_point() else v for k, v in naflex(SHAPES, seed=3, padding=5.0).items()}
    name = "logits" if build is classifier else "pooler_output"
    with torch.no_grad():
        batched = getattr(model(**x), name)
        counts = [c.tolist() for c in ttp.get_pruner(model).state.counts]
        assert (getattr(model(**noisy), name) - batched).abs().max().item() <= ALONE_ATOL_64
        for i in range(len(SHAPES)):
            single = getattr(model(**alone(x, i)), name)
            assert (single - batched[i : i + 1]).abs().max().item() <= ALONE_ATOL_64, i
            assert [c.item() for c in ttp.get_pruner(model).state.counts] == [c[i] for c in counts], i
    assert len({c for c in counts[-1]}) > 1, counts  # images keep different counts
    assert all(c[i] <= n for c in counts for i, n in enumerate(real_patches(x)))
    assert all(c[i] < n for i, n in enumerate(real_patches(x)) for c in counts[-1:])  # each image pruned


def test_kept_tokens_are_real_patches():
    model = patched(restore_tokens=True)
    x = naflex(SHAPES, seed=4)
    with torch.no_grad():
        model(**x)
    pruner = ttp.get_pruner(model)
    n = torch.tensor(real_patches(x))[:, None]
    for positions, valid in pruner.kept_positions():
        real = valid if valid is not None else torch.ones_like(positions, dtype=torch.bool)
        assert (positions[real] < n.expand_as(positions)[real]).all()
    sources = pruner.restored_sources()  # where each restored real patch's fill comes from: a real patch
    assert all((sources[i, :k] < k).all() for i, k in enumerate(real_patches(x)))


def test_restore_tokens_gives_each_images_own_grid():
    model = patched(restore_tokens=True)
    x = naflex(SHAPES, seed=5, padding=1.0)
    with torch.no_grad():
        out = model(**x)
        grid = out.last_hidden_state
        assert grid.shape == (len(SHAPES), x["pixel_values"].shape[1], VISION["hidden_size"])
        for i, k in enumerate(real_patches(x)):
            assert not grid[i, k:].any()  # padding positions: zeros
            single = model(**alone(x, i))
            assert single.last_hidden_state.shape[1] == k
            assert (single.last_hidden_state[0] - grid[i, :k]).abs().max().item() <= ALONE_ATOL, i
            assert (single.pooler_output - out.pooler_output[i]).abs().max().item() <= ALONE_ATOL, i
        thresholds = ttp.get_pruner(model).thresholds.detach().clone()
        unrestored = ttp.patch_model(ttp.unpatch_model(model), 0.6, prune_locations=LOCATIONS)
        ttp.get_pruner(unrestored).thresholds.copy_(thresholds)
        # the same thresholds without restoring: the pooled output is bit-equal
        assert torch.equal(unrestored(**x).pooler_output, out.pooler_output)


def test_restore_at_budget_one_equals_dense_at_real_patches():
    model = vision_model()
    x = naflex(SHAPES, seed=6, padding=1.0)
    with torch.no_grad():
        dense = model(**x)
        ttp.patch_model(model, 1.0, prune_locations=LOCATIONS, restore_tokens=True)
        got = model(**x, output_hidden_states=True)
    real = x["pixel_attention_mask"].bool()
    assert torch.equal(got.last_hidden_state[real], dense.last_hidden_state[real])
    assert not got.last_hidden_state[~real].any()
    assert torch.equal(got.pooler_output, dense.pooler_output)


def _counted_gmacs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    from test_timm import _counted_gmacs as counted

    class Call(torch.nn.Module):  # the counter takes one tensor: the other inputs ride along
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model(**{**inputs, "pixel_values": pixels})

    return counted(Call(), inputs["pixel_values"])


def test_flops_per_image_over_real_patches_agree_with_flop_counter_and_meet_the_budget():
    """calibrate on padded batches meets the budget per image; each image's analytic MACs (dense and pruned,
    from the padded batch) match FlopCounterMode on the image run alone, unpadded."""
    model = patched(budget=0.6)
    dense_model = vision_model()
    x = naflex(SHAPES * 2, seed=10)  # calibration images
    with torch.no_grad():
        model(**x)
    stats = ttp.last_stats(model)
    for i in range(len(SHAPES)):  # one image of each size
        single = alone(x, i)
        dense, pruned = _counted_gmacs(dense_model, single), _counted_gmacs(model, single)
        assert stats.dense_gflops_per_image[i] == pytest.approx(dense, rel=0.02), i
        assert stats.gflops_per_image[i] == pytest.approx(pruned, rel=0.02), i
        assert stats.gflops_per_image[i] / stats.dense_gflops_per_image[i] == pytest.approx(pruned / dense, abs=0.01)
    ratios = [g / d for g, d in zip(stats.gflops_per_image, stats.dense_gflops_per_image)]
    assert sum(ratios) / len(ratios) == pytest.approx(0.6, abs=0.02)
    assert stats.flops_ratio == pytest.approx(sum(ratios) / len(ratios))
    assert len({round(d, 9) for d in stats.dense_gflops_per_image}) == len(SHAPES)  # per image, not padded


def test_training_masks_padding_and_gives_the_same_output_as_dropping():
    model = patched()
    x = naflex(SHAPES, seed=7)
    with torch.no_grad():
        dropped = model(**x).pooler_output
    model.train()
    masked = model(**x).pooler_output
    assert (masked - dropped).abs().max().item() <= 1e-4
    loss = masked.pow(2).mean() + ttp.budget_loss(model)
    loss.backward()
    grad = ttp.get_pruner(model).thresholds.grad
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    counts = ttp.get_pruner(model).state.counts
    assert all((c <= torch.tensor(real_patches(x))).all() for c in counts)


def test_wrong_inputs():
    model = patched(budget=1.0)
    with pytest.raises(ValueError, match=r"pixel_values of shape \(B, N, 48\)"):
        model(pixel_values=torch.randn(2, 3, 32, 32), pixel_attention_mask=torch.ones(2, 64), spatial_shapes=torch.tensor([[8, 8]] * 2))
    x = naflex(SHAPES)
    with pytest.raises(ValueError, match="does not fit"):
        model(**{**x, "pixel_attention_mask": x["pixel_attention_mask"][:, :10]})


def dual_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.Siglip2Config(
        vision_config=VISION,
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    )
    return _sharpen(transformers.Siglip2Model(config))


def test_siglip2_model_image_features_through_the_vision_tower():
    model = dual_model()
    x = naflex(SHAPES, seed=8, padding=1.0)
    with torch.no_grad():
        dense = model.get_image_features(**x).pooler_output
        ttp.patch_model(model, 1.0, prune_locations=LOCATIONS)
        assert torch.equal(model.get_image_features(**x).pooler_output, dense)
        ttp.unpatch_model(model)
        ttp.patch_model(model, 0.6, prune_locations=LOCATIONS)
        ttp.calibrate(model, CALIBRATION)
        pruned = model.get_image_features(**x).pooler_output
        for i in range(len(SHAPES)):
            single = model.get_image_features(**alone(x, i)).pooler_output
            assert (single - pruned[i : i + 1]).abs().max().item() <= ALONE_ATOL
    assert ttp.last_stats(model).flops_ratio < 0.9


def test_onnx_export_is_refused_clearly_and_writes_nothing(tmp_path):
    model = patched(keep_policy="topk")
    path = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="NaFlex"):
        ttp.export_onnx(model, path, naflex(SHAPES[:1])["pixel_values"])
    assert list(tmp_path.iterdir()) == []


def test_freeze_refuses_padded_samples_and_leaves_the_model_adaptive():
    model = patched()
    with pytest.raises(ValueError, match="unpadded"):
        ttp.freeze(model, [naflex(SHAPES)])
    assert not ttp.get_pruner(model).fixed_counts


def test_a_refused_classifier_forward_leaves_no_mask_behind():
    model = patched(classifier, budget=1.0)
    x = naflex(SHAPES[:2])
    with torch.no_grad():
        tower = model.vision_model if hasattr(model, "vision_model") else model.siglip2.vision_model
        before = tower(pixel_values=x["pixel_values"], pixel_attention_mask=None, spatial_shapes=x["spatial_shapes"])
        with pytest.raises(NotImplementedError):
            model(**x, output_attentions=True)
        after = tower(pixel_values=x["pixel_values"], pixel_attention_mask=None, spatial_shapes=x["spatial_shapes"])
    assert torch.equal(before.pooler_output, after.pooler_output)


@pytest.mark.parametrize("build", ["vision", "dual"])
def test_calibrate_on_plain_tensors_says_what_batches_to_pass(build):
    model = patched() if build == "vision" else ttp.patch_model(dual_model(), 0.6)
    thresholds = ttp.get_pruner(model).thresholds.detach().clone()
    with pytest.raises(ValueError, match="pixel_attention_mask"):
        ttp.calibrate(model, [naflex(SHAPES)["pixel_values"]])
    assert torch.equal(ttp.get_pruner(model).thresholds, thresholds)


def test_packed_grouped_attention_on_a_padded_batch(monkeypatch):
    """Sixteen NaFlex images, packed and attending in groups: attention reads q, k, v straight from the packed
    tokens (`TokenPruner.attention_packed`), with the same outputs as unpacking the whole batch, and each
    image as alone."""
    model = patched()
    pruner = ttp.get_pruner(model)
    calls = spy_packed_attention(monkeypatch, pruner)
    x = naflex(SHAPES * 4, seed=3)
    with torch.no_grad():
        direct = model(**x).pooler_output
        assert calls, "the packed path should have run"
        singles = torch.cat([model(**alone(x, i)).pooler_output for i in range(len(SHAPES) * 4)])
        monkeypatch.setattr(type(pruner), "attends_packed", lambda self: False)
        unpacked = model(**x).pooler_output
    assert (direct - unpacked).abs().max().item() <= 1e-6
    assert (direct - singles).abs().max().item() <= ALONE_ATOL
