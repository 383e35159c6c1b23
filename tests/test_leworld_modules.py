"""LeWorld's training modules: loss terms by hand, metrics, the data contract and predictions."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.leworld_data import LeWorldDataModule
from experiment.cli import main
from lightning_modules.leworld import EvalMetrics, LeWorldBaseline, LeWorldData, LeWorldPhase1
from lightning_modules.leworld_losses import sequence_losses, step_losses
from models.leworld import BigLeWorldModel
from tests.conftest import REPO
from tests.test_leworld import TINY_DATA, batch_of, make_trainer, tiny_system

TINY_SYSTEM = dict(state_dim=16, num_words=256, word_size=8, max_read_range=16, d_read=8, slm_d_model=16,
                   blm_d_model=16, blm_layers=1, info_dim=8)


def fake_step(route_probs, hi_logits, lo_logits, prediction):
    return {"route_probs": torch.tensor(route_probs), "mask": None, "prediction": torch.tensor(prediction),
            "slm": {"start_logits_high": torch.tensor(hi_logits), "start_logits_low": torch.tensor(lo_logits)}}


def test_step_losses_by_hand():
    # 2 samples, 2 SLMs; SLM 0 is sure of start (hi 0, lo 0), SLM 1 of (hi 0, lo 1) in sample 0 and (hi 0, lo 0) in 1.
    big = 50.0
    hi = [[[big, 0.0], [big, 0.0]], [[big, 0.0], [big, 0.0]]]
    lo = [[[big, 0.0], [0.0, big]], [[big, 0.0], [big, 0.0]]]
    step = fake_step([[0.5, 1.0], [0.5, 0.5]], hi, lo, [[1.0, 2.0], [0.0, 0.0]])
    losses = step_losses(step, torch.tensor([[0.0, 0.0], [0.0, 2.0]]))
    assert losses["next_state_loss"].item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    # usage (mean gate per SLM) [0.5, 0.75]: variance 0.015625 over squared mean 0.390625
    assert losses["balance_loss"].item() == pytest.approx(0.04)
    # three gates at 1/2 (entropy ln 2), one at 1 (entropy ~0 after clamping)
    assert losses["entropy_loss"].item() == pytest.approx(3 * math.log(2) / 4, abs=1e-4)
    # the two SLMs pick the same start in sample 1 only: off-diagonal mass 2 of 2 pairs, over 2 samples
    assert losses["diversity_loss"].item() == pytest.approx((0 + 2) / 2 / 2, abs=1e-4)


def test_sequence_losses_average_the_steps_and_weight_the_terms():
    hi = [[[0.0, 0.0], [1.0, 0.0]]]
    steps = [fake_step([[0.2, 0.9]], hi, hi, [[1.0, 1.0]]), fake_step([[0.7, 0.4]], hi, hi, [[3.0, 1.0]])]
    states = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    per_step = [step_losses(s, states[:, t + 1]) for t, s in enumerate(steps)]
    losses, total = sequence_losses(steps, states, {"balance": 0.5, "entropy": 2.0})
    for name in per_step[0]:
        assert losses[name].item() == pytest.approx((per_step[0][name] + per_step[1][name]).item() / 2)
    expected = losses["next_state_loss"] + 0.5 * losses["balance_loss"] + 2.0 * losses["entropy_loss"]
    assert total.item() == pytest.approx(expected.item())


def test_metrics_are_one_collection_per_split_with_the_routing_entropy():
    metrics = EvalMetrics("val/", horizons=2, num_slms=3)
    batch = {"starts": torch.tensor([[[0, 8, 0]]]), "ends": torch.tensor([[[4, 12, 1]]]),
             "valid": torch.tensor([[True, True, False]])}
    masks = torch.tensor([[[1.0, 1.0, 0.0]]])
    metrics.update_addresses(torch.tensor([[[0, 9, 40]]]), torch.tensor([[[4, 12, 41]]]), batch, masks)
    metrics["mse"].update(torch.ones(2, 3), torch.zeros(2, 3))
    metrics["mse/h1"].update(torch.ones(2, 3), torch.zeros(2, 3))
    values = metrics.compute()
    assert values["val/hit_rate"] == 1.0 and values["val/address_iou"] == pytest.approx((1 + 3 / 4) / 2)
    assert values["val/routing_entropy"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert [values[f"val/usage/slm_{i}"].item() for i in range(3)] == [1.0, 1.0, 0.0]
    assert "val/mse/h2" not in values  # never updated: left out, not NaN


class StatesOnly(LightningDataModule):
    """Batches of LeWorld sequences without the memory that drives them."""

    def __init__(self, with_task: bool) -> None:
        super().__init__()
        self.data = LeWorldDataModule(**TINY_DATA)
        if with_task:
            self.task = self.data.task

    def train_dataloader(self):
        return DataLoader([batch_of(self.data)], batch_size=None)


@pytest.mark.parametrize("with_task,missing", [(False, "task, memory_bits_for"), (True, "memory_bits_for")])
def test_a_datamodule_without_the_memory_is_rejected_naming_what_is_missing(tmp_path, with_task, missing):
    assert isinstance(LeWorldDataModule(**TINY_DATA), LeWorldData)
    with pytest.raises(TypeError, match=f"missing: {missing}$"):
        make_trainer(tmp_path, max_steps=1).fit(LeWorldPhase1(tiny_system()), StatesOnly(with_task))
    with pytest.raises(TypeError, match="missing: a datamodule"):
        make_trainer(tmp_path, max_steps=1).fit(LeWorldPhase1(tiny_system()), StatesOnly(True).train_dataloader())


def test_predict_from_the_command_line_saves_predictions_and_read_ranges(in_tmp):
    tiny = [f"--data.init_args.{k}={v}" for k, v in TINY_DATA.items()]
    tiny += [f"--model.init_args.system.init_args.{k}={v}" for k, v in TINY_SYSTEM.items()]
    run = main(["predict", "--config", str(REPO / "configs/leworld/phase1.yaml"), *tiny,
                "--trainer.callbacks+=lightning_modules.leworld.PredictionsToFile",
                "--trainer.callbacks.init_args.path=out/predictions.pt", "--trainer.enable_progress_bar=false"])
    saved = torch.load(in_tmp / "out" / "predictions.pt", weights_only=True)
    test = run.datamodule.split("test")
    n, steps = TINY_DATA["test_sequences"], TINY_DATA["seq_len"] - 1
    assert saved["predictions"].shape == (n, steps, TINY_DATA["state_dim"]) and saved["starts"].shape == (n, steps, 3)
    assert torch.equal(saved["targets"], test["states"][:, 1:])
    assert torch.allclose(saved["sq_error"], ((saved["predictions"] - saved["targets"]) ** 2).mean(-1))
    assert (saved["starts"] >= 0).all() and (saved["ends"] > saved["starts"]).all()
    assert (saved["ends"] <= TINY_DATA["num_words"]).all() and set(saved["gates"].unique().tolist()) <= {0.0, 1.0}
    # the same as the model's own teacher-forced rollout on the test memory
    system = run.model.system.eval()
    system.memory.load_bits(run.datamodule.memory_bits_for("test"))
    with torch.no_grad():
        out = system.multi_step_forward(test["states"][:4], test["chars"][:4])
    assert torch.allclose(saved["predictions"][:4], out["predictions"], atol=1e-5)
    assert torch.equal(saved["starts"][:4], out["start"])


def test_baseline_predictions_are_its_teacher_forced_steps():
    L.seed_everything(0)
    dm = LeWorldDataModule(**TINY_DATA)
    baseline = LeWorldBaseline(BigLeWorldModel(16, 0, 16, 8, 16, 1, 2, 8)).eval()
    batch = batch_of(dm, "test", n=4)
    with torch.no_grad():
        out = baseline.predict_step(batch, 0)
        first = baseline.step(batch["states"][:, 0], batch["states"][:, 0], None)
        later = baseline.step(batch["states"][:, 1], batch["states"][:, 2], None)
    assert out["predictions"].shape == (4, TINY_DATA["seq_len"] - 1, 16)
    assert torch.allclose(out["predictions"][:, 0], first, atol=1e-6)
    assert torch.allclose(out["predictions"][:, 2], later, atol=1e-6)


def test_an_unknown_balance_target_names_the_known_ones():
    from lightning_modules.leworld_phases import check_balance_target

    check_balance_target("need")
    check_balance_target("uniform")
    with pytest.raises(ValueError, match=r"unknown balance_target 'even'; expected one of \['need', 'uniform'\]"):
        check_balance_target("even")
