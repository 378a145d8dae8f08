"""Bad input gets a clear error and leaves the model unchanged; the config round-trips."""

from __future__ import annotations

import json
import pickle

import pytest
import timm
import torch
from conftest import LOCATIONS, images, make_model
from timm.models.vision_transformer import ParallelScalingBlock

import timm_token_prune as ttp


def _snapshot(model: torch.nn.Module):
    return (
        {name: type(m) for name, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model: torch.nn.Module, snapshot) -> None:
    classes, state = snapshot
    assert {name: type(m) for name, m in model.named_modules()} == classes
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert not hasattr(model, "token_pruner")


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(global_pool=""), "global_pool='': it returns every token"),
        (dict(global_pool="prr"), "global_pool='prr'"),
        (dict(block_fn=ParallelScalingBlock), "ParallelScalingBlock"),
    ],
)
def test_unsupported_timm_models_raise_and_stay_unchanged(overrides, reason):
    model = make_model("vit", **overrides)
    snapshot = _snapshot(model)
    with pytest.raises(ttp.UnsupportedModelError) as error:
        ttp.patch_model(model, budget=0.5)
    message = str(error.value)
    assert "VisionTransformer" in message and reason in message and "Supported:" in message
    _assert_unchanged(model, snapshot)


def test_models_of_no_known_zoo_are_unsupported():
    for model in (torch.nn.Linear(4, 4), timm.create_model("test_resnet", pretrained=False)):
        with pytest.raises(ttp.UnsupportedModelError, match="no adapter knows it. Supported: timm VisionTransformer"):
            ttp.patch_model(model)


@pytest.mark.parametrize("budget", [0.0, -0.2, 1.5, float("nan")])
def test_bad_budget(budget):
    model = make_model("vit")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="budget must be in"):
        ttp.patch_model(model, budget=budget)
    _assert_unchanged(model, snapshot)


def test_bad_options_leave_the_model_unchanged():
    model = make_model("vit")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"prune_locations \(2, 6\) must be block indices in \[1, 5\]"):
        ttp.patch_model(model, prune_locations=(2, 6))
    with pytest.raises(ValueError, match="threshold_init has 2 values for 3 pruning stages"):
        ttp.patch_model(model, prune_locations=LOCATIONS, threshold_init=(0.1, 0.2))
    with pytest.raises(TypeError):
        ttp.patch_model(model, no_such_option=1)
    with pytest.raises(ValueError, match="score must be one of"):
        ttp.patch_model(model, score="max")
    _assert_unchanged(model, snapshot)


def test_double_patch_and_unpatched_calls():
    model = make_model("vit")
    with pytest.raises(ttp.NotPatchedError, match="call patch_model"):
        ttp.unpatch_model(model)
    with pytest.raises(ttp.NotPatchedError):
        ttp.last_stats(model)
    ttp.patch_model(model, budget=0.5)
    with pytest.raises(RuntimeError, match="no forward pass"):
        ttp.budget_loss(model)
    with pytest.raises(ttp.AlreadyPatchedError, match="unpatch_model"):
        ttp.patch_model(model, budget=0.7)


@pytest.mark.parametrize(
    "shape, match",
    [((2, 1, 32, 32), r"shape \(B, 3, H, W\)"), ((2, 3, 40, 40), r"takes \(32, 32\) images"), ((3, 32, 32), "shape")],
)
def test_wrong_input_shape(shape, match):
    model = ttp.patch_model(make_model("vit"), budget=0.5)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_unreachable_budget():
    model = ttp.patch_model(make_model("vit"), budget=0.05, prune_locations=(4,))
    with pytest.raises(ValueError, match="unreachable"):
        ttp.calibrate(model, [images(4)])


def test_unsupported_uses_of_a_patched_model():
    model = ttp.patch_model(make_model("vit"), budget=0.5)
    with pytest.raises(NotImplementedError, match="unpatch_model"):
        model.forward_intermediates(images(1))
    model.set_grad_checkpointing(True)
    model.train()
    with pytest.raises(NotImplementedError, match="set_grad_checkpointing"):
        model(images(2))


