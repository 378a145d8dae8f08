"""Distillation fine-tuning of a patched model: L = ce * CE + flops * L_flops + kd * KL(student || teacher),
the teacher being the dense model (AS-ViT's recipe: AdamW, cosine lr, thresholds without weight decay).

`distill(student, loader, ...)` runs it with progress bars, a JSON-lines metrics log, atomic
checkpoints and exact resume; it runs under `torchrun` (DistributedDataParallel) as well.
`evaluate(model, loader)` gives top-1 and GFLOPs per image.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints
from .api import budget_loss, calibrate, get_pruner, last_stats, unpatch_model
from .batches import logits_of, split_batch
from .distill_config import DistillConfig  # re-exported: its home was this module
from .flops import solve_keep_ratio
from .pruner import TokenPruner
from .training import TrainState


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.dtype.is_floating_point or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-d integer tensor of class indices, got {labels.dtype} {tuple(labels.shape)}")
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}] for a {num_classes}-class model; got {low}..{high}")


# ---- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1 accuracy (%, when labels are given) and, for a patched model, mean GFLOPs (MACs) per image."""
    patched = isinstance(getattr(model, "token_pruner", None), nn.Module)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct = images = 0
    gflops = dense = 0.0
    labelled = True
    try:
        for batch in loader:
            x, y, _ = split_batch(batch)
            logits = logits_of(model(x.to(device)))
            if patched:
                stats = last_stats(model)
                gflops += stats.gflops * len(x)
                dense = stats.dense_gflops
            images += len(x)
            if y is None:
                labelled = False
            else:
                correct += (logits.argmax(-1).cpu() == y.cpu()).sum().item()
    finally:
        model.train(was_training)
    if not images:
        raise ValueError("evaluate got an empty loader")
    result: dict[str, float] = {"images": images}
    if patched:
        result.update(gflops=gflops / images, dense_gflops=dense, flops_ratio=gflops / images / dense)
    if labelled:
        result["top1"] = 100.0 * correct / images
    return result


