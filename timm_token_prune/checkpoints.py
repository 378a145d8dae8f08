"""Checkpoints of `distill`: `checkpoint-<step>/` folders (state.safetensors + state.json) in the output
folder, and a `latest` file naming the newest one."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .training import TrainState

LATEST = "latest"


def save(output: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState,
         config: Any) -> Path:
    """Write `checkpoint-<step>/` into a temporary folder and rename it, then point `latest` at it: a killed
    run leaves whole checkpoints only. Returns the folder."""
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
    if state.epoch_rng is not None:
        tensors["rng.epoch"] = state.epoch_rng
    meta = {
        "step": state.step,
        "epoch": state.epoch,
        "batches_in_epoch": state.batches_in_epoch,
        "history": state.history,
        "optimizer": {"param_groups": opt_state["param_groups"], "state": meta_state},
        "scheduler": scheduler.state_dict(),
        "rng_python": _jsonable(random.getstate()),
        "config": dataclasses.asdict(config),
    }
    staging = Path(tempfile.mkdtemp(dir=output, prefix=".checkpoint-tmp-"))
    save_file(tensors, staging / "state.safetensors")
    (staging / "state.json").write_text(json.dumps(meta))
    final = output / f"checkpoint-{state.step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)  # the checkpoint appears whole or not at all
    latest = output / ".latest.tmp"
    latest.write_text(final.name)
    os.replace(latest, output / LATEST)
    return final


@dataclass
class Checkpoint:
    """A checkpoint read from disk, not yet applied."""

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


def load_latest(output: Path) -> Checkpoint | None:
    """The checkpoint `latest` names, or None when there is no `latest`."""
    pointer = output / LATEST
    if not pointer.is_file():
        return None  # nothing saved yet: start from scratch
    return read(output / pointer.read_text().strip())


def read(folder: Path) -> Checkpoint:
    from safetensors.torch import load_file

    tensors = load_file(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    opt_state = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for index, values in meta["optimizer"]["state"].items():
        opt_state["state"][int(index)] = dict(values)
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state["state"].setdefault(int(index), {})[name] = value
    state = TrainState(step=meta["step"], epoch=meta["epoch"], batches_in_epoch=meta["batches_in_epoch"],
                       history=meta["history"], epoch_rng=tensors.get("rng.epoch"))
    return Checkpoint(
        folder=folder,
        model={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        optimizer=opt_state,
        scheduler=meta["scheduler"],
        state=state,
        rng_torch=tensors["rng.torch"],
        rng_python=_tuples(meta["rng_python"]),
    )


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
