"""transformers BEiT and Data2VecVision (relative position bias, mean pooling), tiny random configs: checked
against the unpatched model, single images, the training-mask path and a slow per-image reference."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images
from test_hf import main_output as main

import timm_token_prune as ttp

transformers = pytest.importorskip("transformers")

IMG, PATCH = 32, 4  # 8 x 8 patches
LOCATIONS = (1, 2, 3)
TINY = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=IMG,
    patch_size=PATCH, drop_path_rate=0.0, num_labels=10,
)
VARIANTS = {
    "plain_mean": dict(),  # the configs' defaults: no relative bias, mean pooling
    "own_bias_mean": dict(use_relative_position_bias=True),
    "shared_bias_cls": dict(use_shared_relative_position_bias=True, use_mean_pooling=False),
    "both_biases_cls": dict(use_relative_position_bias=True, use_shared_relative_position_bias=True, use_mean_pooling=False),
}
CLASSES = {
    "BeitForImageClassification": "BeitConfig",
    "BeitModel": "BeitConfig",
    "Data2VecVisionForImageClassification": "Data2VecVisionConfig",
    "Data2VecVisionModel": "Data2VecVisionConfig",
}
CASES = [f"{cls}-{variant}" for cls in CLASSES for variant in VARIANTS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(case: str, seed: int = 0, **extra) -> torch.nn.Module:
    cls, variant = case.split("-")
    torch.manual_seed(seed)
    config = getattr(transformers, CLASSES[cls])(**TINY, **VARIANTS[variant], **extra)
    kwargs = {"add_pooling_layer": True} if cls == "Data2VecVisionModel" and "mean" in variant else {}
    model = getattr(transformers, cls)(config, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(4.0)  # sharper class attention, so scores and counts vary (see conftest)
            if "relative_position_bias_table" in name:  # zeros at init: make the bias matter
                p.normal_(0.0, 1.0)
    return model


def patched(case: str, budget: float = 0.65, **options) -> torch.nn.Module:
    model = ttp.patch_model(make(case), budget=budget, prune_locations=LOCATIONS, **options)
    if budget < 1.0:
        ttp.calibrate(model, [images(16, seed=s, size=IMG) for s in (10, 11)])
    return model


def base_of(model):
    return getattr(model, "beit", None) or getattr(model, "data2vec_vision", None) or model


# ---- a slow reference: the dense model's modules, run eagerly per image on the kept tokens only -------
def reference(dense, x: torch.Tensor, kept: list[torch.Tensor] | None, interpolate: bool = False) -> torch.Tensor:
    """One image x (1, 3, H, W). `kept[s]`: the original positions of the tokens entering stage s
    (LOCATIONS[s]); None keeps all. Attention: softmax(q k^T / sqrt(d) + bias[rows, cols]) v with the
    relative position biases (own + shared, window from x) at those positions; mean pooling over the
    remaining patch tokens. Returns the main output."""
    base = base_of(dense)
    beit = type(base).__name__ == "BeitModel"
    window = (x.shape[2] // PATCH, x.shape[3] // PATCH)
    n0 = window[0] * window[1] + 1
    h = base.embeddings(x)
    h = h[0] if isinstance(h, tuple) else h
    shared_module = base.shared_position_bias if beit else getattr(base.encoder, "relative_position_bias", None)
    shared = 0.0 if shared_module is None else shared_module(window, interpolate, dim_size=n0)
    positions = torch.arange(n0)
    layers = base.layers if beit else base.encoder.layer
    for index, layer in enumerate(layers):
        if kept is not None and index in LOCATIONS:
            new = kept[LOCATIONS.index(index)]
            rows = torch.tensor([positions.tolist().index(p) for p in new.tolist()])
            h, positions = h[:, rows], new
        if beit:
            a = layer.attention
            q_proj, k_proj, v_proj, out = a.q_proj, a.k_proj, a.v_proj, a.o_proj
            own = layer.relative_position_bias
            lambdas = (layer.lambda_1, layer.lambda_2)
        else:
            a = layer.attention.attention
            q_proj, k_proj, v_proj, out = a.query, a.key, a.value, layer.attention.output.dense
            own = a.relative_position_bias if a.has_relative_position_bias else None
            lambdas = (layer.lambda_1 if layer.lambda_1 is not None else 1.0, layer.lambda_2 if layer.lambda_2 is not None else 1.0)
        bias = shared + (0.0 if own is None else own(window, interpolate, dim_size=n0))
        if isinstance(bias, torch.Tensor):
            bias = bias[:, :, positions][:, :, :, positions]
        y = layer.layernorm_before(h)
        heads = TINY["num_attention_heads"]
        q, k, v = (p(y).view(1, y.shape[1], heads, -1).transpose(1, 2) for p in (q_proj, k_proj, v_proj))
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(1, y.shape[1], -1)
        h = h + lambdas[0] * out(context)
        y = layer.layernorm_after(h)
        y = layer.mlp(y) if beit else layer.output(layer.intermediate(y))
        h = h + lambdas[1] * y
    sequence = base.layernorm(h)
    pooled = base.pooler(sequence) if base.pooler is not None else None
    classifier = getattr(dense, "classifier", None)
    if classifier is not None:
        return classifier(pooled)
    return pooled if pooled is not None else sequence


def kept_of(model, image: int) -> list[torch.Tensor]:
    return [p[image] if v is None else p[image][v[image]] for p, v in ttp.get_pruner(model).kept_positions()]


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_budget_one_equals_unpatched_and_unpatch_restores(case):
    model = make(case)
    x = images(4, size=IMG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        ttp.patch_model(model, budget=1.0, prune_locations=LOCATIONS)
        got = model(x)
        for key in ("logits", "pooler_output", "last_hidden_state"):
            if getattr(expected, key, None) is not None:
                assert torch.equal(got[key], expected[key]), key
        ttp.unpatch_model(model)
        assert torch.equal(main(model(x)), main(expected))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not any(type(m).__module__.startswith("timm_token_prune") for m in model.modules())  # classes back
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))
    assert not any("_token_pruner" in m.__dict__ for m in model.modules())


def test_reference_is_the_dense_model():
    """The slow reference itself, with every token kept, computes what the unpatched models compute."""
    for case in ("BeitForImageClassification-both_biases_cls", "Data2VecVisionModel-own_bias_mean"):
        model = make(case)
        x = images(2, size=IMG)
        with torch.no_grad():
            expected = main(model(x))
            for i in range(2):
                assert (reference(model, x[i : i + 1], None) - expected[i : i + 1]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_pruned_eval_matches_slow_reference_and_is_batch_invariant(case):
    dense = make(case)
    model = patched(case, pruned_tokens="drop")
    x = images(6, seed=3, size=IMG)
    with torch.no_grad():
        batched = main(model(x))
        counts = ttp.get_pruner(model).state.counts
        kept = [kept_of(model, i) for i in range(len(x))]
        assert len(set(counts[-1].tolist())) > 1 and max(counts[-1].tolist()) < 65  # pruned, a padded batch
        for i in range(len(x)):
            want = reference(dense, x[i : i + 1], kept[i])
            single = main(model(x[i : i + 1]))
            got = batched[i : i + 1, : want.shape[1]] if batched.ndim == 3 else batched[i : i + 1]
            assert got.shape == want.shape == single.shape
            assert (got - want).abs().max().item() <= 1e-4, i
            assert (single - got).abs().max().item() <= 1e-5, i


@pytest.mark.parametrize("case", CASES)
def test_merging_batch_invariant_and_training_masks_give_the_same_output(case):
    """Default settings (merging): an image alone vs in a batch; the training path with every token kept
    and pruned ones masked as keys (the bias not gathered) vs eval, which drops and gathers the bias."""
    model = patched(case)
    x = images(5, seed=4, size=IMG)
    with torch.no_grad():
        dropped = main(model(x))
        assert len(set(ttp.get_pruner(model).state.counts[-1].tolist())) > 1
        singles = [main(model(x[i : i + 1])) for i in range(len(x))]
        if dropped.ndim == 2:
            assert (dropped - torch.cat(singles)).abs().max().item() <= 1e-5
        else:  # last_hidden_state: each image's kept tokens, then zero padding
            for i, single in enumerate(singles):
                assert (dropped[i : i + 1, : single.shape[1]] - single).abs().max().item() <= 1e-5
                assert not dropped[i, single.shape[1] :].any()
        if dropped.ndim == 3:
            return  # training keeps every token in place: no per-token output to compare
        pruner = ttp.get_pruner(model)
        pruner.drop_in_training = False
        model.train()
        masked = main(model(x))
    assert pruner.state.layout.positions is None  # nothing moved: the full bias was used
    assert (masked - dropped).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cls", list(CLASSES))
def test_interpolate_pos_encoding_at_another_size(cls):
    """interpolate_pos_encoding resizes each bias to dim_size x dim_size: the window's tokens + 1 in the dense
    model, also in pruned layers (not their token count)."""
    case = f"{cls}-both_biases_cls"
    dense = make(case)
    model = patched(case, pruned_tokens="drop")
    x = images(3, seed=5, size=40)  # 10 x 10 patches
    with torch.no_grad():
        expected = main(dense(x, interpolate_pos_encoding=True))
        ttp.get_pruner(model).thresholds.fill_(-1.0)  # keep all: the patched model is the dense one
        assert torch.equal(main(model(x, interpolate_pos_encoding=True)), expected)
        model = patched(case, pruned_tokens="drop")
        batched = main(model(x, interpolate_pos_encoding=True))
        assert ttp.last_stats(model).tokens == 101 and ttp.last_stats(model).kept_max[-1] < 101
        for i in range(len(x)):
            want = reference(dense, x[i : i + 1], kept_of(model, i), interpolate=True)
            got = batched[i : i + 1, : want.shape[1]] if batched.ndim == 3 else batched[i : i + 1]
            assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["BeitForImageClassification-both_biases_cls", "Data2VecVisionForImageClassification-own_bias_mean", "BeitModel-plain_mean"])
def test_calibrated_flops_meet_the_budget_and_agree_with_flop_counter(case):
    from test_timm import _counted_gmacs

    model = ttp.patch_model(make(case), budget=0.65, prune_locations=LOCATIONS)
    ttp.calibrate(model, [images(16, seed=s, size=IMG) for s in range(20, 23)])
    ratios = []
    with torch.no_grad():
        for s in range(30, 33):
            model(images(16, seed=s, size=IMG))
            ratios.append(ttp.last_stats(model).flops_ratio)
    assert sum(ratios) / len(ratios) == pytest.approx(0.65, abs=0.02)
    x = images(1, seed=7, size=IMG)
    dense_counted = _counted_gmacs(make(case), x)
    pruned_counted = _counted_gmacs(model, x)
    stats = ttp.last_stats(model)
    assert stats.flops_ratio < 0.9
    assert stats.dense_gflops == pytest.approx(dense_counted, rel=0.02)
    assert stats.gflops == pytest.approx(pruned_counted, rel=0.02)


@pytest.mark.parametrize("case", ["BeitForImageClassification-own_bias_mean", "Data2VecVisionForImageClassification-both_biases_cls", "BeitModel-shared_bias_cls", "Data2VecVisionModel-own_bias_mean"])
def test_thresholds_and_biases_get_gradients_in_training(case):
    model = patched(case)
    model.train()
    x = images(8, seed=6, size=IMG)
    if "Classification" in case:
        loss = model(x, labels=torch.arange(8) % 10).loss
    else:
        loss = model(x).pooler_output.square().mean()
    (loss + 2.0 * ttp.budget_loss(model)).backward()
    grad = ttp.get_pruner(model).thresholds.grad
    assert torch.isfinite(grad).all() and (grad != 0).any()
    tables = [p for n, p in model.named_parameters() if "relative_position_bias_table" in n]
    assert tables and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables[-2:])


@pytest.mark.parametrize("case", ["BeitForImageClassification-both_biases_cls", "Data2VecVisionForImageClassification-own_bias_mean"])
def test_save_and_load(case, tmp_path):
    original = make(case)
    model = patched(case)
    x = images(3, seed=2, size=IMG)
    ttp.save_pretrained(model, tmp_path / "pruned")
    loaded = ttp.from_pretrained(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    model.save_pretrained(tmp_path / "dense")  # transformers' own save: the base weights as they were
    plain = getattr(transformers, case.split("-")[0]).from_pretrained(tmp_path / "dense").eval()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, original(x).logits)


@pytest.mark.parametrize(
    "case, policy",
    [
        ("BeitModel-both_biases_cls", "mass"),
        ("Data2VecVisionModel-own_bias_mean", "mass"),
        ("BeitForImageClassification-plain_mean", "mass"),
        ("Data2VecVisionForImageClassification-own_bias_mean", "topk"),  # no padding: pool_weights() is None
    ],
)
def test_restore_tokens(case, policy):
    """The full grid comes back (kept tokens where they were), and the pooled output / logits are those of
    the same thresholds without restore_tokens (mean pooling reads the kept tokens, not the grid)."""
    options = dict(pruned_tokens="drop", keep_policy=policy)
    model = patched(case, restore_tokens=True, restore_fill="dropped", **options)
    plain = patched(case, **options)
    plain.token_pruner.load_state_dict(model.token_pruner.state_dict())
    x = images(4, seed=8, size=IMG)
    with torch.no_grad():
        want = plain(x)
        got = model(x, output_hidden_states=True)
    pooled = "logits" if "Classification" in case else "pooler_output"
    assert torch.equal(got[pooled], want[pooled])
    assert len(got.hidden_states) == TINY["num_hidden_layers"] + 1
    assert all(h.shape == (4, 65, 64) for h in got.hidden_states)
    if "Classification" in case:
        return
    assert got.last_hidden_state.shape == (4, 65, 64)
    kept = [kept_of(model, i)[-1] for i in range(4)]
    assert max(len(k) for k in kept) < 65
    for i, positions in enumerate(kept):  # the last layer's kept tokens, in their places (the norm is per token)
        assert (got.last_hidden_state[i, positions] - want.last_hidden_state[i, : len(positions)]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["BeitForImageClassification-both_biases_cls", "Data2VecVisionForImageClassification-both_biases_cls"])
def test_copies_and_pickles_run_and_unpatch_on_their_own(case):
    import pickle

    dense = make(case)
    model = patched(case)
    x = images(4, seed=9, size=IMG)
    with torch.no_grad():
        expected_dense, expected = dense(x).logits, model(x).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(x).logits, expected)
            ttp.unpatch_model(clone)
            assert torch.equal(clone(x).logits, expected_dense)
            assert not any(type(m).__module__.startswith("timm_token_prune") for m in clone.modules())
            assert torch.equal(model(x).logits, expected)  # the original is still patched


@pytest.mark.parametrize("cls", ["BeitForImageClassification", "Data2VecVisionForImageClassification"])
def test_eager_attention(cls):
    """attn_implementation='eager' (Data2VecVision: the other SelfAttention class): budget 1.0 is the dense
    model, a pruned batch matches the slow reference."""
    case = f"{cls}-both_biases_cls"
    dense = make(case, attn_implementation="eager")
    x = images(4, seed=12, size=IMG)
    with torch.no_grad():
        expected = dense(x).logits
        model = ttp.patch_model(make(case, attn_implementation="eager"), budget=1.0, prune_locations=LOCATIONS)
        assert torch.equal(model(x).logits, expected)
        model = ttp.patch_model(make(case, attn_implementation="eager"), prune_locations=LOCATIONS, pruned_tokens="drop")
        ttp.calibrate(model, [images(16, seed=13, size=IMG)])
        got = model(x).logits
        assert ttp.last_stats(model).kept_max[-1] < 65
        for i in range(len(x)):
            assert (got[i : i + 1] - reference(dense, x[i : i + 1], kept_of(model, i))).abs().max() <= 1e-4
