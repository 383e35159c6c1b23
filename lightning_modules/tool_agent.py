"""A2C training of the GRU tool agent on the arithmetic tool environment."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import grad_norm, rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection

from datamodules.distributed import global_batch_index
from envs.tool_env import NUM_STAGES, STAGE_NUM_DIGITS, Semantics, ToolEnv, context_tokens, decode, stage_goal
from lightning_modules.guarded import GuardedModule
from lightning_modules.rl import gae, masked_mean, masked_normalize
from models.tool_policy import GRUActorCritic


@dataclass
class Rollout:
    """One batch of episodes; per-step tensors are ``[B, T]`` and zero after an episode ends."""

    actions: Tensor  # action indices
    tokens: Tensor  # the tool tokens they stand for
    log_probs: Tensor
    entropies: Tensor
    values: Tensor
    rewards: Tensor
    mask: Tensor  # steps the episode took
    correct: Tensor  # [B] answered the stated goal
    answer: Tensor  # [B] the submitted value (0 without ANS)

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)

    @property
    def returns(self) -> Tensor:
        return self.rewards.sum(1)


def episode_metrics(split: str) -> MetricCollection:
    """Greedy accuracy and mean reward per curriculum stage, mean reward and episode length of one split."""
    metrics = {"reward": MeanMetric(), "episode_length": MeanMetric()}
    for k in range(NUM_STAGES):
        metrics |= {f"greedy_acc/stage_{k}": MeanMetric(), f"reward/stage_{k}": MeanMetric()}
    # Each metric gets its own inputs, so none may share state with another (compute groups).
    return MetricCollection(metrics, prefix=f"{split}/", compute_groups=False)


def update_episode_metrics(metrics: MetricCollection, rollout: Rollout, stage: Tensor) -> None:
    """Add a batch of evaluated episodes at curriculum ``stage`` ``[B]`` to ``metrics``."""
    for k in range(NUM_STAGES):
        chosen = stage == k
        if chosen.any():
            metrics[f"greedy_acc/stage_{k}"].update(rollout.correct[chosen].float())
            metrics[f"reward/stage_{k}"].update(rollout.returns[chosen])
    metrics["reward"].update(rollout.returns)
    metrics["episode_length"].update(rollout.lengths.float())


def compute_episode_metrics(metrics: MetricCollection) -> dict[str, Tensor]:
    """The split's values and ``<split>/greedy_acc_min``; resets ``metrics``.

    Every process computes every metric (each compute is a collective under DDP); a stage that no process evaluated
    is a 0/0 = NaN mean and is left out.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
        values = {k: v for k, v in metrics.compute().items() if not v.isnan()}
    metrics.reset()
    accuracy = [v for k, v in values.items() if "/greedy_acc/stage_" in k]
    if accuracy:
        values[f"{metrics.prefix}greedy_acc_min"] = torch.stack(accuracy).min()
    return values


