"""The base of LM policies trained by RL against a frozen reward model (PPO; any critic-free method beside it):
the policy, its reference, the reward model, sampling, scoring, and evaluation of the policy against its
reference on the same prompts.

The reference is the policy's starting weights: the policy with its LoRA adapter disabled, or a frozen copy when
every weight trains. Contract with the DataModule: batches hold left-padded ``prompt_ids``/``prompt_mask`` and the
documents' ``index``; a DataModule that also has ``ReferenceTexts`` (``datamodules.text_corpus.PromptDataModule``)
gives the test metrics against the held-out completions; one that holds the generated story corpus
(``GeneratedStories``) also gives the gold judge's scores (``envs.story_judge``), independent of the reward model.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text import BLEUScore, Perplexity, ROUGEScore

from datamodules.distributed import global_batch_index, per_device_batch
from envs.story_judge import gold_score
from lightning_modules.lm_phase import LMPhase, checkpoint_lm_settings, load_phase_checkpoint
from lightning_modules.rl import minibatch_indices
from models.lm_rollout import RewardModel, distinct_n, response_logprobs
from models.lm_text import IGNORE_INDEX, lm_batch, sample

PAIRED = ("reward", "reward_ref", "win_rate", "tie_rate", "kl", "response_length")
GOLD = ("gold_score", "gold_score_ref", "gold_win_rate")


def paired_wins(score: Tensor, score_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Per prompt: 1 where the policy's sample scores higher than the reference's, 0.5 on a tie, else 0; and the
    ties."""
    ties = (score == score_ref).float()
    return (score > score_ref).float() + 0.5 * ties, ties


@runtime_checkable
class ReferenceTexts(Protocol):
    """A prompt DataModule whose documents have held-out completions (for ROUGE, BLEU and perplexity)."""

    def prompt_and_completion(self, index: int) -> tuple[str, str]: ...

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]: ...


@runtime_checkable
class GeneratedStories(Protocol):
    """A prompt DataModule that says whether its documents are the generated stories (the gold judge applies)."""

    generated: bool

    def prompt_and_completion(self, index: int) -> tuple[str, str]: ...


