"""An LM agent trained on its early experience: IL, IWM then IL, or SR, with LoRA and optional 4-bit weights.

The recipe is chosen by the DataModule (``datamodules.early_experience``); this module owns the LM, the
completion-only causal-LM loss and the evaluation episodes. The policy acts by scoring every candidate action of
the page after the prompt ``<observation>\\nAction:`` (``models.action_scorer``) and taking the best.

Logged: ``train/loss``; per split (``train``, ``held_out``, ``out_of_domain``) ``val/success/<split>``,
``val/reward/<split>``, ``val/invalid_rate/<split>`` (share of actions the environment rejected),
``val/episode_length/<split>``; the same under ``test/``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torchmetrics import MeanMetric, MetricCollection

from datamodules.distributed import on_any_rank
from datamodules.early_experience import policy_prompt
from envs.text_env import TextEnv
from lightning_modules.lm_phase import LMPhase, LRDecay
from models.action_scorer import score_candidates
from models.lm_factory import LMSettings
from models.lm_text import completion_loss, encode_prompts, greedy_texts

SPLITS = ("train", "held_out", "out_of_domain")
EPISODE_METRICS = ("success", "reward", "invalid_rate", "episode_length")


@runtime_checkable
class ExperienceSource(Protocol):
    """What the agent needs from its DataModule beyond batches: the tokenizer, the evaluation episodes (also played
    before the first update), for branching with the policy its scorer, and for policy-written self-reflection the
    requests to answer first."""

    tokenizer: Any

    def val_dataloader(self) -> Any: ...

    def needs_policy(self) -> bool: ...

    def collect_with_policy(self, scorer: Any) -> int: ...

    def reflection_requests(self) -> list[str]: ...

    def set_policy_rationales(self, rationales: list[str]) -> int: ...


def episode_metrics(stage: str) -> MetricCollection:
    """Success, reward, invalid-action rate and length per evaluation split, each a mean over episodes."""
    return MetricCollection({f"{name}/{split}": MeanMetric() for name in EPISODE_METRICS for split in SPLITS},
                            prefix=f"{stage}/")


def update_episode_metrics(metrics: MetricCollection, split: str, reward: float, steps: int, invalid: int) -> None:
    values = {"success": float(reward >= 1.0), "reward": reward, "invalid_rate": invalid / max(steps, 1),
              "episode_length": float(steps)}
    for name, value in values.items():
        metrics[f"{name}/{split}"].update(value)


def compute_and_reset(metrics: MetricCollection) -> dict[str, torch.Tensor]:
    """The metrics of the splits that were played on any process (a split without episodes is left out, not logged
    as NaN; under DDP every process computes the same ones, since each compute is a collective)."""
    items = list(metrics.items(keep_base=True))
    device = next(iter(metrics.values())).device
    played = on_any_rank([m.update_called for _, m in items], device)
    out = {f"{metrics.prefix}{key}": m.compute() for (key, m), keep in zip(items, played) if keep}
    metrics.reset()
    return out


class EpisodeAgent:
    """Acting by candidate scoring and the greedy evaluation episodes, shared by the LM phases whose policy picks
    one of a text environment's candidate actions (``EarlyExperienceAgent``, ``WebShopGRPO``). The phase has
    ``lm``, ``tokenizer``, the hyperparameters ``length_normalize`` and ``evaluate_before_training``, and
    ``val_metrics`` / ``test_metrics`` from :func:`episode_metrics`; its DataModule is an ``ExperienceSource``.
    """

    # --- acting -----------------------------------------------------------------------------------------------
    def candidate_scores(self, prompts: list[str], candidates: list[list[str]]) -> list[torch.Tensor]:
        """The policy's score of each candidate after each prompt, all in one batch (no gradients)."""
        return score_candidates(self.lm, self.tokenizer, prompts, candidates, self.hparams.length_normalize)

    @torch.no_grad()
    def act(self, envs: list[TextEnv]) -> list[str]:
        """The best-scoring candidate action of each environment's current page, all scored in one batch."""
        candidates = [env.candidate_actions() for env in envs]
        scores = self.candidate_scores([policy_prompt(env.observation()) for env in envs], candidates)
        return [c[int(s.argmax())] for c, s in zip(candidates, scores)]

    def run_episodes(self, envs: list[TextEnv]) -> list[tuple[float, int, int]]:
        """Greedy episodes in copies of ``envs``: ``(reward, steps, invalid actions)`` each."""
        was_training = self.lm.training
        self.lm.eval()
        envs = [env.copy() for env in envs]
        for env in envs:
            env.reset()
        outcomes = [[0.0, 0, 0] for _ in envs]
        done = [False] * len(envs)
        active = list(range(len(envs)))
        while active:
            for i, action in zip(active, self.act([envs[i] for i in active])):
                result = envs[i].step(action)
                outcomes[i][0] = result.reward
                outcomes[i][1] += 1
                outcomes[i][2] += result.error is not None
                done[i] = result.done or outcomes[i][1] >= envs[i].max_steps
            active = [i for i in active if not done[i]]
        self.lm.train(was_training)
        return [tuple(o) for o in outcomes]

    def _evaluate(self, batch: list[tuple[str, TextEnv]], metrics: MetricCollection) -> None:
        if not batch:  # the empty batch a process short of evaluation batches gets under DDP
            return
        splits, envs = zip(*batch)
        for split, outcome in zip(splits, self.run_episodes(list(envs))):
            update_episode_metrics(metrics, split, *outcome)

    def validation_step(self, batch: list[tuple[str, TextEnv]], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: list[tuple[str, TextEnv]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(compute_and_reset(self.val_metrics))

    def on_test_epoch_end(self) -> None:
        self.log_dict(compute_and_reset(self.test_metrics))

    def _experience(self) -> ExperienceSource:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ExperienceSource):
            raise TypeError(f"{type(self).__name__} needs a DataModule with tokenizer, val_dataloader, needs_policy, "
                            "collect_with_policy, reflection_requests and set_policy_rationales (got "
                            f"{type(datamodule).__name__})")
        return datamodule

    def on_train_start(self) -> None:
        super().on_train_start()
        # Outside Lightning's validation loop (which would not run before the first update): every rank plays its
        # share of the episodes, rank 0 logs them at step 0.
        if not self.hparams.evaluate_before_training or self.global_step > 0:
            return
        loader = self._experience().val_dataloader()
        limit = self.trainer.limit_val_batches  # honoured as in validation (fast_dev_run sets it to 1)
        limit = limit if isinstance(limit, int) else math.ceil(limit * len(loader))
        for batch in itertools.islice(loader, limit):
            self._evaluate(batch, self.val_metrics)
        metrics = {k: float(v) for k, v in compute_and_reset(self.val_metrics).items()}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)


