"""Supervised fine-tuning of a causal LM: on stories (RLHF phase 1), instructions (tuning trials) and agentic
demonstrations (tool calls in the sentinel grammar).

    python train.py fit --config configs/rlhf/sft.yaml
    python train.py fit --config configs/rlhf/agentic_sft.yaml
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text import Perplexity

from lightning_modules.lm_phase import LMPhase
from models.lm_text import IGNORE_INDEX, causal_lm_loss, greedy_texts, model_inputs


class CausalLMSFT(LMPhase):
    """SFT with the causal-LM loss on the labelled tokens (the completion, with a
    ``TextCorpusDataModule(completion_only=true)``), full or through a LoRA adapter.

    Logged metrics: ``train/loss``; ``val/loss``, ``val/ppl`` (torchmetrics perplexity over the labelled tokens);
    the same under ``test/``.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.val_ppl, self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX), Perplexity(ignore_index=IGNORE_INDEX)
        # Token-weighted means that sum exactly across processes (a logged float would be averaged per process).
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def model_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self.lm(**model_inputs(batch)).logits
        return causal_lm_loss(logits, batch["labels"]), logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _eval_step(self, batch: dict[str, Tensor], stage: str, ppl: Perplexity, mean_loss: MeanMetric) -> None:
        if batch:  # not the empty batch a process short of evaluation batches gets under DDP
            loss, logits = self.model_step(batch)
            labels = batch["labels"][:, 1:]
            ppl.update(logits[:, :-1].float(), labels)
            mean_loss.update(loss, weight=(labels != IGNORE_INDEX).sum())
        # Logged for empty batches too: computing a metric is a collective that every process must join.
        self.log(f"{stage}/loss", mean_loss)
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_ppl, self.val_loss)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_ppl, self.test_loss)


class AgenticSFT(CausalLMSFT):
    """SFT on agentic demonstrations (``AgenticDemoDataModule``), also measuring the greedy first action.

    Logged metrics: those of ``CausalLMSFT`` and ``val/tool_call_acc`` (share of first actions that are a valid call
    of a registered tool: known name, the right argument names and types), ``val/tool_call_exact`` (the task's
    own tool with its arguments); the same under ``test/``.
    """

    def __init__(self, max_new_tokens: int = 40, **kwargs) -> None:
        """
        Args:
            max_new_tokens: Longest generated action.
        """
        super().__init__(**kwargs)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.val_tool_metrics, self.test_tool_metrics = (
            MetricCollection({"tool_call_acc": MeanMetric(), "tool_call_exact": MeanMetric()}, prefix=f"{stage}/")
            for stage in ("val", "test"))

    @torch.no_grad()
    def first_actions(self, prompt_ids: Tensor, prompt_mask: Tensor) -> list[str]:
        """Greedy first actions for left-padded task prompts."""
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        return greedy_texts(self.lm, self.tokenizer, prompts, self.hparams.max_new_tokens, batch_size=len(prompts))

    def _tool_step(self, batch: dict, metrics: MetricCollection) -> None:
        from envs.agentic import default_tools, parse_action

        if not batch:  # an empty batch (see ``_eval_step``)
            self.log_dict(metrics)
            return
        tools = default_tools()
        actions = [parse_action(text) for text in self.first_actions(batch["prompt_ids"], batch["prompt_mask"])]
        valid = torch.tensor([float(tools.is_valid_call(a)) for a in actions])
        exact = torch.tensor([float(a.kind == "tool" and a.name == t.tool and a.args == t.args)
                              for a, t in zip(actions, batch["tasks"])])
        metrics["tool_call_acc"].update(valid)
        metrics["tool_call_exact"].update(exact)
        self.log_dict(metrics)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._tool_step(batch, self.val_tool_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._tool_step(batch, self.test_tool_metrics)
