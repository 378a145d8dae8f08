"""Exceptions raised by timm-token-prune."""


class UnsupportedModelError(TypeError):
    """The model (or one of its parts) cannot be patched; the message says why and what is supported."""


class AlreadyPatchedError(ValueError):
    """`patch_model` was called on a model that is already patched."""


class NotPatchedError(ValueError):
    """A function that needs a patched model got an unpatched one."""


class CheckpointError(ValueError):
    """A pruned checkpoint (folder or Hub repo) cannot be loaded; the message names it and says why."""
