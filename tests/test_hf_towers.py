"""Vision towers inside larger transformers models: image-text models (CLIPModel, SiglipModel) and a LLaVA
vision-language model, each checked against its unpatched copy and against FlopCounterMode (tiny random
configs, no downloads)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import images
from torch.utils.flop_counter import FlopCounterMode

import timm_token_prune as ttp
from timm_token_prune.errors import AlreadyPatchedError

transformers = pytest.importorskip("transformers")

IMG, PATCH = 32, 4  # 8 x 8 = 64 patches
PATCHES = (IMG // PATCH) ** 2
VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=IMG,
              patch_size=PATCH)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
IMAGE_TOKEN = 127


def _sharpen(tower: torch.nn.Module) -> None:
    """Random init leaves the attention almost uniform; sharpen it so scores vary (see conftest)."""
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and name.endswith("weight"):
                p.mul_(4.0)


def make_dual(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    t = transformers
    if kind == "clip":
        config = t.CLIPConfig(text_config=t.CLIPTextConfig(**TEXT), vision_config=t.CLIPVisionConfig(**VISION),
                              projection_dim=32)
        model = t.CLIPModel(config)
    else:
        config = t.SiglipConfig(text_config=t.SiglipTextConfig(**TEXT), vision_config=t.SiglipVisionConfig(**VISION))
        model = t.SiglipModel(config)
    _sharpen(model.vision_model)
    return model.eval()


@functools.lru_cache(maxsize=None)
def dense_llava() -> torch.nn.Module:
    """The unpatched tiny LLaVA, built once: tests patch deep copies of it."""
    return make_llava()


def make_llava(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    t = transformers
    text = t.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    config = t.LlavaConfig(vision_config=t.CLIPVisionConfig(**VISION), text_config=text,
                           image_token_index=IMAGE_TOKEN, image_seq_length=PATCHES)
    model = t.LlavaForConditionalGeneration(config)
    _sharpen(model.model.vision_tower)
    return model.eval()


def text_ids(batch: int = 3, seed: int = 5, length: int = 8) -> torch.Tensor:
    return torch.randint(4, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def prompt(batch: int = 2) -> torch.Tensor:
    """<bos>, one image token per patch (the "default" strategy drops the class token), then some text."""
    text = torch.randint(3, 120, (batch, 5), generator=torch.Generator().manual_seed(9))
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, PATCHES), IMAGE_TOKEN), text], 1)


def calibration(seed: int = 20, batch: int = 16) -> list[dict]:
    return [{"pixel_values": images(batch, seed=seed, size=IMG)}]  # no text


@functools.lru_cache(maxsize=None)
def calibrated(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(dense, patched at 0.65 and calibrated on pixel_values alone, calibrate's stats), built once."""
    dense = make_dual(kind)
    model = ttp.patch_model(copy.deepcopy(dense), 0.65)
    return dense, model, ttp.calibrate(model, calibration())


def counted_gmacs(fn) -> float:
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa_cpu(query, key, value, *args, **kwargs):
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops() / 2 / 1e9


def untouched(module: torch.nn.Module) -> bool:
    """No hook, attribute or attention implementation of ours anywhere in `module`."""
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or any(k.startswith("_token_prune") for k in m.__dict__):
            return False
        if getattr(getattr(m, "config", None), "_attn_implementation", None) == "timm_token_prune":
            return False
    return True


