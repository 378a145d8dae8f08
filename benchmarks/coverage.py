"""Coverage report: which timm and transformers Vision Transformers `patch_model` handles, checked end to end.

    python benchmarks/coverage.py --output docs/coverage.md      # every model (timm families + hf)
    python benchmarks/coverage.py --family deit --limit 3        # a quick look
    python benchmarks/coverage.py --family hf --filter 'CLIP*'   # --filter is an fnmatch pattern on names

Every timm model of the vision_transformer, deit, eva and beit modules and every transformers class in
`HF_CLASSES` is built with random weights at a tiny size (4 blocks, 8 x 8 patches, 10 classes; fewer
overrides if a model refuses them) and classified:

    patched      patch_model(model, 1.0) gives the dense output (float32, atol = rtol = 1e-4), unpatch_model
                 restores it, and patch_model(model, 0.65) + calibrate keeps fewer tokens, with finite
                 outputs of the dense shapes
    unsupported  patch_model raises UnsupportedModelError (its reason is shown)
    failed       anything else: another exception, or a mismatch
    skipped      the model could not be built at a tiny size

Every patched model then goes through, each reported in its own column (ok / failed with the reason):

    save -> load   save_pretrained then from_pretrained gives exactly the same outputs
    train step     model.train(), a forward on 8 random images, cross-entropy on the logits (a feature
                   model: the mean square of its output) + budget_loss, backward: the loss is finite and
                   the thresholds get a finite gradient, nonzero at one stage at least (the calibrated
                   thresholds as they are: with the straight-through mask only tokens within a few
                   temperatures of a threshold carry gradient, and a zero gradient is reported as such);
                   left blank for models patched with restore_tokens (PATCH_OPTIONS: LLaVA), eval-only
    freeze + ONNX  the models in ONNX_MODELS: freeze, export_onnx with a 1-image example, and
                   onnxruntime at batch 2 matches the frozen model (atol = rtol = 1e-3); image-text models
                   export their image features. Blank for the others (SigLIP 2 NaFlex does not export yet)

The Markdown report goes to stdout (and to --output, written atomically), one progress line per model
to stderr. Exit status 1 if any model or check failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import gc
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # check this checkout, not another installed copy
import timm_token_prune as ttp
from timm_token_prune.adapters import patched_adapter
from timm_token_prune.batches import logits_of
from timm_token_prune.errors import UnsupportedModelError
from timm_token_prune.files import atomic_file

try:
    import transformers
except ImportError:  # the hf family is then reported as skipped
    transformers = None

TIMM_FAMILIES = ("vision_transformer", "deit", "eva", "beit")
FAMILIES = (*TIMM_FAMILIES, "hf")
RESULTS = ("patched", "unsupported", "failed", "skipped")
CHECKS = {"save": "save -> load", "train": "train step", "onnx": "freeze + ONNX"}  # key -> column title
TRAIN_BATCH = 8
ONNX_ATOL = ONNX_RTOL = 1e-3
# the freeze + ONNX check: one model per timm family (and distilled DeiT), one class per transformers family
ONNX_MODELS = {
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "eva02_tiny_patch14_224", "beit_base_patch16_224",
    "ViTForImageClassification", "DeiTForImageClassificationWithTeacher", "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification", "ViTMSNForImageClassification", "CLIPVisionModelWithProjection",
    "CLIPForImageClassification", "SiglipVisionModel", "SiglipForImageClassification", "BeitForImageClassification",
    "Data2VecVisionForImageClassification", "CLIPModel", "SiglipModel",
}
# blocks, patches per side (8 x 8: with 4 blocks, fewer leave no room to reach the budget once register
# tokens are kept), classes, images
DEPTH, GRID, CLASSES, BATCH = 4, 8, 10, 2
MAX_FULL_PARAMS = 400e6  # a model built without the depth override must stay below this
ATOL = RTOL = 1e-4
BUDGET = 0.65

# transformers classes (docs/models.md lists them as supported or as raising a clear error) -> config kind
HF_CLASSES = {
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "DeiTModel": "deit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2_reg",
    "Dinov2WithRegistersForImageClassification": "dinov2_reg",
    "ViTMSNModel": "vit_msn",
    "ViTMSNForImageClassification": "vit_msn",
    "CLIPVisionModel": "clip_vision",
    "CLIPVisionModelWithProjection": "clip_vision",
    "CLIPForImageClassification": "clip",
    "SiglipVisionModel": "siglip_vision",
    "SiglipForImageClassification": "siglip",
    "BeitModel": "beit",
    "BeitForImageClassification": "beit",
    "Data2VecVisionModel": "data2vec",
    "Data2VecVisionForImageClassification": "data2vec",
    "ViTMAEModel": "vit_mae",
    "CLIPModel": "clip",
    "SiglipModel": "siglip",
    "Siglip2VisionModel": "siglip2_vision",  # the Siglip2 classes only if this transformers has them
    "Siglip2ForImageClassification": "siglip2",
    "Siglip2Model": "siglip2",
    "LlavaForConditionalGeneration": "llava",
}
# classes patched with more than the defaults: a vision-language model's projector reads the full grid
PATCH_OPTIONS = {"LlavaForConditionalGeneration": {"restore_tokens": True}}
HF_PATCH, HF_VOCAB, HF_TEXT_LEN = 8, 100, 8
HF_SIZE = GRID * HF_PATCH
_HF_WIDTH = {"hidden_size": 64, "num_hidden_layers": DEPTH, "num_attention_heads": 4}
_HF_VISION = dict(_HF_WIDTH, intermediate_size=128, image_size=HF_SIZE, patch_size=HF_PATCH)
_HF_TEXT = dict(
    _HF_WIDTH, intermediate_size=128, vocab_size=HF_VOCAB, max_position_embeddings=16, pad_token_id=1, bos_token_id=2,
    eos_token_id=3
)


@dataclass
class Built:
    """A model ready to check: its forward inputs, one calibration batch and its dense outputs."""

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    calib: Any
    reference: dict[str, torch.Tensor]
    cls: str
    note: str = ""  # how it was built, when not with the usual overrides


@dataclass
class Result:
    family: str
    name: str
    cls: str
    result: str
    detail: str
    seconds: float
    note: str = ""  # how it was built, when not with the usual overrides
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)  # CHECKS key -> ("ok" / "failed", detail)


class Mismatch(AssertionError):
    """A patched model's output differs from the dense one, or pruning did not prune."""


