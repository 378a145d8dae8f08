"""Bad input gets a clear error and leaves the model unchanged; the config round-trips."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import timm
import torch
from conftest import LOCATIONS, images, make_model
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

import timm_token_prune as ttp
from timm_token_prune import adapters
from timm_token_prune.adapters import VisionTransformerAdapter


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


def test_dict_batches_with_labels_and_other_keys_calibrate_on_the_images():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    x = images(8)
    plain = ttp.calibrate(model, [x]).flops_ratio
    extra = {"pixel_values": x, "labels": torch.zeros(8, dtype=torch.long), "image_id": torch.arange(8)}
    assert ttp.calibrate(model, [extra]).flops_ratio == plain


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


@pytest.mark.parametrize("policy", ["mass", "topk"])
def test_calibrating_on_batches_of_different_image_sizes_meets_the_budget_at_each(policy):
    """The ratio calibrate aims at is each image's to its own dense cost (not the mean MACs of a mixed set
    over the last batch's dense cost, which took a mixed 32 + 64 px set to 0.3 at budget 0.6)."""
    model = ttp.patch_model(
        make_model("vit", dynamic_img_size=True), budget=0.6, prune_locations=LOCATIONS, keep_policy=policy
    )
    stats = ttp.calibrate(model, [images(16, seed=10, size=64), images(16, seed=11)])
    assert abs(stats.flops_ratio - 0.6) <= 0.02
    dense = [ttp.last_stats(model).dense_gflops]
    for size in (64, 32):
        with torch.no_grad():
            model(images(16, seed=12, size=size))
        dense.append(ttp.last_stats(model).dense_gflops)
        assert abs(ttp.last_stats(model).flops_ratio - 0.6) <= 0.05, (size, ttp.last_stats(model).flops_ratio)
    assert dense[2] < stats.dense_gflops < dense[1]  # the mean dense cost of the calibration images


# ---- no silent budget ----------------------------------------------------------------------------
def _uncalibrated_warnings(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(x)
    return [str(w.message) for w in caught if "never set" in str(w.message)]


def test_an_uncalibrated_model_warns_once_with_its_flops_ratio():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    model.train()
    assert _uncalibrated_warnings(model, images(4)) == []  # training: distill's business
    model.eval()
    (message,) = _uncalibrated_warnings(model, images(4))
    ratio = ttp.last_stats(model).flops_ratio
    assert f"FLOPs ratio of {ratio:.3f}, not its budget of 0.5" in message and "calibrate(model, batches)" in message
    assert ratio > 0.6  # the default thresholds miss the budget: the warning is not idle
    assert _uncalibrated_warnings(model, images(4)) == []  # once


@pytest.mark.parametrize(
    "setup",
    ["calibrate", "threshold_init", "budget_one", "topk", "loaded_state", "trained"],
)
def test_set_thresholds_never_warn(setup):
    options = {
        "threshold_init": dict(threshold_init=(0.1, 0.2, 0.3)),
        "budget_one": dict(budget=1.0),
        "topk": dict(keep_policy="topk"),
    }.get(setup, {})
    model = ttp.patch_model(make_model("vit"), **{"budget": 0.5, **options}, prune_locations=LOCATIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibration's own forward passes do not warn either
        if setup == "calibrate":
            ttp.calibrate(model, [images(8)])
        if setup == "loaded_state":
            source = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
            ttp.calibrate(source, [images(8)])
            model.load_state_dict(source.state_dict())
        if setup == "trained":  # e.g. by a transformers Trainer: the thresholds learnt the budget
            thresholds = ttp.get_pruner(model).thresholds
            before = thresholds.detach().clone()
            model.train()
            model(images(4))
            ttp.budget_loss(model).backward()
            torch.optim.SGD([thresholds], lr=0.1).step()
            model.eval()
            assert not torch.equal(thresholds.detach(), before)
        with torch.no_grad():
            model(images(4))


# ---- bad options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(novelty="no"), TypeError, "novelty must be True or False, got 'no'"),
        (dict(score_gradient=1), TypeError, "score_gradient must be True or False, got 1"),
        (dict(threshold_init=(float("nan"),) * 3), ValueError, "threshold_init must hold finite numbers"),
        (dict(threshold_init=(0.1, float("inf"), 0.3)), ValueError, "threshold_init must hold finite numbers"),
        (dict(min_keep=1.5), TypeError, "min_keep must be a whole number >= 1 .* got 1.5"),
        (dict(min_keep=True), TypeError, "min_keep must be a whole number >= 1 .* got True"),
        (dict(min_keep="2"), TypeError, "min_keep must be a whole number >= 1 .* got '2'"),
        (dict(min_keep=0), ValueError, "min_keep must be >= 1"),
        (dict(min_keep=65), ValueError, "min_keep=65 is more than the 64 patch tokens"),
        (dict(min_keep=65, keep_policy="topk"), ValueError, "min_keep=65 is more than the 64 patch tokens"),
        (dict(keep_ratios=(0.5, 0.5, 0.5)), ValueError, "keep_ratios=.* applies to keep_policy='topk' only"),
        (dict(prune_locations=(2.7, 4)), TypeError, r"whole block indices .* got \(2.7, 4\)"),
        (dict(temperature=float("inf")), ValueError, "temperature must be > 0 and finite"),
        (dict(temperature="0.1"), TypeError, "temperature must be a number"),
    ],
)
def test_bad_option_values_are_refused_at_patch_time(options, error, match):
    model = make_model("vit")
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        ttp.patch_model(model, **{"budget": 0.5, "prune_locations": LOCATIONS, **options})
    _assert_unchanged(model, snapshot)