# ---- image-text models ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_tower_budget_one_is_exact_and_unpatch_restores(kind):
    model = make_dual(kind)
    x, ids = images(4, size=IMG), text_ids()
    with torch.no_grad():
        expected, features = model(input_ids=ids, pixel_values=x), model.get_image_features(pixel_values=x)
        ttp.patch_model(model, 1.0)
        assert untouched(model.text_model) and not untouched(model.vision_model)
        got = model(input_ids=ids, pixel_values=x)
        assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, features.pooler_output)
        for key in ("logits_per_image", "image_embeds", "text_embeds"):
            assert torch.equal(getattr(got, key), getattr(expected, key)), key
        ttp.unpatch_model(model)
        assert untouched(model) and not hasattr(model, "token_pruner")
        assert torch.equal(model(input_ids=ids, pixel_values=x).logits_per_image, expected.logits_per_image)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_tower_prunes_the_vision_tower_only(kind):
    dense, model, stats = calibrated(kind)  # calibrated on pixel_values only: get_image_features ran
    assert stats.flops_ratio == pytest.approx(0.65, abs=0.02)
    x, ids = images(6, seed=3, size=IMG), text_ids()
    with torch.no_grad():
        got, want = model(input_ids=ids, pixel_values=x), dense(input_ids=ids, pixel_values=x)
        assert ttp.last_stats(model).kept_mean[-1] < PATCHES  # the full forward pruned
        features = model.get_image_features(pixel_values=x).pooler_output
        # the text tower: its modules and outputs as in the dense model
        assert untouched(model.text_model)
        assert torch.equal(got.text_embeds, want.text_embeds)
        assert torch.equal(model.get_text_features(input_ids=ids).pooler_output,
                           dense.get_text_features(input_ids=ids).pooler_output)
    # image_embeds and logits_per_image come from the pruned tower
    assert not torch.allclose(features, dense.get_image_features(pixel_values=x).pooler_output, atol=1e-3)
    assert torch.allclose(got.image_embeds, features / features.norm(dim=-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(got.logits_per_image, want.logits_per_image, atol=1e-3)
    scale = model.logit_scale.exp()
    bias = getattr(model, "logit_bias", torch.zeros(()))
    assert torch.allclose(got.logits_per_image, got.image_embeds @ got.text_embeds.T * scale + bias, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_tower_flops_cover_the_image_path_only(kind):
    dense, model, _ = calibrated(kind)
    x = images(1, seed=7, size=IMG)
    dense_counted = counted_gmacs(lambda: dense.get_image_features(pixel_values=x))
    pruned_counted = counted_gmacs(lambda: model.get_image_features(pixel_values=x))
    stats = ttp.last_stats(model)
    assert stats.flops_ratio < 0.8
    # CLIP: exactly what FlopCounterMode counts, visual_projection included (2e-4 of the total); SigLIP's
    # attention-pooling head is counted approximately (hf.py)
    rel = 1e-9 if kind == "clip" else 0.005
    assert stats.dense_gflops == pytest.approx(dense_counted, rel=rel)
    assert stats.gflops == pytest.approx(pruned_counted, rel=rel)
    whole = counted_gmacs(lambda: dense(input_ids=text_ids(1, length=16), pixel_values=x))
    assert whole > 1.05 * dense_counted  # the text tower costs something, and is not counted


def test_dual_tower_calibrates_on_processor_batches_with_text():
    """A CLIP processor's batch holds the text too: calibrate reads its images only."""
    dense = make_dual("clip")
    model = ttp.patch_model(copy.deepcopy(dense), 0.65)
    images_only = ttp.calibrate(model, calibration()).flops_ratio
    batch = {**calibration()[0], "input_ids": text_ids(16), "attention_mask": torch.ones(16, 8, dtype=torch.long)}
    assert ttp.calibrate(model, [batch]).flops_ratio == images_only


def test_dual_tower_save_load_and_plain_transformers(tmp_path):
    dense, model, _ = calibrated("clip")
    x, ids = images(4, seed=3, size=IMG), text_ids()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=x)
    ttp.save_pretrained(model, tmp_path)
    loaded = ttp.from_pretrained(tmp_path)
    plain = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, pixel_values=x)
        assert torch.equal(got.logits_per_image, expected.logits_per_image)
        assert torch.equal(got.text_embeds, expected.text_embeds)
        want, back = dense(input_ids=ids, pixel_values=x), plain(input_ids=ids, pixel_values=x)
    assert type(loaded) is transformers.CLIPModel and not hasattr(plain, "token_pruner")
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        assert torch.equal(getattr(back, key), getattr(want, key)), key
    assert torch.equal(ttp.get_pruner(loaded).thresholds, ttp.get_pruner(model).thresholds)


def test_dual_tower_push_to_hub(hub):
    _, model, _ = calibrated("siglip")
    x, ids = images(3, seed=4, size=IMG), text_ids()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=x).logits_per_image
    ttp.push_to_hub(model, "org/siglip-pruned")
    assert "token_prune_config.json" in hub.files("org/siglip-pruned")
    loaded = ttp.from_pretrained("org/siglip-pruned")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=x).logits_per_image, expected)


