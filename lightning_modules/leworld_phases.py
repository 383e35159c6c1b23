"""LeWorld's three training phases on :class:`LeWorldSystem`; their losses are in ``leworld_losses.py``."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from datamodules.distributed import step_generator
from lightning_modules.leworld_base import Batch, SystemModule, flatten_steps
from lightning_modules.leworld_losses import (
    address_cross_entropy,
    masked_mean,
    reinforce_loss,
    sequence_losses,
    slot_need,
)
from models.leworld import InfoMode, LeWorldSystem


def aux_weights(hparams) -> dict[str, float]:
    """Weights of the auxiliary losses of Phases 2 and 3 from their hyperparameters."""
    return {"balance": hparams.lambda_balance, "diversity": hparams.lambda_diversity, "entropy": hparams.lambda_entropy}


def balance_need(hparams, batch: Batch, num_slms: int) -> Tensor | None:
    """What the balance loss balances against: the slots' need (``balance_target: need``) or none (``uniform``)."""
    return slot_need(batch["valid"], num_slms) if hparams.balance_target == "need" else None


BalanceTarget = Literal["need", "uniform"]


def check_balance_target(balance_target: str) -> None:
    if balance_target not in get_args(BalanceTarget):
        raise ValueError(f"unknown balance_target {balance_target!r}; expected one of {list(get_args(BalanceTarget))}")


class LeWorldPhase1(SystemModule):
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
        num = min(self.system.num_slms, starts.shape[1])
        slm_loss, acc, hidden = self.slm_losses(past, current, chars, starts[:, :num], ends[:, :num], valid[:, :num])
        blm_loss, router_loss = self.oracle_losses(past, current, nxt, hidden, starts[:, :num], ends[:, :num],
                                                   valid[:, :num])
        loss = self.touch_unused(slm_loss + blm_loss + self.hparams.router_weight * router_loss)
        logs = {"loss": loss, "slm_loss": slm_loss, "blm_loss": blm_loss, "router_loss": router_loss}
        self.log_dict({f"train/{k}": v for k, v in (logs | {"address_acc": acc}).items()}, batch_size=len(past))
        return loss

    def slm_losses(
        self, past: Tensor, current: Tensor, chars: Tensor, starts: Tensor, ends: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Address cross-entropy of SLM ``i`` on slot ``i`` (mean over SLMs), the share of exact ranges, and every
        SLM's hidden state ``[B, num, d]``, detached (the BLM must not train the SLMs here)."""
        memory, num = self.system.memory, starts.shape[1]
        losses, correct, hiddens = [], [], []
        slm_past = self.system.slm_past(past)
        for i, slm in enumerate(self.system.slms):
            out = slm(slm_past, current, chars)
            hiddens.append(out["hidden"].detach())
            if i >= num:
                continue
            mask = valid[:, i]
            ce = address_cross_entropy(out, starts[:, i], ends[:, i], memory.lo_size, memory.max_read_range,
                                       self.hparams.range_weight)
            losses.append(masked_mean(ce, mask))
            correct.append(((out["start_addr"] == starts[:, i]) & (out["end_addr"] == ends[:, i]))[mask].float())
        acc = torch.cat(correct).mean() if correct else torch.zeros(())
        return torch.stack(losses).mean(), acc, torch.stack(hiddens[:num], 1)

    def oracle_losses(
        self, past: Tensor, current: Tensor, nxt: Tensor, hidden: Tensor, starts: Tensor, ends: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        """BLM next-state MSE with reads of the relevant ranges routed to the relevant slots, and the router's
        binary cross-entropy towards those slots."""
        system = self.system
        reads = system.oracle_reads(starts, ends)
        confidence = torch.ones_like(valid, dtype=reads.dtype)
        slots, router_slots = system.slot_inputs(hidden, reads, starts, ends, confidence)
        _, _, route_logits = system.blm.route(past, current, router_slots)
        router_loss = F.binary_cross_entropy_with_logits(route_logits, valid.float())
        blm_out = system.blm(past, current, slots, valid.to(reads.dtype))
        return F.mse_loss(blm_out["next_state"], nxt), router_loss


class LeWorldPhase2(SystemModule):
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
        balance_target: BalanceTarget = "need",
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
            optimizer: Optimiser factory (default AdamW, lr 1e-3 as Phase 1; phase2.yaml sets the seed's lr 3e-4).
            init_from: Phase 1 checkpoint (``null``: fresh weights, the "without Phase 1" ablation).
            lambda_balance: Weight of the routing balance loss (CV^2 of per-SLM usage).
            lambda_diversity: Weight of the address diversity loss (chance two SLMs pick the same start).
            lambda_entropy: Weight of the routing entropy (mean Bernoulli entropy of the gates).
            balance_target: ``need``: balance usage against the share of sequences that need each SLM's slot, so
                unneeded SLMs stay off; ``uniform``: the CV^2 of usage, which switches every SLM on (earlier runs).
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
        check_balance_target(balance_target)
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
        out = self.system.multi_step_forward(batch["states"], batch["chars"], info=hp.info)
        need = balance_need(hp, batch, self.system.num_slms)
        losses, total = sequence_losses(out["steps"], batch["states"], aux_weights(hp), need)
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs |= {
            "train/temperature": self.system.blm.router.temperature,
            "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
        }
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=len(batch["states"]))
        self.log_dict(logs, batch_size=len(batch["states"]))
        return self.touch_unused(total)

class LeWorldPhase3(SystemModule):
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
        balance_target: BalanceTarget = "need",
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
            balance_target: What the balance loss balances against (as Phase 2).
            baseline_momentum: Momentum of the running reward baseline.
            horizons: Open-loop horizons evaluated.
            max_grad_norm: Clip the gradient's global norm.
        """
        super().__init__(system, optimizer, init_from, horizons, max_grad_norm)
        if lr <= 0 or other_lr_scale < 0 or memory_lr_scale < 0 or lambda_info < 0:
            raise ValueError("lr must be positive; scales and lambda_info must be >= 0")
        check_balance_target(balance_target)
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
        with_info = self.system.multi_step_forward(states, chars, info="sample", generator=generator)
        need = balance_need(hp, batch, self.system.num_slms)
        losses, total = sequence_losses(with_info["steps"], states, aux_weights(hp), need)
        with torch.no_grad():
            without = self.system.multi_step_forward(states, chars, info="never")
        mse_without = without["sq_error"].mean(1)  # [B]
        reward = mse_without - with_info["sq_error"].mean(1)
        # The first step's decision has no effect (no previous step); the last step's query is never used.
        pg_loss = reinforce_loss(reward, self.reward_baseline, with_info["request_log_prob"][:, :-1].sum(1))
        return {
            "loss": total + hp.lambda_info * pg_loss,
            "pg_loss": pg_loss,
            "reward": reward.detach(),
            "next_state_loss": losses["next_state_loss"],
            "loss_without_info": mse_without.mean(),
            "request_rate": with_info["request"][:, :-1].mean(),
        }

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.paired_branches(batch)
        improvement = out["reward"].mean()
        if self.trainer.world_size > 1:
            improvement = self.all_gather(improvement).mean()
        if torch.isfinite(improvement):  # a non-finite step is skipped or rolled back: keep the baseline too
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
