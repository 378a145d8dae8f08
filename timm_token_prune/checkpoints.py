"""Checkpoints of `distill`: `checkpoint-<step>/` folders (state.safetensors + state.json) in the output
folder, and a `latest` file naming the newest one.

Saving writes a temporary folder and renames it, then `latest` through a temporary file: a killed run
leaves whole checkpoints only. Resuming takes the newest checkpoint (by step) that reads whole and fits the
model and optimiser, skipping damaged ones with a warning; it is read and checked completely before any of
it is applied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distill_config import DistillConfig
from .errors import CheckpointError
from .files import normal_permissions
from .training import RunningTotals, TrainState

LATEST = "latest"
METRICS = "metrics.jsonl"
FORMAT = 2  # 1: no "format" field (timm-token-prune 0.1.0)
_NAME = re.compile(r"checkpoint-(\d+)")
_USER = 4  # warnings point at the caller of distill: load_newest <- _start <- distill <- caller
_REQUIRED = ("step", "epoch", "batches_in_epoch", "history", "optimizer", "scheduler", "rng_python")


def run_files(output: Path) -> list[str]:
    """The names in `output` that a distill run writes: checkpoints, `latest`, metrics."""
    if not output.is_dir():
        return []
    return sorted(p.name for p in output.iterdir() if p.name in (LATEST, METRICS) or _NAME.fullmatch(p.name))


def save(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
         config: DistillConfig) -> Path:
    """Write `checkpoint-<step>/` (replacing one of the same step) and point `latest` at it. Returns the folder."""
    from safetensors.torch import save_file

    tensors, meta = _serialise(model, optimizer, scheduler, state, config)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".checkpoint-tmp-"))
    try:
        save_file(tensors, staging / "state.safetensors")
        (staging / "state.json").write_text(json.dumps(meta))
        for path in (staging, *staging.iterdir()):  # mkdtemp's folder and safetensors' file are private
            normal_permissions(path)
        final = output / f"checkpoint-{state.step}"
        _replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    latest = output / ".latest.tmp"
    latest.write_text(final.name)
    os.replace(latest, output / LATEST)  # last: `latest` only ever names a whole checkpoint
    return final


def _serialise(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
               config: DistillConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
    if state.epoch_rng is not None:
        tensors["rng.epoch"] = state.epoch_rng
    meta = {
        "format": FORMAT,
        "step": state.step,
        "epoch": state.epoch,
        "batches_in_epoch": state.batches_in_epoch,
        "history": state.history,
        "totals": {"sums": state.totals.sums, "count": state.totals.count},  # the epoch so far (format 2)
        "optimizer": {"param_groups": opt_state["param_groups"], "state": meta_state},
        "scheduler": scheduler.state_dict(),
        "rng_python": _jsonable(random.getstate()),
        "config": dataclasses.asdict(config),
    }
    return tensors, meta


def _replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is moved aside first (a folder cannot be replaced in one
    rename) and deleted once the new one is in place."""
    if not final.exists():
        os.replace(new, final)  # the checkpoint appears whole or not at all
        return
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=".checkpoint-old-"))
    os.replace(final, old / final.name)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


# ---- resuming -------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint read whole from disk and checked against the model and optimiser, not yet applied."""

    folder: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: TrainState
    rng_torch: torch.Tensor
    rng_python: tuple

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
        """Load the weights, optimiser, scheduler and RNG states; returns the run's state."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng_torch)
        random.setstate(self.rng_python)
        return self.state


def checkpoint_folders(output: Path) -> list[Path]:
    """The `checkpoint-<step>/` folders directly in `output`, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def _step_of(name: str) -> int:
    return int(_NAME.fullmatch(name).group(1))


