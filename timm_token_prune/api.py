"""Public functions: patch / unpatch a model, calibrate its thresholds, read its loss and statistics."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, find_adapter, patched_adapter, supported_models, wrapper_hint
from .adapters.base import adapter_problems
from .batches import cat_inputs, images_in, map_inputs, model_inputs, run_model
from .config import PruneConfig, validated_locations
from .errors import AlreadyPatchedError, NotPatchedError, UnsupportedModelError
from .flops import schedule_ratio, solve_keep_ratio
from .pruner import PruneStats, StopForward, TokenPruner


def patch_model(model: nn.Module, budget: float = 0.65, *, config: PruneConfig | None = None, **options: Any) -> nn.Module:
    """Patch `model` in place for adaptive token pruning and return the same object.

    `budget` is the target fraction of the dense FLOPs; `options` are other `PruneConfig` fields (or pass a
    whole `config`). Weights are shared, not copied; the only new parameters are `token_pruner.thresholds`.
    Every check runs before anything changes, so a failure leaves the model as it was.
    """
    if config is None:
        config = PruneConfig(budget=budget, **options)
    elif options or budget != 0.65:
        raise ValueError("pass either config=PruneConfig(...) or budget/options, not both")
    else:
        config = PruneConfig.from_dict(config.to_dict())  # the model gets its own copy
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "token_pruner", None), TokenPruner):
        raise AlreadyPatchedError(
            f"this {type(model).__name__} is already patched: call unpatch_model(model) before patching it again"
        )
    adapter = find_adapter(model)
    if adapter is None:
        reason = wrapper_hint(model) or "no adapter knows it"
        broken = "".join(f"; {problem}" for problem in adapter_problems())
        raise UnsupportedModelError(
            f"cannot patch {type(model).__name__}: {reason}{broken}. Supported: {supported_models()}."
        )
    locations = _checked_locations(adapter, adapter.check(model, config))
    if config.restore_tokens and not adapter.restores_tokens:
        raise UnsupportedModelError(
            f"cannot patch {type(model).__name__} with restore_tokens=True: the {adapter.name!r} adapter does not "
            "restore pruned tokens to the grid: for dense outputs use the model unpatched, or patch it without "
            "restore_tokens for pooled outputs"
        )
    restore = _snapshot(model)
    try:
        pruner = adapter.patch(model, config, locations)
        _check_patched(adapter, model, pruner, locations)
    except BaseException:
        restore()  # the adapter failed part-way, or broke its contract: the model as it was
        raise
    pruner.train(model.training)  # a new module starts in train mode; follow the model's
    return model


def _checked_locations(adapter: Adapter, locations: Any) -> tuple[int, ...]:
    """The locations an adapter's `check` returned: strictly increasing whole block indices >= 1, checked
    as `PruneConfig` checks the user's."""
    try:
        if locations is None or isinstance(locations, str):
            raise TypeError("not block indices")
        return validated_locations(locations)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"the {adapter.name!r} adapter's check() returned {locations!r}: it must return strictly increasing "
            f"block indices >= 1 ({error}; fix the adapter)"
        ) from None


def _check_patched(adapter: Adapter, model: nn.Module, pruner: Any, locations: tuple[int, ...]) -> None:
    """What `adapter.patch` must leave: a TokenPruner at `model.token_pruner`, pruning inside the model."""
    if not isinstance(pruner, TokenPruner) or getattr(model, "token_pruner", None) is not pruner:
        raise TypeError(
            f"the {adapter.name!r} adapter's patch() returned a {type(pruner).__name__}, not the TokenPruner it "
            "added as model.token_pruner (fix the adapter); the model was left as it was"
        )
    depth = pruner.flops.depth
    if pruner.locations != locations or locations[-1] >= depth:
        raise ValueError(
            f"the {adapter.name!r} adapter gave prune_locations {locations} (its pruner: {pruner.locations}) for "
            f"a model of {depth} blocks: they must be block indices in [1, {depth - 1}] (fix the adapter); the "
            "model was left as it was"
        )