def test_config_json_round_trip_and_versioning():
    config = ttp.PruneConfig(budget=0.5, prune_locations=[3, 6, 9], keep_policy="topk", keep_ratios=[0.7, 0.7, 0.7])
    data = json.loads(config.to_json())
    assert ttp.PruneConfig.from_dict(data) == config
    with pytest.warns(UserWarning, match="unknown keys"):
        assert ttp.PruneConfig.from_dict({**data, "added_later": 1}) == config
    with pytest.raises(ValueError, match="upgrade timm-token-prune"):
        ttp.PruneConfig.from_dict({**data, "format_version": 99})


def test_the_soft_mask_temperature_defaults_per_keep_policy_and_round_trips():
    assert ttp.PruneConfig().soft_temperature == 0.003  # 'mass': a share of the score mass
    assert ttp.PruneConfig(keep_policy="threshold").soft_temperature == 0.01
    given = ttp.PruneConfig(temperature=0.02)
    assert given.soft_temperature == 0.02
    for config in (ttp.PruneConfig(), given):
        assert ttp.PruneConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ttp.PruneConfig(temperature=0.0)


def test_patched_model_pickles():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(8)])
    clone = pickle.loads(pickle.dumps(model))
    x = images(3)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


# ---- unusual inputs ------------------------------------------------------------------------------
def test_an_empty_batch_gives_empty_outputs_like_the_unpatched_model():
    plain = make_model("vit")
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(8)])
    empty = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        expected = plain(empty)
        assert model(empty).shape == expected.shape == (0, 10)
    model.train()
    assert model(empty).shape == (0, 10) and ttp.budget_loss(model).item() == 0.0
    with pytest.raises(ValueError, match="no images"):
        ttp.last_stats(model)
    before = ttp.get_pruner(model).thresholds.clone()
    with pytest.raises(ValueError, match="at least one image"):
        ttp.calibrate(model, [empty])
    assert torch.equal(ttp.get_pruner(model).thresholds, before)
    ttp.calibrate(model, [empty, images(8)])  # empty batches among others are skipped


def test_a_nan_image_keeps_min_keep_patches_and_leaves_its_batch_mates_alone():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(16)])
    x = images(4)
    x[1] = float("nan")
    with torch.no_grad():
        out = model(x)
        counts = [c.tolist() for c in ttp.get_pruner(model).state.counts]
        rest = model(x[[0, 2, 3]])
        rest_counts = [c.tolist() for c in ttp.get_pruner(model).state.counts]
    prefix = model.num_prefix_tokens
    assert [c[1] for c in counts] == [prefix + 1] * len(LOCATIONS)  # min_keep = 1 patch, never 0 or padding
    assert [[c[0], c[2], c[3]] for c in counts] == rest_counts
    assert torch.equal(out[[0, 2, 3]], rest)


def test_tied_scores_warn_with_the_budget_asked_for():
    model = make_model("vit")
    with torch.no_grad():
        model.pos_embed.zero_()  # with identical images every patch token is the same
    ttp.patch_model(model, budget=0.7, prune_locations=LOCATIONS, keep_policy="threshold")
    with pytest.warns(UserWarning, match="for budget 0.7, the closest it found"):
        stats = ttp.calibrate(model, [torch.zeros(8, 3, 32, 32)])
    with torch.no_grad():
        model(torch.zeros(8, 3, 32, 32))
    assert ttp.last_stats(model).flops_ratio == pytest.approx(stats.flops_ratio)


def test_a_failed_calibration_changes_nothing():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(8)])
    before = {k: v.clone() for k, v in ttp.get_pruner(model).state_dict().items()}
    with pytest.raises(ValueError):
        ttp.calibrate(model, [images(8), torch.zeros(2, 3, 31, 31)])  # the second batch has a bad size
    after = ttp.get_pruner(model).state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("policy", ["mass", "topk"])
def test_one_calibration_serves_other_image_sizes(policy):
    """Thresholds on a scale-free statistic: calibrated at 32 px, the budget holds at 48 and 64 px."""
    model = ttp.patch_model(
        make_model("vit", dynamic_img_size=True), budget=0.6, prune_locations=LOCATIONS, keep_policy=policy
    )
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    for size in (48, 64):
        with torch.no_grad():
            model(images(16, seed=12, size=size))
        stats = ttp.last_stats(model)
        assert stats.tokens == (size // 4) ** 2 + 1
        assert abs(stats.flops_ratio - 0.6) <= 0.05, (size, stats.flops_ratio)
