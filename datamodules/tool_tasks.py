"""Problem batches for the tool agent, with the curriculum that decides which stages they come from."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset

from datamodules.distributed import evaluation_loader, per_device_batch, step_generator
from envs.tool_env import NUM_STAGES, all_problems, sample_problems


class ProblemStream(IterableDataset):
    """``batches`` random problem batches, regenerated identically for the same epoch, rank and curriculum.

    It starts after the batches of the epoch that were already trained on (``datamodule.batches_done``, restored from
    a checkpoint), so a run resumed mid-epoch sees the problems the uninterrupted run sees.
    """

    def __init__(self, datamodule: ToolTaskDataModule, batch_size: int, batches: int, rank: int) -> None:
        self.datamodule, self.batch_size, self.batches, self.rank = datamodule, batch_size, batches, rank

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        dm = self.datamodule
        # Seeded by epoch and rank: ranks see different problems, and a resumed run sees the same ones.
        generator = step_generator(dm.seed, self.rank, dm.epochs_completed)
        probs = dm.stage_probs()
        # (A generator: this runs at the first batch, after the callbacks' on_train_start.)
        done = dm.batches_done if dm.batches_done < self.batches else 0
        for index in range(self.batches):
            digits, stage = sample_problems(self.batch_size, probs, generator)
            if index >= done:  # the batches before were trained on before a resume: drawn and dropped
                yield digits, stage


class StageBatches(Dataset):
    """Evaluation problems pre-cut into batches that never mix stages (the seed's batch-mean encoder needs it)."""

    def __init__(self, digits: torch.Tensor, stages: torch.Tensor, batch_size: int) -> None:
        self.digits, self.stages = digits, stages
        self.chunks = [
            chunk for k in stages.unique().tolist() for chunk in (stages == k).nonzero().flatten().split(batch_size)
        ]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.chunks[index]
        return self.digits[chunk], self.stages[chunk]


class ToolTaskDataModule(LightningDataModule):
    """Arithmetic problems for the tool agent, served by curriculum stage.

    The curriculum's frontier stage moves after each validation of a fit (the ``AdvanceCurriculum`` callback, which
    a fit requires): in ``threshold`` mode when the greedy accuracy on the frontier stage reaches
    ``advance_threshold``, in ``schedule`` mode as ``schedule`` lists (one entry per epoch). Training batches mix the
    frontier stage with earlier ones (``replay_fraction``) so that mastered stages are not forgotten. The curriculum
    is part of this module's state and is saved in checkpoints.
    """

    def __init__(
        self,
        batch_size: int = 256,
        batches_per_epoch: int = 25,
        curriculum: Literal["threshold", "schedule"] = "threshold",
        advance_threshold: float = 0.95,
        schedule: list[int] | None = None,
        start_stage: int = 0,
        replay_fraction: float = 0.5,
        val_problems_per_stage: int = 1024,
        eval_batch_size: int = 4096,
        seed: int = 0,
    ) -> None:
        """
        Args:
            batch_size: Problems per optimisation step, summed over all devices.
            batches_per_epoch: Optimisation steps per epoch; validation and the curriculum update follow each epoch.
            curriculum: ``threshold`` (advance on accuracy) or ``schedule`` (advance by epoch).
            advance_threshold: Greedy accuracy on the frontier stage needed to advance (``threshold`` mode).
            schedule: Frontier stage of each epoch; the last entry holds afterwards (``schedule`` mode).
            start_stage: Frontier stage before training (``threshold`` mode).
            replay_fraction: Share of each batch drawn uniformly from stages before the frontier.
            val_problems_per_stage: Fixed random validation problems per stage.
            eval_batch_size: Batch size of validation, test and predict (each batch holds one stage).
            seed: Seed of the training problem stream (offset by rank and epoch).
        """
        super().__init__()
        if curriculum not in ("threshold", "schedule"):
            raise ValueError(f"unknown curriculum {curriculum!r}; expected 'threshold' or 'schedule'")
        if curriculum == "schedule" and not schedule:
            raise ValueError("curriculum='schedule' needs a non-empty `schedule` of stages")
        for stage in [start_stage, *(schedule or [])]:
            if stage not in range(NUM_STAGES):
                raise ValueError(f"unknown stage {stage}: stages are 0..{NUM_STAGES - 1}")
        if not 0.0 <= replay_fraction < 1.0:
            raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
        if not 0.0 < advance_threshold <= 1.0:
            raise ValueError(f"advance_threshold must be in (0, 1], got {advance_threshold}")
        if batch_size < 1 or batches_per_epoch < 1 or val_problems_per_stage < 1:
            raise ValueError("batch_size, batches_per_epoch and val_problems_per_stage must be positive")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seed = seed
        self.stage = schedule[0] if curriculum == "schedule" else start_stage
        self.epochs_completed = 0
        self.batches_done = 0  # training batches of the current epoch trained on (counted by AdvanceCurriculum)

    # --- curriculum -------------------------------------------------------------------------------------------
    def stage_probs(self) -> torch.Tensor:
        """Probability of each stage in a training batch."""
        probs = torch.zeros(NUM_STAGES)
        if self.stage == 0:
            probs[0] = 1.0
        else:
            probs[: self.stage] = self.hparams.replay_fraction / self.stage
            probs[self.stage] = 1.0 - self.hparams.replay_fraction
        return probs

    def update_curriculum(self, greedy_accuracy: list[float]) -> None:
        """Called after each validation of a fit with the greedy accuracy of every stage."""
        self.epochs_completed += 1
        if self.hparams.curriculum == "schedule":
            schedule = self.hparams.schedule
            self.stage = schedule[min(self.epochs_completed, len(schedule) - 1)]
        elif self.stage < NUM_STAGES - 1 and greedy_accuracy[self.stage] >= self.hparams.advance_threshold:
            self.stage += 1

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "epochs_completed": self.epochs_completed, "batches_done": self.batches_done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = state_dict["stage"]
        self.epochs_completed = state_dict["epochs_completed"]
        self.batches_done = state_dict.get("batches_done", 0)  # checkpoints written before it: epoch ends only

    # --- data -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(12_345)  # the same validation problems for every run
        per_stage = self.hparams.val_problems_per_stage
        digits = torch.randint(0, 10, (per_stage * NUM_STAGES, 5), generator=generator)
        stages = torch.arange(NUM_STAGES).repeat_interleave(per_stage)
        self.val_set = StageBatches(digits, stages, self.hparams.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        callbacks = self.trainer.callbacks if self.trainer is not None else []
        if not any(isinstance(c, AdvanceCurriculum) for c in callbacks):
            # Without it the curriculum never moves and every epoch replays the first epoch's problems.
            raise ValueError(
                "ToolTaskDataModule needs the datamodules.tool_tasks.AdvanceCurriculum callback in trainer.callbacks"
            )
        per_device, rank, _ = per_device_batch(self, self.batch_size)
        stream = ProblemStream(self, per_device, self.hparams.batches_per_epoch, rank)
        # Lightning cannot see that this stream continues mid-epoch and would warn that it restarts the epoch.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        return DataLoader(stream, batch_size=None)

    def _evaluation_loader(self, batches: StageBatches) -> DataLoader:
        """This process's share of ``batches``, dealt whole (``datamodules.distributed.RankBatches``; steps skip the
        empty batches a rank with fewer gets)."""
        return evaluation_loader(self, batches, empty=(batches.digits[:0], batches.stages[:0]))

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """Every digit combination of every stage (1,000 + 10,000 + 100,000 problems)."""
        digits = torch.cat([all_problems(s) for s in range(NUM_STAGES)])
        stages = torch.cat([torch.full((10 ** (3 + s),), s) for s in range(NUM_STAGES)])
        return self._evaluation_loader(StageBatches(digits, stages, self.hparams.eval_batch_size))

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class AdvanceCurriculum(Callback):
    """Advances the ``ToolTaskDataModule`` curriculum after each validation of a fit, and counts the training batches
    of the current epoch trained on (so that a run resumed mid-epoch continues the epoch's problem stream).

    It reads the logged greedy accuracy of every stage (``val/greedy_acc/stage_<k>``; 0 for a stage not logged) and
    runs before checkpointing (Lightning orders checkpoint callbacks last), so a checkpoint holds the new curriculum
    and the count.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(trainer.datamodule, ToolTaskDataModule):
            raise ValueError(f"AdvanceCurriculum needs a ToolTaskDataModule, got {type(trainer.datamodule).__name__}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        accuracy = [float(metrics.get(f"val/greedy_acc/stage_{k}", 0.0)) for k in range(NUM_STAGES)]
        dm = trainer.datamodule
        dm.update_curriculum(accuracy)
        if dm.batches_done >= trainer.num_training_batches:  # the epoch's own validation: its training is over
            dm.batches_done = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        if dm.batches_done < trainer.num_training_batches:
            return
        # Resumed from a checkpoint of an epoch's last batch, taken before the epoch's end: Lightning goes on with the
        # next epoch and does not run the epoch's validation, so the curriculum would not move. Run it now, as the
        # uninterrupted run did at this step (its hooks move the curriculum and may checkpoint or stop).
        every = trainer.check_val_every_n_epoch
        if trainer.enable_validation and every is not None and trainer.current_epoch % every == 0:
            rank_zero_info(f"Running the validation of epoch {trainer.current_epoch - 1}, which the checkpoint "
                           "preceded and which moves the curriculum")
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True
        dm.batches_done = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        trainer.datamodule.batches_done += 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.datamodule.batches_done = 0
