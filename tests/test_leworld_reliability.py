"""LeWorld's reliability: non-finite weights never train on or reach a checkpoint, checkpoints of another phase are
refused, checkpoint folders keep other runs' files, a resume at any step equals the uninterrupted run, and short runs
of every config finish."""

import re
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.leworld_data import LeWorldDataModule
from experiment.cli import main
from lightning_modules.checkpointing import RunCheckpoint
from lightning_modules.guarded import NonFiniteGuard
from lightning_modules.leworld import LeWorldBaseline, LeWorldPhase1, LeWorldPhase2, LeWorldPhase3
from models.leworld import BigLeWorldModel
from tests.conftest import REPO
from tests.test_leworld import TINY_DATA, make_trainer, tiny_system
from tests.test_leworld_modules import TINY_SYSTEM

CONFIGS = REPO / "configs" / "leworld"
TINY_BLM = dict(state_dim=16, slot_hidden=16, d_read=8, d_model=16, num_layers=1, num_heads=2, info_dim=8)


def make_module(name: str):
    if name == "baseline":
        return LeWorldBaseline(BigLeWorldModel(16, 0, 16, 8, 16, 1, 2, 8))
    return {"phase1": LeWorldPhase1, "phase2": LeWorldPhase2, "phase3": LeWorldPhase3}[name](tiny_system())


