"""LeWorld training: Phase 1 (separate pre-training), Phase 2 (end to end), Phase 3 (info-request refinement) and
two baselines (a BLM with no memory, a BLM with oracle reads), all on ``LeWorldDataModule``.

Each phase is its own LightningModule; ``init_from`` names the previous phase's checkpoint (its ``system.*``
weights are loaded before training). Every module logs the same evaluation metrics:

- ``val/mse``, ``val/mae``: next-state error, teacher forced (true past and current states), over all steps.
- ``val/mse/h<k>``: error ``k`` steps ahead when predictions are fed back (open loop), from the first state.
- ``val/hit_rate``: share of relevant ranges that some SLM's range overlaps with IoU >= 0.5; ``val/address_iou``
  the mean of that best IoU (systems only).
- ``val/routing_entropy``: entropy of the normalised SLM usage; ``val/usage/slm_<i>``: how often SLM ``i`` is on.
- the same under ``test/``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError

from datamodules.distributed import step_generator
from models.leworld import ArtificialMemory, BigLeWorldModel, InfoMode, LeWorldSystem, blm_only_step

Batch = dict[str, Tensor]


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
    """Load ``prefix*`` weights of a Lightning checkpoint (or a plain state dict) into ``module`` (strict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from checkpoint not found: {path!r} (run the previous phase first)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"{path!r} holds no {prefix!r} weights: is it a checkpoint of a LeWorld phase?")
    module.load_state_dict(own, strict=True)


class EvalMetrics(nn.Module):
    """MSE, MAE, per-horizon MSE, hit rate / IoU, usage per SLM and routing entropy of one split."""

    def __init__(self, horizons: int, num_slms: int) -> None:
        super().__init__()
        self.mse, self.mae = MeanSquaredError(), MeanAbsoluteError()
        self.horizon = nn.ModuleList(MeanSquaredError() for _ in range(horizons))
        self.hit, self.iou = MeanMetric(), MeanMetric()
        self.usage = nn.ModuleList(MeanMetric() for _ in range(num_slms))

    def update_addresses(self, starts: Tensor, ends: Tensor, batch: Batch, masks: Tensor) -> None:
        """``starts``/``ends``/``masks`` ``[B, n, M]`` of the first ``n`` steps."""
        n = starts.shape[1]
        iou = range_iou(starts, ends, batch["starts"][:, :n], batch["ends"][:, :n])  # [B, n, M, 3]
        best = iou.max(2).values  # [B, n, 3]
        valid = batch["valid"].unsqueeze(1).expand_as(best)
        self.iou.update(best[valid])
        self.hit.update((best[valid] >= 0.5).float())
        for i, metric in enumerate(self.usage):
            metric.update(masks[..., i].float())

    def compute(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}/mse": self.mse.compute(), f"{prefix}/mae": self.mae.compute()}
        out |= {f"{prefix}/mse/h{k + 1}": m.compute() for k, m in enumerate(self.horizon) if m.update_count}
        if self.hit.update_called:
            out[f"{prefix}/hit_rate"] = self.hit.compute()
            out[f"{prefix}/address_iou"] = self.iou.compute()
        if self.usage and self.usage[0].update_called:
            usage = torch.stack([m.compute() for m in self.usage])
            for i, u in enumerate(usage):
                out[f"{prefix}/usage/slm_{i}"] = u
            p = usage / usage.sum().clamp(min=1e-8)
            out[f"{prefix}/routing_entropy"] = -(p * (p + 1e-8).log()).sum()
        return out

    def reset(self) -> None:
        for m in [self.mse, self.mae, *self.horizon, self.hit, self.iou, *self.usage]:
            m.reset()