def test_dual_tower_restore_tokens_gives_the_full_grid():
    model = ttp.patch_model(make_dual("clip"), 0.65, restore_tokens=True)
    ttp.calibrate(model, calibration(batch=8))
    x = images(3, seed=4, size=IMG)
    with torch.no_grad():
        out = model(input_ids=text_ids(), pixel_values=x, output_hidden_states=True)
    vision = out.vision_model_output
    assert vision.last_hidden_state.shape == (3, PATCHES + 1, 64)
    assert all(h.shape == (3, PATCHES + 1, 64) for h in vision.hidden_states)
    assert ttp.last_stats(model).kept_mean[-1] < PATCHES


def test_copies_of_a_patched_dual_tower_model_unpatch_on_their_own():
    import pickle

    dense, model, _ = calibrated("clip")
    x = images(3, size=IMG)
    with torch.no_grad():
        want = model.get_image_features(pixel_values=x).pooler_output
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone.get_image_features(pixel_values=x).pooler_output, want)
            ttp.unpatch_model(clone)
            assert untouched(clone) and not hasattr(clone, "token_pruner")
            assert torch.equal(clone.get_image_features(pixel_values=x).pooler_output,
                               dense.get_image_features(pixel_values=x).pooler_output)
            assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, want)  # still patched


def test_patching_twice_or_a_patched_tower_is_refused():
    model = ttp.patch_model(make_dual("clip"), 0.65)
    with pytest.raises(AlreadyPatchedError, match="already patched"):
        ttp.patch_model(model, 0.5)
    with pytest.raises(AlreadyPatchedError, match="unpatch_model on that model"):
        ttp.patch_model(model.vision_model, 0.5)  # the tower inside a patched model
    other = make_dual("clip")
    ttp.patch_model(other.vision_model, 0.65)
    with pytest.raises(AlreadyPatchedError, match="vision tower of this CLIPModel"):
        ttp.patch_model(other, 0.5)
    assert not hasattr(other, "token_pruner") and untouched(other.text_model)