def test_whole_numbers_of_other_types_are_accepted():
    import numpy as np

    config = ttp.PruneConfig(prune_locations=np.array([2, 4]), min_keep=np.int64(2), threshold_init=(1, 0.5))
    assert config.prune_locations == (2, 4) and type(config.min_keep) is int and config.threshold_init == (1.0, 0.5)
    assert ttp.PruneConfig(min_keep=64).min_keep == 64 and ttp.patch_model(make_model("vit"), min_keep=64)


# ---- the adapter contract ------------------------------------------------------------------------
class _Adapter(VisionTransformerAdapter):
    """A third-party adapter for a subclass of VisionTransformer, broken in one of several ways."""

    name = "broken"

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def model_classes(self):
        if self.fault == "model_classes":
            raise RuntimeError("boom")
        return (_MyViT,)

    def check(self, model, config):
        return (100,) if self.fault == "locations" else super().check(model, config)

    def patch(self, model, config, locations):
        if self.fault == "returns":
            super().patch(model, config, locations)
            return "a pruner"
        if self.fault == "raises":
            super().patch(model, config, locations)
            raise RuntimeError("failed part-way")
        return super().patch(model, config, locations)


class _MyViT(VisionTransformer):
    pass


@pytest.fixture
def broken_adapter():
    registered = []

    def register(fault: str) -> adapters.Adapter:
        registered.append(adapters.register_adapter(_Adapter(fault)))
        return registered[-1]

    yield register
    for adapter in registered:
        adapters.ADAPTERS.remove(adapter)


def _my_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return _MyViT(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10).eval()


def test_an_adapter_whose_model_classes_raise_is_named_and_skipped(broken_adapter):
    patched = ttp.patch_model(make_model("vit"), budget=0.5)
    broken_adapter("model_classes")
    with pytest.warns(UserWarning, match="the 'broken' adapter .* was skipped: RuntimeError: boom"):
        ttp.unpatch_model(patched)  # other models still work
    assert type(patched) is VisionTransformer
    ttp.patch_model(patched, budget=0.5)
    with pytest.raises(ttp.UnsupportedModelError, match="no adapter knows it; the 'broken' adapter .* boom"):
        ttp.patch_model(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "fault, error, match",
    [
        ("returns", TypeError, "the 'broken' adapter's patch\\(\\) returned a str, not the TokenPruner"),
        ("raises", RuntimeError, "failed part-way"),
        ("locations", ValueError, r"prune_locations \(100,\) .* of 6 blocks: .* \[1, 5\]"),
    ],
)
def test_a_failing_adapter_leaves_the_model_as_it_was(broken_adapter, fault, error, match):
    broken_adapter(fault)
    model = _my_vit()
    snapshot = _snapshot(model)
    hooks = dict(model._forward_hooks)
    with pytest.raises(error, match=match):
        ttp.patch_model(model, budget=0.5)
    _assert_unchanged(model, snapshot)
    assert type(model) is _MyViT and dict(model._forward_hooks) == hooks
    assert all(not hasattr(m, "_token_pruner") for m in model.modules())
