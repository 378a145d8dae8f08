"""restore_tokens: pruned backbones that still return the full token grid (dense prediction), checked
against the unpatched model, the same model without restore_tokens, the single-image forward, and a slow
single-image loop that runs the *unpatched* blocks and fills pruned positions by hand."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import LOCATIONS, images, make_model

import timm_token_prune as ttp

FILLS = ("dropped", "nearest", "offset")
CASES = ("vit", "registers", "deit_distilled", "no_class_token_avg", "no_class_token_map", "avg_pool_prefix")


def restoring(case: str, budget: float = 0.5, **options) -> torch.nn.Module:
    model = ttp.patch_model(make_model(case), budget=budget, prune_locations=LOCATIONS, restore_tokens=True, **options)
    if budget < 1.0:
        ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


def without_restore(model: torch.nn.Module, case: str) -> torch.nn.Module:
    """The same weights and thresholds, patched without restore_tokens."""
    config = ttp.PruneConfig.from_dict({**ttp.get_pruner(model).config.to_dict(), "restore_tokens": False})
    other = ttp.patch_model(make_model(case), config=config)
    other.load_state_dict(model.state_dict())
    return other


# ---- budget 1.0: the unpatched model ------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_budget_one_equals_unpatched(case):
    dense = make_model(case)
    model = ttp.patch_model(copy.deepcopy(dense), budget=1.0, prune_locations=LOCATIONS, restore_tokens=True)
    x = images(3)
    with torch.no_grad():
        assert (model.forward_features(x) - dense.forward_features(x)).abs().max() <= 1e-5
        assert (model(x) - dense(x)).abs().max() <= 1e-5
        for kwargs in (dict(indices=[0, 2, 5]), dict(indices=2, output_fmt="NLC", norm=True)):
            final, got = model.forward_intermediates(x, **kwargs)
            expected_final, expected = dense.forward_intermediates(x, **kwargs)
            assert (final - expected_final).abs().max() <= 1e-5
            assert len(got) == len(expected)
            assert all(g.shape == e.shape and (g - e).abs().max() <= 1e-5 for g, e in zip(got, expected))


def test_intermediates_options_follow_timm():
    dense = make_model("registers")
    model = ttp.patch_model(copy.deepcopy(dense), budget=1.0, prune_locations=LOCATIONS, restore_tokens=True)
    x = images(2)
    options = dict(indices=[1, 4], return_prefix_tokens=True, intermediates_only=True)
    with torch.no_grad():
        got, expected = model.forward_intermediates(x, **options), dense.forward_intermediates(x, **options)
        assert all((g - e).abs().max() <= 1e-5 for pair, ref in zip(got, expected) for g, e in zip(pair, ref))
        got = model.forward_intermediates(x, indices=[3], output_dict=True, return_prefix_tokens=True, stop_early=True)
        expected = dense.forward_intermediates(x, indices=[3], output_dict=True, return_prefix_tokens=True, stop_early=True)
    assert got.keys() == expected.keys()
    for key in got:
        values = got[key] if isinstance(got[key], list) else [got[key]]
        references = expected[key] if isinstance(expected[key], list) else [expected[key]]
        assert all((g - e).abs().max() <= 1e-5 for g, e in zip(values, references)), key


# ---- pruned: the grid, and outputs unchanged by restoring ---------------------------------------------
@pytest.mark.parametrize("policy", ["mass", "topk"])
@pytest.mark.parametrize("pruned_tokens", ["merge", "drop"])
@pytest.mark.parametrize("case", CASES)
def test_logits_and_pooled_bit_equal_without_restore(case, pruned_tokens, policy):
    model = restoring(case, pruned_tokens=pruned_tokens, keep_policy=policy)
    plain = without_restore(model, case)
    x = images(6, seed=3)
    with torch.no_grad():
        expected, expected_pooled = plain(x), plain.forward_head(plain.forward_features(x), pre_logits=True)
        grid = model.forward_features(x)
        assert ttp.last_stats(model).kept_max[-1] < ttp.last_stats(model).tokens
        assert grid.shape == (6, ttp.last_stats(model).tokens, 48)
        assert torch.equal(model.forward_head(grid), expected)
        assert torch.equal(model.forward_head(grid, pre_logits=True), expected_pooled)
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("case", ["vit", "registers"])
def test_kept_positions_hold_the_kept_tokens_and_prefix_stays(case, fill):
    model = restoring(case, restore_fill=fill)
    plain = without_restore(model, case)
    x = images(5, seed=4)
    with torch.no_grad():
        grid = model.forward_features(x)
        kept = plain.forward_features(x)  # (B, n, C): the kept tokens, padded with zeros
    positions, valid = ttp.get_pruner(model).kept_positions()[-1]
    valid = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
    assert not valid.all(), "the batch should mix keep counts (padding and packing)"
    for b in range(len(x)):
        rows = positions[b][valid[b]]
        assert torch.equal(grid[b, rows], kept[b, : len(rows)])
        assert len(rows) < grid.shape[1]
    prefix = model.num_prefix_tokens
    assert torch.equal(grid[:, :prefix], kept[:, :prefix])


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("policy", ["mass", "topk"])
def test_batch_invariance(fill, policy):
    model = restoring("registers", restore_fill=fill, keep_policy=policy)
    x = images(6, seed=3)
    with torch.no_grad():
        grid = model.forward_features(x)
        _, batched = model.forward_intermediates(x, indices=[1, 2, 4], output_fmt="NLC")
        singles = [model.forward_features(x[i : i + 1]) for i in range(len(x))]
        single_intermediates = [model.forward_intermediates(x[i : i + 1], indices=[1, 2, 4], output_fmt="NLC")[1] for i in range(len(x))]
    assert (grid - torch.cat(singles)).abs().max() <= 1e-5
    for level, block_grid in enumerate(batched):
        assert (block_grid - torch.cat([s[level] for s in single_intermediates])).abs().max() <= 1e-5


def _reference_grid(dense, x, kept_sets, fill, merge):
    """One image through the unpatched blocks. At each pruning point the tokens outside the library's kept
    set leave: merged (rows repeated per merged token, as in conftest.reference_prune) or dropped, each into
    the kept patch most similar to it (cosine). Each original position follows the token standing for it;
    its fill is read from that token at the end, by hand."""
    prefix = dense.num_prefix_tokens
    t = dense.norm_pre(dense.patch_drop(dense._pos_embed(dense.patch_embed(x))))
    tokens = t.shape[1]
    rep = torch.arange(tokens)  # row -> the kept token (original position) it belongs to
    anchor = list(range(tokens))
    own, offset = {}, [torch.zeros(t.shape[-1]) for _ in range(tokens)]
    for index, block in enumerate(dense.blocks):
        t = block(t)
        if index + 1 not in LOCATIONS:
            continue
        keep = kept_sets[LOCATIONS.index(index + 1)]
        row = {g: int((rep == g).nonzero()[0]) for g in sorted(set(rep.tolist()))}
        before = {g: t[0, r].clone() for g, r in row.items()}
        unit = F.normalize(t[0], dim=-1)
        targets = [g for g in row if g in keep and g >= prefix]
        destination = {g: max(targets, key=lambda k: float(unit[row[g]] @ unit[row[k]])) for g in row if g not in keep}
        if merge:
            for g, d in destination.items():
                rep[rep == g] = d
            t = t.clone()
            for k in targets:
                t[0, rep == k] = t[0, rep == k].mean(dim=0)
        else:
            rows = torch.tensor([int(r) in keep for r in rep])
            t, rep = t[:, rows], rep[rows]
        after = {g: t[0, int((rep == g).nonzero()[0])] for g in sorted(set(rep.tolist()))}
        for p in range(tokens):
            if anchor[p] in destination:
                own.setdefault(p, before[anchor[p]])
                offset[p] = offset[p] + before[anchor[p]] - after[destination[anchor[p]]]
                anchor[p] = destination[anchor[p]]
    final = {g: t[0, int((rep == g).nonzero()[0])] for g in set(rep.tolist())}
    rows = []
    for p in range(tokens):
        if p not in own:
            rows.append(final[p])
        elif fill == "dropped":
            rows.append(own[p])
        elif fill == "nearest":
            rows.append(final[anchor[p]])
        else:
            rows.append(final[anchor[p]] + offset[p])
    return dense.norm(torch.stack(rows)[None])


@pytest.mark.parametrize("pruned_tokens", ["merge", "drop"])
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("case", ["vit", "registers", "no_class_token_avg"])
def test_fill_matches_slow_reference_loop(case, fill, pruned_tokens):
    model = restoring(case, restore_fill=fill, pruned_tokens=pruned_tokens)
    dense = copy.deepcopy(model)
    ttp.unpatch_model(dense)
    pruner = ttp.get_pruner(model)
    x = images(3, seed=5)
    with torch.no_grad():
        for i in range(len(x)):
            grid = model.forward_features(x[i : i + 1])
            # kept_positions()[s]: the tokens entering stage s, i.e. those kept at pruning point s
            kept_sets = [set(positions[0].tolist()) for positions, _ in pruner.kept_positions()]
            expected = _reference_grid(dense, x[i : i + 1], kept_sets, fill, pruned_tokens == "merge")
            assert (grid - expected).abs().max() <= 1e-4


class _Features(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@pytest.mark.parametrize("fill", FILLS)
def test_traced_static_shapes_restore_the_same_grid(fill):
    """Traced (export): the fill data is written with static shapes; the same grid as eager."""
    model = restoring("vit", restore_fill=fill, keep_policy="topk").eval()
    x = images(3, seed=6)
    with torch.no_grad():
        expected = model.forward_features(x)
        with warnings.catch_warnings():  # torch.jit.trace's deprecation; the layout's ints traced as constants
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(_Features(model), (x,), check_trace=False)
        assert ttp.get_pruner(model).state.layout.restore is not None  # the trace recorded pruning points
        assert (traced(x) - expected).abs().max() <= 1e-5


def test_chains_resolve_to_final_tokens():
    """A token pruned at stage 1 whose destination is pruned later is restored from a token still kept
    at the end."""
    model = restoring("vit", restore_fill="nearest")
    pruner = ttp.get_pruner(model)
    chained = 0
    with torch.no_grad():
        for i in range(4):
            model.forward_features(images(1, seed=20 + i))
            stages = [set(positions[0].tolist()) for positions, _ in pruner.kept_positions()]
            sources = pruner.restored_sources()[0].tolist()
            assert all(s in stages[-1] for s in sources)
            chained += sum(1 for p, s in enumerate(sources) if p not in stages[0])
    assert chained > 0


@pytest.mark.parametrize("fill", ["dropped", "offset"])
def test_a_later_point_in_another_dtype_writes_in_the_first_dtype(fill):
    """Fill data of a bfloat16 point (an autocast region) after a float32 one is stored as float32: the same
    as casting it by hand, on the eager CPU path."""
    from timm_token_prune.restore import RestoreMap

    torch.manual_seed(0)
    first, second = torch.randn(2, 6, 4), torch.randn(2, 4, 4).bfloat16()
    leaving1 = torch.tensor([[0, 0, 1, 0, 1, 0], [0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    destination1 = torch.tensor([[0, 1, 1, 3, 3, 5], [0, 0, 2, 3, 4, 4]])
    leaving2 = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    destination2 = torch.tensor([[0, 0, 2, 3], [0, 1, 3, 3]])
    grids = []
    for cast in (False, True):
        restore = RestoreMap(2, 6, fill, torch.device("cpu"))
        restore.record(leaving1, destination1, torch.arange(6).expand(2, -1), first)
        restore.moved(torch.tensor([[0, 1, 3, 5], [0, 2, 3, 4]]), 6)
        restore.record(leaving2, destination2, torch.arange(4).expand(2, -1), second.float() if cast else second)
        grids.append(restore.values)
    assert grids[0].dtype == torch.float32
    assert torch.equal(grids[0], grids[1]) and grids[0].abs().sum() > 0


# ---- errors ---------------------------------------------------------------------------------------------
def test_config_field_validated_and_serialised():
    with pytest.raises(TypeError, match="restore_tokens"):
        ttp.PruneConfig(restore_tokens="yes")
    with pytest.raises(ValueError, match="restore_fill"):
        ttp.PruneConfig(restore_fill="zeros")
    config = ttp.PruneConfig(restore_tokens=True, restore_fill="nearest")
    assert ttp.PruneConfig.from_json(config.to_json()) == config
    old = ttp.PruneConfig.from_dict({"budget": 0.7, "format_version": 1})
    assert old.restore_tokens is False and old.pruned_tokens == "drop"


def test_intermediates_without_restore_or_in_training_raise():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    with pytest.raises(NotImplementedError, match="restore_tokens=True"):
        model.forward_intermediates(images(1))
    model = restoring("vit").train()
    with pytest.raises(NotImplementedError, match="eval"):
        model.forward_intermediates(images(1))
    with pytest.raises(RuntimeError, match="eval"):
        model(images(2))
        ttp.get_pruner(model).restore(torch.zeros(2, 5, 48))


def test_kept_positions_and_restored_sources_are_eval_only_and_need_restore_tokens():
    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS, restore_tokens=True,
                            threshold_init=(0.3, 0.4, 0.5))
    pruner = ttp.get_pruner(model)
    with torch.no_grad():
        model(images(2))
    assert len(pruner.kept_positions()) == len(LOCATIONS) and pruner.restored_sources().shape == (2, 65)
    model.train()
    model(images(2))
    for ask in (pruner.kept_positions, pruner.restored_sources):
        with pytest.raises(RuntimeError, match=f"{ask.__name__} is eval only: the last forward ran in training mode"):
            ask()
    plain = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS, threshold_init=(0.3, 0.4, 0.5))
    with torch.no_grad():
        plain(images(2))
    with pytest.raises(RuntimeError, match="restored_sources needs a model patched with restore_tokens=True"):
        ttp.get_pruner(plain).restored_sources()  # not None, which would read "nothing was pruned"


def test_an_adapter_that_cannot_restore_names_the_option():
    from timm.models.vision_transformer import VisionTransformer

    from timm_token_prune import adapters
    from timm_token_prune.adapters import VisionTransformerAdapter, register_adapter

    class NoGrid(VisionTransformer):
        pass

    class NoGridAdapter(VisionTransformerAdapter):
        name, restores_tokens = "no-grid", False

        def model_classes(self):
            return (NoGrid,)

    adapter = NoGridAdapter()
    register_adapter(adapter)
    try:
        model = NoGrid(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=4, num_classes=10)
        with pytest.raises(ttp.UnsupportedModelError, match="restore_tokens"):
            ttp.patch_model(model, budget=0.5, restore_tokens=True)
        assert not hasattr(model, "token_pruner")
    finally:
        adapters.ADAPTERS.remove(adapter)


@pytest.mark.parametrize("options", [{}, dict(keep_policy="topk", pruned_tokens="drop")])
def test_pooling_a_foreign_grid_raises(options):
    """A copy of the grid is not recognised as the last forward's: pooling it would average the fills.
    With top-k and dropping (nothing padded or merged) nothing else would notice."""
    model = restoring("avg_pool_prefix", **options)
    with torch.no_grad():
        grid = model.forward_features(images(4))
        for copy_of_grid in (grid.clone(), grid.detach()[:1]):
            with pytest.raises(ValueError, match="kept"):
                model.forward_head(copy_of_grid)
        assert torch.equal(model.forward_head(grid), model(images(4)))


# ---- timm eva and beit --------------------------------------------------------------------------------
FAMILIES = ("eva02", "eva_rope_mixed_token", "eva_gqa_registers_no_class_map", "eva_dinov3_registers", "beit",
            "beit_shared_bias_token")


@pytest.mark.parametrize("case", FAMILIES)
def test_families_budget_one_equals_unpatched(case):
    from test_timm_families import make

    dense = make(case)
    model = ttp.patch_model(make(case), budget=1.0, prune_locations=LOCATIONS, restore_tokens=True)
    x = images(3)
    with torch.no_grad():
        assert (model.forward_features(x) - dense.forward_features(x)).abs().max() <= 1e-5
        assert (model(x) - dense(x)).abs().max() <= 1e-5
        final, got = model.forward_intermediates(x, indices=[0, 2, 5])
        expected_final, expected = dense.forward_intermediates(x, indices=[0, 2, 5])
    assert (final - expected_final).abs().max() <= 1e-5
    assert all(g.shape == e.shape and (g - e).abs().max() <= 1e-5 for g, e in zip(got, expected))


@pytest.mark.parametrize("case", FAMILIES)
def test_families_restore_the_grid_with_logits_unchanged(case):
    from test_timm_families import make, patched

    model = patched(case, restore_tokens=True, restore_fill="nearest")
    config = ttp.PruneConfig.from_dict({**ttp.get_pruner(model).config.to_dict(), "restore_tokens": False})
    plain = ttp.patch_model(make(case), config=config)
    plain.load_state_dict(model.state_dict())
    x = images(6, seed=3)
    with torch.no_grad():
        expected, kept = plain(x), plain.forward_features(x)
        grid = model.forward_features(x)
        assert torch.equal(model.forward_head(grid), expected)
        positions, valid = ttp.get_pruner(model).kept_positions()[-1]
        sources = ttp.get_pruner(model).restored_sources()
        _, maps = model.forward_intermediates(x, indices=[1, 5], output_fmt="NLC")
        singles = [model.forward_features(x[i : i + 1]) for i in range(len(x))]
    tokens = ttp.last_stats(model).tokens
    assert grid.shape == (6, tokens, 48) and all(m.shape == (6, tokens - model.num_prefix_tokens, 48) for m in maps)
    valid = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
    for b in range(len(x)):
        rows = positions[b][valid[b]]
        assert len(rows) < tokens
        assert torch.equal(grid[b, rows], kept[b, : len(rows)])  # kept positions: the kept tokens
        assert torch.equal(grid[b], grid[b, sources[b]])  # 'nearest': every fill copies a kept token
    assert (grid - torch.cat(singles)).abs().max() <= 1e-5  # batch invariance


# ---- transformers ----------------------------------------------------------------------------------------
def _hf_pair(case: str, budget: float = 0.5, **options):
    """A transformers model patched with restore_tokens, the same without, and the dense model."""
    from test_hf import make_hf

    dense = make_hf(case)
    model = ttp.patch_model(copy.deepcopy(dense), budget, prune_locations=LOCATIONS, restore_tokens=True, **options)
    if budget < 1.0:
        ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    plain = ttp.patch_model(copy.deepcopy(dense), budget, prune_locations=LOCATIONS, **options)
    plain.load_state_dict(model.state_dict())
    return model, plain, dense


HF = ("vit_model_pooler", "deit_with_teacher", "dinov2_registers", "clip_classifier", "siglip_vision_map_head",
      "siglip_classifier")


@pytest.mark.parametrize("pruned_tokens", ["merge", "drop"])
@pytest.mark.parametrize("case", ["dinov2_classifier", "clip_classifier", "siglip_vision_map_head", "siglip_classifier"])
def test_hf_pooling_heads_read_the_kept_tokens_with_topk(case, pruned_tokens):
    """Top-k keeps the same count in every image (no padding): mean and attention-pooling heads must still
    pool the kept tokens, not the restored grid."""
    from test_hf import main_output

    model, plain, _ = _hf_pair(case, keep_policy="topk", pruned_tokens=pruned_tokens)
    x = images(4, seed=5)
    with torch.no_grad():
        expected = main_output(plain(x))
        assert torch.equal(main_output(model(x)), expected)


@pytest.mark.parametrize("case", HF)
def test_hf_outputs_bit_equal_and_grids_full(case):
    from test_hf import main_output

    model, plain, dense = _hf_pair(case)
    x = images(5, seed=3)
    with torch.no_grad():
        expected = main_output(plain(x))
        out = model(x, output_hidden_states=True)
        reference = dense(x, output_hidden_states=True)
        assert torch.equal(main_output(out), expected)
        assert torch.equal(main_output(model(x)), expected)
    tokens = ttp.last_stats(model).tokens
    assert ttp.last_stats(model).kept_max[-1] < tokens
    assert len(out.hidden_states) == len(reference.hidden_states)
    assert all(h.shape == (5, tokens, 48) for h in out.hidden_states)
    before = len(out.hidden_states) - 6 + LOCATIONS[0] - 1  # entries of the layers before the first scoring one
    for got, ref in zip(out.hidden_states[:before], reference.hidden_states[:before]):
        assert (got - ref).abs().max() <= 1e-5
    last = getattr(out, "last_hidden_state", None)
    assert last is None or last.shape == (5, tokens, 48)


@pytest.mark.parametrize("case", ["vit_model_pooler", "dinov2_registers"])
def test_hf_budget_one_equals_unpatched(case):
    model, _, dense = _hf_pair(case, budget=1.0)
    x = images(3)
    with torch.no_grad():
        got, expected = model(x, output_hidden_states=True), dense(x, output_hidden_states=True)
    for g, e in zip(got.hidden_states, expected.hidden_states):
        assert (g - e).abs().max() <= 1e-5


@pytest.mark.parametrize("fill", FILLS)
def test_hf_kept_positions_and_batch_invariance(fill):
    from test_hf import make_hf

    model = ttp.patch_model(make_hf("vit_model_pooler"), budget=0.5, prune_locations=LOCATIONS, restore_tokens=True,
                            restore_fill=fill)
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    plain = ttp.patch_model(make_hf("vit_model_pooler"), budget=0.5, prune_locations=LOCATIONS)
    plain.load_state_dict(model.state_dict())
    x = images(6, seed=4)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        kept = plain(x).last_hidden_state
        positions, valid = ttp.get_pruner(model).kept_positions()[-1]
        singles = [model(x[i : i + 1], output_hidden_states=True) for i in range(len(x))]
    assert valid is not None, "the batch should mix keep counts"
    for b in range(len(x)):
        rows = positions[b][valid[b]]
        assert torch.equal(out.last_hidden_state[b, rows], kept[b, : len(rows)])
    assert (out.last_hidden_state - torch.cat([s.last_hidden_state for s in singles])).abs().max() <= 1e-5
    for level, grid in enumerate(out.hidden_states):
        assert (grid - torch.cat([s.hidden_states[level] for s in singles])).abs().max() <= 1e-5


def test_hf_hidden_states_errors_say_what_to_do():
    model, plain, _ = _hf_pair("vit_model_pooler")
    with pytest.raises(NotImplementedError, match="restore_tokens=True"):
        plain(images(2), output_hidden_states=True)
    with pytest.raises(NotImplementedError, match="output_hidden_states=True"):
        model(images(2), output_hidden_states="all")
    with pytest.raises(NotImplementedError, match="return_dict=True"):  # a tuple would hold unrestored layers
        model(images(2), output_hidden_states=True, return_dict=False)
    with pytest.raises(NotImplementedError, match="eval"):
        model.train()(images(2), output_hidden_states=True)


@pytest.mark.parametrize("fill", ["offset", "dropped"])
def test_visualize_shows_the_restored_grid(fill):
    model = restoring("vit", restore_fill=fill)
    picture = ttp.visualize(model, images(1)[0], scale=4)
    plain = ttp.visualize(without_restore(model, "vit"), images(1)[0], scale=4)
    assert picture.width > plain.width  # one more panel
    pruner = ttp.get_pruner(model)
    filled = pruner.state.layout.restore.pruned[0]
    sources = pruner.restored_sources()[0]
    kept = set(pruner.kept_positions()[-1][0][0].tolist())
    assert filled.any() and not filled[0]
    assert all((int(s) in kept) != (fill == "dropped" and bool(f)) for s, f in zip(sources, filled))


def test_empty_batch_gives_empty_grids():
    model = restoring("registers")
    with torch.no_grad():
        grid = model.forward_features(images(0))
        final, maps = model.forward_intermediates(images(0), indices=[1, 4])
    assert grid.shape == final.shape == (0, 69, 48)
    assert all(m.shape == (0, 48, 8, 8) for m in maps)


def test_training_is_unchanged_by_restore_tokens():
    """Training forwards keep tokens off the grid; loss and gradients are those of restore_tokens=False."""
    model = restoring("vit")
    plain = without_restore(model, "vit")
    x, y = images(8, seed=9), torch.arange(8) % 10
    losses, grads = [], []
    for m in (model, plain):
        m.train()
        loss = F.cross_entropy(m(x), y) + 2.0 * ttp.budget_loss(m)
        loss.backward()
        losses.append(loss.item())
        grads.append(ttp.get_pruner(m).thresholds.grad.clone())
    assert losses[0] == losses[1] and torch.equal(grads[0], grads[1])
