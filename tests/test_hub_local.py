"""Pruned checkpoints in local folders: round trips, plain loading by each zoo, bad checkpoints."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import images

import timm_token_prune as ttp

transformers = pytest.importorskip("transformers")


def timm_pruned(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=6).eval()
    ttp.patch_model(model, budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


def hf_pruned(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=48, num_hidden_layers=6, num_attention_heads=3, intermediate_size=96, image_size=32,
        patch_size=4, num_labels=10,
    )
    model = transformers.ViTForImageClassification(config).eval()
    ttp.patch_model(model, budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


def logits(output) -> torch.Tensor:
    return getattr(output, "logits", output)


@pytest.mark.parametrize("build", [timm_pruned, hf_pruned], ids=["timm", "transformers"])
def test_round_trip_through_a_folder(build, tmp_path):
    model = build()
    x = images(4, seed=3)
    with torch.no_grad():
        expected = logits(model(x))
        stats = ttp.last_stats(model)
    ttp.save_pretrained(model, tmp_path, stats=stats, evaluation={"top1": 12.5}, license="apache-2.0")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "token_prune.safetensors", "token_prune_config.json"]
    loaded = ttp.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(logits(loaded(x)), expected)
    assert torch.equal(ttp.get_pruner(loaded).thresholds, ttp.get_pruner(model).thresholds)
    assert ttp.get_pruner(loaded).config == ttp.get_pruner(model).config
    card = (tmp_path / "README.md").read_text()
    assert "token-pruning" in card and "license: apache-2.0" in card and "top1 = 12.5" in card


def test_folder_loads_as_plain_dense_models(tmp_path):
    for build, sub in ((timm_pruned, "timm"), (hf_pruned, "hf")):
        model = build()
        ttp.save_pretrained(model, tmp_path / sub)
        dense = ttp.unpatch_model(model)
        x = images(3)
        if sub == "timm":
            plain = timm.create_model(f"local-dir:{tmp_path / sub}", pretrained=True).eval()
        else:
            plain = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / sub).eval()
        with torch.no_grad():
            assert torch.equal(logits(plain(x)), logits(dense(x)))


def test_not_our_checkpoint(tmp_path):
    model = hf_pruned()
    ttp.unpatch_model(model).save_pretrained(tmp_path)
    with pytest.raises(ttp.CheckpointError, match="not a timm-token-prune checkpoint"):
        ttp.from_pretrained(tmp_path)


def test_newer_format(tmp_path):
    ttp.save_pretrained(timm_pruned(), tmp_path)
    meta = json.loads((tmp_path / "token_prune_config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "token_prune_config.json").write_text(json.dumps(meta))
    with pytest.raises(ttp.CheckpointError, match="format 99.*upgrade timm-token-prune"):
        ttp.from_pretrained(tmp_path)


@pytest.mark.parametrize("build", [timm_pruned, hf_pruned], ids=["timm", "transformers"])
def test_architecture_that_does_not_match_the_weights(build, tmp_path):
    ttp.save_pretrained(build(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if "model_args" in config:
        config["model_args"]["embed_dim"] = 64
        config["model_args"]["num_heads"] = 4
    else:
        config["hidden_size"], config["intermediate_size"] = 64, 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ttp.CheckpointError, match=str(tmp_path)):
        ttp.from_pretrained(tmp_path)


@pytest.mark.parametrize("build", [timm_pruned, hf_pruned], ids=["timm", "transformers"])
@pytest.mark.parametrize("name", ["model.safetensors", "token_prune.safetensors"])
def test_truncated_weights(build, name, tmp_path):
    ttp.save_pretrained(build(), tmp_path)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ttp.CheckpointError, match=str(tmp_path)):
        ttp.from_pretrained(tmp_path)


def test_save_rejects_unpatched_and_keeps_folder_clean(tmp_path):
    model = timm_pruned()
    ttp.unpatch_model(model)
    with pytest.raises(ttp.NotPatchedError):
        ttp.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        ("nan_thresholds", r"token_prune.safetensors holds non-finite thresholds \(\[nan, 0.2"),
        ("nan_threshold_init", "invalid prune_config: threshold_init must hold finite numbers"),
        ("string_novelty", "invalid prune_config: novelty must be True or False, got 'no'"),
    ],
)
def test_non_finite_thresholds_and_non_bool_options_are_refused_at_load(damage, match, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=6)
    ttp.patch_model(model, budget=0.5, prune_locations=(2, 3, 5), threshold_init=(0.1, 0.2, 0.3))
    ttp.save_pretrained(model, tmp_path)
    if damage == "nan_thresholds":
        state = load_file(tmp_path / "token_prune.safetensors")
        state["thresholds"][0] = float("nan")
        save_file(state, tmp_path / "token_prune.safetensors")
    else:
        meta = json.loads((tmp_path / "token_prune_config.json").read_text())
        key, value = ("threshold_init", [float("nan")] * 3) if damage == "nan_threshold_init" else ("novelty", "no")
        meta["prune_config"][key] = value
        (tmp_path / "token_prune_config.json").write_text(json.dumps(meta))
    with pytest.raises(ttp.CheckpointError, match=f"{tmp_path}: .*{match}"):
        ttp.from_pretrained(tmp_path)