# ---- the loop -------------------------------------------------------------------------------------
def distill(
    student: nn.Module,
    train_loader: Iterable[Any],
    *,
    teacher: nn.Module | None = None,
    eval_loader: Iterable[Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    config: DistillConfig | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Fine-tune a patched `student` against a dense `teacher` and its FLOPs budget. Returns one metrics dict
    per epoch; the student is left in eval mode.

    `teacher` (default: a dense copy of the student as it is now) runs in eval mode without gradients and is
    left as it was, train/eval and requires_grad flags included; it must not share parameters with the student.
    Batches may carry the teacher's logits (a third tuple element or 'teacher_logits'), which then replace its
    forward pass. `options` are `DistillConfig` fields; with `grad_accum_steps=k` each optimiser step takes the
    mean gradient of k batches, and an epoch's last, smaller group takes a step too.

    With `output_dir`, metrics go to `metrics.jsonl` and checkpoints (every `checkpoint_every` steps and at the
    end) to `checkpoint-<step>/`. A new run needs an output_dir without a run in it (FileExistsError
    otherwise). `resume=True` continues the run there from its newest intact checkpoint, exactly (step,
    optimiser, scheduler, data order, RNG, the interrupted epoch's running metrics): damaged checkpoints are
    skipped with a warning; FileNotFoundError if the folder or any checkpoint is missing, CheckpointError if
    none is intact. Under `torchrun`, the student is wrapped in DistributedDataParallel and the loader given a
    DistributedSampler; rank 0 writes.
    """
    config = dataclasses.replace(config, **options) if config else DistillConfig(**options)
    output = Path(output_dir) if output_dir is not None else None
    _check_output_dir(output, resume)
    _check_teacher(student, teacher)
    run = _setup(student, train_loader, teacher, eval_loader, output, config)
    state = _start(run, resume)
    if run.world > 1:
        run.model = _wrap_ddp(student)  # after _start: every rank begins with rank 0's weights as they are now
    # Train/eval flags come back as they were, also on error: the teacher may be the caller's own model.
    with _modes_kept(run.teacher), _modes_kept(student):
        run.teacher.eval()
        while state.step < run.total and state.epoch < config.epochs:
            _run_epoch(run, state)
        _save(run, state)
    if state.step < run.total:
        warnings.warn(
            f"train_loader ran out after {state.step} of max_steps={run.total} optimiser steps, so the learning "
            "rate did not decay to min_lr: give a max_steps the loader can feed, or more epochs",
            stacklevel=2,
        )
    student.eval()
    return state.history


def _check_output_dir(output: Path | None, resume: bool) -> None:
    """A new run needs a folder without a run in it: continuing one is resume=True's job (which then needs a
    checkpoint there: see checkpoints.load_newest)."""
    if output is None:
        if resume:
            raise ValueError("resume=True needs output_dir: the folder of the run to continue")
        return
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"output_dir {output} is a file: give a folder (new, empty, or a run to resume)")
    found = checkpoints.run_files(output)
    if found and not resume:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FileExistsError(
            f"output_dir {output} already holds a distill run ({shown}): pass resume=True to continue it, or a "
            "new or empty output_dir (a new run there would mix its checkpoints and metrics with the old ones)"
        )


def _check_teacher(student: nn.Module, teacher: nn.Module | None) -> None:
    """The teacher must stay the dense model the student is measured against: training must not move it."""
    if teacher is None:
        return
    student_params = {id(p) for p in student.parameters()}
    if teacher is student or any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "the teacher shares parameters with the student (teacher=student?), so training would move the "
            "teacher too: pass a separate dense model, e.g. teacher=None makes a dense copy of the student"
        )


@contextlib.contextmanager
def _modes_kept(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit, however the block ends."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class _Run:
    """What the epochs of one `distill` call share."""

    student: nn.Module
    model: nn.Module  # what the forward pass calls: the student, or its DistributedDataParallel wrapper
    teacher: nn.Module
    pruner: TokenPruner
    loader: Iterable[Any]
    eval_loader: Iterable[Any] | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: DistillConfig
    steps_per_epoch: int | None  # None for a loader without len()
    total: int  # optimiser steps of the whole run
    output: Path | None
    rank: int
    world: int
    log: _Log
    num_classes: int | None = None  # known once the first batch has been checked

    @property
    def device(self) -> torch.device:
        return self.pruner.thresholds.device


def _setup(student, train_loader, teacher, eval_loader, output: Path | None, config: DistillConfig) -> _Run:
    pruner = get_pruner(student)
    from .adapters.hf_towers import find_tower

    if type(student).__module__.startswith("transformers") and find_tower(student) is not None:
        raise ValueError(
            f"distill trains classifiers; this {type(student).__name__} is an image-text or vision-language model "
            "whose vision tower is pruned: calibrate it (ttp.calibrate on image batches), or distill a classifier "
            "built on the same tower"
        )
    rank, world = _distributed()
    if teacher is None:
        teacher = unpatch_model(copy.deepcopy(student))
    # No requires_grad_(False) on the teacher: it runs under no_grad, and a caller's teacher keeps its flags
    # (a student deep-copied from it later would silently train its thresholds only).
    loader = _distributed_loader(train_loader, config.seed) if world > 1 else train_loader
    steps_per_epoch, total = _run_length(loader, config)
    optimizer = _optimizer(student, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(config, total))
    return _Run(student, student, teacher, pruner, loader, eval_loader, optimizer, scheduler, config,
                steps_per_epoch, total, output, rank, world, _Log(output, rank))


def _start(run: _Run, resume: bool) -> TrainState:
    """Seed the run, then continue from the newest intact checkpoint (resume) or start at step 0."""
    # read and checked whole before anything is applied: a damaged checkpoint changes nothing
    checkpoint = checkpoints.load_newest(run.output, run.student, run.optimizer) if resume else None
    if checkpoint is None and not run.pruner.is_calibrated:  # before seeding: the data order stays the same
        _calibrate_on_first_batches(run)
    torch.manual_seed(run.config.seed + run.rank)
    random.seed(run.config.seed + run.rank)
    if checkpoint is not None:
        return checkpoint.apply(run.student, run.optimizer, run.scheduler)
    return TrainState()


CALIBRATION_IMAGES = 1024


def _calibrate_on_first_batches(run: _Run) -> None:
    """Thresholds that were never calibrated (the defaults) may sit far from every score, where the soft mask
    has no gradient and the FLOPs loss cannot move them: calibrate them on up to CALIBRATION_IMAGES images of
    the first batches, and say so."""
    if iter(run.loader) is run.loader:  # a one-shot iterator: its batches are the training data
        warnings.warn(
            "the thresholds were never calibrated and train_loader is a one-shot iterator, so distill cannot "
            "calibrate them on its first batches: call calibrate(model, batches) before distill",
            stacklevel=3,
        )
        run.pruner.warn_if_uncalibrated = False  # said once: its eval passes need not say it again
        return
    batches, labels, seen = [], [], 0
    for batch in run.loader:
        images, y, _ = split_batch(batch)
        batches.append(images)
        labels += [] if y is None else [y]
        seen += len(images)
        if seen >= CALIBRATION_IMAGES:
            break
    if batches:  # bad input fails before the thresholds change (the checks training would make on these batches)
        warn, run.pruner.warn_if_uncalibrated = run.pruner.warn_if_uncalibrated, False
        try:
            run.num_classes = _check_first_batch(run.student, run.teacher, batches[0].to(run.device), run.pruner)
        finally:
            run.pruner.warn_if_uncalibrated = warn
        for y in labels:
            _check_labels(y, run.num_classes)
    stats = calibrate(run.student, batches)
    run.log.write({"kind": "calibration", "images": seen, "flops_ratio": stats.flops_ratio})
    if run.rank == 0:
        warnings.warn(
            f"the thresholds were never calibrated: distill calibrated them on the first {seen} training images "
            f"(FLOPs ratio {stats.flops_ratio:.3f} for budget {run.pruner.config.budget}); call "
            "calibrate(model, batches) first to choose the images",
            stacklevel=3,
        )


def _run_length(loader: Iterable[Any], config: DistillConfig) -> tuple[int | None, int]:
    """Optimiser steps per epoch (None for a loader without len()) and in the whole run: the cosine schedule
    ends at min_lr on the last step actually taken."""
    batches = _len_or_none(loader)
    if batches is None:
        if config.max_steps is None:
            raise ValueError("train_loader has no len(): give max_steps")
        return None, config.max_steps
    if batches == 0:
        raise ValueError("train_loader is empty (len() is 0): distill needs at least one batch")
    per_epoch = math.ceil(batches / config.grad_accum_steps)  # the last group of an epoch may be partial
    total = per_epoch * config.epochs
    return per_epoch, min(total, config.max_steps or total)


def _len_or_none(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # no __len__, or a DataLoader over an IterableDataset without one
        return None


def _run_epoch(run: _Run, state: TrainState) -> None:
    """One epoch from where `state` stands: its data order, the batches already done skipped, an optimiser
    step every `grad_accum_steps` batches and one on the epoch's last partial group, step logs and periodic
    checkpoints, then the epoch's metrics."""
    batches = _epoch_batches(run, state)
    bar = _progress(run.config, run.rank, run.steps_per_epoch, state)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    for group in _groups(batches, run.config.grad_accum_steps):
        for batch in group:
            _train_batch(run, state, batch, len(group))
        _optimizer_step(run, state, bar)
        if state.step >= run.total:
            break
    if bar is not None:
        bar.close()
    _finish_epoch(run, state)


def _epoch_batches(run: _Run, state: TrainState) -> Iterator[Any]:
    """The current epoch's batches in the order first drawn for it, without those already trained on."""
    if state.epoch_rng is None or state.batches_in_epoch == 0:
        state.epoch_rng = torch.get_rng_state()
    resume_rng = torch.get_rng_state()
    torch.set_rng_state(state.epoch_rng)  # the data order of this epoch, as it was first drawn
    if hasattr(getattr(run.loader, "sampler", None), "set_epoch"):
        run.loader.sampler.set_epoch(state.epoch)
    batches = iter(run.loader)
    first = list(itertools.islice(batches, 1))  # a sampler draws its seed at the first batch: do it now
    if not first:
        torch.set_rng_state(resume_rng)
        raise ValueError(_no_batch_message(state.epoch, run.config.epochs))
    batches = itertools.chain(first, batches)
    skipped = sum(1 for _ in itertools.islice(batches, state.batches_in_epoch))  # resuming mid-epoch
    torch.set_rng_state(resume_rng)
    if skipped < state.batches_in_epoch:
        raise ValueError(
            f"train_loader yields {skipped} batches in epoch {state.epoch + 1}, but the checkpoint had trained on "
            f"{state.batches_in_epoch} of them: resume with the loader the run started with"
        )
    return batches


def _groups(batches: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` batches, the last one possibly shorter. A group is read whole before its
    first forward pass, so that each batch's loss can be divided by the group's true size."""
    while group := list(itertools.islice(batches, size)):
        yield group


def _no_batch_message(epoch: int, epochs: int) -> str:
    if epoch == 0:
        return "train_loader is empty: it yielded no batch; distill needs at least one"
    return (
        f"train_loader yielded no batch in epoch {epoch + 1} of {epochs}: a generator or other one-shot "
        "iterator is used up after one epoch; pass a list or a DataLoader, or epochs=1"
    )


def _train_batch(run: _Run, state: TrainState, batch: Any, group_size: int) -> None:
    """Forward and backward of one batch of a group of `group_size`; the gradients add up to the group's mean
    until the optimiser step."""
    x, y, cached = split_batch(batch)
    x = x.to(run.device)
    y = None if y is None else y.to(run.device)
    if run.num_classes is None:
        run.num_classes = _check_first_batch(run.student, run.teacher, x, run.pruner)
    if y is not None:
        _check_labels(y, run.num_classes)
    metrics = _step(run.model, run.student, run.teacher, x, y, cached, run.config, group_size)
    state.totals.add(metrics, len(x))
    state.batches_in_epoch += 1


def _optimizer_step(run: _Run, state: TrainState, bar) -> None:
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if bar is not None:
        bar.update(1)
        bar.set_postfix(state.totals.postfix())
    if state.step % run.config.log_every == 0:
        run.log.write({"kind": "step", "step": state.step, "epoch": state.epoch,
                       "lr": run.scheduler.get_last_lr()[0], **state.totals.mean()})
    if run.config.checkpoint_every and state.step % run.config.checkpoint_every == 0:
        _save(run, state)


def _finish_epoch(run: _Run, state: TrainState) -> None:
    record = {"kind": "epoch", "epoch": state.epoch, "step": state.step, **state.totals.mean()}
    if run.eval_loader is not None:
        record.update({f"eval_{k}": v for k, v in evaluate(run.student, run.eval_loader).items()})
    run.log.write(record)
    state.finish_epoch(record)


def _save(run: _Run, state: TrainState) -> None:
    if run.output is not None and run.rank == 0:
        checkpoints.save(run.output, run.student, run.optimizer, run.scheduler, state, run.config)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    flops_loss: torch.Tensor,
    config: DistillConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ce * CE(student, labels) + flops * L_flops + kd * T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    t = config.kd_temperature
    kd = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
        reduction="batchmean", log_target=True,
    ) * (t * t)
    ce = F.cross_entropy(student_logits.float(), labels) if labels is not None else student_logits.new_zeros(())
    loss = config.ce_weight * ce + config.flops_weight * flops_loss + config.kd_weight * kd
    return loss, {"ce": ce, "kd": kd, "flops_loss": flops_loss}


def _step(model, student, teacher, x, y, cached, config: DistillConfig, group_size: int) -> dict[str, float]:
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16")
    if cached is not None:
        teacher_logits = cached.to(x.device)
    else:
        with torch.no_grad(), autocast:
            teacher_logits = logits_of(teacher(x))
    with autocast:
        student_logits = logits_of(model(x))
    flops = budget_loss(student)
    loss, parts = distillation_loss(student_logits, teacher_logits, y, flops, config)
    (loss / group_size).backward()
    stats = last_stats(student)
    metrics = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
    metrics["flops_ratio"] = stats.flops_ratio
    metrics["kept_ratio"] = stats.kept_mean[-1] / stats.tokens
    if y is not None:
        metrics["acc"] = 100.0 * (student_logits.argmax(-1) == y).float().mean().item()
    return metrics


def _check_first_batch(student, teacher, x, pruner) -> int:
    """Fail early: images the model takes, a teacher with the same classes, a reachable budget. Returns the
    number of classes."""
    with torch.no_grad(), _modes_kept(student), _modes_kept(teacher):  # both in eval mode, flags restored
        student.eval()
        teacher.eval()
        s = logits_of(student(x[:1]))
        t = logits_of(teacher(x[:1]))
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"the teacher has {t.shape[-1]} classes and the student {s.shape[-1]}: distill needs the same label space"
        )
    tokens = pruner.state.num_tokens
    prefix = pruner.num_prefix_tokens
    solve_keep_ratio(pruner.flops, pruner.config.budget, tokens, tokens - prefix, prefix, pruner.config.min_keep)
    return s.shape[-1]


def _optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    thresholds = get_pruner(model).thresholds
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or p is thresholds:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": [thresholds], "weight_decay": 0.0, "lr": config.threshold_lr or config.lr},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def _cosine(config: DistillConfig, total: int):
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _progress(config: DistillConfig, rank: int, steps_per_epoch: int | None, state: TrainState):
    if not config.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    done = math.ceil(state.batches_in_epoch / config.grad_accum_steps)
    return tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {state.epoch + 1}/{config.epochs}", unit="step")


class _Log:
    """metrics.jsonl in the output folder, written by rank 0; the folder is made at the first record."""

    def __init__(self, output: Path | None, rank: int) -> None:
        self.path = output / checkpoints.METRICS if output is not None and rank == 0 else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# ---- distributed ----------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _distributed_loader(loader, seed: int):
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(getattr(loader, "sampler", None), DistributedSampler) or not isinstance(loader, DataLoader):
        return loader
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=DistributedSampler(loader.dataset, seed=seed),
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, drop_last=loader.drop_last,
    )


def _wrap_ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = None if next(model.parameters()).device.type == "cpu" else [next(model.parameters()).device.index]
    return DistributedDataParallel(model, device_ids=device_ids)
