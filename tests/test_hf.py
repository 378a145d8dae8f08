"""The same guarantees for Hugging Face transformers models (tiny configs, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IMG, LOCATIONS, images, spy_packed_attention

import timm_token_prune as ttp

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=48, num_hidden_layers=6, num_attention_heads=3, intermediate_size=96, image_size=IMG, patch_size=4
)


def _vit(cls_name, config_name, **extra):
    def build():
        config = getattr(transformers, config_name)(**{**SMALL, **extra})
        return getattr(transformers, cls_name)(config)

    return build


def _clip_classifier():
    vision = dict(SMALL)
    config = transformers.CLIPConfig(
        vision_config=vision,
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        num_labels=10,
    )
    return transformers.CLIPForImageClassification(config)


def _siglip_classifier():
    config = transformers.SiglipConfig(
        vision_config=dict(SMALL),
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        num_labels=10,
    )
    return transformers.SiglipForImageClassification(config)


HF_CASES = {
    "vit_classifier": _vit("ViTForImageClassification", "ViTConfig", num_labels=10),
    "vit_model_pooler": _vit("ViTModel", "ViTConfig"),
    "vit_eager": _vit("ViTForImageClassification", "ViTConfig", num_labels=10, attn_implementation="eager"),
    "deit_classifier": _vit("DeiTForImageClassification", "DeiTConfig", num_labels=10),
    "deit_with_teacher": _vit("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=10),
    "dinov2_classifier": _vit(
        "Dinov2ForImageClassification", "Dinov2Config", num_labels=10, mlp_ratio=2, layerscale_value=0.1
    ),
    "dinov2_registers": _vit(
        "Dinov2WithRegistersForImageClassification",
        "Dinov2WithRegistersConfig",
        num_labels=10,
        mlp_ratio=2,
        layerscale_value=0.1,
        num_register_tokens=2,
    ),
    "vit_msn": _vit("ViTMSNForImageClassification", "ViTMSNConfig", num_labels=10),
    "clip_vision": _vit("CLIPVisionModel", "CLIPVisionConfig"),
    "clip_vision_projection": _vit("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16),
    "clip_classifier": _clip_classifier,
    "siglip_vision_map_head": _vit("SiglipVisionModel", "SiglipVisionConfig"),
    "siglip_classifier": _siglip_classifier,
}


def make_hf(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = HF_CASES[case]().eval()
    with torch.no_grad():  # sharpen the class-token attention so scores vary (see conftest)
        for name, p in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and name.endswith("weight") and "text" not in name:
                p.mul_(4.0)
    return model


def main_output(output) -> torch.Tensor:
    for name in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no main output in {type(output).__name__}")


def patched_hf(case: str, budget: float = 0.5) -> torch.nn.Module:
    model = ttp.patch_model(make_hf(case), budget=budget, prune_locations=LOCATIONS)
    if budget < 1.0:
        ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


@pytest.fixture(params=sorted(HF_CASES))
def hf_case(request) -> str:
    return request.param


def test_budget_one_equals_unpatched_and_unpatch_restores(hf_case):
    model = make_hf(hf_case)
    x = images(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        ttp.patch_model(model, budget=1.0, prune_locations=LOCATIONS)
        got = model(x)
        assert (main_output(got) - main_output(expected)).abs().max().item() <= 1e-5
        if getattr(expected, "last_hidden_state", None) is not None:
            assert (got.last_hidden_state - expected.last_hidden_state).abs().max().item() <= 1e-5
        ttp.unpatch_model(model)
        assert torch.equal(main_output(model(x)), main_output(expected))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_batch_invariance(hf_case):
    model = patched_hf(hf_case)
    x = images(6, seed=3)
    with torch.no_grad():
        batched = main_output(model(x))
        counts = ttp.get_pruner(model).state.counts[-1].tolist()
        singles = torch.cat([main_output(model(x[i : i + 1])) for i in range(len(x))])
    assert len(set(counts)) > 1, counts
    assert (batched - singles).abs().max().item() <= 1e-4


def test_packed_grouped_attention(hf_case, monkeypatch):
    """A packed batch attending in groups reads q, k, v straight from the packed tokens
    (`TokenPruner.attention_packed`): the same as unpacking the whole batch, and as each image alone."""
    model = patched_hf(hf_case)
    pruner = ttp.get_pruner(model)
    calls = spy_packed_attention(monkeypatch, pruner)
    x = torch.cat([images(8, seed=3), images(8, seed=4)])
    with torch.no_grad():
        direct = main_output(model(x))
        assert calls, "the packed path should have run"
        singles = torch.cat([main_output(model(x[i : i + 1])) for i in range(len(x))])
        monkeypatch.setattr(type(pruner), "attends_packed", lambda self: False)
        unpacked = main_output(model(x))
    assert (direct - unpacked).abs().max().item() <= 1e-6
    assert (direct - singles).abs().max().item() <= 1e-4


def test_training_masks_give_the_same_output_as_dropping(hf_case):
    model = patched_hf(hf_case)
    x = images(5, seed=4)
    with torch.no_grad():
        dropped = main_output(model(x))
        model.train()
        masked = model(x)
    masked = main_output(masked)
    assert (masked - dropped).abs().max().item() <= 1e-4


def test_weights_shared_and_thresholds_train():
    model = make_hf("vit_classifier")
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ttp.patch_model(model, budget=0.5, prune_locations=LOCATIONS)
    state = model.state_dict()
    assert set(state) - set(pointers) == {"token_pruner.thresholds", "token_pruner.keep_ratios", "token_pruner.static", "token_pruner.calibrated"}
    assert all(state[k].data_ptr() == p for k, p in pointers.items())
    ttp.calibrate(model, [images(16)])
    model.train()
    out = model(images(8), labels=torch.arange(8) % 10)
    (out.loss + 2.0 * ttp.budget_loss(model)).backward()
    grad = ttp.get_pruner(model).thresholds.grad
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_calibrate_and_stats():
    model = ttp.patch_model(make_hf("dinov2_classifier"), budget=0.6)
    ttp.calibrate(model, [{"pixel_values": images(16, seed=s)} for s in range(20, 24)])
    ratios = []
    with torch.no_grad():
        for s in range(30, 34):
            model(images(16, seed=s))
            ratios.append(ttp.last_stats(model).flops_ratio)
    assert sum(ratios) / len(ratios) == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("case", ["vit_classifier", "siglip_vision_map_head"])
def test_flops_agree_with_flop_counter(case):
    from test_timm import _counted_gmacs

    x = images(1, seed=7)
    dense_counted = _counted_gmacs(make_hf(case), x)
    model = patched_hf(case)
    pruned_counted = _counted_gmacs(model, x)
    stats = ttp.last_stats(model)
    assert stats.flops_ratio < 0.8
    assert stats.dense_gflops == pytest.approx(dense_counted, rel=0.02)
    assert stats.gflops == pytest.approx(pruned_counted, rel=0.02)


def test_save_pretrained_keeps_base_weights(tmp_path):
    original = make_hf("vit_classifier")
    model = ttp.patch_model(copy.deepcopy(original), budget=0.5, prune_locations=LOCATIONS)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    assert "token_pruner.thresholds" in saved
    plain = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    x = images(3)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, original(x).logits)


def test_output_hidden_states_and_attentions_raise():
    model = patched_hf("vit_classifier")
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(NotImplementedError, match="unpatch_model"):
            model(images(2), **{flag: True})


def test_wrong_input_shape():
    model = patched_hf("vit_classifier")
    with pytest.raises(ValueError, match=r"pixel_values of shape \(B, 3, H, W\)"):
        model(torch.randn(2, 1, IMG, IMG))


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL)), "shuffle and mask patches"),
        # BeitModel / Data2VecVisionModel are supported (tests/test_hf_beit.py), not their dense-prediction heads
        (lambda: transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**SMALL, vocab_size=16)), "every patch"),
        (
            lambda: transformers.Data2VecVisionForSemanticSegmentation(
                transformers.Data2VecVisionConfig(**SMALL, out_indices=[1, 2, 3, 5])
            ),
            "full token grid",
        ),
    ],
)
def test_unsupported_families(build, reason):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ttp.UnsupportedModelError, match=reason):
        ttp.patch_model(model)
    assert not hasattr(model, "token_pruner")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_deepcopy_of_patched_model():
    model = patched_hf("dinov2_classifier")
    clone = copy.deepcopy(model)
    x = images(4)
    with torch.no_grad():
        assert torch.equal(main_output(clone(x)), main_output(model(x)))
    assert ttp.get_pruner(clone) is not ttp.get_pruner(model)


def test_distillation_trainer_trains_thresholds_without_decay(tmp_path):
    pytest.importorskip("accelerate")
    from timm_token_prune.trainer import DistillationTrainer

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"pixel_values": images(16, seed=1)[i], "labels": torch.tensor(i % 10)}

    model = patched_hf("vit_classifier")
    before = ttp.get_pruner(model).thresholds.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
    )
    trainer = DistillationTrainer(model=model, args=args, train_dataset=Images())
    assert "token_pruner.thresholds" not in trainer.get_decay_parameter_names(model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(ttp.get_pruner(model).thresholds.detach(), before)


@pytest.mark.parametrize("case", ["dinov2_classifier", "siglip_vision_map_head"])
def test_unpatching_a_copy_restores_the_copy_and_leaves_the_original_patched(case):
    import pickle

    dense = make_hf(case)
    x = images(4)
    with torch.no_grad():
        expected_dense = main_output(dense(x))
        model = patched_hf(case)
        expected_pruned = main_output(model(x))
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            ttp.unpatch_model(clone)
            assert not hasattr(clone, "token_pruner")
            assert all(not m._forward_hooks and not m._forward_pre_hooks for m in clone.modules())
            assert all("_token_pruner" not in m.__dict__ for m in clone.modules())
            assert all(m.config._attn_implementation != "timm_token_prune" for m in clone.modules() if hasattr(m, "config"))
            assert torch.equal(main_output(clone(x)), expected_dense)
            assert torch.equal(main_output(model(x)), expected_pruned)  # the original is still patched
            assert ttp.last_stats(model).kept_mean[-1] < ttp.last_stats(model).tokens
        ttp.unpatch_model(model)
        assert torch.equal(main_output(model(x)), expected_dense)


def test_distillation_trainer_leaves_the_callers_teacher_as_it_was(tmp_path):
    pytest.importorskip("accelerate")
    from timm_token_prune.trainer import DistillationTrainer

    dataset = [{"pixel_values": images(4, seed=1)[i], "labels": torch.tensor(i)} for i in range(4)]
    teacher = make_hf("vit_classifier").train()
    frozen = teacher.classifier.weight
    frozen.requires_grad_(False)  # one flag the caller set differently
    flags = {name: p.requires_grad for name, p in teacher.named_parameters()}
    model = patched_hf("vit_classifier")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no",
    )
    DistillationTrainer(model=model, args=args, train_dataset=dataset, teacher=teacher).train()
    assert teacher.training and all(m.training for m in teacher.modules())
    assert {name: p.requires_grad for name, p in teacher.named_parameters()} == flags
    with pytest.raises(ValueError, match="shares parameters"):
        DistillationTrainer(model=model, args=args, train_dataset=dataset, teacher=model)
