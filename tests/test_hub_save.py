"""save_pretrained for every timm family, into folders that already hold files, and what it leaves behind
when it fails; checkpoints that are damaged in ways a loader must name."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from conftest import images
from test_hub_local import hf_pruned, logits, timm_pruned
from test_timm_families import make as make_family

import timm_token_prune as ttp

transformers = pytest.importorskip("transformers")

TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 6, "num_heads": 4, "num_classes": 10}
FAMILIES = {"eva": "eva02_tiny_patch14_224", "beit": "beit_base_patch16_224"}


def family_pruned(family: str) -> torch.nn.Module:
    """A tiny eva / beit built by timm.create_model (so timm can rebuild it), patched and calibrated."""
    torch.manual_seed(0)
    model = timm.create_model(FAMILIES[family], pretrained=False, **TINY).eval()
    with torch.no_grad():  # sharpen the random attention so scores vary (see conftest._spread_weights)
        for block in model.blocks:
            for name in ("qkv", "q_proj", "k_proj"):
                if getattr(block.attn, name, None) is not None:
                    getattr(block.attn, name).weight.mul_(4.0)
        model.head.weight.normal_(0, 0.2)
    ttp.patch_model(model, budget=0.5, prune_locations=(2, 3, 5))
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    return model


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eva_and_beit_round_trip(family, tmp_path):
    model = family_pruned(family)
    x = images(4, seed=3)
    with torch.no_grad():
        expected = model(x)
        assert ttp.last_stats(model).kept_mean[-1] < ttp.last_stats(model).tokens
    ttp.save_pretrained(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "token_prune_config.json").read_text())
    assert meta["zoo"] == "timm" and meta["adapter"] == f"timm-{family}" and meta["architecture"] == FAMILIES[family]
    loaded = ttp.from_pretrained(tmp_path / "ckpt")
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        plain = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
        assert torch.equal(plain(x), ttp.unpatch_model(model)(x))


def test_a_failing_save_leaves_no_files_behind(tmp_path):
    model = ttp.patch_model(make_family("eva02"), budget=0.5)  # built by the class: timm cannot rebuild it
    with pytest.raises(ValueError, match="not built by timm.create_model"):
        ttp.save_pretrained(model, tmp_path / "new" / "ckpt")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not built by timm.create_model"):
        ttp.save_pretrained(model, tmp_path / "mine")
    assert files_of(tmp_path / "mine") == {"notes.txt": b"keep me"}


def test_an_existing_readme_is_kept_and_said_so(tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    (tmp_path / "notes.txt").write_text("keep me")
    model = timm_pruned()
    with pytest.warns(UserWarning, match="kept the existing .*README.md .*did not write it"):
        ttp.save_pretrained(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    x = images(3)
    with torch.no_grad():
        assert torch.equal(ttp.from_pretrained(tmp_path)(x), model(x))


def test_a_read_only_readme_is_never_replaced(tmp_path):
    ttp.save_pretrained(timm_pruned(), tmp_path, evaluation={"top1": 1.0})  # our card, then made read-only
    card = (tmp_path / "README.md").read_bytes()
    os.chmod(tmp_path / "README.md", 0o444)
    with pytest.warns(UserWarning, match="README.md .*read-only"):
        ttp.save_pretrained(timm_pruned(seed=1), tmp_path, evaluation={"top1": 2.0})
    assert (tmp_path / "README.md").read_bytes() == card
    assert json.loads((tmp_path / "token_prune_config.json").read_text())["evaluation"] == {"top1": 2.0}


def test_a_read_only_weight_file_stops_the_save_before_anything_changes(tmp_path):
    ttp.save_pretrained(timm_pruned(), tmp_path)
    before = files_of(tmp_path)
    os.chmod(tmp_path / "model.safetensors", 0o444)
    with pytest.raises(PermissionError, match="model.safetensors .*read-only"):
        ttp.save_pretrained(timm_pruned(seed=1), tmp_path)
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("recorded", [True, False], ids=["file-list", "older-save-without-list"])
def test_stale_shards_of_an_earlier_save_are_removed(recorded, tmp_path, monkeypatch):
    model = hf_pruned()
    cls = type(model)
    with monkeypatch.context() as patch:  # a large model: transformers writes shards and an index
        patch.setattr(cls, "save_pretrained", functools.partialmethod(cls.save_pretrained, max_shard_size="100KB"))
        ttp.save_pretrained(model, tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    if not recorded:  # as timm-token-prune 0.1 wrote it
        meta = json.loads((tmp_path / "token_prune_config.json").read_text())
        del meta["checkpoint_files"]
        (tmp_path / "token_prune_config.json").write_text(json.dumps(meta))
    (tmp_path / "notes.txt").write_text("keep me")
    ttp.save_pretrained(model, tmp_path)  # one file now
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "notes.txt", "token_prune.safetensors",
        "token_prune_config.json",
    ]
    x = images(3)
    with torch.no_grad():
        assert torch.equal(logits(ttp.from_pretrained(tmp_path)(x)), logits(model(x)))
        plain = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        assert torch.equal(plain(x).logits, ttp.unpatch_model(model)(x).logits)


def test_save_into_a_file_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        ttp.save_pretrained(timm_pruned(), tmp_path / "file")


# ---- damaged checkpoints -----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    ttp.save_pretrained(timm_pruned(), tmp_path)
    return tmp_path


def _edit_meta(folder, edit) -> None:
    path = folder / "token_prune_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


def test_prune_config_that_is_not_an_object(saved):
    _edit_meta(saved, lambda meta: {**meta, "prune_config": [0.5, 0.7]})
    with pytest.raises(ttp.CheckpointError, match="prune_config in token_prune_config.json must be a JSON object"):
        ttp.from_pretrained(saved)


def test_meta_that_is_not_an_object(saved):
    _edit_meta(saved, lambda meta: [meta])
    with pytest.raises(ttp.CheckpointError, match="must hold a JSON object, not a list"):
        ttp.from_pretrained(saved)


def test_truncated_thresholds_are_named(saved):
    data = (saved / "token_prune.safetensors").read_bytes()
    (saved / "token_prune.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ttp.CheckpointError, match="token_prune.safetensors is truncated or corrupt"):
        ttp.from_pretrained(saved)


def test_unknown_zoo(saved):
    _edit_meta(saved, lambda meta: {**meta, "zoo": "keras", "adapter": "keras-vit"})
    with pytest.raises(ttp.CheckpointError, match="unknown zoo 'keras'"):
        ttp.from_pretrained(saved)


# ---- checkpoint format -------------------------------------------------------------------------------
FORMAT_1 = Path(__file__).parent / "data" / "format1_timm"  # written by timm-token-prune 0.1.0


def test_format_1_checkpoints_keep_loading():
    """A checkpoint as 0.1.0 wrote it loads as the same dense model, config and thresholds patched by hand.
    (A format bump that converts thresholds changes the reference below through the same conversion.)"""
    from safetensors.torch import load_file

    meta = json.loads((FORMAT_1 / "token_prune_config.json").read_text())
    assert meta["format_version"] == 1 and "adapter" not in meta and "checkpoint_files" not in meta
    loaded = ttp.from_pretrained(FORMAT_1)
    reference = timm.create_model(f"local-dir:{FORMAT_1}", pretrained=True).eval()
    ttp.patch_model(reference, config=ttp.PruneConfig.from_dict(meta["prune_config"]))
    with torch.no_grad():  # format 1 thresholded raw scores; format 2 compares score x patches
        raw = load_file(FORMAT_1 / "token_prune.safetensors")["thresholds"]
        ttp.get_pruner(reference).thresholds.copy_(raw * ttp.get_pruner(reference).num_patches)
        x = images(6, seed=4, size=16)
        assert torch.equal(loaded(x), reference(x))
    stats = ttp.last_stats(loaded)
    assert stats.kept_mean[-1] < stats.tokens and ttp.get_pruner(loaded).config == ttp.get_pruner(reference).config


def test_format_2_checkpoints_keep_the_paper_locations(tmp_path):
    """Format 2 saved prune_locations=None for the paper's three points, the default then: it still loads
    with them (and the same thresholds and logits), not with today's default."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=6).eval()
    ttp.patch_model(model, budget=0.5, prune_locations="paper")
    ttp.calibrate(model, [images(16, seed=s) for s in (10, 11)])
    ttp.save_pretrained(model, tmp_path)

    def as_format_2(meta):
        config = {**meta["prune_config"], "prune_locations": None, "format_version": 2}
        return {**meta, "format_version": 2, "prune_config": config}

    _edit_meta(tmp_path, as_format_2)
    loaded = ttp.from_pretrained(tmp_path)
    assert ttp.get_pruner(loaded).locations == ttp.get_pruner(model).locations == (2, 4, 5)
    assert ttp.get_pruner(loaded).config.prune_locations == "paper"
    x = images(6, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