# --------------------------------------------------------------------------- forward and outputs


def forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs to compare, by name (seeded, so random masking such as ViTMAE's repeats)."""
    torch.manual_seed(0)
    with torch.no_grad():
        return outputs_of(model(**inputs))


def outputs_of(output: Any) -> dict[str, torch.Tensor]:
    """timm: the tensor(s); transformers: `logits` if present, else the hidden state / pooled / embeddings."""
    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, (tuple, list)) and not hasattr(output, "keys"):
        return {f"output[{i}]": o for i, o in enumerate(output) if isinstance(o, torch.Tensor)}
    if getattr(output, "logits", None) is not None:
        return {"logits": output.logits}
    keys = ("last_hidden_state", "pooler_output", "image_embeds", "logits_per_image")
    found = {k: getattr(output, k) for k in keys if isinstance(getattr(output, k, None), torch.Tensor)}
    if not found:
        raise TypeError(f"no output to compare in a {type(output).__name__}")
    return found


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], when: str) -> float:
    """Max abs difference over all outputs; raises `Mismatch` beyond the tolerance."""
    worst = 0.0
    for key, ref in want.items():
        out = got.get(key)
        if out is None or out.shape != ref.shape:
            shape = None if out is None else tuple(out.shape)
            raise Mismatch(f"{when}: {key} has shape {shape}, dense {tuple(ref.shape)}")
        diff = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
        try:
            torch.testing.assert_close(out.float(), ref.float(), atol=ATOL, rtol=RTOL)
        except AssertionError:
            raise Mismatch(f"{when}: {key} differs from dense, max abs diff {diff:.2e}") from None
        worst = max(worst, diff)
    return worst


