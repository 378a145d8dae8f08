"""Distillation fine-tuning: it learns, resumes exactly, runs under DDP, and rejects bad input early."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import torch
from conftest import LOCATIONS, images, make_model
from torch.utils.data import DataLoader, TensorDataset

import timm_token_prune as ttp
from timm_token_prune.distill import evaluate


def dataset(n: int = 48, seed: int = 0, classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(images(n, seed=seed), torch.randint(0, classes, (n,), generator=g))


def student(budget: float = 0.5, calibrated: bool = True, **overrides) -> torch.nn.Module:
    model = ttp.patch_model(make_model("vit", **overrides), budget=budget, prune_locations=LOCATIONS)
    if calibrated:
        ttp.calibrate(model, [images(16, seed=30)])
    return model


def test_thresholds_never_calibrated_are_calibrated_on_the_first_batches_and_reach_the_budget(tmp_path):
    """From the default thresholds (far from every score) distill still reaches the budget: it calibrates
    them on its first batches, says so, and logs it."""
    model = student(budget=0.5, calibrated=False)
    loader = DataLoader(dataset(96), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match="never calibrated: distill calibrated them on the first 96 training images") as said:
        ttp.distill(model, loader, epochs=3, lr=1e-3, output_dir=tmp_path, progress=False)
    assert sum("calibrat" in str(w.message) for w in said) == 1  # said once: not by its eval passes too
    assert abs(evaluate(model, loader)["flops_ratio"] - 0.5) <= 0.05
    assert '"kind": "calibration"' in (tmp_path / "metrics.jsonl").read_text()
    assert ttp.get_pruner(model).is_calibrated
    with warnings.catch_warnings():  # calibrated once, never again
        warnings.simplefilter("error")
        ttp.distill(model, loader, max_steps=1, progress=False)


def test_a_one_shot_iterator_is_not_eaten_by_calibration():
    model = student(budget=0.5, calibrated=False)
    batches = iter([(images(8, seed=s), torch.arange(8)) for s in range(3)])
    with pytest.warns(UserWarning, match="one-shot iterator") as said:
        ttp.distill(model, batches, max_steps=3, eval_loader=[images(4)], progress=False)
    assert not [w for w in said if "never set" in str(w.message)]  # distill said it once, its way


def test_a_few_steps_lower_the_loss_and_move_flops_to_the_budget(tmp_path):
    model = student(budget=0.8)  # calibrated for 0.8: the thresholds must learn the new budget
    ttp.get_pruner(model).config.budget = 0.6
    loader = DataLoader(dataset(32), batch_size=8, shuffle=True)
    before = evaluate(model, loader)
    history = ttp.distill(
        model, loader, epochs=6, lr=1e-3, min_lr=1e-3, threshold_lr=5e-4, output_dir=tmp_path, progress=False, log_every=1
    )
    after = evaluate(model, loader)
    assert history[-1]["loss"] < history[0]["loss"]
    assert abs(after["flops_ratio"] - 0.6) < abs(before["flops_ratio"] - 0.6)
    assert after["top1"] > before["top1"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "step"' in line for line in lines) and sum('"kind": "epoch"' in line for line in lines) == 6
    assert (tmp_path / "latest").read_text() == "checkpoint-24"


class _Killed(Exception):
    pass


class _KillingLoader(DataLoader):
    """Dies after `after` batches, like a killed process."""

    def __init__(self, *args, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.seen = after, 0

    def __iter__(self):
        for batch in super().__iter__():
            if self.seen == self.after:
                raise _Killed
            self.seen += 1
            yield batch


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    options = dict(epochs=2, lr=1e-3, checkpoint_every=2, progress=False, grad_accum_steps=1, seed=3)
    data = dataset(40)

    def run(loader, out, resume=False):
        torch.manual_seed(0)
        model = student(proj_drop_rate=0.2)  # dropout: the RNG must be restored too
        ttp.distill(model, loader, teacher=make_model("vit"), output_dir=out, resume=resume, **options)
        return model

    reference = run(DataLoader(data, batch_size=8, shuffle=True), tmp_path / "a")
    with pytest.raises(_Killed):
        run(_KillingLoader(data, batch_size=8, shuffle=True, after=7), tmp_path / "b")  # dies in epoch 2
    assert (tmp_path / "b" / "latest").read_text() == "checkpoint-6"
    resumed = run(DataLoader(data, batch_size=8, shuffle=True), tmp_path / "b", resume=True)
    expected, got = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = student()
    ttp.distill(model, DataLoader(dataset(32), batch_size=4, shuffle=True), epochs=1, lr=1e-3, progress=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_keeps_replicas_identical(tmp_path):
    from safetensors.torch import load_file

    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, second = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    torch.manual_seed(0)
    initial = student().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["token_pruner.thresholds"], initial["token_pruner.thresholds"])


@pytest.mark.parametrize(
    "case, match",
    [
        ("shape", r"shape \(B, 3, H, W\)"),
        ("labels", r"labels must be in \[0, 9\]"),
        ("teacher", "teacher has 7 classes and the student 10"),
        ("budget", "unreachable"),
    ],
)
def test_bad_input_fails_before_any_step(case, match):
    model = student(budget=0.5)
    if case == "budget":
        ttp.get_pruner(model).config.budget = 0.05
    before = copy.deepcopy(model.state_dict())
    x, y = images(8), torch.arange(8)
    teacher = None
    if case == "shape":
        x = torch.randn(8, 1, 32, 32)
    elif case == "labels":
        y = torch.arange(8) + 9
    elif case == "teacher":
        teacher = make_model("vit", num_classes=7)
    with pytest.raises(ValueError, match=match):
        ttp.distill(model, DataLoader(TensorDataset(x, y), batch_size=4), teacher=teacher, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unlabelled_batches_and_dict_batches():
    model = student()
    plain = [images(4, seed=s) for s in range(3)]
    history = ttp.distill(model, plain, max_steps=3, progress=False)
    assert "ce" in history[0] and history[0]["ce"] == 0.0
    dicts = [{"pixel_values": images(4, seed=s), "labels": torch.arange(4)} for s in range(3)]
    assert ttp.distill(model, dicts, max_steps=3, progress=False)[0]["acc"] >= 0.0


def test_evaluate_reports_top1_and_gflops():
    model = student()
    ttp.calibrate(model, [images(16)])
    data = dataset(16)
    result = evaluate(model, DataLoader(data, batch_size=8))
    with torch.no_grad():
        logits = model(data.tensors[0])
    expected = 100.0 * (logits.argmax(-1) == data.tensors[1]).float().mean().item()
    assert result["top1"] == pytest.approx(expected)
    assert result["flops_ratio"] == pytest.approx(ttp.last_stats(model).flops_ratio, abs=0.1)
    assert "gflops" not in evaluate(make_model("vit"), DataLoader(data, batch_size=8))


# ---- the teacher ----------------------------------------------------------------------------------
def labelled(n: int, size: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (images, labels) batches of `size` images: a loader with len() whose batches can be swapped."""
    g = torch.Generator().manual_seed(seed)
    return [(images(size, seed=seed * 100 + i), torch.randint(0, 10, (size,), generator=g)) for i in range(n)]


