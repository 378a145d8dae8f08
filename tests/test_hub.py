"""Push to and load from the Hub, against a local fake of its HTTP API (tests/hub_server.py)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import images
from test_hub_local import hf_pruned, logits, timm_pruned

import timm_token_prune as ttp
from timm_token_prune.cli import main as cli

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("build", [timm_pruned, hf_pruned], ids=["timm", "transformers"])
def test_push_then_load_and_plain_zoo_loading(build, hub, monkeypatch):
    model = build()
    x = images(4, seed=2)
    with torch.no_grad():
        expected = logits(model(x))
    commit = ttp.push_to_hub(model, "org/pruned", commit_message="first")
    files = hub.files("org/pruned")
    assert {"token_prune_config.json", "token_prune.safetensors", "config.json", "model.safetensors"} <= set(files)
    assert b'ttp.from_pretrained("org/pruned")' in files["README.md"]
    loaded = ttp.from_pretrained("org/pruned", revision=commit.oid)
    with torch.no_grad():
        assert torch.equal(logits(loaded(x)), expected)
        dense = logits(ttp.unpatch_model(model)(x))
        if build is timm_pruned:
            plain = timm.create_model("hf-hub:org/pruned", pretrained=True).eval()
        else:
            plain = transformers.AutoModelForImageClassification.from_pretrained("org/pruned").eval()
        assert torch.equal(logits(plain(x)), dense)
    # offline, from the cache filled above
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    offline = ttp.from_pretrained("org/pruned")
    with torch.no_grad():
        assert torch.equal(logits(offline(x)), expected)
    with pytest.raises(ttp.CheckpointError, match="org/never-pushed: .*offline"):
        ttp.from_pretrained("org/never-pushed")


def test_bad_repos(hub, tmp_path):
    with pytest.raises(ttp.CheckpointError, match="org/missing: no such repository"):
        ttp.from_pretrained("org/missing")
    ttp.push_to_hub(timm_pruned(), "org/pruned")
    with pytest.raises(ttp.CheckpointError, match="org/pruned: revision 'v9' does not exist"):
        ttp.from_pretrained("org/pruned", revision="v9")
    hub.put_files("org/plain", {"config.json": b"{}", "model.safetensors": b"x"})
    with pytest.raises(ttp.CheckpointError, match="org/plain has no token_prune_config.json"):
        ttp.from_pretrained("org/plain")
    meta = json.loads(hub.files("org/pruned")["token_prune_config.json"])
    hub.put_files("org/pruned", {"token_prune_config.json": json.dumps({**meta, "format_version": 7}).encode()})
    with pytest.raises(ttp.CheckpointError, match="format 7"):
        ttp.from_pretrained("org/pruned")
    weights = hub.files("org/pruned")["model.safetensors"]
    hub.put_files(
        "org/pruned",
        {"token_prune_config.json": json.dumps(meta).encode(), "model.safetensors": weights[: len(weights) // 3]},
    )
    with pytest.raises(ttp.CheckpointError, match="org/pruned: could not load the timm model"):
        ttp.from_pretrained("org/pruned")


def test_pull_request_and_foreign_readme_kept(hub):
    hub.put_files("org/card", {"README.md": b"# my own card\n"})
    commit = ttp.push_to_hub(timm_pruned(), "org/card", create_pr=True)
    assert commit.pr_url and hub.files("org/card")["README.md"] == b"# my own card\n"
    assert "token_prune_config.json" not in hub.files("org/card")
    assert "token_prune_config.json" in hub.files("org/card", "refs/pr/1")
    assert hub.files("org/card", "refs/pr/1")["README.md"] == b"# my own card\n"


def test_cli_push_and_info(hub, tmp_path, capsys):
    ttp.save_pretrained(hf_pruned(), tmp_path / "ckpt")
    assert cli(["push", str(tmp_path / "ckpt"), "org/cli", "--message", "from the cli"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert cli(["info", "org/cli"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["zoo"] == "transformers" and shown["prune_config"]["budget"] == 0.5
    assert cli(["info", str(tmp_path)]) == 2
    assert "not a timm-token-prune checkpoint" in capsys.readouterr().err