# --------------------------------------------------------------------------- the check


@dataclass
class Step:
    """The step of the check now running, to say where an exception came from."""

    name: str = "patch_model(model, 1.0)"


def classify(built: Built) -> tuple[str, str]:
    """(result, detail) for one built model; the model is patched in place."""
    model, step = built.model.eval(), Step()
    try:
        ttp.patch_model(model, 1.0, **PATCH_OPTIONS.get(type(model).__name__, {}))
    except UnsupportedModelError as error:
        return "unsupported", unsupported_reason(error)
    except Exception as error:  # noqa: BLE001 - everything else is a failure to report
        return "failed", f"{step.name}: {describe(error)}"
    try:
        return "patched", check_patched(built, step)
    except Mismatch as error:
        return "failed", describe(error)
    except Exception as error:  # noqa: BLE001
        return "failed", f"{step.name}: {describe(error)}"


def check_patched(built: Built, step: Step) -> str:
    """Budget 1.0 equals dense, unpatch restores it, budget 0.65 calibrated prunes; returns the detail."""
    model = built.model
    step.name = "forward at budget 1.0"
    diff = compare(forward(model, built.inputs), built.reference, "budget 1.0")
    step.name = "unpatch_model"
    ttp.unpatch_model(model)
    compare(forward(model, built.inputs), built.reference, "after unpatch_model")
    step.name = f"patch_model(model, {BUDGET})"
    ttp.patch_model(model, BUDGET, **PATCH_OPTIONS.get(type(model).__name__, {}))
    step.name = "calibrate"
    ttp.calibrate(model, [built.calib], BUDGET)
    step.name = f"forward at budget {BUDGET}"
    model.eval()
    pruned = forward(model, built.inputs)
    for key, ref in built.reference.items():
        out = pruned.get(key)
        if out is None or not pruned_shape_ok(key, out, ref):
            shape = None if out is None else tuple(out.shape)
            raise Mismatch(f"budget {BUDGET}: {key} has shape {shape}, dense {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            raise Mismatch(f"budget {BUDGET}: {key} is not finite")
    stats = ttp.last_stats(model)
    if not stats.kept_mean[-1] < stats.tokens:
        raise Mismatch(f"budget {BUDGET}: last stage keeps {stats.kept_mean[-1]:g} of {stats.tokens} tokens")
    kept = "/".join(f"{k:.1f}" for k in stats.kept_mean)
    return f"max diff {diff:.1e}; FLOPs ratio {stats.flops_ratio:.3f} at {BUDGET} (kept {kept} of {stats.tokens})"


def pruned_shape_ok(key: str, out: torch.Tensor, ref: torch.Tensor) -> bool:
    """The dense shape, except that a pruned last_hidden_state holds only the kept tokens (at most N)."""
    if key != "last_hidden_state" or out.dim() != 3:
        return out.shape == ref.shape
    return out.shape[0] == ref.shape[0] and out.shape[2] == ref.shape[2] and 0 < out.shape[1] <= ref.shape[1]


def unsupported_reason(error: Exception) -> str:
    """The message without 'cannot patch X: ' and the trailing list of supported models."""
    text = str(error).split(" Supported:")[0].strip().rstrip(".")
    return re.sub(r"^cannot patch \w+: ", "", text)


def describe(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --------------------------------------------------------------------------- checks of a patched model


def run_checks(built: Built, onnx: bool) -> dict[str, tuple[str, str]]:
    """The CHECKS of a model patched at BUDGET and calibrated: key -> ("ok" / "failed", detail)."""
    checks = {"save": check_round_trip, "train": check_train_step}
    if ttp.get_pruner(built.model).config.restore_tokens:  # restoring is eval-only: such a model trains dense
        checks.pop("train")
    if onnx:
        checks["onnx"] = check_onnx
    results = {}
    for key, check in checks.items():
        try:
            results[key] = ("ok", check(built))
        except Exception as error:  # noqa: BLE001 - a failed check is reported, the others still run
            results[key] = ("failed", describe(error))
        finally:
            built.model.eval()
    return results


def images_of(built: Built, batch: int) -> torch.Tensor:
    """`batch` random images of the model's input shape."""
    calib = built.calib["pixel_values"] if isinstance(built.calib, dict) else built.calib
    return torch.randn(batch, *calib.shape[1:], generator=torch.Generator().manual_seed(1))


def call(built: Built, images: torch.Tensor) -> Any:
    """The model on `images`, passed as its image input (timm's x, transformers' pixel_values), with the text
    input of an image-text model as it is (contrastive logits need no matching batch)."""
    text = {k: v for k, v in built.inputs.items() if k == "input_ids"}
    if "spatial_shapes" in built.inputs:  # NaFlex: full square grids
        side = round(images.shape[1] ** 0.5)
        text["pixel_attention_mask"] = torch.ones(images.shape[:2], dtype=torch.long)
        text["spatial_shapes"] = torch.tensor([[side, side]] * len(images))
    return built.model(**{next(iter(built.inputs)): images}, **text)


def check_round_trip(built: Built) -> str:
    """save_pretrained -> from_pretrained: exactly the same outputs."""
    model = built.model.eval()
    want = forward(model, built.inputs)
    with tempfile.TemporaryDirectory() as folder:
        ttp.save_pretrained(model, folder)
        got = forward(ttp.from_pretrained(folder), built.inputs)
    for key, ref in want.items():
        if key not in got or got[key].shape != ref.shape or not torch.equal(got[key], ref):
            diff = (got[key].float() - ref.float()).abs().max().item() if key in got else float("nan")
            raise Mismatch(f"{key} differs after save -> load (max abs diff {diff:.1e})")
    return "equal"


def check_train_step(built: Built) -> str:
    """One training step's loss and threshold gradient (no optimizer step: the model is unchanged)."""
    model = built.model
    pruner = ttp.get_pruner(model)
    model.zero_grad(set_to_none=True)
    model.train()
    images = images_of(built, TRAIN_BATCH)
    torch.manual_seed(0)
    output = call(built, images)
    try:
        logits = logits_of(output)
    except TypeError:
        logits = None
    if logits is not None and logits.dim() == 2 and logits.shape[-1] > 1:
        labels = torch.randint(0, logits.shape[-1], (TRAIN_BATCH,), generator=torch.Generator().manual_seed(2))
        task, kind = nn.functional.cross_entropy(logits.float(), labels), "CE"
    else:  # a feature model
        task, kind = next(iter(outputs_of(output).values())).float().pow(2).mean(), "feature MSE"
    loss = task + ttp.budget_loss(model)
    loss.backward()
    grad = pruner.thresholds.grad
    model.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        raise Mismatch(f"the {kind} + budget loss is {loss.item()}")
    if grad is None or not torch.isfinite(grad).all():
        raise Mismatch(f"threshold gradient {None if grad is None else grad.tolist()}")
    nonzero = int((grad != 0).sum())
    if nonzero == 0:
        raise Mismatch(f"threshold gradient is exactly zero at all {grad.numel()} stages (no score near a threshold)")
    return f"{kind} + budget loss {loss.item():.3f}; threshold gradient nonzero at {nonzero}/{grad.numel()} stages"


def check_onnx(built: Built) -> str:
    """freeze, export with a 1-image example, run onnxruntime at batch 2 (a dynamic batch) against the model."""
    import onnxruntime

    model = built.model.eval()
    images = images_of(built, 2)
    ttp.freeze(model, [images_of(built, 8)])
    try:
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = ttp.export_onnx(model, Path(folder) / "model.onnx", images[:1])
            except Exception as error:
                if dense_export_fails(model, images[:1], Path(folder) / "dense.onnx"):
                    raise NotExportable(f"the unpatched model does not export either: {describe(error)}") from error
                raise
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_outputs()[0].name
            (got,) = session.run(None, {"pixel_values": images.numpy()})
        with torch.no_grad():  # the image path the export traced (an image-text model: get_image_features)
            output = patched_adapter(model, "export")[0].forward_images(model, images)
        want = logits_of(output) if name == "logits" else exported_features(output)
        got = torch.from_numpy(got)
        diff = (got - want).abs().max().item()
        torch.testing.assert_close(got, want, atol=ONNX_ATOL, rtol=ONNX_RTOL)
    finally:
        ttp.unfreeze(model)
    return f"{name}, max diff {diff:.1e}"


def dense_export_fails(model: nn.Module, example: torch.Tensor, path: Path) -> bool:
    """Whether the same model, unpatched, fails torch.onnx.export too (a limitation of the zoo or exporter)."""
    dense = ttp.unpatch_model(copy.deepcopy(model)).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Logits(dense), (example,), str(path), dynamo=False, opset_version=17)
    except Exception:  # noqa: BLE001
        return True
    return False


class NotExportable(RuntimeError):
    """torch.onnx cannot export the model, patched or not."""


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        return output if isinstance(output, torch.Tensor) else next(iter(outputs_of(output).values()))


def exported_features(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return next(getattr(output, k) for k in ("image_embeds", "pooler_output") if getattr(output, k, None) is not None)


# --------------------------------------------------------------------------- timm models


def small_overrides(name: str) -> dict[str, Any]:
    match = re.search(r"patch(\d+)", name)
    patch = int(match.group(1)) if match else 16
    return {"depth": DEPTH, "img_size": GRID * patch, "num_classes": CLASSES}


def per_block_settings(name: str) -> dict[str, Any]:
    """Settings given per block (Sapiens2's num_kv_heads), cut to DEPTH blocks: first, two middle, last."""
    try:
        with torch.device("meta"):
            blocks = list(timm.create_model(name, pretrained=False).blocks)
    except Exception:  # noqa: BLE001 - then there is nothing to cut
        return {}
    heads = [getattr(b.attn, "num_kv_heads", None) for b in blocks]
    if len(blocks) <= DEPTH or all(h is None for h in heads):
        return {}
    middle = len(blocks) // 2
    return {"num_kv_heads": tuple(heads[i] for i in (0, middle - 1, middle, len(blocks) - 1))}


def image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = model.pretrained_cfg["input_size"][-2:]
    return (size, size) if isinstance(size, int) else tuple(size)


def parameters_on_meta(name: str, overrides: dict[str, Any]) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **overrides)
    return sum(p.numel() for p in model.parameters())


def build_timm(name: str) -> Built:
    """Build tiny, else with fewer overrides (the first that gives a working dense forward)."""
    errors: list[str] = []
    small = small_overrides(name)
    built = try_build(name, small, errors)
    if built is not None:
        return built
    extra = per_block_settings(name)
    fallbacks = [dict(small, **extra)] if extra else []
    fallbacks += [dict(depth=DEPTH, num_classes=CLASSES, **extra), dict(depth=DEPTH, **extra), {}]
    for overrides in fallbacks:
        built = try_build(name, overrides, errors)
        if built is not None:
            built.note = f"built with {format_overrides(overrides)}"
            return built
    raise BuildError("; ".join(errors))


def try_build(name: str, overrides: dict[str, Any], errors: list[str]) -> Built | None:
    """The model built with `overrides` and its dense outputs, or None (the reason appended to `errors`)."""
    try:
        if "depth" not in overrides and parameters_on_meta(name, overrides) > MAX_FULL_PARAMS:
            errors.append(f"{format_overrides(overrides)}: over {MAX_FULL_PARAMS / 1e6:.0f}M parameters at full size")
            return None
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **overrides).eval()
        images = torch.randn(BATCH, 3, *image_size(model), generator=torch.Generator().manual_seed(0))
        inputs = {"x": images}
        return Built(model, inputs, images, forward(model, inputs), type(model).__name__)
    except Exception as error:  # noqa: BLE001 - the caller tries fewer overrides
        errors.append(f"{format_overrides(overrides)}: {describe(error, 120)}")
        gc.collect()
        return None


