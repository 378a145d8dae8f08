"""Distillation fine-tuning of a patched model: L = ce * CE + flops * L_flops + kd * KL(student || teacher),
the teacher being the dense model (AS-ViT's recipe: AdamW, cosine lr, thresholds without weight decay).

`distill(student, loader, ...)` runs it with progress bars, a JSON-lines metrics log, atomic
checkpoints and exact resume; it runs under `torchrun` (DistributedDataParallel) as well.
`evaluate(model, loader)` gives top-1 and GFLOPs per image.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .api import budget_loss, get_pruner, last_stats, unpatch_model
from .batches import logits_of, split_batch
from .flops import solve_keep_ratio


@dataclass
class DistillConfig:
    """Fine-tuning options; defaults follow the AS-ViT reference recipe."""

    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimiser steps."})
    lr: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW), cosine-decayed to min_lr."})
    min_lr: float = field(default=2e-6, metadata={"help": "Final learning rate."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=1e-6, metadata={"help": "On weight matrices; none on thresholds, biases, norms."})
    threshold_lr: float | None = field(default=None, metadata={"help": "Learning rate of the thresholds (default: lr)."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-entropy on labels."})
    flops_weight: float = field(default=2.0, metadata={"help": "Weight of the FLOPs-budget loss."})
    kd_weight: float = field(default=0.5, metadata={"help": "Weight of KL(student || teacher)."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the distillation term."})
    grad_accum_steps: int = field(default=1, metadata={"help": "Batches per optimiser step."})
    amp: str | None = field(default=None, metadata={"help": "None, or 'bf16' for bfloat16 autocast."})
    log_every: int = field(default=10, metadata={"help": "Steps between metrics-log lines."})
    checkpoint_every: int | None = field(default=None, metadata={"help": "Steps between checkpoints (output_dir)."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and dropout."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars (rank 0)."})

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError(f"epochs and max_steps must be >= 1, got {self.epochs}, {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")


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
    """Fine-tune a patched `student` against a frozen dense `teacher` (default: a dense copy of the student
    as it is now) and its FLOPs budget. Returns one metrics dict per epoch. Batches may carry the
    teacher's logits (a third tuple element or 'teacher_logits'), which then replace its forward pass.

    `options` are `DistillConfig` fields. With `output_dir`, metrics go to `metrics.jsonl` and checkpoints
    (every `checkpoint_every` steps and at the end) to `checkpoint-<step>/`; `resume=True` continues from
    the latest one exactly (step, optimiser, scheduler, data order, RNG). Under `torchrun`, the student is
    wrapped in DistributedDataParallel and the loader given a DistributedSampler; rank 0 writes.
    """
    config = dataclasses.replace(config, **options) if config else DistillConfig(**options)
    pruner = get_pruner(student)
    device = pruner.thresholds.device
    rank, world = _distributed()
    if teacher is None:
        teacher = unpatch_model(copy.deepcopy(student))
    teacher.eval().requires_grad_(False)
    output = Path(output_dir) if output_dir is not None else None
    loader = _distributed_loader(train_loader, config.seed) if world > 1 else train_loader
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum_steps) if hasattr(loader, "__len__") else None
    total = config.max_steps or (steps_per_epoch * config.epochs if steps_per_epoch else None)
    if total is None:
        raise ValueError("train_loader has no len(): give max_steps")
    optimizer = _optimizer(student, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(config, total))
    model = _wrap_ddp(student) if world > 1 else student

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "epoch_rng": None, "history": []}
    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    if resume:
        if output is None:
            raise ValueError("resume=True needs output_dir")
        _load_checkpoint(output, student, optimizer, scheduler, state, rank)
    num_classes = None
    log = _Log(output, rank)
    while state["step"] < total and state["epoch"] < config.epochs:
        if state["epoch_rng"] is None or state["batches_in_epoch"] == 0:
            state["epoch_rng"] = torch.get_rng_state()
        resume_rng = torch.get_rng_state()
        torch.set_rng_state(state["epoch_rng"])  # the data order of this epoch, as it was first drawn
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(state["epoch"])
        batches = iter(loader)
        first = list(itertools.islice(batches, 1))  # a sampler draws its seed at the first batch: do it now
        batches = itertools.chain(first, batches)
        for _ in range(state["batches_in_epoch"]):  # resuming mid-epoch: skip what was done
            next(batches)
        torch.set_rng_state(resume_rng)
        totals = _Totals()
        bar = _progress(config, rank, steps_per_epoch, state)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        accumulated = 0
        for batch in batches:
            x, y, cached = split_batch(batch)
            x = x.to(device)
            y = None if y is None else y.to(device)
            if num_classes is None:
                num_classes = _check_first_batch(student, teacher, x, pruner)
            if y is not None:
                _check_labels(y, num_classes)
            metrics = _step(model, student, teacher, x, y, cached, config)
            totals.add(metrics, len(x))
            accumulated += 1
            state["batches_in_epoch"] += 1
            if accumulated < config.grad_accum_steps:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            accumulated = 0
            state["step"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(totals.postfix())
            if state["step"] % config.log_every == 0:
                log.write({"kind": "step", "step": state["step"], "epoch": state["epoch"],
                           "lr": scheduler.get_last_lr()[0], **totals.mean()})
            if output is not None and config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                _save_checkpoint(output, student, optimizer, scheduler, state, config, rank)
            if state["step"] >= total:
                break
        if bar is not None:
            bar.close()
        epoch_metrics = {"kind": "epoch", "epoch": state["epoch"], "step": state["step"], **totals.mean()}
        if eval_loader is not None:
            epoch_metrics.update({f"eval_{k}": v for k, v in evaluate(student, eval_loader).items()})
        state["history"].append(epoch_metrics)
        log.write(epoch_metrics)
        state["epoch"] += 1
        state["batches_in_epoch"] = 0
        state["epoch_rng"] = None
    if output is not None:
        _save_checkpoint(output, student, optimizer, scheduler, state, config, rank)
    student.eval()
    return state["history"]


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


def _step(model, student, teacher, x, y, cached, config: DistillConfig) -> dict[str, float]:
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
    (loss / config.grad_accum_steps).backward()
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
    with torch.no_grad():
        was_training = student.training
        student.eval()
        try:
            s = logits_of(student(x[:1]))
        finally:
            student.train(was_training)
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


class _Totals:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float], n: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.count += n

    def mean(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def postfix(self) -> dict[str, str]:
        m = self.mean()
        keys = {"loss": "loss", "acc": "acc", "kept_ratio": "kept", "flops_ratio": "flops"}
        return {short: f"{m[k]:.3g}" for k, short in keys.items() if k in m}


def _progress(config: DistillConfig, rank: int, steps_per_epoch, state):
    if not config.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    done = state["batches_in_epoch"] // config.grad_accum_steps
    return tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {state['epoch'] + 1}/{config.epochs}", unit="step")


class _Log:
    def __init__(self, output: Path | None, rank: int) -> None:
        self.path = output / "metrics.jsonl" if output is not None and rank == 0 else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# ---- checkpoints ----------------------------------------------------------------------------------
def _save_checkpoint(output: Path, model, optimizer, scheduler, state, config: DistillConfig, rank: int) -> None:
    if rank != 0:
        return
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    meta_state = {}
    for index, values in opt_state["state"].items():
        meta_state[index] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.contiguous()
            else:
                meta_state[index][key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if state["epoch_rng"] is not None:
        tensors["rng.epoch"] = state["epoch_rng"]
    meta = {
        "step": state["step"],
        "epoch": state["epoch"],
        "batches_in_epoch": state["batches_in_epoch"],
        "history": state["history"],
        "optimizer": {"param_groups": opt_state["param_groups"], "state": meta_state},
        "scheduler": scheduler.state_dict(),
        "rng_python": _jsonable(random.getstate()),
        "config": dataclasses.asdict(config),
    }
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".checkpoint-tmp-"))
    save_file(tensors, staging / "state.safetensors")
    (staging / "state.json").write_text(json.dumps(meta))
    final = output / f"checkpoint-{state['step']}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)  # the checkpoint appears whole or not at all
    latest = output / ".latest.tmp"
    latest.write_text(final.name)
    os.replace(latest, output / "latest")


def _load_checkpoint(output: Path, model, optimizer, scheduler, state, rank: int) -> None:
    from safetensors.torch import load_file

    pointer = output / "latest"
    if not pointer.is_file():
        return  # nothing saved yet: start from scratch
    folder = output / pointer.read_text().strip()
    tensors = load_file(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for index, values in meta["optimizer"]["state"].items():
        opt_state["state"][int(index)] = dict(values)
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(meta["scheduler"])
    state.update(step=meta["step"], epoch=meta["epoch"], batches_in_epoch=meta["batches_in_epoch"],
                 history=meta["history"], epoch_rng=tensors.get("rng.epoch"))
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tuples(meta["rng_python"]))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


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