def flags(model: torch.nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_the_callers_teacher_keeps_its_flags_and_a_second_copy_of_it_trains_fully():
    dense = make_model("vit").train()
    dense.blocks[0].eval()  # mixed flags must come back exactly, not just model.train(True)
    dense.patch_embed.requires_grad_(False)
    before = flags(dense)
    first = ttp.patch_model(copy.deepcopy(dense), budget=0.5, prune_locations=LOCATIONS)
    modes_seen = []
    hook = dense.register_forward_pre_hook(lambda module, args: modes_seen.append(module.training))
    with pytest.warns(UserWarning, match="never calibrated"):  # uncalibrated thresholds: distill says so
        ttp.distill(first, labelled(2), teacher=dense, lr=1e-3, progress=False)
    hook.remove()
    assert flags(dense) == before
    assert modes_seen and not any(modes_seen)  # it ran in eval mode
    # the reported failure: a second student copied from the teacher trained its thresholds only
    second = ttp.patch_model(copy.deepcopy(dense), budget=0.5, prune_locations=LOCATIONS)
    head = second.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="never calibrated"):
        ttp.distill(second, labelled(2), teacher=dense, lr=1e-3, progress=False)
    assert not torch.equal(second.head.weight, head)
    bad_labels = [(images(4), torch.arange(4) + 9)]
    third = ttp.patch_model(copy.deepcopy(dense), budget=0.5, prune_locations=LOCATIONS)
    thresholds = ttp.get_pruner(third).thresholds.detach().clone()
    with pytest.raises(ValueError, match="labels must be in"), warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before distill calibrates (and warns)
        ttp.distill(third, bad_labels, teacher=dense, progress=False)
    assert torch.equal(ttp.get_pruner(third).thresholds, thresholds)  # the model is left as it was
    assert flags(dense) == before