def format_overrides(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "no overrides"


class BuildError(RuntimeError):
    """The model could not be built (and run dense) at a tiny size."""


# --------------------------------------------------------------------------- transformers models


def hf_config(kind: str):
    """A tiny config of `kind` (composite ones get tiny vision and text towers)."""
    t = transformers
    simple = {
        "vit": (t.ViTConfig, _HF_VISION),
        "deit": (t.DeiTConfig, _HF_VISION),
        "vit_msn": (t.ViTMSNConfig, _HF_VISION),
        "vit_mae": (t.ViTMAEConfig, _HF_VISION),
        "dinov2": (t.Dinov2Config, dict(_HF_WIDTH, mlp_ratio=2, image_size=HF_SIZE, patch_size=HF_PATCH)),
        "dinov2_reg": (
            t.Dinov2WithRegistersConfig,
            dict(_HF_WIDTH, mlp_ratio=2, image_size=HF_SIZE, patch_size=HF_PATCH, num_register_tokens=4),
        ),
        "beit": (t.BeitConfig, dict(_HF_VISION, use_relative_position_bias=True)),
        "data2vec": (t.Data2VecVisionConfig, dict(_HF_VISION, use_relative_position_bias=True)),
        "clip_vision": (t.CLIPVisionConfig, dict(_HF_VISION, projection_dim=32)),
        "siglip_vision": (t.SiglipVisionConfig, _HF_VISION),
    }
    if kind in simple:
        cls, options = simple[kind]
        return cls(**options, num_labels=CLASSES)
    if kind == "siglip2_vision":
        vision = {k: v for k, v in _HF_VISION.items() if k != "image_size"}
        return t.Siglip2VisionConfig(**vision, num_patches=(HF_SIZE // HF_PATCH) ** 2)
    if kind == "clip":
        return t.CLIPConfig(
            text_config=t.CLIPTextConfig(**_HF_TEXT, projection_dim=32),
            vision_config=hf_config("clip_vision"),
            projection_dim=32,
            num_labels=CLASSES,
        )
    if kind == "siglip2":
        return t.Siglip2Config(
            text_config=t.Siglip2TextConfig(**_HF_TEXT), vision_config=hf_config("siglip2_vision"), num_labels=CLASSES
        )
    if kind == "llava":  # a tiny CLIP tower and a tiny Llama; one image token per patch (no class token)
        vision = {k: v for k, v in _HF_VISION.items()}
        text = t.LlamaConfig(**dict(_HF_TEXT, vocab_size=HF_VOCAB + 1, max_position_embeddings=128), num_key_value_heads=2)
        return t.LlavaConfig(
            vision_config=t.CLIPVisionConfig(**vision), text_config=text, image_token_index=HF_VOCAB,
            image_seq_length=GRID * GRID,
        )
    if kind == "siglip":
        return t.SiglipConfig(
            text_config=t.SiglipTextConfig(**_HF_TEXT), vision_config=hf_config("siglip_vision"), num_labels=CLASSES
        )
    raise ValueError(f"unknown config kind {kind!r}")


def hf_inputs(name: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Forward inputs and one calibration batch for the transformers class `name`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, HF_SIZE, HF_SIZE, generator=generator)
    if name.startswith("Siglip2"):  # naflex: patchified pixels, a patch mask and the grid shape
        side = HF_SIZE // HF_PATCH
        patches = images.reshape(BATCH, 3, side, HF_PATCH, side, HF_PATCH).permute(0, 2, 4, 3, 5, 1)
        pixels = patches.reshape(BATCH, side * side, HF_PATCH * HF_PATCH * 3)
        # the last image is smaller (side x (side - 3) patches), so the batch is padded as NaFlex pads it
        shapes = torch.tensor([[side, side]] * (BATCH - 1) + [[side, side - 3]])
        mask = (torch.arange(side * side) < shapes.prod(1)[:, None]).long()
        inputs = {"pixel_values": pixels * mask[..., None], "pixel_attention_mask": mask, "spatial_shapes": shapes}
        calib = dict(inputs)
        if name == "Siglip2Model":  # both towers run
            inputs["input_ids"] = torch.randint(0, HF_VOCAB, (BATCH, HF_TEXT_LEN), generator=generator)
        return inputs, calib
    inputs = {"pixel_values": images}
    if name == "LlavaForConditionalGeneration":  # <bos>, one image token per patch, some text
        text = torch.randint(3, HF_VOCAB, (BATCH, 5), generator=generator)
        image = torch.full((BATCH, GRID * GRID), HF_VOCAB)
        inputs["input_ids"] = torch.cat([torch.full((BATCH, 1), 2), image, text], 1)
    if name in ("CLIPModel", "SiglipModel"):  # both towers run
        inputs["input_ids"] = torch.randint(0, HF_VOCAB, (BATCH, HF_TEXT_LEN), generator=generator)
    return inputs, {"pixel_values": images}


def build_hf(name: str) -> Built:
    if transformers is None:
        raise BuildError("transformers is not installed")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise BuildError(f"transformers {transformers.__version__} has no {name}")
    config = hf_config(HF_CLASSES[name])
    torch.manual_seed(0)
    model = cls(config).eval()
    draw_zero_tokens(model)
    inputs, calib = hf_inputs(name)
    return Built(model, inputs, calib, forward(model, inputs), type(config).__name__)


_LEARNED_TOKENS = ("cls_token", "distillation_token", "position_embeddings")


@torch.no_grad()
def draw_zero_tokens(model: nn.Module) -> None:
    """Random draws for learned tokens that transformers initialises to zeros (ViT-MSN's and DeiT's class,
    distillation and position embeddings), as every trained checkpoint has. With zeros, the class token's
    query is the same for every image and its attention over the patches at the first block is uniform: the
    first pruning point's scores tie, and eager PyTorch and onnxruntime break the ties by rounding, keeping
    different tokens (a degenerate random model, not an export error)."""
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _LEARNED_TOKENS and not parameter.any():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def hf_names() -> list[str]:
    return [n for n in HF_CLASSES if not n.startswith("Siglip2") or hasattr(transformers, n) or transformers is None]


# --------------------------------------------------------------------------- running


def model_names(family: str) -> list[str]:
    return hf_names() if family == "hf" else timm.list_models(module=family)


def check_one(family: str, name: str) -> Result:
    start = time.perf_counter()
    builder: Callable[[str], Built] = build_hf if family == "hf" else build_timm
    try:
        built = builder(name)
    except Exception as error:  # noqa: BLE001 - a BuildError, or the hf build itself
        reason = str(error) if isinstance(error, BuildError) else describe(error)
        return Result(family, name, "-", "skipped", reason, time.perf_counter() - start)
    result, detail = classify(built)
    checks = run_checks(built, onnx=name in ONNX_MODELS) if result == "patched" else {}
    cls, note = built.cls, built.note
    del built
    gc.collect()
    return Result(family, name, cls, result, detail, time.perf_counter() - start, note, checks)


def run(families: list[str], pattern: str | None, limit: int | None, progress: bool) -> list[Result]:
    plan = []
    for family in families:
        names = [n for n in model_names(family) if pattern is None or fnmatch.fnmatch(n, pattern)]
        plan += [(family, n) for n in names[:limit]]
    results, start = [], time.perf_counter()
    for index, (family, name) in enumerate(plan, 1):
        result = check_one(family, name)
        results.append(result)
        if progress:
            failed = [CHECKS[k] for k, (status, _) in result.checks.items() if status != "ok"]
            print(
                f"[{index}/{len(plan)}] {family} {name}: {result.result}"
                f"{'; failed ' + ', '.join(failed) if failed else ''} ({result.seconds:.1f} s, "
                f"{time.perf_counter() - start:.0f} s elapsed)",
                file=sys.stderr,
                flush=True,
            )
    return results


# --------------------------------------------------------------------------- the report


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def totals_table(results: list[Result], families: list[str]) -> list[str]:
    titles = [f"{title} ok / failed" for title in CHECKS.values()]
    lines = [
        "| family | models | " + " | ".join([*RESULTS, *titles]) + " |",
        "|---|" + "---:|" * (len(RESULTS) + len(CHECKS) + 1),
    ]
    for family in [*families, None]:
        rows = [r for r in results if family is None or r.family == family]
        counts = Counter(r.result for r in rows)
        checks = [Counter(r.checks[key][0] for r in rows if key in r.checks) for key in CHECKS]
        label = "**total**" if family is None else family
        cells = [str(counts[k]) for k in RESULTS] + [f"{c['ok']} / {c['failed']}" for c in checks]
        lines.append(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def check_cells(result: Result) -> list[str]:
    """One cell per check: ok (its detail), failed: the reason, or empty (not run)."""
    cells = []
    for key in CHECKS:
        status, detail = result.checks.get(key, ("", ""))
        cells.append("ok" if status == "ok" and key == "save" else f"{status}: {detail}" if status else "")
    return cells


def detail_cell(result: Result) -> str:
    return f"{result.detail} ({result.note})" if result.note else result.detail


def family_section(family: str, rows: list[Result]) -> list[str]:
    """Failures first, then unsupported grouped by reason, then patched, then skipped."""
    order = {"failed": 0, "unsupported": 1, "patched": 2, "skipped": 3}
    failed_check = {r.name for r in rows if any(status != "ok" for status, _ in r.checks.values())}
    rows = sorted(
        rows,
        key=lambda r: (order[r.result], r.name not in failed_check, r.detail if r.result == "unsupported" else "", r.name),
    )
    lines = [f"## {family}", ""]
    reasons = Counter(r.detail for r in rows if r.result == "unsupported")
    if reasons:
        lines += ["Unsupported, by reason:", ""]
        lines += [f"- {count} x {cell(reason)}" for reason, count in reasons.most_common()]
        lines.append("")
    lines += ["| model | class | result | detail | " + " | ".join(CHECKS.values()) + " |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| `{r.name}` | {r.cls} | {r.result} | {cell(detail_cell(r))} | " + " | ".join(map(cell, check_cells(r))) + " |"
        for r in rows
    ]
    return lines + [""]


def report(results: list[Result], families: list[str], command: str) -> str:
    seconds = sum(r.seconds for r in results)
    hf_version = "(not installed)" if transformers is None else transformers.__version__
    lines = [
        "# Model coverage of timm-token-prune",
        "",
        (
            f"Produced by `{command}` with timm {timm.__version__}, transformers {hf_version}, "
            f"torch {torch.__version__} on {datetime.date.today().isoformat()} ({seconds / 60:.1f} min). Random "
            f"weights, {DEPTH} blocks, {GRID} x {GRID} patches; patched = dense output at budget 1.0 (atol = rtol = "
            f"{ATOL:g}) and fewer tokens after calibrating to {BUDGET}. Each patched model is then saved and loaded "
            f"(equal outputs) and takes one training step on {TRAIN_BATCH} random images (finite CE + budget loss, "
            "nonzero threshold gradient); one model per family is frozen and exported to ONNX (onnxruntime at a "
            f"different batch size matches, atol = rtol = {ONNX_ATOL:g}). See the docstring of benchmarks/coverage.py."
        ),
        "",
        *totals_table(results, families),
        "",
    ]
    for family in families:
        rows = [r for r in results if r.family == family]
        if rows:
            lines += family_section(family, rows)
    return "\n".join(lines)


def write_atomic(text: str, path: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=FAMILIES, help="repeatable (default: all)")
    parser.add_argument("--filter", default=None, help="fnmatch pattern on model / class names")
    parser.add_argument("--limit", type=int, default=None, help="the first N models of each family")
    parser.add_argument("--output", default=None, help="also write the Markdown report here")
    parser.add_argument("--no-progress", action="store_true", help="no per-model lines on stderr")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if transformers is not None:
        transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    families = list(dict.fromkeys(args.family or FAMILIES))
    results = run(families, args.filter, args.limit, not args.no_progress)
    command = shlex.join(["python", "benchmarks/coverage.py", *sys.argv[1:]])
    text = report(results, families, command)
    print(text)
    if args.output:
        write_atomic(text, args.output)
    failed = any(r.result == "failed" or any(status != "ok" for status, _ in r.checks.values()) for r in results)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