class GenerationMetrics(nn.Module):
    """Paired comparison of the policy and the reference on the same prompts, and text statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.paired = MetricCollection({name: MeanMetric() for name in PAIRED})
        self.gold = MetricCollection({name: MeanMetric() for name in GOLD})
        self.rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
        self.bleu = BLEUScore(n_gram=4, smooth=True)
        self.ppl, self.ppl_ref = Perplexity(ignore_index=IGNORE_INDEX), Perplexity(ignore_index=IGNORE_INDEX)
        self.texts: list[str] = []

    def compute(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}/{n}": v for n, v in self.paired.compute().items()}
        out[f"{prefix}/reward_delta"] = out[f"{prefix}/reward"] - out[f"{prefix}/reward_ref"]
        if self.gold["gold_score"].update_called:
            out |= {f"{prefix}/{n}": v for n, v in self.gold.compute().items()}
        if self.texts:
            rouge = self.rouge.compute()
            out |= {f"{prefix}/rouge1": rouge["rouge1_fmeasure"], f"{prefix}/rouge2": rouge["rouge2_fmeasure"],
                    f"{prefix}/rougeL": rouge["rougeL_fmeasure"], f"{prefix}/bleu": self.bleu.compute(),
                    f"{prefix}/distinct_1": torch.tensor(distinct_n(self.texts, 1)),
                    f"{prefix}/distinct_2": torch.tensor(distinct_n(self.texts, 2))}
        if self.ppl.update_called:
            out |= {f"{prefix}/ppl": self.ppl.compute(), f"{prefix}/ppl_ref": self.ppl_ref.compute()}
        return out

    def reset(self) -> None:
        for m in self.children():
            m.reset()
        self.texts = []


class RolloutIteration:
    """The rollout an on-policy method (PPO, GRPO) is taking minibatches from, and the minibatches left.

    It is saved with checkpoints (``PolicyRL.on_save_checkpoint``), so that a run resumed mid-iteration takes the
    same minibatches from the same rollout as the uninterrupted run."""

    def __init__(self) -> None:
        self.buffer: dict[str, Tensor] | None = None
        self.queue: list[Tensor] = []
        self.total = 0  # minibatches of the iteration in progress

    def start(self, buffer: dict[str, Tensor], size: int, epochs: int, generator: torch.Generator) -> None:
        """``epochs`` shuffled passes over the rollout's sequences (``buffer["ids"]``) in minibatches of ``size``."""
        self.buffer, self.queue = buffer, minibatch_indices(len(buffer["ids"]), size, epochs, generator)
        self.total = len(self.queue)

    @property
    def done(self) -> bool:
        return not self.queue

    @property
    def taken(self) -> int:
        """Minibatches of this iteration taken so far (the one being trained on included)."""
        return self.total - len(self.queue)

    def next(self, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        """The next minibatch's indices and its per-sequence tensors (those of the buffer with a sequence axis)."""
        index = self.queue.pop(0)
        return index, {k: v[index].to(device) for k, v in self.buffer.items() if v.dim() > 0}

    def clear(self) -> None:
        """Drop the rest of the iteration: the next training step samples a new rollout."""
        self.buffer, self.queue, self.total = None, [], 0

    def state(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "queue": list(self.queue), "total": self.total}

    def load(self, state: dict[str, Any]) -> None:
        self.buffer, self.queue = state.get("buffer"), list(state.get("queue", []))
        self.total = state.get("total", len(self.queue))  # older checkpoints: counted from the minibatches left


class PolicyRL(LMPhase):
    """An LM policy, its reference and a frozen reward model; validation and test compare policy and reference.

    Logged by validation and test: ``val/reward``, ``val/reward_ref``, ``val/reward_delta``, ``val/win_rate``
    (paired, ties count half), ``val/tie_rate`` (share of prompts where both score the same: mostly identical
    samples), ``val/kl`` (sequence KL of the policy's samples to the reference), ``val/response_length``; test adds
    ``test/rouge1|2|L``, ``test/bleu``, ``test/distinct_1|2`` against the held-out completions and ``test/ppl`` /
    ``test/ppl_ref``, the perplexity of the policy / the reference on them. On the generated story corpus both also
    log the gold judge's view (``envs.story_judge``, a program, not trained on any pairs): ``val/gold_score`` /
    ``val/gold_score_ref`` (mean judge score of the policy's / the reference's samples, 0 = clean) and
    ``val/gold_win_rate`` (paired as the win rate, ties count half).
    """

    uses_reward_model = True
    """Whether rewards come from the reward model of ``reward_model_from`` (a subclass whose environment gives the
    reward sets this false: no reward model is built, and ``reward_model_from`` is refused)."""

    def __init__(
        self,
        reward_model_from: str | None = None,
        max_new_tokens: int = 96,
        temperature: float = 1.0,
        eval_temperature: float | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            reward_model_from: Reward-model checkpoint (``null``: an untrained reward model, for smoke tests only).
            max_new_tokens: Longest sampled response.
            temperature: Sampling temperature; the log-probs are those of the tempered distribution.
            eval_temperature: Sampling temperature of validation/test generations (``null``: ``temperature``).
        """
        if max_new_tokens < 1 or temperature <= 0 or (eval_temperature is not None and eval_temperature <= 0):
            raise ValueError("max_new_tokens must be >= 1, temperature and eval_temperature > 0")
        if reward_model_from is not None and not self.uses_reward_model:
            raise ValueError(f"{type(self).__name__} takes its reward from the environment: drop reward_model_from")
        super().__init__(**kwargs)
        self.reward_model: RewardModel | None = None
        self.reference: nn.Module | None = None
        self.val_metrics, self.test_metrics = GenerationMetrics(), GenerationMetrics()
        self.iteration: RolloutIteration | None = None  # the on-policy methods' (PPO, GRPO) rollout in progress

    # --- building ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.lm = self._build_lm(self._init_state())
        if self.lm_settings.lora is None:  # full fine-tuning: the reference is a frozen copy of the starting weights
            self.reference = copy.deepcopy(self.lm).requires_grad_(False).eval()
        if self.uses_reward_model:
            self.reward_model = self._load_reward_model().requires_grad_(False).eval()

    def _load_reward_model(self) -> RewardModel:
        path = self.hparams.reward_model_from
        if path is None:
            rank_zero_warn("reward_model_from is null: the policy optimises an untrained reward model (smoke tests)")
            return RewardModel(self._build_lm(None, adapter=False))
        checkpoint = load_phase_checkpoint(path)
        if "reward_head" not in checkpoint:
            raise ValueError(f"{path!r} is not a reward-model checkpoint (no reward_head)")
        reward_model = RewardModel(self._build_lm(checkpoint["merged_lm"], adapter=False,
                                                  **checkpoint_lm_settings(checkpoint)))
        reward_model.head.load_state_dict(checkpoint["reward_head"])
        return reward_model

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.reward_model, self.reference):
            if frozen is not None:
                frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The frozen reward model and reference are rebuilt from their own checkpoints.
        for key in [k for k in checkpoint["state_dict"] if k.startswith(("reward_model.", "reference."))]:
            del checkpoint["state_dict"][key]
        if self.iteration is not None:
            checkpoint["rollout_iteration"] = self.iteration.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = self.state_dict()
        for key in state:
            if key.startswith(("reward_model.", "reference.")):
                checkpoint["state_dict"][key] = state[key]
        if self.iteration is not None:  # none in checkpoints of earlier versions: the old keys, or a fresh iteration
            old = checkpoint.get("ppo_iteration") or checkpoint.get("grpo_iteration") or {}
            self.iteration.load(checkpoint.get("rollout_iteration", old))

    def start_iteration(self, buffer: dict[str, Tensor], generator: torch.Generator) -> None:
        """Start an iteration of ``ppo_epochs`` passes over the rollout in minibatches of ``minibatch_size``
        sequences over all devices (each device takes its share from its own rollout)."""
        size = per_device_batch(self, self.hparams.minibatch_size)[0]  # the module knows its trainer as a DataModule
        self.iteration.start(buffer, size, self.hparams.ppo_epochs, generator)

    # --- acting -----------------------------------------------------------------------------------------------
    def _reference_forward(self, fn, *args) -> Any:
        """``fn(reference model, *args)``: the frozen copy, or the policy with its adapter disabled."""
        if self.reference is not None:
            return fn(self.reference, *args)
        with self.lm.disable_adapter():
            return fn(self.lm, *args)

    def _reference_logprobs(self, ids: Tensor, mask: Tensor, prompt_length: int,
                            temperature: float | None = None) -> Tensor:
        temperature = temperature or self.hparams.temperature
        return self._reference_forward(response_logprobs, ids, mask, prompt_length, temperature)[0]

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, reference: bool = False, greedy: bool = False,
                 temperature: float | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Responses ``(tokens, mask)`` of the policy (or of the reference) to left-padded prompts."""
        tok = self.tokenizer
        kwargs = dict(max_new_tokens=self.hparams.max_new_tokens, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, temperature=temperature or self.hparams.temperature,
                      greedy=greedy, generator=generator)
        if reference:
            return self._reference_forward(lambda model: sample(model, prompt_ids, prompt_mask, **kwargs))
        return sample(self.lm, prompt_ids, prompt_mask, **kwargs)

    @torch.no_grad()
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response: Tensor, response_mask: Tensor) -> Tensor:
        """Raw reward-model scores of prompt + response (read at the last real token)."""
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, response_mask.long()], 1)
        return self.reward_model(ids, mask)

    # --- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compare(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> dict[str, Any]:
        """Policy and reference responses to the same prompts, their scores, the policy's KL and its texts."""
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        temperature = self.hparams.eval_temperature or self.hparams.temperature
        seed = None if generator is None else generator.initial_seed()
        gens = [torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None for _ in range(2)]
        response, rmask = self.generate(prompt_ids, prompt_mask, temperature=temperature, generator=gens[0])
        ref_response, ref_mask = self.generate(prompt_ids, prompt_mask, reference=True, temperature=temperature,
                                               generator=gens[1])
        reward = self.score(prompt_ids, prompt_mask, response, rmask)
        reward_ref = self.score(prompt_ids, prompt_mask, ref_response, ref_mask)
        ids = torch.cat([prompt_ids, response], 1)
        mask = torch.cat([prompt_mask, rmask.long()], 1)
        p = prompt_ids.shape[1]
        logprobs = response_logprobs(self.lm, ids, mask, p, temperature)[0]
        ref_logprobs = self._reference_logprobs(ids, mask, p, temperature)
        kl = ((logprobs - ref_logprobs) * rmask).sum(1)
        return {"reward": reward, "reward_ref": reward_ref, "kl": kl, "length": rmask.float().sum(1),
                "texts": self.decode(response, rmask), "ref_texts": self.decode(ref_response, ref_mask)}

    def decode(self, response: Tensor, response_mask: Tensor) -> list[str]:
        return [self.tokenizer.decode(r[m], skip_special_tokens=True).strip() for r, m in zip(response, response_mask)]

    def _eval_step(self, batch: dict[str, Tensor], batch_idx: int, metrics: GenerationMetrics, text: bool) -> None:
        if not batch:  # the empty batch a process short of evaluation batches gets under DDP
            return
        # Seeded by the batch's index on one process, so every world size samples the same responses.
        index = global_batch_index(self._trainer, batch_idx)
        generator = torch.Generator(device=self.device).manual_seed(10_007 * (index + 1))
        out = self.compare(batch, generator)
        wins, ties = paired_wins(out["reward"], out["reward_ref"])
        values = {"reward": out["reward"], "reward_ref": out["reward_ref"], "win_rate": wins, "tie_rate": ties,
                  "kl": out["kl"], "response_length": out["length"]}
        for name, value in values.items():
            metrics.paired[name].update(value)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if text and isinstance(datamodule, ReferenceTexts):
            pairs = [datamodule.prompt_and_completion(int(i)) for i in batch["index"]]
            references = [completion for _, completion in pairs]
            metrics.rouge.update(out["texts"], references)
            metrics.bleu.update(out["texts"], [[r] for r in references])
            metrics.texts += out["texts"]
            self._update_perplexity([datamodule.encode_pair(*p) for p in pairs], metrics)
        if isinstance(datamodule, GeneratedStories) and datamodule.generated:
            prompts = [datamodule.prompt_and_completion(int(i))[0] for i in batch["index"]]
            self._update_gold(prompts, out["texts"], out["ref_texts"], metrics)

    def _update_gold(self, prompts: list[str], texts: list[str], ref_texts: list[str],
                     metrics: GenerationMetrics) -> None:
        """The story judge's scores of the policy's and the reference's samples for the same prompts."""
        gold, gold_ref = (torch.tensor([gold_score(p, t) for p, t in zip(prompts, samples)], device=self.device)
                          for samples in (texts, ref_texts))
        values = {"gold_score": gold, "gold_score_ref": gold_ref, "gold_win_rate": paired_wins(gold, gold_ref)[0]}
        for name, value in values.items():
            metrics.gold[name].update(value)

    @torch.no_grad()
    def _update_perplexity(self, pairs: list[tuple[list[int], list[int]]], metrics: GenerationMetrics) -> None:
        """Perplexity of the policy and of the reference on held-out (prompt, completion) token pairs."""
        data = lm_batch([p for p, _ in pairs], [c for _, c in pairs], self.tokenizer.pad_token_id, True)
        ids, mask, labels = (data[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        logits = self.lm(input_ids=ids, attention_mask=mask).logits
        ref_logits = self._reference_forward(lambda model: model(input_ids=ids, attention_mask=mask).logits)
        metrics.ppl.update(logits[:, :-1].float(), labels[:, 1:])
        metrics.ppl_ref.update(ref_logits[:, :-1].float(), labels[:, 1:])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_metrics, text=False)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_metrics, text=True)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute("val")
        self.val_metrics.reset()
        self.log("val/win_rate", values.pop("val/win_rate"), prog_bar=True)
        self.log_dict(values)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute("test"))
        self.test_metrics.reset()