def load_newest(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """The newest checkpoint in `output` that reads whole and fits `model` and `optimizer`; damaged ones are
    skipped with a warning. FileNotFoundError when there is none at all, CheckpointError when none is intact."""
    if not output.is_dir():
        raise FileNotFoundError(
            f"resume=True, but the output_dir {output} does not exist: check the path, or start without resume"
        )
    folders = checkpoint_folders(output)
    if not folders:
        raise FileNotFoundError(
            f"resume=True, but {output} holds no checkpoint-<step>/ folder to continue from: check the path, or "
            "start without resume in a new or empty output_dir"
        )
    latest = _latest(output)
    problems = []
    for folder in folders:
        try:
            checkpoint = read(folder, model, optimizer)
        except CheckpointError as error:
            warnings.warn(f"skipping a damaged checkpoint: {error}", stacklevel=_USER)
            problems.append(str(error))
            continue
        if latest is not None and _step_of(latest) < _step_of(folder.name):  # killed between the two renames
            warnings.warn(f"{output / LATEST} names {latest}, but {folder.name} is newer and intact: resuming from "
                          f"{folder.name}", stacklevel=_USER)
        return checkpoint
    raise CheckpointError(f"no intact checkpoint to resume from in {output}: " + "; ".join(problems))


def _latest(output: Path) -> str | None:
    """The checkpoint `latest` names, if it names a checkpoint folder directly in `output`; otherwise None (a
    name elsewhere is ignored, with a warning: resuming never reads outside `output`)."""
    pointer = output / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        warnings.warn(f"ignoring {pointer}: it cannot be read ({error})", stacklevel=_USER + 1)
        return None
    if not _NAME.fullmatch(name) or not (output / name).is_dir():
        warnings.warn(f"ignoring {pointer}: {name[:80]!r} is not a checkpoint-<step> folder in {output}",
                      stacklevel=_USER + 1)
        return None
    return name


def read(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Read `folder` whole and check it against `model` and `optimizer`; CheckpointError says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(folder / "state.safetensors")
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as error:  # missing, truncated, not JSON
        raise CheckpointError(f"{folder}: {type(error).__name__}: {error}") from error
    try:
        return _checked(folder, tensors, meta, model, optimizer)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: {_describe(error)}") from error


def _checked(folder: Path, tensors: dict[str, torch.Tensor], meta: Any, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> Checkpoint:
    missing = [key for key in _REQUIRED if key not in meta] + [key for key in ["rng.torch"] if key not in tensors]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_weights(weights, model)
    opt_state = _optimizer_state(tensors, meta["optimizer"], optimizer)
    for name in ("rng.torch", "rng.epoch"):
        if name in tensors:
            torch.Generator().set_state(tensors[name])  # raises if it is no RNG state
    rng_python = _tuples(meta["rng_python"])
    random.Random().setstate(rng_python)  # raises if it is no RNG state
    if not isinstance(meta["scheduler"], dict) or "last_epoch" not in meta["scheduler"]:
        raise ValueError("scheduler state without last_epoch")
    state = TrainState(
        step=_count(meta, "step"), epoch=_count(meta, "epoch"), batches_in_epoch=_count(meta, "batches_in_epoch"),
        history=_history(meta["history"]), epoch_rng=tensors.get("rng.epoch"), totals=_totals(meta.get("totals")),
    )
    return Checkpoint(folder, weights, opt_state, meta["scheduler"], state, tensors["rng.torch"], rng_python)


def _check_weights(weights: dict[str, torch.Tensor], model: nn.Module) -> None:
    expected = model.state_dict()
    if weights.keys() != expected.keys():
        extra, absent = sorted(weights.keys() - expected.keys()), sorted(expected.keys() - weights.keys())
        raise ValueError(f"its weights do not fit the model (unexpected {extra[:3]}, missing {absent[:3]})")
    wrong = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"its weights do not fit the model: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, "
                         f"the model's {tuple(expected[wrong[0]].shape)}")


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state_dict from the JSON part and the tensors, checked against `optimizer`."""
    groups = saved["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError(f"its optimiser has parameter groups of {sizes}, this run's of "
                         f"{[len(g['params']) for g in optimizer.param_groups]}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in saved["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in state.items():
        if not 0 <= index < len(params):
            raise ValueError(f"its optimiser state names parameter {index} of {len(params)}")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != params[index].shape:
                raise ValueError(f"its optimiser's {name} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(params[index].shape)}")
    return {"param_groups": groups, "state": state}


def _count(meta: dict, key: str) -> int:
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} is {value!r}, not a count")
    return value


def _history(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(record, dict) for record in value):
        raise ValueError("history is not a list of metrics dicts")
    return value


def _totals(value: Any) -> RunningTotals:
    """The running totals of the interrupted epoch; a format-1 checkpoint has none (its epoch's metrics then
    cover only the batches after the resume)."""
    if value is None:
        return RunningTotals()
    sums, count = value["sums"], value["count"]
    if not isinstance(sums, dict) or not all(isinstance(v, (int, float)) for v in sums.values()):
        raise ValueError("totals.sums is not a dict of numbers")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"totals.count is {count!r}, not a count")
    return RunningTotals(dict(sums), count)


def _describe(error: Exception) -> str:
    return f"missing {error}" if isinstance(error, KeyError) else str(error)


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
