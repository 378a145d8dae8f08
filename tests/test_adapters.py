"""The adapter contract: the registry picks the most specific adapter, every built-in adapter answers
the questions the save / load / export / CLI paths ask, and wrapped models get pointed at the inner one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import IMG, images, make_model
from test_hf import make_hf
from test_timm_families import make as make_timm_family
from timm.models.vision_transformer import VisionTransformer

import timm_token_prune as ttp
from timm_token_prune import adapters
from timm_token_prune.adapters import (
    Adapter,
    BeitAdapter,
    EvaAdapter,
    TransformersAdapter,
    VisionTransformerAdapter,
    find_adapter,
    register_adapter,
)

CASES = {
    "timm": (lambda: make_model("vit"), VisionTransformerAdapter, "timm"),
    "eva": (lambda: make_timm_family("eva02"), EvaAdapter, "timm"),
    "beit": (lambda: make_timm_family("beit"), BeitAdapter, "timm"),
    "transformers": (lambda: make_hf("vit_classifier"), TransformersAdapter, "transformers"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_family_gets_its_adapter_and_zoo(case):
    build, cls, zoo = CASES[case]
    model = build()
    adapter = find_adapter(model)
    assert type(adapter) is cls and adapter.zoo == zoo
    assert adapter.input_size(model) == (3, IMG, IMG)
    assert adapter.is_classifier(model)
    mean, std = adapter.normalization(model)
    assert len(mean) == len(std) == 3
    adapter.check_images(model, images(2))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        adapter.check_images(model, torch.randn(2, 1, IMG, IMG))
    ttp.patch_model(model, budget=0.5)
    assert find_adapter(model) is adapter  # a patched model keeps its adapter


@pytest.mark.parametrize(
    "case, classifier", [("deit_with_teacher", True), ("clip_classifier", True), ("vit_model_pooler", False)]
)
def test_transformers_classifiers_are_recognised(case, classifier):
    model = make_hf(case)
    assert find_adapter(model).is_classifier(model) is classifier
    assert find_adapter(model).input_size(model) == (3, IMG, IMG)


def test_every_registered_adapter_implements_the_contract():
    assert [a.name for a in adapters.ADAPTERS] == ["timm", "timm-eva", "timm-beit", "transformers", "transformers-tower"]
    for adapter in adapters.ADAPTERS:
        assert isinstance(adapter, Adapter) and adapter.zoo in ("timm", "transformers") and adapter.supported


def test_the_most_specific_adapter_wins_and_registration_is_checked():
    class MyViT(VisionTransformer):
        pass

    class MyAdapter(VisionTransformerAdapter):
        name = "my-vit"

        def model_classes(self):
            return (MyViT,)

    mine = MyAdapter()
    try:
        register_adapter(mine)
        torch.manual_seed(0)
        assert find_adapter(MyViT(img_size=IMG, patch_size=4, embed_dim=48, depth=4, num_heads=3)) is mine
        assert type(find_adapter(make_model("vit"))) is VisionTransformerAdapter  # the base class keeps its own
    finally:
        adapters.ADAPTERS.remove(mine)

    class Incomplete(Adapter):
        name, zoo, supported = "incomplete", "timm", "nothing"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()

    class Unnamed(VisionTransformerAdapter):
        name = ""

    with pytest.raises(TypeError, match="name must be a non-empty string"):
        register_adapter(Unnamed())


def _wrapped(kind: str, model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    if kind == "sequential":
        return torch.nn.Sequential(torch.nn.Identity(), model), r"model\[1\]"
    if kind == "data_parallel":
        return torch.nn.DataParallel(model), r"model\.module"
    return torch.nn.parallel.DistributedDataParallel(model), r"model\.module"


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["sequential", "data_parallel", "distributed"])
def test_wrappers_point_at_the_inner_model(kind, request, tmp_path):
    if kind == "distributed":
        request.getfixturevalue("process_group")
    model = make_model("vit")
    wrapper, where = _wrapped(kind, model)
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    with pytest.raises(ttp.UnsupportedModelError, match=f"is a wrapper: patch {where} .*VisionTransformer.* instead"):
        ttp.patch_model(wrapper, budget=0.5)
    assert not hasattr(model, "token_pruner") and type(model) is VisionTransformer
    assert all(torch.equal(wrapper.state_dict()[k], v) for k, v in before.items())
    ttp.patch_model(model, budget=0.5)
    with pytest.raises(ttp.NotPatchedError, match=f"is a wrapper: unpatch {where}"):
        ttp.unpatch_model(wrapper)
    with pytest.raises(ttp.NotPatchedError, match=f"is a wrapper: save {where}"):
        ttp.save_pretrained(wrapper, tmp_path / "out")
    assert not (tmp_path / "out").exists()