class _LeWorldModule(LightningModule):
    """Shared parts: memory loading from the datamodule, evaluation, gradient clipping, optimiser."""

    eval_info: InfoMode = "always"

    def __init__(self, horizons: int, max_grad_norm: float | None, num_slms: int) -> None:
        super().__init__()
        if horizons < 1:
            raise ValueError(f"horizons must be >= 1, got {horizons}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or null, got {max_grad_norm}")
        self.horizons, self.max_grad_norm = horizons, max_grad_norm
        self.val_metrics = EvalMetrics(horizons, num_slms)
        self.test_metrics = EvalMetrics(horizons, num_slms)

    @property
    def memory(self) -> ArtificialMemory | None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Check the model against the task; the memory is loaded per split (:meth:`use_memory`)."""
        self._memory_split: str | None = None
        datamodule = self._datamodule()
        if datamodule is not None and hasattr(datamodule, "task"):
            self.check_task(datamodule.task)

    def _datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def use_memory(self, split: str) -> None:
        """Copy the memory that drives the ``split``'s sequences into the model (training and evaluation may use
        different memories: ``LeWorldDataModule(eval_memory="fresh")``)."""
        datamodule, memory = self._datamodule(), self.memory
        if memory is None or not hasattr(datamodule, "memory_bits_for"):
            return
        if getattr(self, "_memory_split", None) != split:
            memory.load_bits(datamodule.memory_bits_for(split))
            self._memory_split = split

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._memory_split = None  # the checkpoint's bits replace whatever was loaded

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self.use_memory("train")

    def on_validation_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.use_memory("val")

    def on_test_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.use_memory("test")

    def on_predict_batch_start(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.use_memory("test")

    def check_task(self, task) -> None:
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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.max_grad_norm if gradient_clip_val is None else gradient_clip_val
        if clip is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def touch_unused(self, loss: Tensor) -> Tensor:
        """``loss + 0 * sum(params)``: every parameter joins the graph, so DDP needs no unused-parameter search."""
        return loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, batch: Batch, metrics: EvalMetrics) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate(batch, self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.evaluate(batch, self.test_metrics)

    def on_train_start(self) -> None:
        self.val_metrics.reset()  # the sanity check filled them

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute("val")
        self.val_metrics.reset()
        self.log("val/mse", values.pop("val/mse"), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute("test"), sync_dist=True)
        self.test_metrics.reset()

    def _horizons(self, batch: Batch) -> int:
        return min(self.horizons, batch["states"].shape[1] - 1)


class _SystemModule(_LeWorldModule):
    """A phase that trains the whole :class:`LeWorldSystem`."""

    def __init__(
        self,
        system: LeWorldSystem,
        optimizer: OptimizerCallable,
        init_from: str | None,
        horizons: int,
        max_grad_norm: float | None,
    ) -> None:
        super().__init__(horizons, max_grad_norm, system.num_slms)
        self.system = system
        self.optimizer_factory = optimizer
        if init_from is not None:
            load_system_weights(self.system, init_from)

    @property
    def memory(self) -> ArtificialMemory:
        return self.system.memory

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    def evaluate(self, batch: Batch, metrics: EvalMetrics) -> None:
        states, chars = batch["states"], batch["chars"]
        out = self.system.multi_step_forward(states, chars, info=self.eval_info)
        n = out["predictions"].shape[1]
        target = states[:, 1 : n + 1].contiguous()
        metrics.mse.update(out["predictions"], target)
        metrics.mae.update(out["predictions"], target)
        metrics.update_addresses(out["start"], out["end"], batch, out["masks"])
        h = self._horizons(batch)
        rollout = self.system.multi_step_forward(states, chars, n_steps=h, info=self.eval_info, open_loop=True)
        for k in range(h):
            metrics.horizon[k].update(rollout["predictions"][:, k].contiguous(), states[:, k + 1].contiguous())


class LeWorldPhase1(_SystemModule):
    """Phase 1: pre-train the parts separately on ground truth.

    SLMs: cross-entropy of the high byte, low byte and length of the relevant range of "their" slot (SLM ``i`` learns
    slot ``i``; slots that are not relevant are skipped). BLM and bit encoder: next-state MSE with oracle reads of the
    relevant ranges (the SLM hidden states enter detached; confidence 1). Router: binary cross-entropy towards the
    relevant slots. All steps of a sequence are independent here, so they run as one batch.

    Logged: ``train/loss``, ``train/slm_loss``, ``train/blm_loss``, ``train/router_loss``, ``train/address_acc``
    (both bytes and the length right), and the evaluation metrics of the whole system (see the module docstring).
    """

    def __init__(
        self,
        system: LeWorldSystem,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        init_from: str | None = None,
        range_weight: float = 0.5,
        router_weight: float = 1.0,
        horizons: int = 4,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        """
        Args:
            system: The LeWorld system.
            optimizer: Optimiser factory (the seed: AdamW, lr 1e-3, weight decay 0.01).
            init_from: Checkpoint to start from (``null``: fresh weights).
            range_weight: Weight of the range-length cross-entropy.
            router_weight: Weight of the router's binary cross-entropy.
            horizons: Open-loop horizons evaluated (``val/mse/h1..``).
            max_grad_norm: Clip the gradient's global norm (``null``: no clipping).
        """
        super().__init__(system, optimizer, init_from, horizons, max_grad_norm)
        if range_weight < 0 or router_weight < 0:
            raise ValueError("range_weight and router_weight must be >= 0")
        self.save_hyperparameters(ignore=["system", "optimizer"])

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        past, current, nxt, chars, (starts, ends, valid) = flatten_steps(batch)
        system = self.system
        mem = system.memory
        slm_losses, correct = [], []
        hiddens = []
        num = min(system.num_slms, starts.shape[1])
        for i, slm in enumerate(system.slms):
            out = slm(past, current, chars)
            hiddens.append(out["hidden"].detach())
            if i >= num:
                continue
            mask = valid[:, i]
            target_hi, target_lo = starts[:, i] // mem.lo_size, starts[:, i] % mem.lo_size
            target_len = (ends[:, i] - starts[:, i] - 1).clamp(0, mem.max_read_range - 1)
            ce = (
                F.cross_entropy(out["start_logits_high"], target_hi, reduction="none")
                + F.cross_entropy(out["start_logits_low"], target_lo, reduction="none")
                + self.hparams.range_weight * F.cross_entropy(out["range_logits"], target_len, reduction="none")
            )
            slm_losses.append((ce * mask).sum() / mask.sum().clamp(min=1))
            hit = (out["start_addr"] == starts[:, i]) & (out["end_addr"] == ends[:, i])
            correct.append(hit[mask].float())
        slm_loss = torch.stack(slm_losses).mean()
        reads = system.oracle_reads(starts[:, :num], ends[:, :num])
        hidden = system.slot_hidden(torch.stack(hiddens[:num], 1))
        slots = system.blm.slot_features(
            hidden,
            reads,
            starts[:, :num],
            (ends - starts)[:, :num],
            torch.ones_like(valid[:, :num], dtype=reads.dtype),
            mem.num_words,
            mem.max_read_range,
        )
        router_slots = system.blm.slot_features(
            torch.stack(hiddens[:num], 1),
            reads,
            starts[:, :num],
            (ends - starts)[:, :num],
            torch.ones_like(valid[:, :num], dtype=reads.dtype),
            mem.num_words,
            mem.max_read_range,
        )
        features = torch.cat([past, current], -1).unsqueeze(1).expand(-1, num, -1)
        _, _, route_logits = system.blm.router(torch.cat([features, router_slots], -1))
        router_loss = F.binary_cross_entropy_with_logits(route_logits, valid[:, :num].float())
        blm_out = system.blm(past, current, slots, valid[:, :num].to(reads.dtype))
        blm_loss = F.mse_loss(blm_out["next_state"], nxt)
        loss = slm_loss + blm_loss + self.hparams.router_weight * router_loss
        loss = self.touch_unused(loss)
        acc = torch.cat(correct).mean() if correct else torch.zeros(())
        self.log_dict(
            {
                "train/loss": loss,
                "train/slm_loss": slm_loss,
                "train/blm_loss": blm_loss,
                "train/router_loss": router_loss,
                "train/address_acc": acc,
            },
            batch_size=len(past),
        )
        return loss


class LeWorldPhase2(_SystemModule):
    """Phase 2: end-to-end training over whole sequences (SLMs -> memory -> BLM, info query passed step to step).

    Loss: next-state MSE + ``lambda_balance`` * routing balance + ``lambda_diversity`` * address diversity +
    ``lambda_entropy`` * routing entropy. Hard addresses and gates run forward; gradients reach the address logits
    through the soft reads and the router through its straight-through sigmoid. The router temperature anneals
    with every step; the learning rate follows cosine warm restarts (per step).

    Logged: ``train/loss``, ``train/next_state_loss``, ``train/balance_loss``, ``train/diversity_loss``,
    ``train/entropy_loss``, ``train/temperature``, ``train/lr`` and the evaluation metrics.
    """

    def __init__(
        self,
        system: LeWorldSystem,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        init_from: str | None = None,
        lambda_balance: float = 0.01,
        lambda_diversity: float = 0.001,
        lambda_entropy: float = 0.01,
        temp_anneal_rate: float = 3e-5,
        temp_min: float = 0.1,
        restart_steps: int = 50,
        info: InfoMode = "always",
        horizons: int = 4,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        """
        Args:
            system: The LeWorld system.
            optimizer: Optimiser factory (the seed: AdamW, lr 3e-4, weight decay 0.01).
            init_from: Phase 1 checkpoint (``null``: fresh weights, the "without Phase 1" ablation).
            lambda_balance: Weight of the routing balance loss (CV^2 of per-SLM usage).
            lambda_diversity: Weight of the address diversity loss (chance two SLMs pick the same start).
            lambda_entropy: Weight of the routing entropy (mean Bernoulli entropy of the gates).
            temp_anneal_rate: Router temperature ``max(temp_min, exp(-rate * step))``.
            temp_min: Lowest router temperature.
            restart_steps: Steps of the first cosine cycle (cycles double: warm restarts).
            info: How the info query travels between steps in training and evaluation (``always`` as the seed).
            horizons: Open-loop horizons evaluated.
            max_grad_norm: Clip the gradient's global norm.
        """
        super().__init__(system, optimizer, init_from, horizons, max_grad_norm)
        if min(lambda_balance, lambda_diversity, lambda_entropy, temp_anneal_rate) < 0:
            raise ValueError("loss weights and temp_anneal_rate must be >= 0")
        if not 0 < temp_min <= 1 or restart_steps < 1:
            raise ValueError(f"need 0 < temp_min <= 1 and restart_steps >= 1, got {temp_min}, {restart_steps}")
        self.save_hyperparameters(ignore=["system", "optimizer"])
        self.eval_info = info

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=self.hparams.restart_steps, T_mult=2
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        hp = self.hparams
        self.system.blm.router.anneal_temperature(self.global_step, hp.temp_anneal_rate, hp.temp_min)
        weights = {"balance": hp.lambda_balance, "diversity": hp.lambda_diversity, "entropy": hp.lambda_entropy}
        out = self.system.multi_step_forward(batch["states"], batch["chars"], info=hp.info, weights=weights)
        logs = {f"train/{k}": v.detach() for k, v in out["losses"].items()}
        logs |= {
            "train/temperature": self.system.blm.router.temperature,
            "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
        }
        self.log("train/loss", out["total_loss"].detach(), prog_bar=True, batch_size=len(batch["states"]))
        self.log_dict(logs, batch_size=len(batch["states"]))
        return self.touch_unused(out["total_loss"])


class LeWorldPhase3(_SystemModule):
    """Phase 3: train the info request with a paired-branch reward (ProactAgent, arXiv 2604.20572).

    Each step the BLM emits a query and a request logit; a Bernoulli request gate decides whether the query reaches
    the next step's SLMs. Branch A samples the gates; branch B (no grad) runs the same sequences with no request.
    The per-sequence improvement ``mse_without - mse_with`` is the reward of the sampled gate decisions
    (REINFORCE with a running-mean baseline), and branch A's MSE also trains the query itself through the SLMs
    and the soft reads (pathwise). The seed detached its improvement term, which trained nothing (bug 3).
    Evaluation uses the greedy gate. Lower learning rates for everything but the info modules.

    Logged: ``train/loss``, ``train/next_state_loss``, ``train/loss_without_info``, ``train/improvement``
    (branch B's MSE minus branch A's: > 0 when the requests help), ``train/request_rate``, ``train/pg_loss``,
    ``train/reward_baseline`` and the evaluation metrics.
    """

    eval_info: InfoMode = "greedy"

    def __init__(
        self,
        system: LeWorldSystem,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        init_from: str | None = None,
        lr: float = 1e-4,
        other_lr_scale: float = 0.1,
        memory_lr_scale: float = 0.01,
        weight_decay: float = 0.01,
        lambda_info: float = 0.1,
        lambda_balance: float = 0.01,
        lambda_diversity: float = 0.001,
        lambda_entropy: float = 0.01,
        baseline_momentum: float = 0.9,
        horizons: int = 4,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        """
        Args:
            system: The LeWorld system.
            optimizer: Optimiser factory, called with parameter groups that carry their own learning rates.
            init_from: Phase 2 checkpoint (``null``: fresh weights).
            lr: Learning rate of the info modules (``blm.info_request``, ``info_to_slm``).
            other_lr_scale: Learning rate of the SLMs and the rest of the BLM, relative to ``lr``.
            memory_lr_scale: Learning rate of the memory's encoders, relative to ``lr``.
            weight_decay: AdamW weight decay of every group.
            lambda_info: Weight of the REINFORCE term of the request gate.
            lambda_balance: Routing balance weight (as Phase 2).
            lambda_diversity: Address diversity weight (as Phase 2).
            lambda_entropy: Routing entropy weight (as Phase 2).
            baseline_momentum: Momentum of the running reward baseline.
            horizons: Open-loop horizons evaluated.
            max_grad_norm: Clip the gradient's global norm.
        """
        super().__init__(system, optimizer, init_from, horizons, max_grad_norm)
        if lr <= 0 or other_lr_scale < 0 or memory_lr_scale < 0 or lambda_info < 0:
            raise ValueError("lr must be positive; scales and lambda_info must be >= 0")
        if not 0 <= baseline_momentum < 1:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {baseline_momentum}")
        self.save_hyperparameters(ignore=["system", "optimizer"])
        self.register_buffer("reward_baseline", torch.zeros(()))
        self.register_buffer("sampling_seed", torch.randint(0, 2**31 - 1, ()))

    def configure_optimizers(self):
        hp, system = self.hparams, self.system
        info = [*system.blm.info_request.parameters(), *system.info_to_slm.parameters()]
        info_ids = {id(p) for p in info}
        memory = list(system.memory.parameters())
        other = [p for p in system.parameters() if id(p) not in info_ids and id(p) not in {id(q) for q in memory}]
        groups = [
            {"params": info, "lr": hp.lr},
            {"params": other, "lr": hp.lr * hp.other_lr_scale},
            {"params": memory, "lr": hp.lr * hp.memory_lr_scale},
        ]
        return self.optimizer_factory(groups, weight_decay=hp.weight_decay)

    def paired_branches(self, batch: Batch) -> dict[str, Tensor]:
        """Both branches, the reward and the losses (the test calls this directly)."""
        hp = self.hparams
        states, chars = batch["states"], batch["chars"]
        generator = step_generator(self.sampling_seed, self.global_rank, self.global_step, device=states.device)
        weights = {"balance": hp.lambda_balance, "diversity": hp.lambda_diversity, "entropy": hp.lambda_entropy}
        with_info = self.system.multi_step_forward(states, chars, info="sample", weights=weights, generator=generator)
        with torch.no_grad():
            without = self.system.multi_step_forward(states, chars, info="never")
        mse_with = with_info["sq_error"].mean(1)  # [B]
        mse_without = without["sq_error"].mean(1)
        reward = (mse_without - mse_with).detach()
        advantage = reward - self.reward_baseline
        # The first step's decision has no effect (no previous step); the last step's query is never used.
        log_prob = with_info["request_log_prob"][:, :-1].sum(1)
        pg_loss = -(advantage * log_prob).mean()
        loss = with_info["total_loss"] + hp.lambda_info * pg_loss
        return {
            "loss": loss,
            "pg_loss": pg_loss,
            "reward": reward,
            "next_state_loss": with_info["losses"]["next_state_loss"],
            "loss_without_info": mse_without.mean(),
            "request_rate": with_info["request"][:, :-1].mean(),
        }

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.paired_branches(batch)
        improvement = out["reward"].mean()
        if self.trainer.world_size > 1:
            improvement = self.all_gather(improvement).mean()
        with torch.no_grad():
            m = self.hparams.baseline_momentum
            self.reward_baseline.mul_(m).add_((1 - m) * improvement)
        logs = {
            "train/improvement": improvement,
            "train/pg_loss": out["pg_loss"].detach(),
            "train/next_state_loss": out["next_state_loss"].detach(),
            "train/loss_without_info": out["loss_without_info"],
            "train/request_rate": out["request_rate"],
            "train/reward_baseline": self.reward_baseline.clone(),
        }
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=len(batch["states"]))
        self.log_dict(logs, batch_size=len(batch["states"]))
        return self.touch_unused(out["loss"])


class LeWorldBaseline(_LeWorldModule):
    """A BLM alone on the same data: ``no_memory`` (states only: the upper bound on error) or ``oracle`` (reads of
    the true relevant ranges, routed to the relevant slots: the lower bound). Teacher-forced next-state MSE; all
    steps as one batch.

    Logged: ``train/loss`` and the evaluation metrics (no hit rate or usage).
    """

    def __init__(
        self,
        blm: BigLeWorldModel,
        mode: Literal["no_memory", "oracle"] = "no_memory",
        memory: ArtificialMemory | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        horizons: int = 4,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        """
        Args:
            blm: The BLM (``num_slots: 0`` for ``no_memory``, ``3`` for ``oracle``).
            mode: ``no_memory`` or ``oracle``.
            memory: The memory (``oracle`` only): its bits come from the data, its bit encoder is trained.
            optimizer: Optimiser factory.
            horizons: Open-loop horizons evaluated.
            max_grad_norm: Clip the gradient's global norm.
        """
        super().__init__(horizons, max_grad_norm, 0)
        if mode not in ("no_memory", "oracle"):
            raise ValueError(f"unknown mode {mode!r}; expected 'no_memory' or 'oracle'")
        if mode == "oracle" and (memory is None or blm.num_slots == 0):
            raise ValueError("mode='oracle' needs a `memory` and a BLM with num_slots > 0")
        if mode == "no_memory" and (memory is not None or blm.num_slots != 0):
            raise ValueError("mode='no_memory' needs a BLM with num_slots: 0 and no memory")
        self.save_hyperparameters(ignore=["blm", "memory", "optimizer"])
        self.blm, self._memory, self.mode = blm, memory, mode
        self.optimizer_factory = optimizer

    @property
    def memory(self) -> ArtificialMemory | None:
        return self._memory

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    def step(self, past: Tensor, current: Tensor, oracle: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        if self.mode == "no_memory":
            return blm_only_step(self.blm, None, past, current, None)
        starts, ends, valid = oracle
        k = self.blm.num_slots
        return blm_only_step(self.blm, self._memory, past, current, (starts[:, :k], ends[:, :k], valid[:, :k]))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        past, current, nxt, _, oracle = flatten_steps(batch)
        loss = F.mse_loss(self.step(past, current, oracle), nxt)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["states"]))
        return self.touch_unused(loss)

    def evaluate(self, batch: Batch, metrics: EvalMetrics) -> None:
        states = batch["states"]
        past, current, nxt, _, oracle = flatten_steps(batch)
        pred = self.step(past, current, oracle)
        metrics.mse.update(pred, nxt)
        metrics.mae.update(pred, nxt)
        past, current = states[:, 0], states[:, 0]
        for k in range(self._horizons(batch)):
            oracle_k = (batch["starts"][:, k], batch["ends"][:, k], batch["valid"])
            pred = self.step(past, current, oracle_k)
            metrics.horizon[k].update(pred, states[:, k + 1].contiguous())
            past, current = current, pred