class ToolAgentA2C(GuardedModule):
    """Advantage actor-critic (A2C) for the tool agent: one on-policy rollout and one update per batch.

    It runs under the shared ``NonFiniteGuard`` (``GuardedModule``): the manual ``optimizer.step()`` goes through
    Lightning's optimizer, so an update with a non-finite gradient is skipped and a step that leaves a non-finite
    weight is rolled back before the next rollout samples from it.

    Logged metrics: ``train/loss``, ``train/policy_loss``, ``train/value_loss``, ``train/entropy``, ``train/reward``
    (mean episode return of the sampled rollouts), ``train/accuracy`` (sampled episodes that answered the stated
    goal), ``train/episode_length``, ``train/grad_norm`` (before clipping), ``train/stage`` (curriculum frontier);
    ``val/greedy_acc/stage_<k>``, ``val/greedy_acc_min``, ``val/reward``, ``val/episode_length``, and the same
    under ``test/`` for every digit combination.
    """

    def __init__(
        self,
        policy: GRUActorCritic,
        optimizer: OptimizerCallable = torch.optim.Adam,
        semantics: Semantics = "register",
        max_steps: int = 8,
        advantage_estimator: Literal["gae", "seed_terminal"] = "gae",
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        normalize_advantages: bool = True,
        value_coef: float = 0.5,
        entropy_coef: float = 0.01,
        max_grad_norm: float | None = 1.0,
        logged_trajectories: int = 2,
    ) -> None:
        """
        Args:
            policy: The actor-critic network.
            optimizer: Optimiser factory, called with the parameters.
            semantics: Environment rules: ``register`` (every goal reachable) or ``seed`` (the original's).
            max_steps: Tool tokens an episode may execute.
            advantage_estimator: ``gae`` (per-step GAE returns) or ``seed_terminal`` (the seed's final reward minus
                the sum of the step values, one advantage for the whole episode).
            gamma: Discount factor.
            gae_lambda: GAE bias/variance trade-off (1 = Monte-Carlo returns, 0 = one-step TD).
            normalize_advantages: Standardise advantages over the batch's steps.
            value_coef: Weight of the value loss.
            entropy_coef: Weight of the entropy bonus.
            max_grad_norm: Clip the gradient's global norm to this value (``null`` to disable).
            logged_trajectories: Greedy trajectories per stage written to the logger after each validation.
        """
        super().__init__()
        if not 0.0 <= gamma <= 1.0 or not 0.0 <= gae_lambda <= 1.0:
            raise ValueError(f"gamma and gae_lambda must be in [0, 1], got {gamma} and {gae_lambda}")
        if value_coef < 0 or entropy_coef < 0:
            raise ValueError("value_coef and entropy_coef must be >= 0")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or null, got {max_grad_norm}")
        if advantage_estimator not in ("gae", "seed_terminal"):
            raise ValueError(f"unknown advantage_estimator {advantage_estimator!r}")
        self.save_hyperparameters(ignore=["policy", "optimizer"])
        self.automatic_optimization = False
        self.env = ToolEnv(semantics, max_steps)
        if policy.num_actions != self.env.num_actions:
            raise ValueError(
                f"policy.num_actions={policy.num_actions} but the {semantics!r} environment has "
                f"{self.env.num_actions} actions"
            )
        self.policy = policy
        self.optimizer_factory = optimizer
        self.register_buffer("action_tokens", self.env.action_tokens.clone(), persistent=False)
        # Action sampling uses its own generator, reseeded every step: runs are reproducible and resume exactly.
        self.register_buffer("sampling_seed", torch.randint(0, 2**31 - 1, ()))
        self._score_all_tokens = advantage_estimator == "seed_terminal"
        self.trajectories: list[str] = []  # readable greedy episodes of the latest validation, of every process
        self._batch_trajectories: list[tuple[int, list[str]]] = []  # (global batch index, lines) of this process
        self.val_metrics = episode_metrics("val")
        self.test_metrics = episode_metrics("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    # --- acting -----------------------------------------------------------------------------------------------
    def rollout(self, digits: Tensor, stage: Tensor, greedy: bool, generator: torch.Generator | None = None) -> Rollout:
        """Run one episode per problem; ``greedy`` takes the most likely action, otherwise one is sampled."""
        state = self.env.reset(digits, stage)
        hidden = self.policy.encode(context_tokens(digits, stage), stage)
        steps: dict[str, list[Tensor]] = {
            k: [] for k in ("actions", "log_probs", "entropies", "values", "rewards", "mask")
        }
        for _ in range(self.env.max_steps):
            logits, value = self.policy.heads(hidden)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            if greedy:
                action = log_probs.argmax(-1)
            else:
                action = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
            active = ~state.done
            reward, _ = self.env.step(state, self.action_tokens[action])
            steps["actions"].append(action)
            steps["log_probs"].append(log_probs.gather(1, action.unsqueeze(1)).squeeze(1))
            steps["entropies"].append(-(log_probs.exp() * log_probs).sum(-1))
            steps["values"].append(value.float())
            steps["rewards"].append(reward)
            # The seed's estimator scores every emitted token, also those after the episode ended.
            steps["mask"].append(torch.ones_like(active) if self._score_all_tokens else active)
            if state.done.all() and not self._score_all_tokens:
                break
            hidden = self.policy.advance(hidden, self.action_tokens[action])
        stacked = {k: torch.stack(v, 1) for k, v in steps.items()}
        mask = stacked["mask"]
        for key in ("log_probs", "entropies", "values", "rewards"):
            stacked[key] = stacked[key] * mask
        return Rollout(
            tokens=self.action_tokens[stacked["actions"]], correct=state.correct, answer=state.answer, **stacked
        )

    # --- learning ---------------------------------------------------------------------------------------------
    def a2c_losses(self, rollout: Rollout) -> dict[str, Tensor]:
        """Policy-gradient, value and entropy terms and their weighted sum ``loss``."""
        hp = self.hparams
        mask = rollout.mask
        if hp.advantage_estimator == "gae":
            advantages, returns = gae(rollout.rewards, rollout.values.detach(), mask, hp.gamma, hp.gae_lambda)
            if hp.normalize_advantages:
                advantages = masked_normalize(advantages, mask)
            policy_loss = -masked_mean(rollout.log_probs * advantages, mask)
            value_loss = masked_mean((rollout.values - returns) ** 2, mask)
        else:  # the seed: final reward against the sum of step values, for the whole episode at once
            episode_value = rollout.values.sum(1)
            advantage = (rollout.returns - episode_value).detach()
            if hp.normalize_advantages:
                advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
            policy_loss = -(rollout.log_probs.sum(1) * advantage).mean()
            value_loss = ((episode_value - rollout.returns) ** 2).mean()
        entropy = masked_mean(rollout.entropies, mask)
        loss = policy_loss + hp.value_coef * value_loss - hp.entropy_coef * entropy
        return {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy}

    def _step_generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        seed = int(self.sampling_seed) + 1_000_003 * self.global_rank + 7_919 * self.global_step
        return generator.manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        digits, stage = batch
        rollout = self.rollout(digits, stage, greedy=False, generator=self._step_generator())
        losses = self.a2c_losses(rollout)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        norm = grad_norm(self.policy, norm_type=2)["grad_2.0_norm_total"]
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        logs = {f"train/{k}": v.detach() for k, v in losses.items()}
        logs |= {
            "train/reward": rollout.returns.mean(),
            "train/accuracy": rollout.correct.float().mean(),
            "train/episode_length": rollout.lengths.float().mean(),
            "train/grad_norm": norm,
            "train/stage": float(stage.max()),
        }
        self.log("train/reward", logs.pop("train/reward"), prog_bar=True, batch_size=len(digits))
        self.log_dict(logs, batch_size=len(digits))
        return losses["loss"]

    # --- evaluation -------------------------------------------------------------------------------------------
    # Under DDP a process with fewer evaluation batches than another gets empty ones (distributed.RankBatches).
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        digits, stage = batch
        if batch_idx == 0:
            self._batch_trajectories = []
        if not len(digits):
            return
        rollout = self.rollout(digits, stage, greedy=True)
        update_episode_metrics(self.val_metrics, rollout, stage)
        index = global_batch_index(self._trainer, batch_idx)
        self._batch_trajectories.append((index, self.describe(digits, stage, rollout)))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        digits, stage = batch
        if len(digits):
            update_episode_metrics(self.test_metrics, self.rollout(digits, stage, greedy=True), stage)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> list[str]:
        """Every greedy trajectory of the batch as text; the first few are printed."""
        digits, stage = batch
        if not len(digits):
            return []
        lines = self.describe(digits, stage, self.rollout(digits, stage, greedy=True), per_stage=len(digits))
        rank_zero_info("\n".join(lines[: self.hparams.logged_trajectories]))
        return lines

    def on_validation_epoch_end(self) -> None:
        values = compute_episode_metrics(self.val_metrics)
        self.log("val/greedy_acc_min", values.pop("val/greedy_acc_min"), prog_bar=True)
        self.log_dict(values)
        self.trajectories = self._gather_trajectories()
        self._log_trajectories(self.trajectories)

    def on_test_epoch_end(self) -> None:
        self.log_dict(compute_episode_metrics(self.test_metrics))

    def describe(self, digits: Tensor, stage: Tensor, rollout: Rollout, per_stage: int | None = None) -> list[str]:
        """Readable trajectories: the first ``per_stage`` problems of each stage in the batch."""
        per_stage = self.hparams.logged_trajectories if per_stage is None else per_stage
        goals = stage_goal(digits, stage)
        lines = []
        for k in range(NUM_STAGES):
            for i in (stage == k).nonzero().flatten()[:per_stage].tolist():
                program = decode(rollout.tokens[i][rollout.mask[i]].tolist())
                mark = "correct" if rollout.correct[i] else "wrong"
                shown = digits[i, : STAGE_NUM_DIGITS[k]].tolist()
                answer = int(rollout.answer[i])
                lines.append(f"stage {k} | digits {shown} | goal {int(goals[i])} | {program} -> {answer} ({mark})")
        return lines

    def _gather_trajectories(self) -> list[str]:
        """Every process's trajectories of this validation, in the batch order of one process (under DDP each
        process evaluates some of the stages)."""
        shares = [self._batch_trajectories]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shares = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shares, self._batch_trajectories)
        batches = sorted((pair for share in shares for pair in share), key=lambda pair: pair[0])
        return [line for _, lines in batches for line in lines]

    def _log_trajectories(self, lines: list[str]) -> None:
        if not lines or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        logger = self.logger
        if hasattr(logger, "log_text"):  # W&B: a table per validation
            logger.log_text(key="val/trajectories", columns=["trajectory"], data=[[line] for line in lines])
        elif logger is not None and hasattr(logger.experiment, "add_text"):  # TensorBoard
            logger.experiment.add_text("val/trajectories", "\n\n".join(lines), self.global_step)

    def on_train_end(self) -> None:
        rank_zero_info("\n".join(["Greedy trajectories after training:", *self.trajectories]))