class InjectNaN(Callback):
    """Writes a NaN into one trained weight before the step ``at_step`` (and every later step with ``repeat``)."""

    def __init__(self, at_step: int, repeat: bool = False) -> None:
        self.at_step, self.repeat, self.injected = at_step, repeat, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step or (self.repeat and trainer.global_step > self.at_step):
            with torch.no_grad():
                next(p for p in module.parameters() if p.requires_grad).view(-1)[0] = float("nan")
            self.injected += 1


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# --- non-finite weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["phase1", "phase2", "phase3", "baseline"])
def test_an_injected_nan_is_rolled_back_and_never_reaches_a_checkpoint(tmp_path, name):
    L.seed_everything(0)
    module, inject = make_module(name), InjectNaN(at_step=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="run", every_n_train_steps=1)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[inject, checkpoint])
    trainer.fit(module, LeWorldDataModule(**TINY_DATA))
    assert inject.injected == 1 and trainer.global_step == 6
    assert all_finite(module.state_dict().values()), "training went on with non-finite weights"
    assert all_finite(torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"].values())
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped == 1


def test_repeated_nans_stop_training_with_a_clear_error_and_no_non_finite_checkpoint(tmp_path):
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="run-{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(tmp_path, max_steps=20, callbacks=[InjectNaN(at_step=3, repeat=True), checkpoint])
    with pytest.raises(FloatingPointError, match="in a row"):
        trainer.fit(LeWorldPhase2(tiny_system()), LeWorldDataModule(**TINY_DATA))
    written = sorted(tmp_path.glob("run-*.ckpt"))
    assert written
    for path in written:
        assert all_finite(torch.load(path, weights_only=True)["state_dict"].values()), path.name


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_init_from_refuses_a_non_finite_checkpoint_naming_the_file(tmp_path):
    state = {f"system.{k}": v.clone() for k, v in tiny_system().state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    path = tmp_path / "nan_phase1.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as excinfo:
        LeWorldPhase2(tiny_system(), init_from=str(path))
    assert "non-finite" in one_line_error(excinfo)


def test_init_from_an_empty_file_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.touch()
    with pytest.raises(ValueError, match=re.escape(str(path))) as excinfo:
        LeWorldPhase2(tiny_system(), init_from=str(path))
    one_line_error(excinfo)


def test_init_from_a_checkpoint_of_another_size_names_the_file_and_the_first_mismatching_tensors(tmp_path):
    path = tmp_path / "small.ckpt"
    torch.save({"state_dict": {f"system.{k}": v for k, v in tiny_system().state_dict().items()}}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as excinfo:
        LeWorldPhase2(tiny_system(slm_d_model=32), init_from=str(path))
    message = one_line_error(excinfo)
    assert re.search(r"slms\.0\.\S+ \(16.*\) .*\(32.*\)", message), message


# --- checkpoints of another phase or run ------------------------------------------------------------------------
def tiny_args(config: str) -> list[str]:
    """Command-line overrides that shrink a LeWorld config's data and model."""
    data = dict(TINY_DATA)
    if "latent" in config:  # what the overlay is about stays
        data.pop("difficulty")
    if config == "fill_experience_file.yaml":  # the shipped file's 256 states of 32 numbers fix the memory's shape
        data.update(word_size=32, num_pages=8)
    args = [f"--data.init_args.{k}={v}" for k, v in data.items()]
    if config.startswith(("no_memory", "oracle")):  # the baselines (and their overlays) have a BLM, no system
        args += [f"--model.init_args.blm.init_args.{k}={v}" for k, v in TINY_BLM.items()]
        if config.startswith("oracle"):
            args += [f"--model.init_args.memory.init_args.{k}={v}"
                     for k, v in dict(num_words=256, word_size=8, max_read_range=16, d_read=8).items()]
    else:
        system = TINY_SYSTEM | ({"word_size": 32, "max_read_range": 8} if config == "fill_experience_file.yaml" else {})
        args += [f"--model.init_args.system.init_args.{k}={v}" for k, v in system.items()]
    return args + ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                   "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def fit_config(config: str, *args: str):
    return main(["fit", "--config", str(CONFIGS / config), *tiny_args(config), *args])


def test_resuming_another_phases_checkpoint_is_refused_and_keeps_its_file(in_tmp):
    fit_config("phase1.yaml", "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    phase1 = in_tmp / "checkpoints" / "leworld" / "phase1.ckpt"
    assert phase1.is_file()
    with pytest.raises(ValueError, match=r"LeWorldPhase1.*LeWorldPhase2"):
        fit_config("phase2.yaml", "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--ckpt_path", str(phase1))
    assert phase1.is_file() and not (phase1.parent / "phase2.ckpt").exists()


def test_a_run_never_deletes_a_checkpoint_it_did_not_write(in_tmp):
    fit_config("phase2.yaml", "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    phase2 = in_tmp / "checkpoints" / "leworld" / "phase2.ckpt"
    copy = in_tmp / "elsewhere" / "phase2.ckpt"
    copy.parent.mkdir()
    shutil.copy(phase2, copy)
    # A run of the same class, resumed from that copy, writes its own file in the same folder.
    fit_config("ablation_no_phase1.yaml", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
               "--ckpt_path", str(copy))
    assert (phase2.parent / "ablation_no_phase1.ckpt").is_file()
    assert phase2.is_file(), "the resumed run deleted the checkpoint another run wrote"


# --- resume -----------------------------------------------------------------------------------------------------
class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit_recording(folder, name, max_steps, checkpoint=None, ckpt_path=None, **trainer_args):
    L.seed_everything(0)
    module, record = make_module(name), RecordLosses()
    callbacks = [record] + ([checkpoint] if checkpoint else [])
    make_trainer(folder, max_steps=max_steps, callbacks=callbacks, **trainer_args).fit(
        module, LeWorldDataModule(**TINY_DATA), ckpt_path=ckpt_path)
    return module, record.losses


@pytest.mark.parametrize("name,saved_at", [("phase2", "train_batch_end"), ("phase3", "validation_end")])
def test_resume_mid_epoch_equals_the_uninterrupted_run(tmp_path, name, saved_at):
    # 4 batches an epoch: step 5 is the first batch of the second epoch; the run ends at step 7.
    if saved_at == "train_batch_end":
        checkpoint, args = dict(every_n_train_steps=5), dict(val_check_interval=100, check_val_every_n_epoch=None)
    else:
        checkpoint, args = {}, dict(val_check_interval=5, check_val_every_n_epoch=None)
    full, full_losses = fit_recording(tmp_path / "full", name, 7, **args)
    saving = ModelCheckpoint(dirpath=tmp_path / "half", filename="at5", **checkpoint)
    fit_recording(tmp_path / "half", name, 5, checkpoint=saving, **args)
    at5 = str(tmp_path / "half" / "at5.ckpt")
    resumed, resumed_losses = fit_recording(tmp_path / "resumed", name, 7, ckpt_path=at5, **args)
    assert resumed_losses == {k: v for k, v in full_losses.items() if k > 5}
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key


# --- short runs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_survives_a_run_that_stops_before_its_first_validation_and_leaves_its_checkpoint(in_tmp, config):
    run = fit_config(config, "--trainer.max_steps=3")
    assert run.trainer.global_step == 3
    written = torch.load(in_tmp / "checkpoints" / "leworld" / config.replace(".yaml", ".ckpt"), weights_only=True)
    assert written["global_step"] == 3  # not a stale file of an earlier run, which the next phase would start from


def test_a_short_run_resumed_from_its_final_checkpoint_equals_the_uninterrupted_run(tmp_path):
    args = dict(val_check_interval=100, check_val_every_n_epoch=None)  # as the configs: no validation in 3 steps
    full, full_losses = fit_recording(tmp_path / "full", "phase2", 7, **args)
    saving = RunCheckpoint(dirpath=tmp_path / "short", filename="p")
    fit_recording(tmp_path / "short", "phase2", 3, checkpoint=saving, **args)
    resumed, resumed_losses = fit_recording(tmp_path / "resumed", "phase2", 7, ckpt_path=str(tmp_path / "short/p.ckpt"),
                                            **args)
    assert resumed_losses == {k: v for k, v in full_losses.items() if k > 3}
    for (key, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key
