"""The method on timm ViTs, checked against independent references: the unpatched model, a slow
explicit-attention loop, FlopCounterMode, and the single-image forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import LOCATIONS, images, make_model, reference_prune, spy_packed_attention
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import timm_token_prune as ttp
from timm_token_prune.layout import TokenLayout


def patched(case: str, budget: float = 0.5, **options) -> torch.nn.Module:
    model = ttp.patch_model(make_model(case), budget=budget, prune_locations=LOCATIONS, **options)
    if budget < 1.0:
        ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


# ---- equivalence and restoring -------------------------------------------------------------------
def test_budget_one_equals_unpatched(case):
    model = make_model(case)
    x = images(4)
    with torch.no_grad():
        expected = model(x)
        ttp.patch_model(model, budget=1.0, prune_locations=LOCATIONS)
        got = model(x)
    assert (got - expected).abs().max().item() <= 1e-5
    stats = ttp.last_stats(model)
    assert stats.kept_min == [stats.tokens] * len(LOCATIONS)
    assert stats.flops_ratio == 1.0  # nothing scored or compared: no score or similarity FLOPs either


def test_unpatch_restores_exactly(case):
    model = make_model(case)
    x = images(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {name: type(m) for name, m in model.named_modules()}
    with torch.no_grad():
        expected = model(x)
    ttp.patch_model(model, budget=0.5, prune_locations=LOCATIONS, threshold_init=(0.3, 0.5, 0.7))
    with torch.no_grad():
        model(x)
    ttp.unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_weights_shared_and_only_thresholds_added():
    model = make_model("deit_distilled")
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ttp.patch_model(model, budget=0.6, prune_locations=LOCATIONS)
    state = model.state_dict()
    assert set(state) - set(pointers) == {"token_pruner.thresholds", "token_pruner.keep_ratios", "token_pruner.static", "token_pruner.calibrated"}
    assert [name for name, _ in model.named_parameters() if name.startswith("token_pruner")] == ["token_pruner.thresholds"]
    assert all(state[k].data_ptr() == p for k, p in pointers.items())
    assert state["token_pruner.thresholds"].shape == (len(LOCATIONS),)


def test_default_locations_prune_after_every_block_and_the_paper_schedule_is_named():
    assert ttp.get_pruner(ttp.patch_model(make_model("vit", depth=12))).locations == tuple(range(1, 12))
    assert ttp.PruneConfig().prune_locations == ttp.PruneConfig(prune_locations=None).prune_locations == "every_block"
    paper = {12: (4, 7, 10), 16: (5, 9, 13), 20: (6, 11, 16)}
    for depth, locations in paper.items():
        assert ttp.get_pruner(ttp.patch_model(make_model("vit", depth=depth), prune_locations="paper")).locations == locations
    every_other = ttp.patch_model(make_model("vit", depth=12), prune_locations="every_other_block")
    assert ttp.get_pruner(every_other).locations == (2, 4, 6, 8, 10)
    with pytest.raises(ValueError, match="every_block"):
        ttp.PruneConfig(prune_locations="everywhere")


def test_a_config_saved_before_format_3_keeps_the_paper_locations():
    old = {**ttp.PruneConfig().to_dict(), "prune_locations": None, "format_version": 2}
    assert ttp.PruneConfig.from_dict(old).prune_locations == "paper"


# ---- inference: real dropping --------------------------------------------------------------------
def test_pruning_drops_tokens_with_counts_varying_per_image(case):
    model = patched(case)
    with torch.no_grad():
        model(images(8))
    stats = ttp.last_stats(model)
    assert stats.kept_max[-1] < stats.tokens
    assert stats.kept_min[-1] < stats.kept_max[-1], "the batch should mix keep counts"
    assert abs(stats.flops_ratio - 0.5) < 0.15


@pytest.mark.parametrize("packed", [True, False])
def test_batch_invariance(case, packed, monkeypatch):
    """Padded batches, packed for the linear layers or not (`TokenLayout.pack_min_gain`), give each image
    what it gets alone."""
    monkeypatch.setattr(TokenLayout, "pack_min_gain", 0 if packed else 10**9)
    model = patched(case)
    x = images(6, seed=3)
    with torch.no_grad():
        batched = model(x)
        assert (ttp.get_pruner(model).state.layout.pack_index is not None) == packed
        counts = [c.tolist() for c in ttp.get_pruner(model).state.counts]
        singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert len(set(counts[-1])) > 1, f"keep counts should differ across the batch: {counts}"
    assert (batched - singles).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["vit", "no_class_token_map", "layerscale_dinov2"])
def test_batch_invariance_with_attention_in_groups(case):
    """A batch large enough for attention to run in groups of similar counts (`core.attention_groups`)."""
    model = patched(case)
    x = torch.cat([images(8, seed=3), images(8, seed=4)])
    with torch.no_grad():
        batched = model(x)
        assert ttp.get_pruner(model).state.layout.groups is not None
        singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert (batched - singles).abs().max().item() <= 1e-4


def test_packed_grouped_attention_equals_unpacking(case, monkeypatch):
    """A packed batch attending in groups reads q, k, v straight from the packed tokens
    (`TokenPruner.attention_packed`): the same outputs, scores and counts as unpacking the whole batch."""
    model = patched(case)
    pruner = ttp.get_pruner(model)
    calls = spy_packed_attention(monkeypatch, pruner)  # before the forward: packing is decided at each point
    x = torch.cat([images(8, seed=3), images(8, seed=4)])
    with torch.no_grad():
        direct = model(x)
        counts = [c.clone() for c in pruner.state.counts]
        assert calls, "the packed path should have run"
        monkeypatch.setattr(type(pruner), "attends_packed", lambda self: False)
        unpacked = model(x)
    assert all(torch.equal(a, b) for a, b in zip(counts, pruner.state.counts))
    assert (direct - unpacked).abs().max().item() <= 1e-6


def _slow_reference(model, x: torch.Tensor, thresholds: list[float], locations, **options) -> torch.Tensor:
    """One image through the *unpatched* model block by block, with the AS-ViT score computed from the
    full attention matrix; tokens with S <= theta (the best patch always stays) are dropped or merged
    (see conftest.reference_prune)."""
    prefix = model.num_prefix_tokens
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    rep = torch.arange(t.shape[1])
    options["patches"] = t.shape[1] - prefix
    for index, block in enumerate(model.blocks):
        stage = locations.index(index + 1) if index + 1 in locations else None
        if stage is not None:
            attn = block.attn
            h = block.norm1(t)
            B, N, _ = h.shape
            q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            probs = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)  # B, H, N, N
            norms = (probs @ v).norm(dim=-1)  # B, H, N
        t = block(t)
        if stage is not None:
            t, rep = reference_prune(
                t, rep, probs, norms, class_token=model.cls_token is not None, threshold=thresholds[stage],
                prefix=prefix, **options,
            )
    return model.forward_head(model.norm(t))


# the defaults, the paper's method (raw-score thresholds, dropping), and each change alone
VARIANTS = {
    "default": dict(),
    "paper": dict(keep_policy="threshold", novelty=False, pruned_tokens="drop"),
    "threshold": dict(keep_policy="threshold"),
    "no_novelty": dict(novelty=False),
    "drop": dict(pruned_tokens="drop"),
}


def _reference_options(options: dict) -> dict:
    config = ttp.PruneConfig(**options)
    return dict(policy=config.keep_policy, novelty=config.novelty, merge=config.pruned_tokens == "merge")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_slow_reference_loop(case, variant):
    model = patched(case, budget=0.5, **VARIANTS[variant])
    reference = copy.deepcopy(model)
    ttp.unpatch_model(reference)
    thresholds = ttp.get_pruner(model).thresholds.tolist()
    x = images(4, seed=5)
    with torch.no_grad():
        for i in range(len(x)):
            got = model(x[i : i + 1])
            assert ttp.last_stats(model).kept_mean[-1] < ttp.last_stats(model).tokens
            expected = _slow_reference(reference, x[i : i + 1], thresholds, LOCATIONS, **_reference_options(VARIANTS[variant]))
            assert (got - expected).abs().max().item() <= 1e-4


def test_training_masks_give_the_same_output_as_dropping(case):
    """Masking pruned tokens as keys in training is the same function as removing them in eval."""
    model = patched(case)
    x = images(5, seed=4)
    with torch.no_grad():
        dropped = model(x)
        model.train()
        masked = model(x)
    if isinstance(masked, tuple):  # distilled heads in training
        masked = (masked[0] + masked[1]) / 2
    assert (masked - dropped).abs().max().item() <= 1e-4
    train_counts = ttp.last_stats(model).kept_mean
    model.eval()
    with torch.no_grad():
        model(x)
    assert train_counts == pytest.approx(ttp.last_stats(model).kept_mean)


# ---- training ------------------------------------------------------------------------------------
def _train_step(model: torch.nn.Module, x: torch.Tensor, drop_in_training: bool):
    """Loss and gradients of one training step of a copy of `model`, and whether tokens left its forward."""
    model = copy.deepcopy(model).train()
    pruner = ttp.get_pruner(model)
    pruner.drop_in_training = drop_in_training
    out = model(x)
    logits = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out
    loss = F.cross_entropy(logits, torch.arange(len(x)) % 10) + 2.0 * ttp.budget_loss(model)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, any(order is not None for order, _ in pruner.state.layout.kept)


@pytest.mark.parametrize("policy", ["mass", "threshold", "topk"])
def test_training_drops_far_tokens_with_the_masked_paths_loss_and_gradients(case, policy):
    """Pruned tokens far below their threshold leave the training forward; the loss and every gradient
    (weights and thresholds) stay those of the masked path that keeps all of them as hidden keys."""
    model = patched(case, keep_policy=policy)
    x = images(8, seed=9)
    loss, grads, dropped = _train_step(model, x, drop_in_training=True)
    reference_loss, reference_grads, kept_all = _train_step(model, x, drop_in_training=False)
    assert dropped and not kept_all
    assert loss == pytest.approx(reference_loss, rel=1e-4)
    assert grads.keys() == reference_grads.keys() and "token_pruner.thresholds" in grads or policy == "topk"
    for name, reference in reference_grads.items():
        assert (grads[name] - reference).norm() <= 1e-4 * reference.norm() + 1e-7, name

@pytest.mark.parametrize("policy", ["mass", "threshold"])
def test_tokens_pruned_earlier_leave_the_training_forward_exactly(policy, monkeypatch):
    """Even when every pruned token stays at its own stage (an infinitely wide band), it leaves at the next
    pruning point: from there its mask is 0 times 0, with no gradient to any threshold."""
    import timm_token_prune.pruner as pruner_module

    monkeypatch.setattr(pruner_module, "FAR_IN_TEMPERATURES", 1e9)
    model = patched("vit", keep_policy=policy)
    x = images(8, seed=9)
    loss, grads, dropped = _train_step(model, x, drop_in_training=True)
    reference_loss, reference_grads, _ = _train_step(model, x, drop_in_training=False)
    trained = copy.deepcopy(model).train()
    trained(x)
    pruner = ttp.get_pruner(trained)
    present = [pruner.state.layout.kept[0][0] is None]  # the first stage removes nothing: all are in band
    assert dropped and present == [True]
    assert loss == pytest.approx(reference_loss, rel=1e-4)
    for name, reference in reference_grads.items():
        assert (grads[name] - reference).norm() <= 1e-4 * reference.norm() + 1e-7, name


def test_a_small_mass_threshold_gets_a_proportionally_sharp_mask():
    """'mass': the temperature is capped at a fraction of the threshold, so a first stage that prunes
    little of the mass (a threshold below 20 T) still lets its far tokens leave, exactly."""
    model = patched("vit", keep_policy="mass")
    with torch.no_grad():
        ttp.get_pruner(model).thresholds[0] = 0.02  # < 20 x the default T (0.003): no token would be far
    x = images(8, seed=9)
    loss, grads, _ = _train_step(model, x, drop_in_training=True)
    reference_loss, reference_grads, _ = _train_step(model, x, drop_in_training=False)
    trained = copy.deepcopy(model).train()
    trained(x)
    assert trained.token_pruner.state.layout.kept[0][0] is not None  # some first-stage tokens left
    assert loss == pytest.approx(reference_loss, rel=1e-4)
    for name, reference in reference_grads.items():
        assert (grads[name] - reference).norm() <= 1e-4 * reference.norm() + 1e-7, name


def test_gradients_reach_thresholds():
    model = patched("vit")
    model.train()
    x, y = images(8), torch.arange(8) % 10
    loss = F.cross_entropy(model(x), y) + 2.0 * ttp.budget_loss(model)
    loss.backward()
    grad = ttp.get_pruner(model).thresholds.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("policy", ["mass", "threshold"])
def test_threshold_steps_lower_budget_loss(policy):
    model = patched("vit", budget=0.5, keep_policy=policy)
    pruner = ttp.get_pruner(model)
    pruner.config.budget = 0.75  # the thresholds must move to meet a new budget
    model.train()
    x = images(16, seed=6)
    # steps of 5% of the thresholds' size: each policy's statistic has its own scale
    optimizer = torch.optim.Adam([pruner.thresholds], lr=0.05 * pruner.thresholds.abs().mean().item())
    losses = []
    for _ in range(12):
        model(x)
        loss = ttp.budget_loss(model)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model(x)
    final = ttp.budget_loss(model).item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert final < losses[0] * 0.5, losses + [final]


# ---- FLOPs ---------------------------------------------------------------------------------------
def _counted_gmacs(model: torch.nn.Module, x: torch.Tensor) -> float:
    def sdpa_cpu(query, key, value, *args, **kwargs):  # FlopCounterMode passes shapes
        return sdpa_flop_count(query, key, value)  # shapes

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # FlopCounterMode's module hooks trip over parameters needing grad under no_grad
        p.requires_grad_(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.parametrize("case", ["vit", "deit_distilled", "no_class_token_map"])
def test_flops_agree_with_flop_counter(case):
    x = images(1, seed=7)
    dense = make_model(case, embed_dim=96, depth=6)
    dense_counted = _counted_gmacs(dense, x)
    model = ttp.patch_model(make_model(case, embed_dim=96, depth=6), budget=0.5, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(16, seed=8)])
    pruned_counted = _counted_gmacs(model, x)
    stats = ttp.last_stats(model)
    assert stats.flops_ratio < 0.8
    assert stats.dense_gflops == pytest.approx(dense_counted, rel=0.02)
    assert stats.gflops == pytest.approx(pruned_counted, rel=0.02)


def test_calibrate_meets_budget_on_held_out_batches():
    model = ttp.patch_model(make_model("vit", depth=8), budget=0.6)
    ttp.calibrate(model, [images(16, seed=s) for s in range(20, 24)])
    with torch.no_grad():
        ratios = []
        for s in range(30, 34):
            model(images(16, seed=s))
            ratios.append(ttp.last_stats(model).flops_ratio)
    assert sum(ratios) / len(ratios) == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("case", ["vit", "deit_distilled", "no_class_token_avg"])
def test_calibrate_in_one_pass_sets_the_thresholds_of_the_stage_by_stage_passes(case, monkeypatch):
    """calibrate runs a small calibration set as one batch (every stage's threshold set as the forward reaches
    it); a large one batch by batch, stage by stage. Per-image results do not depend on the batch, so both
    give the same thresholds."""
    from timm_token_prune import api

    batches = [images(16, seed=s) for s in (20, 21, 22)]
    one_pass = ttp.patch_model(make_model(case, depth=8), budget=0.5)
    stats = ttp.calibrate(one_pass, batches)
    monkeypatch.setattr(api, "ONE_PASS_VALUES", 0)
    staged = ttp.patch_model(make_model(case, depth=8), budget=0.5)
    staged_stats = ttp.calibrate(staged, batches)
    pruners = ttp.get_pruner(one_pass), ttp.get_pruner(staged)
    assert len(pruners[0].locations) == 7 and pruners[0].calibrating is None
    torch.testing.assert_close(pruners[0].thresholds, pruners[1].thresholds, rtol=1e-5, atol=1e-6)
    assert stats.flops_ratio == pytest.approx(staged_stats.flops_ratio, abs=1e-6)
    assert stats.flops_ratio == pytest.approx(0.5, abs=0.02)


# ---- other modes ---------------------------------------------------------------------------------
def test_topk_policy_keeps_equal_counts_and_is_batch_invariant():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS, keep_policy="topk", score="mean")
    x = images(6)
    with torch.no_grad():
        batched = model(x)
        stats = ttp.last_stats(model)
        singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert stats.kept_min == stats.kept_max and stats.kept_max[-1] < stats.tokens
    assert stats.flops_ratio == pytest.approx(0.5, abs=0.03)
    assert (batched - singles).abs().max().item() <= 1e-4


def test_other_image_size_with_dynamic_img_size():
    model = make_model("vit", dynamic_img_size=True)
    x = images(2, size=48)
    with torch.no_grad():
        expected = model(x)
        ttp.patch_model(model, budget=1.0, prune_locations=LOCATIONS)
        assert (model(x) - expected).abs().max().item() <= 1e-5
    assert ttp.last_stats(model).tokens == (48 // 4) ** 2 + 1


def test_deepcopy_and_state_dict_round_trip():
    model = patched("vit")
    clone = copy.deepcopy(model)
    assert ttp.get_pruner(clone) is not ttp.get_pruner(model)
    assert clone.blocks[LOCATIONS[0] - 1]._token_pruner is ttp.get_pruner(clone)
    fresh = ttp.patch_model(make_model("vit", seed=9), budget=0.5, prune_locations=LOCATIONS)
    fresh.load_state_dict(model.state_dict())
    x = images(4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_kept_positions_are_nested_and_match_counts():
    model = patched("registers")
    with torch.no_grad():
        model(images(5))
    pruner = ttp.get_pruner(model)
    previous = None
    for (positions, valid), counts in zip(pruner.kept_positions(), pruner.state.counts):
        valid = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
        assert valid.sum(1).tolist() == counts.tolist()
        for b in range(positions.shape[0]):
            kept = set(positions[b][valid[b]].tolist())
            assert set(range(model.num_prefix_tokens)) <= kept
            assert previous is None or kept <= previous[b]
        previous = [set(positions[b][valid[b]].tolist()) for b in range(positions.shape[0])]


# Real timm registry configurations (random weights, small images): the families docs/models.md promises.
REGISTRY = {
    "deit_tiny_patch16_224": dict(img_size=64),
    "deit_tiny_distilled_patch16_224": dict(img_size=64),
    "deit3_small_patch16_224": dict(img_size=64),
    "vit_small_patch14_reg4_dinov2": dict(img_size=56),
    "vit_small_patch16_224": dict(img_size=64, global_pool="avg"),
    "vit_small_patch14_dinov2": dict(img_size=56),
    "test_vit": dict(),
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_models_patch_exactly(name):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **REGISTRY[name]).eval()
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, *size, generator=g)
    with torch.no_grad():
        expected = model(x)
        ttp.patch_model(model, budget=1.0)
        assert (model(x) - expected).abs().max().item() <= 1e-5
        ttp.unpatch_model(model)
        ttp.patch_model(model, budget=0.6)
        ttp.calibrate(model, [torch.randn(8, 3, *size, generator=g)])
        assert torch.isfinite(model(x)).all()
        assert ttp.last_stats(model).flops_ratio < 0.8