class EarlyExperienceAgent(EpisodeAgent, LMPhase):
    """Causal LM policy trained with the completion-only LM loss on IL / IWM / SR examples."""

    def __init__(
        self,
        lm: LMSettings = LMSettings(model_name="tiny-smollm3"),
        lr_decay: LRDecay = "cosine",
        warmup_ratio: float = 0.02,
        length_normalize: bool = False,
        evaluate_before_training: bool = True,
        rationale_batch_size: int = 16,
        **kwargs,
    ) -> None:
        """
        Args:
            lm: The policy LM (a tiny SmolLM3-architecture model by default; see ``LMPhase``).
            lr_decay: Learning-rate decay after the warmup (a cosine to zero beat a constant rate on the web shop).
            warmup_ratio: Share of the optimiser steps over which the learning rate rises linearly from zero.
            length_normalize: Score candidate actions by mean instead of summed token log-probability.
            evaluate_before_training: Run the evaluation episodes once before the first update and log them at
                step 0 (the "before training" row of the results).
            rationale_batch_size: Requests per batch when the policy writes its self-reflection rationales.
        """
        if rationale_batch_size < 1:
            raise ValueError(f"rationale_batch_size must be >= 1, got {rationale_batch_size}")
        super().__init__(lm=lm, lr_decay=lr_decay, warmup_ratio=warmup_ratio, **kwargs)
        self.val_metrics, self.test_metrics = episode_metrics("val"), episode_metrics("test")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = completion_loss(self.lm, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                               batch.get("position_ids"))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def on_fit_start(self) -> None:
        datamodule = self._experience()
        if datamodule.needs_policy():  # before the rationales: they are written for these branches
            was_training = self.lm.training
            self.lm.eval()
            states = datamodule.collect_with_policy(self.candidate_scores)
            self.lm.train(was_training)
            self.print(f"branched {states} states with the policy")
        requests = datamodule.reflection_requests()
        if requests:
            rationales = self.write(requests, datamodule.hparams.rationale_tokens)
            kept = datamodule.set_policy_rationales(rationales)
            self.print(f"policy-written rationales: kept {kept} of {len(rationales)} (the others concluded otherwise)")

    def write(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of ``prompts`` (batched, left-padded), decoded up to ``<eos>``."""
        rows = encode_prompts(self.tokenizer, prompts)
        texts = greedy_texts(self.lm, self.tokenizer, rows, max_new_tokens, self.hparams.rationale_batch_size)
        return [t.strip() for t in texts]
