"""The command line: demo options, benchmark, visualize, export, and its errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from timm_token_prune.cli import main
from timm_token_prune.files import umask



def test_benchmark_writes_json(tmp_path, one_thread, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "test_vit", "--batch", "4", "--repeats", "1", "--static", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask()  # not mkstemp's private 0o600
    assert set(results["variants"]) == {"dense", "pruned@0.65", "patched@1", "static@0.65"}
    assert results["variants"]["static@0.65"]["flops_ratio"] < 0.8
    assert results["repeats"] == 1 and results["timing"]["batch"] == {"spread": None, "reliable": None}
    out = capsys.readouterr().out
    assert "static@0.65" in out and "spread is not known" in out


def test_visualize_and_export(tmp_path, one_thread):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["visualize", "test_vit", str(tmp_path / "red.png"), "--out", str(tmp_path / "kept.png")]) == 0
    assert Image.open(tmp_path / "kept.png").size[0] > 0
    assert (tmp_path / "kept.png").stat().st_mode & 0o777 == 0o666 & ~umask()
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


def test_visualize_and_export_a_transformers_checkpoint(tmp_path, one_thread, capsys):
    from test_hub_local import hf_pruned

    import timm_token_prune as ttp

    ttp.save_pretrained(hf_pruned(), tmp_path / "ckpt")
    Image.new("RGB", (50, 30), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["visualize", str(tmp_path / "ckpt"), str(tmp_path / "red.png"), "--out", str(tmp_path / "k.png")]) == 0
    assert Image.open(tmp_path / "k.png").size[0] > 0
    out = capsys.readouterr().out
    assert "calibrated" not in out and "random weights" not in out  # a checkpoint keeps its own thresholds
    assert main(["export", str(tmp_path / "ckpt"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_bare_command_prints_usage(monkeypatch, capsys):
    monkeypatch.setattr("timm_token_prune.cli._demo", lambda args: pytest.fail("a bare command ran the demo"))
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: timm-token-prune")
    assert all(command in out for command in ("demo", "benchmark", "visualize", "export", "push", "info"))


def test_visualize_random_weights_says_so_and_calibrates_on_the_image(tmp_path, monkeypatch, one_thread, capsys):
    from PIL import ImageDraw

    image = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(image).polygon([(100, 20), (20, 180), (180, 180)], fill="black")
    image.save(tmp_path / "triangle.png")
    captions, draw_text = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: captions.append(text) or draw_text(self, xy, text, *a, **k))
    argv = ["visualize", "test_vit", str(tmp_path / "triangle.png"), "--out", str(tmp_path / "k.png"), "--budget", "0.5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test_vit has random weights" in out
    # calibrated on this image (not on noise): it runs at the budget
    ratio = float(re.search(r"calibrated on \S+triangle.png: it runs at ([0-9.]+) of the dense FLOPs", out).group(1))
    assert abs(ratio - 0.5) <= 0.02
    # the printed counts are the captions' counts: patches only
    assert "class token not counted" in out
    printed = dict(re.findall(r"before block (\d+) (\d+/\d+)", out))
    shown = dict(re.findall(r"before block (\d+): (\d+/\d+)", " ".join(captions)))
    assert shown and all(printed[block] == count for block, count in shown.items())
    assert all(count.endswith("/100") for count in printed.values())  # test_vit: 10 x 10 patches


def synthetic_times(dense: list[float], pruned: list[float]) -> dict:
    """Timings as `time_variants` returns them, batch and batch 1 alike."""
    return {(v, k): list(t) for v, t in (("dense", dense), ("pruned", pruned)) for k in ("batch", "single")}


def test_ratio_spread_and_stability_from_synthetic_timings():
    from timm_token_prune.benchmark import is_stable, ratio_spread, timing_spread

    assert ratio_spread([1.0], [0.5]) is None  # one repeat: not known
    assert ratio_spread([1.0, 1.0, 1.0], [0.5, 0.5, 3.0]) == 0.0  # one outlier in three: the median holds
    assert ratio_spread([1.0, 2.0, 4.0], [0.5, 1.0, 2.0]) == 0.0  # a machine slowing down alike for both
    assert ratio_spread([1.0, 1.0, 1.0], [0.5, 2.0, 1.0]) == pytest.approx(0.5)
    assert is_stable(synthetic_times([1.0, 1.1, 0.9], [0.6, 0.63, 0.56]))
    assert not is_stable(synthetic_times([1.0, 1.0, 1.0], [0.5, 2.0, 1.0]))
    assert not is_stable(synthetic_times([1.0], [0.5]))
    assert timing_spread(synthetic_times([1.0], [0.5]))["batch"] == {"spread": None, "reliable": None}


@pytest.mark.parametrize("repeats, max_repeats, pruned, done", [
    (3, None, [0.5, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5], 5),  # noisy, then stable: stops at 5
    (3, None, [0.5, 1.0, 2.0] * 4, 9),  # never stable: stops at 3 x repeats
    (3, 4, [0.5, 1.0, 2.0] * 4, 4),
    (3, None, [0.5] * 9, 3),  # stable at once
    (1, None, [0.5, 2.0] * 6, 1),  # one repeat asked, one done
])
def test_time_variants_repeats_until_stable(monkeypatch, repeats, max_repeats, pruned, done):
    from timm_token_prune import benchmark

    script = {"dense": iter([1.0] * 24), "pruned": iter(value for value in pruned for _ in range(2))}
    monkeypatch.setattr(benchmark, "seconds_per_call", lambda model, x, iters: next(script[model]))
    inputs = {"batch": torch.zeros(4), "single": torch.zeros(1)}
    times = benchmark.time_variants({"dense": "dense", "pruned": "pruned"}, inputs, repeats, max_repeats)
    assert len(times[("dense", "batch")]) == len(times[("pruned", "single")]) == done


def synthetic_results(dense: list[float], pruned: list[float]) -> dict:
    from timm_token_prune.benchmark import timing_spread

    row = dict(gflops=1.0, flops_ratio=0.6, kept_tokens=[150.0, 100.0], images_per_s=100.0, latency_ms=10.0,
               throughput_ratio=0.34, latency_speedup=0.34)
    return {"model": "m", "budget": 0.6, "batch": 8, "repeats": len(dense), "threads": 2, "tokens": 197,
            "timing": timing_spread(synthetic_times(dense, pruned)),
            "variants": {"dense": {**row, "flops_ratio": 1.0, "kept_tokens": None, "throughput_ratio": 1.0,
                                   "latency_speedup": 1.0}, "pruned@0.6": row}}


def test_demo_says_the_machine_is_too_busy_instead_of_printing_a_slowdown(monkeypatch, capsys):
    noisy = synthetic_results([1.0] * 9, [0.5, 2.0, 3.0] * 3)
    monkeypatch.setattr("timm_token_prune.benchmark.compare", lambda *args, **kwargs: noisy)
    assert main(["demo", "--model", "test_vit"]) == 0
    out = capsys.readouterr().out
    assert "TIMING UNRELIABLE" in out and "too busy" in out and "this is not a slowdown" in out
    assert "0.34" not in out  # the slowdown figure is not printed
    assert re.search(r"pruned@0.6 .* - .* - *$", out, re.M)


def test_benchmark_prints_the_spread_of_reliable_timings(monkeypatch, capsys):
    from timm_token_prune.benchmark import format_table

    quiet = format_table(synthetic_results([1.0, 1.02, 0.98], [2.9, 2.95, 3.0]))
    assert "0.34" in quiet and "UNRELIABLE" not in quiet
    assert re.search(r"between 3 interleaved repeats: img/s ±\d+%, bs1 ms ±\d+%", quiet)
    assert "spread is not known" in format_table(synthetic_results([1.0], [3.0]))