@pytest.mark.parametrize("teacher", ["the student itself", "a model sharing its head"])
def test_a_teacher_that_shares_the_students_parameters_is_rejected_up_front(teacher):
    model = student().train()
    dense = model
    if teacher == "a model sharing its head":
        dense = make_model("vit")
        dense.head = model.head
    weights, before = copy.deepcopy(model.state_dict()), flags(model)
    with pytest.raises(ValueError, match="teacher shares parameters with the student.*teacher=None"):
        ttp.distill(model, labelled(2), teacher=dense, lr=1e-3, progress=False)
    assert flags(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


# ---- gradient accumulation ------------------------------------------------------------------------
def _train(batches, out=None, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = student()
    options = dict(lr=1e-3, min_lr=1e-4, progress=False, log_every=1, **options)
    ttp.distill(model, batches, teacher=make_model("vit"), output_dir=out, **options)
    return model


def _step_records(out) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "step"]


def test_the_last_partial_accumulation_group_of_each_epoch_takes_a_step(tmp_path):
    batches = labelled(7)
    model = _train(batches, tmp_path / "a", grad_accum_steps=3, epochs=2)
    steps = _step_records(tmp_path / "a")
    assert [(r["epoch"], r["step"]) for r in steps] == [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (1, 6)]  # ceil(7/3)
    assert steps[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)  # the cosine ends at min_lr on the last step
    assert (tmp_path / "a" / "latest").read_text() == "checkpoint-6"
    other = _train(batches[:6] + labelled(1, seed=5), grad_accum_steps=3, epochs=2)  # another 7th batch
    assert not torch.equal(model.token_pruner.thresholds, other.token_pruner.thresholds)
    assert not torch.equal(model.head.weight, other.head.weight)


def test_a_partial_group_steps_on_the_mean_gradient_of_its_batches():
    batches = labelled(7)
    partial = _train(batches, grad_accum_steps=3)  # groups 1-3, 4-6, 7
    repeated = _train(batches + batches[6:] * 2, grad_accum_steps=3)  # groups 1-3, 4-6, (7, 7, 7): same mean
    expected, got = repeated.state_dict(), partial.state_dict()
    # the key bias has no gradient in exact arithmetic (softmax ignores it): Adam makes its rounding noise a step
    compared = [k for k in expected if not k.endswith("attn.qkv.bias")]
    assert all(torch.allclose(expected[k], got[k], rtol=1e-4, atol=1e-6) for k in compared)
    initial = student().state_dict()
    assert not torch.allclose(initial["token_pruner.thresholds"], got["token_pruner.thresholds"], atol=1e-6)


def test_fewer_batches_than_one_accumulation_group_still_take_a_step(tmp_path):
    model = _train(labelled(2), tmp_path, grad_accum_steps=3)
    assert [r["step"] for r in _step_records(tmp_path)] == [1]
    assert _step_records(tmp_path)[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)
    assert not torch.equal(model.head.weight, student().head.weight)


def test_max_steps_beyond_what_the_loader_feeds_still_ends_the_schedule_at_min_lr(tmp_path):
    _train(labelled(3), tmp_path, max_steps=10)
    assert [r["step"] for r in _step_records(tmp_path)] == [1, 2, 3]
    assert _step_records(tmp_path)[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)
    with pytest.warns(UserWarning, match="ran out after 3 of max_steps=10"):  # no len(): known only at the end
        _train(iter(labelled(3)), max_steps=10)


# ---- empty loaders --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loader, options, match",
    [
        ([], {"max_steps": 5}, r"train_loader is empty \(len\(\) is 0\)"),
        (DataLoader(dataset(0), batch_size=4), {}, r"train_loader is empty \(len\(\) is 0\)"),
        (iter([]), {"max_steps": 5}, "train_loader is empty: it yielded no batch"),  # no len()
    ],
    ids=["list", "DataLoader", "iterator"],
)
def test_an_empty_loader_is_rejected_before_anything_changes(tmp_path, loader, options, match):
    model = student().train()
    weights, before = copy.deepcopy(model.state_dict()), flags(model)
    with pytest.raises(ValueError, match=match):
        ttp.distill(model, loader, output_dir=tmp_path / "run", progress=False, **options)
    assert not (tmp_path / "run").exists()
    assert flags(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_a_one_shot_iterator_used_up_before_the_last_epoch_is_an_error():
    with pytest.raises(ValueError, match="no batch in epoch 2 of 2: a generator or other one-shot iterator"):
        ttp.distill(student(), iter(labelled(2)), max_steps=5, epochs=2, progress=False)


# ---- output folders and resuming ------------------------------------------------------------------
RUN = {"epochs": 2, "lr": 1e-3, "checkpoint_every": 2, "progress": False, "seed": 3}  # 5 batches an epoch


def _run(loader, out, resume=False) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = student(proj_drop_rate=0.2)
    history = ttp.distill(model, loader, teacher=make_model("vit"), output_dir=out, resume=resume, **RUN)
    return model, history


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """An uninterrupted run's weights and history, and the folder of the same run killed at batch 8 of 10
    (checkpoints 2, 4 and 6, `latest` naming checkpoint-6)."""
    root = tmp_path_factory.mktemp("killed")
    data = dataset(40)
    model, history = _run(DataLoader(data, batch_size=8, shuffle=True), root / "reference")
    with pytest.raises(_Killed):
        _run(_KillingLoader(data, batch_size=8, shuffle=True, after=7), root / "run")
    return model.state_dict(), history, root / "run"


def _copy_of_killed_run(killed, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(killed[2], out)
    return out


def _resume(out) -> tuple[torch.nn.Module, list[dict]]:
    return _run(DataLoader(dataset(40), batch_size=8, shuffle=True), out, resume=True)


def _same_weights(expected: dict, model: torch.nn.Module) -> bool:
    got = model.state_dict()
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def _files(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `folder` with its inode, mtime and bytes: a rewrite shows even with equal bytes."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("existing", ["a killed run", "metrics only"])
def test_a_new_run_refuses_an_output_dir_that_holds_a_run(killed, tmp_path, existing):
    if existing == "a killed run":
        out = _copy_of_killed_run(killed, tmp_path)
    else:
        out = tmp_path / "run"
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    before = _files(out)
    model = student()
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(FileExistsError, match=r"already holds a distill run .*pass resume=True .* new or empty"):
        ttp.distill(model, labelled(2), output_dir=out, progress=False)
    assert _files(out) == before
    assert _same_weights(weights, model)


def test_a_new_run_may_use_an_existing_empty_output_dir(tmp_path):
    (tmp_path / "run").mkdir()
    ttp.distill(student(), labelled(2), output_dir=tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "latest").read_text() == "checkpoint-2"


def test_resume_without_latest_continues_from_the_newest_checkpoint_without_rewriting_older_ones(killed, tmp_path):
    out = _copy_of_killed_run(killed, tmp_path)
    (out / "latest").unlink()
    older = {k: v for k, v in _files(out).items() if k.startswith(("checkpoint-2/", "checkpoint-4/", "checkpoint-6/"))}
    model, _ = _resume(out)
    assert _same_weights(killed[0], model)
    assert {k: v for k, v in _files(out).items() if k in older} == older
    assert (out / "latest").read_text() == "checkpoint-10"


@pytest.mark.parametrize("folder", ["missing", "empty", "metrics only"])
def test_resume_without_a_checkpoint_to_continue_from_is_an_error(tmp_path, folder):
    out = tmp_path / "runs" / "typo"
    if folder != "missing":
        out.mkdir(parents=True)
    if folder == "metrics only":
        (out / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    before = sorted(p.name for p in tmp_path.rglob("*"))
    model = student()
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(FileNotFoundError, match=f"resume=True, but .*{re.escape(str(out))}"):
        ttp.distill(model, labelled(2), output_dir=out, resume=True, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert _same_weights(weights, model)


def _damage(folder: Path, how: str) -> None:
    tensors, meta = folder / "state.safetensors", folder / "state.json"
    if how == "truncated safetensors":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    elif how == "no safetensors":
        tensors.unlink()
    elif how == "bad JSON":
        meta.write_text(meta.read_text()[:-20])
    elif how == "no scheduler in JSON":  # the weights read fine: they must not be applied either
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "scheduler"}))


DAMAGES = ["truncated safetensors", "no safetensors", "bad JSON", "no scheduler in JSON"]


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(killed, tmp_path, how):
    out = _copy_of_killed_run(killed, tmp_path)
    _damage(out / "checkpoint-6", how)
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint: .*checkpoint-6"):
        model, _ = _resume(out)
    assert _same_weights(killed[0], model)  # exact resume from checkpoint-4
    assert (out / "latest").read_text() == "checkpoint-10"


@pytest.mark.parametrize("latest", ["../../etc", "/etc", "checkpoint-6/..", "checkpoint-x", "checkpoint-4"])
def test_latest_is_only_a_hint_and_never_read_outside_output_dir(killed, tmp_path, latest):
    out = _copy_of_killed_run(killed, tmp_path)
    (out / "latest").write_text(latest)
    if latest == "checkpoint-4":  # killed between renaming checkpoint-6 into place and updating latest
        match = "latest names checkpoint-4, but checkpoint-6 is newer and intact"
    else:
        match = "ignoring .*latest: .* is not a checkpoint-<step> folder in"
    with pytest.warns(UserWarning, match=match):
        model, _ = _resume(out)
    assert _same_weights(killed[0], model)


def test_no_intact_checkpoint_is_a_checkpoint_error_and_changes_nothing(killed, tmp_path):
    out = _copy_of_killed_run(killed, tmp_path)
    for step, how in zip((2, 4, 6), ("no scheduler in JSON", "truncated safetensors", "no scheduler in JSON")):
        _damage(out / f"checkpoint-{step}", how)
    before = _files(out)
    torch.manual_seed(0)
    model = student(proj_drop_rate=0.2)
    weights = copy.deepcopy(model.state_dict())
    match = f"no intact checkpoint to resume from in {re.escape(str(out))}: .*scheduler"
    with pytest.warns(UserWarning), pytest.raises(ttp.CheckpointError, match=match):
        ttp.distill(model, labelled(2), output_dir=out, resume=True, progress=False)
    assert _same_weights(weights, model)
    assert _files(out) == before



def test_a_resumed_run_reports_the_metrics_of_an_uninterrupted_one(killed, tmp_path):
    out = _copy_of_killed_run(killed, tmp_path)
    _, history = _resume(out)
    assert history == killed[1]
    last_epoch = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in line][-1]
    assert json.loads(last_epoch) == killed[1][-1]


def test_checkpoints_in_the_first_format_still_resume(killed, tmp_path, recwarn):
    """Written by timm-token-prune 0.1.0: no format field, no running totals."""
    out = _copy_of_killed_run(killed, tmp_path)
    first = ("step", "epoch", "batches_in_epoch", "history", "optimizer", "scheduler", "rng_python", "config")
    for meta_file in out.glob("checkpoint-*/state.json"):
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({k: meta[k] for k in first}))
    model, history = _resume(out)
    assert not [w for w in recwarn if "checkpoint" in str(w.message)]  # checkpoint-6 itself was used
    assert _same_weights(killed[0], model)
    assert history[0] == killed[1][0] and history[1]["step"] == 10


