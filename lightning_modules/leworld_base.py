"""What every LeWorld module shares: the data contract, evaluation metrics, memory loading, predictions, clipping.

The data contract (:class:`LeWorldData`): a module whose model has a memory needs from its datamodule the task's
memory shape (``task.num_words``, ``task.word_size``, ``task.max_range``) and the memory bits that drive each split
(``memory_bits_for("train" | "val" | "test")``). ``LeWorldDataModule`` implements it; :meth:`LeWorldModule.setup`
checks it once and names what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric, MetricCollection

from datamodules.distributed import on_any_rank
from lightning_modules.guarded import GuardedModule, non_finite_names, read_checkpoint
from models.leworld import ArtificialMemory, InfoMode, LeWorldSystem

Batch = dict[str, Tensor]


@runtime_checkable
class TaskShape(Protocol):
    """The memory shape of a task."""

    num_words: int
    word_size: int
    max_range: int


@runtime_checkable
class LeWorldData(Protocol):
    """What a LeWorld module needs from its datamodule (``datamodules.leworld_data.LeWorldDataModule``)."""

    task: TaskShape

    def memory_bits_for(self, split: str) -> Tensor:
        """The memory bits ``[num_words, word_size]`` that drive the ``train`` / ``val`` / ``test`` sequences."""
        ...


def missing_members(obj: object, protocol: type) -> list[str]:
    """Names a ``protocol`` declares (attributes and methods) that ``obj`` lacks."""
    names = [*getattr(protocol, "__annotations__", {}), *(k for k, v in vars(protocol).items() if callable(v))]
    return [name for name in names if not name.startswith("_") and not hasattr(obj, name)]


def range_iou(starts: Tensor, ends: Tensor, ref_starts: Tensor, ref_ends: Tensor) -> Tensor:
    """IoU of every predicted range ``[..., M]`` with every reference range ``[..., K]`` -> ``[..., M, K]``."""
    s, e = starts.unsqueeze(-1), ends.unsqueeze(-1)
    rs, re = ref_starts.unsqueeze(-2), ref_ends.unsqueeze(-2)
    inter = (torch.minimum(e, re) - torch.maximum(s, rs)).clamp(min=0)
    union = (e - s) + (re - rs) - inter
    return inter.float() / union.clamp(min=1).float()


def flatten_steps(batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """All teacher-forced steps of a batch as one batch: ``past, current, next, chars, (starts, ends, valid)``."""
    states = batch["states"]
    steps = states.shape[1] - 1
    past_idx = (torch.arange(steps, device=states.device) - 1).clamp(min=0)
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    past, current, nxt = flat(states[:, past_idx]), flat(states[:, :steps]), flat(states[:, 1:])
    chars = batch["chars"].repeat_interleave(steps, 0)
    valid = batch["valid"].repeat_interleave(steps, 0)
    return past, current, nxt, chars, (flat(batch["starts"][:, :steps]), flat(batch["ends"][:, :steps]), valid)


def load_system_weights(module: nn.Module, path: str, prefix: str = "system.") -> None:
    """Load ``prefix*`` weights of a Lightning checkpoint (or a plain state dict) into ``module`` (strict); refuse,
    in one line naming the file, one that is unreadable, non-finite or of another shape."""
    state = read_checkpoint(path)
    state = state.get("state_dict", state)
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"{path!r} holds no {prefix!r} weights: is it a checkpoint of a LeWorld phase?")
    bad = non_finite_names(own)
    if bad:
        raise ValueError(f"{path!r} has non-finite weights ({', '.join(bad[:3])}): refusing to start from it")
    expected = module.state_dict()
    problems = [f"{k} {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
                for k, v in own.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"{k} missing from the file" for k in expected if k not in own]
    problems += [f"{k} unknown to the model" for k in own if k not in expected]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{path!r} does not fit this model (another size or version?): "
                         f"{'; '.join(problems[:3])}{more}")
    module.load_state_dict(own, strict=True)


class EvalMetrics(MetricCollection):
    """One split's metrics (``prefix`` ``val/`` or ``test/``): ``mse``, ``mae``, ``mse/h<k>`` and, for systems with
    ``num_slms`` SLMs, ``hit_rate``, ``address_iou``, ``usage/slm_<i>`` and the derived ``routing_entropy``."""

    def __init__(self, prefix: str, horizons: int, num_slms: int) -> None:
        """
        Args:
            prefix: Prefix of every name (``val/``, ``test/``).
            horizons: Open-loop horizons (one MSE each).
            num_slms: SLMs whose usage is tracked (0: a baseline; no address metrics).
        """
        metrics: dict[str, Metric] = {"mse": MeanSquaredError(), "mae": MeanAbsoluteError()}
        metrics |= {f"mse/h{k + 1}": MeanSquaredError() for k in range(horizons)}
        if num_slms:
            metrics |= {"hit_rate": MeanMetric(), "address_iou": MeanMetric()}
            metrics |= {f"usage/slm_{i}": MeanMetric() for i in range(num_slms)}
        # Each metric is updated with its own inputs, so no two may share state (compute groups).
        super().__init__(metrics, prefix=prefix, compute_groups=False)
        self.horizons, self.num_slms = horizons, num_slms

    def update_addresses(self, starts: Tensor, ends: Tensor, batch: Batch, masks: Tensor) -> None:
        """``starts``/``ends``/``masks`` ``[B, n, M]`` of the first ``n`` steps."""
        n = starts.shape[1]
        iou = range_iou(starts, ends, batch["starts"][:, :n], batch["ends"][:, :n])  # [B, n, M, 3]
        best = iou.max(2).values  # [B, n, 3]
        valid = batch["valid"].unsqueeze(1).expand_as(best)
        self["address_iou"].update(best[valid])
        self["hit_rate"].update((best[valid] >= 0.5).float())
        for i in range(self.num_slms):
            self[f"usage/slm_{i}"].update(masks[..., i].float())

    def compute(self) -> dict[str, Tensor]:
        """The metrics that were updated (a horizon past a short sequence is left out) and the routing entropy."""
        items = list(self.items(keep_base=True))
        # Under DDP each compute is a collective: every process computes those that any process updated.
        updated = on_any_rank([m.update_called for _, m in items], next(iter(self.values())).device)
        out = {self.prefix + name: m.compute() for (name, m), keep in zip(items, updated) if keep}
        names = [f"{self.prefix}usage/slm_{i}" for i in range(self.num_slms)]
        usage = [out[name] for name in names if name in out]
        if usage:
            p = torch.stack(usage) / torch.stack(usage).sum().clamp(min=1e-8)
            out[f"{self.prefix}routing_entropy"] = -(p * (p + 1e-8).log()).sum()
        return out


class PredictionsToFile(BasePredictionWriter):
    """Saves ``predict``'s outputs, concatenated over batches, as one ``torch.save`` file of tensors (one process).

    ``python train.py predict --config configs/leworld/phase3.yaml --ckpt_path ... --trainer.callbacks+=
    lightning_modules.leworld.PredictionsToFile --trainer.callbacks.init_args.path predictions.pt``
    """

    def __init__(self, path: str = "predictions.pt") -> None:
        """
        Args:
            path: File to write (its folder is created).
        """
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions: list, batch_indices: Any) -> None:
        merged = {k: torch.cat([p[k] for p in predictions]) for k in predictions[0]}
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(merged, self.path)


class LeWorldModule(GuardedModule):
    """Shared parts: the data contract and memory loading, evaluation, predictions, gradient clipping, optimiser.

    A :class:`GuardedModule`: it refuses a checkpoint of another class, never saves non-finite weights and trains
    under ``NonFiniteGuard`` (an update with non-finite gradients is skipped, a step that leaves non-finite weights
    rolled back, training stops after 5 in a row)."""

    eval_info: InfoMode = "always"

    def __init__(self, optimizer: OptimizerCallable, horizons: int, max_grad_norm: float | None, num_slms: int) -> None:
        super().__init__()
        if horizons < 1:
            raise ValueError(f"horizons must be >= 1, got {horizons}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or null, got {max_grad_norm}")
        self.horizons, self.max_grad_norm = horizons, max_grad_norm
        self.optimizer_factory = optimizer
        self.val_metrics = EvalMetrics("val/", horizons, num_slms)
        self.test_metrics = EvalMetrics("test/", horizons, num_slms)
        self._data: LeWorldData | None = None
        self._memory_split: str | None = None

    @property
    def memory(self) -> ArtificialMemory | None:
        raise NotImplementedError

    # --- the data contract ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Check the datamodule against :class:`LeWorldData` and the model's memory against its task (once)."""
        self._memory_split = None
        if self.memory is None:
            return  # nothing to load: the no-memory baseline runs on any batches of states
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, LeWorldData):
            missing = ["a datamodule"] if datamodule is None else missing_members(datamodule, LeWorldData)
            raise TypeError(
                f"{type(self).__name__} reads its memory from the datamodule, which must implement "
                f"lightning_modules.leworld.LeWorldData (as LeWorldDataModule does); missing: {', '.join(missing)}"
            )
        self._data = datamodule
        self.check_task(datamodule.task)

    def check_task(self, task: TaskShape) -> None:
        """Reject a model whose memory does not fit the task's."""
        memory = self.memory
        if memory is None:
            return
        if (memory.num_words, memory.word_size) != (task.num_words, task.word_size):
            raise ValueError(
                f"model memory is {memory.num_words}x{memory.word_size} bits but the data's is "
                f"{task.num_words}x{task.word_size}: set the same num_words / word_size in model and data"
            )
        if memory.max_read_range < task.max_range:
            raise ValueError(
                f"max_read_range={memory.max_read_range} is shorter than the task's longest range ({task.max_range})"
            )

    def use_memory(self, split: str) -> None:
        """Copy the memory that drives the ``split``'s sequences into the model (training and evaluation may use
        different memories: ``LeWorldDataModule(eval_memory="fresh")``)."""
        if self.memory is not None and self._data is not None and self._memory_split != split:
            self.memory.load_bits(self._data.memory_bits_for(split))
            self._memory_split = split

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._memory_split = None  # the checkpoint's bits replace whatever was loaded

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self.use_memory("train")

    def on_validation_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.use_memory("val")

    def on_test_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.use_memory("test")

    def on_predict_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.use_memory("test")  # the datamodule predicts on the test sequences

    # --- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.max_grad_norm if gradient_clip_val is None else gradient_clip_val
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def touch_unused(self, loss: Tensor) -> Tensor:
        """``loss + 0 * sum(params)``: every parameter joins the graph, so DDP needs no unused-parameter search."""
        return loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)

    # --- evaluation and prediction ----------------------------------------------------------------------------
    def evaluate(self, batch: Batch, metrics: EvalMetrics) -> None:
        raise NotImplementedError

    def predict(self, batch: Batch) -> dict[str, Tensor]:
        """Teacher-forced predictions of every step: ``predictions`` and ``targets`` ``[B, n, S]``, ``sq_error``
        ``[B, n]`` (mean over the state), and for systems the read ranges and gates ``[B, n, M]``."""
        raise NotImplementedError

    # Under DDP a process short of evaluation batches gets empty ones (``{}``; datamodules.distributed.RankBatches).
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        if batch:
            self.evaluate(batch, self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        if batch:
            self.evaluate(batch, self.test_metrics)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.predict(batch).items()}

    def on_train_start(self) -> None:
        self.val_metrics.reset()  # the sanity check filled them

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log("val/mse", values.pop("val/mse"), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def _horizons(self, batch: Batch) -> int:
        return min(self.horizons, batch["states"].shape[1] - 1)


class SystemModule(LeWorldModule):
    """A phase that trains the whole :class:`LeWorldSystem`."""

    def __init__(
        self,
        system: LeWorldSystem,
        optimizer: OptimizerCallable,
        init_from: str | None,
        horizons: int,
        max_grad_norm: float | None,
    ) -> None:
        super().__init__(optimizer, horizons, max_grad_norm, system.num_slms)
        self.system = system
        if init_from is not None:
            load_system_weights(self.system, init_from)

    @property
    def memory(self) -> ArtificialMemory:
        return self.system.memory

    def evaluate(self, batch: Batch, metrics: EvalMetrics) -> None:
        states, chars = batch["states"], batch["chars"]
        out = self.system.multi_step_forward(states, chars, info=self.eval_info)
        n = out["predictions"].shape[1]
        target = states[:, 1 : n + 1].contiguous()
        metrics["mse"].update(out["predictions"], target)
        metrics["mae"].update(out["predictions"], target)
        metrics.update_addresses(out["start"], out["end"], batch, out["masks"])
        h = self._horizons(batch)
        rollout = self.system.multi_step_forward(states, chars, n_steps=h, info=self.eval_info, open_loop=True)
        for k in range(h):
            metrics[f"mse/h{k + 1}"].update(rollout["predictions"][:, k].contiguous(), states[:, k + 1].contiguous())

    def predict(self, batch: Batch) -> dict[str, Tensor]:
        out = self.system.multi_step_forward(batch["states"], batch["chars"], info=self.eval_info)
        return {
            "predictions": out["predictions"],
            "targets": batch["states"][:, 1:],
            "sq_error": out["sq_error"],
            "starts": out["start"],
            "ends": out["end"],
            "gates": out["masks"],
        }