def naflex(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """SigLIP 2 NaFlex inputs of square images: patchified pixels, the patch mask, the grid shapes."""
    batch, side = len(pixels), IMG // PATCH
    patches = pixels.reshape(batch, 3, side, PATCH, side, PATCH).permute(0, 2, 4, 3, 5, 1)
    return {"pixel_values": patches.reshape(batch, side * side, PATCH * PATCH * 3),
            "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]] * batch)}


def test_siglip2_model_prunes_the_vision_tower_only():
    if not hasattr(transformers, "Siglip2Model"):
        pytest.skip("this transformers has no SigLIP 2")
    t = transformers
    torch.manual_seed(0)
    vision = {k: v for k, v in VISION.items() if k != "image_size"}
    config = t.Siglip2Config(text_config=t.Siglip2TextConfig(**TEXT),
                             vision_config=t.Siglip2VisionConfig(**vision, num_patches=PATCHES))
    dense = t.Siglip2Model(config).eval()
    _sharpen(dense.vision_model)
    x, ids = naflex(images(4, seed=3, size=IMG)), text_ids()
    with torch.no_grad():
        want = dense(input_ids=ids, **x)
        model = ttp.patch_model(copy.deepcopy(dense), 1.0)
        assert torch.equal(model(input_ids=ids, **x).logits_per_image, want.logits_per_image)
        ttp.unpatch_model(model)
        ttp.patch_model(model, 0.65)
    stats = ttp.calibrate(model, [naflex(images(8, seed=20, size=IMG))])  # image inputs only, no text
    assert stats.flops_ratio == pytest.approx(0.65, abs=0.02)
    with torch.no_grad():
        got = model(input_ids=ids, **x)
        features = model.get_image_features(**x).pooler_output
    assert untouched(model.text_model) and torch.equal(got.text_embeds, want.text_embeds)
    assert torch.allclose(got.image_embeds, features / features.norm(dim=-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(got.logits_per_image, want.logits_per_image, atol=1e-3)


# ---- vision-language models ----------------------------------------------------------------------
def test_vlm_needs_restore_tokens():
    model = copy.deepcopy(dense_llava())
    with pytest.raises(ttp.UnsupportedModelError, match=r"restore_tokens=True"):
        ttp.patch_model(model, 0.65)
    assert untouched(model) and not hasattr(model, "token_pruner")
    model.model.vision_tower = torch.nn.Linear(2, 2)  # a tower of no supported family
    with pytest.raises(ttp.UnsupportedModelError, match=r"vision tower \(model.vision_tower, a Linear\) is not a supported"):
        ttp.patch_model(model, 0.65, restore_tokens=True)


def test_vlm_budget_one_gives_the_same_logits_and_tokens():
    dense = dense_llava()
    model = ttp.patch_model(copy.deepcopy(dense), 1.0, restore_tokens=True)
    ids, x = prompt(), images(2, seed=3, size=IMG)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=x).logits, dense(input_ids=ids, pixel_values=x).logits)
        new = dense.generate(input_ids=ids, pixel_values=x, max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(input_ids=ids, pixel_values=x, max_new_tokens=3, do_sample=False), new)
    assert untouched(model.model.language_model) and untouched(model.model.multi_modal_projector)


def test_vlm_pruned_tower_end_to_end():
    dense = dense_llava()
    model = ttp.patch_model(copy.deepcopy(dense), 0.65, restore_tokens=True)
    batches = calibration(batch=8)
    stats = ttp.calibrate(model, batches)
    tower, dense_tower = model.model.vision_tower, dense.model.vision_tower
    # the tower's FLOPs, counted independently image by image, and the library's measure
    pixels = batches[0]["pixel_values"]
    dense_counted = counted_gmacs(lambda: dense_tower(pixel_values=pixels[:1]))
    counted = [counted_gmacs(lambda: tower(pixel_values=pixels[i : i + 1], output_hidden_states=-2))
               for i in range(len(pixels))]
    assert sum(counted) / len(counted) / dense_counted == pytest.approx(0.65, abs=0.02)
    assert stats.flops_ratio == pytest.approx(0.65, abs=0.02)
    assert stats.dense_gflops == pytest.approx(dense_counted, rel=0.02)
    measured = ttp.api.measure(model, ttp.get_pruner(model), [pixels])
    assert measured.flops_ratio == pytest.approx(0.65, abs=0.02)
    # the projector gets the restored grid of hidden_states[-2] (one embedding per patch)
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    ids, x = prompt(), images(2, seed=3, size=IMG)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=x).logits
            assert ttp.last_stats(model).kept_mean[-1] < PATCHES
            out = model.generate(input_ids=ids, pixel_values=x, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert seen == [(2, PATCHES, 64)] * 2
    assert out.shape == (2, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)
    with torch.no_grad():
        want = dense(input_ids=ids, pixel_values=x).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, want, atol=1e-3)
    # only the selected hidden state was restored; the others stay unselected
    with torch.no_grad():
        hidden = model.model.get_image_features(pixel_values=x).hidden_states
    assert [h is not None for h in hidden] == [False, False, False, True, False]
    assert hidden[-2].shape == (2, PATCHES + 1, 64)


def test_distill_refuses_an_image_text_model_clearly():
    model = ttp.patch_model(make_dual("clip"), 0.65)
    thresholds = ttp.get_pruner(model).thresholds.detach().clone()
    with pytest.raises(ValueError, match="image-text or vision-language"):
        ttp.distill(model, [{"pixel_values": images(4, size=IMG)}], epochs=1)
    assert torch.equal(ttp.get_pruner(model).thresholds, thresholds)