def test_checkpoints_get_the_permissions_the_umask_allows(tmp_path):
    """Not mkdtemp's private 0o700: a serving account in the group can read the run."""
    model = student()
    old = os.umask(0o027)
    try:
        ttp.distill(model, [(images(4), torch.arange(4))], max_steps=1, output_dir=tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    folder = tmp_path / "run" / "checkpoint-1"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o640}
    assert stat.S_IMODE((tmp_path / "run" / "latest").stat().st_mode) == 0o640


def test_checkpoints_and_distill_import_no_circle():
    """checkpoints reads DistillConfig from its own module; distill (and the package) still export it."""
    import ast
    import importlib

    checkpoints, distill, distill_config = (
        importlib.import_module(f"timm_token_prune.{name}") for name in ("checkpoints", "distill", "distill_config")
    )
    tree = ast.parse(Path(checkpoints.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "distill" not in imported and "distill_config" in imported
    assert ttp.DistillConfig is distill.DistillConfig is distill_config.DistillConfig


def test_pil_images_in_a_batch_are_refused_with_what_to_do_and_the_model_unchanged():
    from PIL import Image

    model = ttp.patch_model(make_model("vit"), budget=0.5, prune_locations=LOCATIONS)
    thresholds = ttp.get_pruner(model).thresholds.detach().clone()
    with pytest.raises(TypeError, match="first item is of type Image: convert the images to a"):
        ttp.distill(model, [(Image.new("RGB", (32, 32)), torch.tensor([0]))], teacher=make_model("vit"), progress=False)
    assert torch.equal(ttp.get_pruner(model).thresholds, thresholds)
    with pytest.raises(TypeError, match="got a str$"):
        ttp.calibrate(model, ["not a batch"])
    with pytest.raises(TypeError, match="got an Image: convert the images to a"):  # a lone image
        ttp.calibrate(model, [Image.new("RGB", (32, 32))])
    assert torch.equal(ttp.get_pruner(model).thresholds, thresholds)
