"""The command line: demo options, benchmark, visualize, export, and its errors."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from timm_token_prune.cli import main


def test_benchmark_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "test_vit", "--batch", "4", "--repeats", "1", "--static", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["variants"]) == {"dense", "pruned@0.65", "patched@1", "static@0.65"}
    assert results["variants"]["static@0.65"]["flops_ratio"] < 0.8
    assert "static@0.65" in capsys.readouterr().out


def test_visualize_and_export(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["visualize", "test_vit", str(tmp_path / "red.png"), "--out", str(tmp_path / "kept.png")]) == 0
    assert Image.open(tmp_path / "kept.png").size[0] > 0
    assert main(["export", "test_vit", "--onnx", str(tmp_path / "m.onnx")]) == 0
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]


def test_errors_exit_2(tmp_path, capsys):
    assert main(["visualize", "test_vit", str(tmp_path / "missing.png")]) == 2
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "test_vit", "--budget", "0"])
    assert exit_info.value.code == 2


def one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["visualize", "no_such_model", "IMAGE"], "'no_such_model' is not a checkpoint folder, a Hub repo id"),
        (["visualize", "test_vit", "NOT_AN_IMAGE"], "not an image file that PIL can read"),
        (["visualize", "resnet18", "IMAGE"], "cannot patch ResNet: no adapter knows it"),
        (["export", "resnet18", "--onnx", "OUT"], "cannot patch ResNet"),
        (["visualize", "test_vit", "IMAGE", "--out", "kept.xyz"], "not an image file name PIL can write"),
        (["benchmark", "no_such_model"], "unknown model 'no_such_model'"),
    ],
)
def test_bad_command_lines_print_one_line(argv, pattern, tmp_path, capsys):
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "image.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    replace = {"IMAGE": str(tmp_path / "image.png"), "NOT_AN_IMAGE": str(tmp_path / "not_an_image.png"),
               "OUT": str(tmp_path / "m.onnx")}
    argv = [replace.get(a, a) for a in argv]
    argv = [str(tmp_path / a) if a.endswith(".xyz") else a for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "not_an_image.png"]


def test_info_errors_print_one_line(hub, tmp_path, monkeypatch, capsys):
    assert main(["info", "org/missing"]) == 2
    one_line_error(capsys, "org/missing: no such repository")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["info", "org/never-downloaded"]) == 2
    err = one_line_error(capsys, "org/never-downloaded: not in the local cache and downloads are off")
    assert "not a timm-token-prune checkpoint" not in err


def test_visualize_and_export_a_transformers_checkpoint(tmp_path):
    from test_hub_local import hf_pruned

    import timm_token_prune as ttp

    ttp.save_pretrained(hf_pruned(), tmp_path / "ckpt")
    Image.new("RGB", (50, 30), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["visualize", str(tmp_path / "ckpt"), str(tmp_path / "red.png"), "--out", str(tmp_path / "k.png")]) == 0
    assert Image.open(tmp_path / "k.png").size[0] > 0
    assert main(["export", str(tmp_path / "ckpt"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
