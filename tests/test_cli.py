"""The command line: demo options, benchmark, visualize, export, and its errors."""

from __future__ import annotations

import json

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