def _snapshot(model: nn.Module) -> Callable[[], None]:
    """A function that puts every module of `model` back as it is now: its class and attributes (the
    dicts among them, i.e. submodules, parameters, buffers and hooks, by content). Tensors are not copied:
    patching changes no weight."""
    saved = []
    for module in model.modules():
        attributes = dict(module.__dict__)
        contents = {k: dict(v) for k, v in attributes.items() if isinstance(v, dict)}
        saved.append((module, type(module), attributes, contents))

    def restore() -> None:
        for module, cls, attributes, contents in saved:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, items in contents.items():
                attributes[name].clear()
                attributes[name].update(items)

    return restore


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore the original modules (the thresholds are removed) and return the same object."""
    adapter, _ = patched_adapter(model, "unpatch")
    adapter.unpatch(model)
    return model


def get_pruner(model: nn.Module) -> TokenPruner:
    pruner = getattr(model, "token_pruner", None)
    if not isinstance(pruner, TokenPruner):
        raise NotPatchedError(f"this {type(model).__name__} is not patched: call patch_model(model, budget) first")
    return pruner


def budget_loss(model: nn.Module) -> torch.Tensor:
    """|mean FLOPs / dense FLOPs - budget| of the last forward, differentiable through the soft masks."""
    return get_pruner(model).budget_loss()


def last_stats(model: nn.Module) -> PruneStats:
    """Kept-token counts per stage and GFLOPs (multiply-accumulates) of the last forward."""
    return get_pruner(model).stats()


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[Any], budget: float | None = None, *, tolerance: float = 0.01, max_rounds: int = 6
) -> PruneStats:
    """Set the thresholds (or top-k keep ratios) from score quantiles on sample batches so that the mean
    FLOPs ratio over them meets `budget` (default: the config's). Returns the statistics over all batches.

    Keep fractions follow a geometric schedule (rho, rho^2, rho^3 of the patches survive the stages);
    thresholds are set stage by stage as quantiles of the surviving tokens' scores, and rho is corrected
    until the measured ratio is within `tolerance` of the budget.
    """
    pruner = get_pruner(model)
    config = pruner.config
    budget = config.budget if budget is None else PruneConfig(budget=budget).budget
    images = sample_images(pruner, batches, "calibrate")
    saved = {k: v.clone() for k, v in pruner.state_dict().items()}
    was_training, warn = model.training, pruner.warn_if_uncalibrated
    pruner.warn_if_uncalibrated = False  # its own forward passes run before the thresholds are set
    model.eval()
    try:
        forward_images(model, map_inputs(images[0], lambda t: t[:1]))
        tokens = pruner.state.num_tokens
        prefix, patches = pruner.num_prefix_tokens, tokens - pruner.num_prefix_tokens
        stages = len(pruner.locations)
        solve_keep_ratio(pruner.flops, budget, tokens, patches, prefix, config.min_keep)  # reachable at all?
        lowest = schedule_ratio(pruner.flops, 0.0, tokens, patches, prefix, config.min_keep)
        target, best = budget, None
        for _ in range(max_rounds):
            rho = solve_keep_ratio(pruner.flops, min(max(target, lowest), 1.0), tokens, patches, prefix, config.min_keep)
            if pruner.fixed_counts:
                pruner.set_counts((rho,) * stages, static=pruner._static)
            else:
                _fit_thresholds(model, pruner, images, rho, budget)
            stats = measure(model, pruner, images)
            error = stats.flops_ratio - budget
            if best is None or abs(error) < abs(best[0]):
                best = (error, stats, {k: v.clone() for k, v in pruner.state_dict().items()})
            if abs(error) <= tolerance or budget >= 1.0 or (target >= 1.0 and error < 0):
                break
            target = target - error
        error, stats, state = best
        pruner.load_state_dict(state)
        pruner.mark_calibrated()
    except BaseException:
        pruner.load_state_dict(saved)  # a failed calibration changes nothing
        raise
    finally:
        model.train(was_training)
        pruner.warn_if_uncalibrated = warn
    if abs(error) > tolerance:
        warnings.warn(
            f"calibrate reached a FLOPs ratio of {stats.flops_ratio:.3f} for budget {budget}, the closest it "
            "found: the calibration images' token scores do not separate finely enough (tied scores, or too "
            "few images); more, or more varied, calibration images help",
            stacklevel=2,
        )
    config.budget = budget
    return stats


def forward_images(model: nn.Module, images: torch.Tensor) -> Any:
    """`model(images)`, or what its adapter runs for images alone (the vision tower of an image-text model or
    of a vision-language model)."""
    adapter = find_adapter(model)
    return run_model(model, images) if adapter is None else adapter.forward_images(model, images)


def sample_images(pruner: TokenPruner, batches: Iterable[Any], caller: str) -> list[torch.Tensor | dict[str, Any]]:
    """The model inputs of `batches`, on the model's device: image tensors, or dicts of keyword inputs for
    batches that hold more than 'pixel_values' (NaFlex's mask and grid shapes: `batches.model_inputs`)."""
    device = pruner.thresholds.device
    inputs = (model_inputs(b) for b in batches)
    images = [map_inputs(x, lambda t: t.to(device)) for x in inputs if len(images_in(x))]
    if not images:
        raise ValueError(f"{caller} needs at least one image: the batches were empty")
    return images


# calibrate runs all its images as one batch when their tokens hold at most this many values (x width), so
# that every stage's threshold is set in a single forward; a larger set is run batch by batch, stage by stage
ONE_PASS_VALUES = 2**27


def _fit_thresholds(model: nn.Module, pruner: TokenPruner, images: list[torch.Tensor], rho: float, budget: float) -> None:
    """Each stage's threshold: the quantile of its statistic over every calibration image's eligible patch
    tokens that leaves the fraction rho, given the earlier stages' thresholds (so stage by stage)."""
    thresholds = pruner.thresholds
    thresholds.fill_(-1.0)  # keep all while the later stages are unset
    if budget >= 1.0:
        return
    prefix = pruner.num_prefix_tokens

    def threshold(statistic: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor | float:
        s = statistic[:, prefix:]
        return _midpoint_quantile((s[eligible[:, prefix:]] if eligible is not None else s.flatten()).float(), 1.0 - rho)

    width = pruner.flops.attn_per_pair // 2
    same_shape = len({tuple(images_in(x).shape[1:]) for x in images}) == 1  # else each batch is checked as it runs
    if same_shape and sum(len(images_in(x)) for x in images) * pruner.state.num_tokens * width <= ONE_PASS_VALUES:
        # one batch of every image: per-image results do not depend on the batch, so the quantiles are those
        # of the stage-by-stage passes below, at the cost of one forward instead of one per stage
        pruner.calibrating = threshold
        try:
            forward_images(model, cat_inputs(images))
        finally:
            pruner.calibrating = None
        return
    for stage in range(len(pruner.locations)):
        scores = []
        for x in images:
            _run_until(model, pruner, x, stage)
            s, eligible = pruner.state.stage_scores[stage]
            s = s[:, prefix:]
            scores.append(s[eligible[:, prefix:]] if eligible is not None else s.flatten())
        thresholds[stage] = _midpoint_quantile(torch.cat(scores).float(), 1.0 - rho)


def _midpoint_quantile(scores: torch.Tensor, drop: float) -> torch.Tensor | float:
    """A threshold below which a fraction `drop` of `scores` lies, halfway between two neighbouring scores,
    so that rounding differences (batched vs single-image) cannot flip a calibration token's decision."""
    ordered = scores.sort().values
    k = min(max(round(drop * ordered.numel()), 0), ordered.numel())
    if k == 0:
        return -1.0
    if k == ordered.numel():
        return ordered[-1]
    return (ordered[k - 1] + ordered[k]) / 2


def _run_until(model: nn.Module, pruner: TokenPruner, x: torch.Tensor, stage: int) -> None:
    """Run `model(x)` only up to the scoring block of `stage` (calibration passes)."""
    pruner.stop_after = stage
    try:
        forward_images(model, x)
    except StopForward:
        pass
    finally:
        pruner.stop_after = None


def measure(model: nn.Module, pruner: TokenPruner, images: list[torch.Tensor]) -> PruneStats:
    """Statistics over all `images` batches (eval forward passes). Batches (and the images of a padded batch)
    may differ in image size: the FLOPs ratio is the mean of each image's ratio to its own dense cost."""
    per_image, dense, counts = [], [], []
    for x in images:
        forward_images(model, x)
        stats = pruner.stats()
        per_image += stats.gflops_per_image
        dense += stats.dense_gflops_per_image or [stats.dense_gflops] * len(stats.gflops_per_image)
        counts.append([c.detach().double() for c in pruner.state.counts])
    merged = [torch.cat([c[s] for c in counts]) for s in range(len(pruner.locations))]
    return dataclasses.replace(
        stats,
        kept_mean=[c.mean().item() for c in merged],
        kept_min=[c.min().item() for c in merged],
        kept_max=[c.max().item() for c in merged],
        gflops=sum(per_image) / len(per_image),
        gflops_per_image=per_image,
        dense_gflops=sum(dense) / len(dense),
        flops_ratio=sum(g / d for g, d in zip(per_image, dense)) / len(per_image),
        dense_gflops_per_image=dense,
    )
