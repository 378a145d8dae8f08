"""One thin adapter per model zoo. Each module provides NAME, SUPPORTED, matches(model),
check(model, config) -> locations (raises UnsupportedModelError), patch(model, config, locations)
-> TokenPruner, unpatch(model)."""

from . import hf, timm, timm_beit, timm_eva

ADAPTERS = (timm, timm_eva, timm_beit, hf)


def find_adapter(model):
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    return None
