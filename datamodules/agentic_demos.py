"""Agentic SFT demonstrations: expert turns of one-tool tasks in the sentinel grammar (``envs.agentic``)."""

from __future__ import annotations

import random

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.distributed import Chunks, evaluation_loader, per_device_batch, resumable
from envs.agentic import Task, default_tools, demonstrations, make_task
from models.lm_factory import build_tokenizer
from models.lm_text import lm_batch, pad_with_mask


class AgenticDemoDataModule(LightningDataModule):
    """Turns ``(context, action)`` of expert episodes as causal-LM batches with the loss on the action and its
    ``<eos>``. Every batch also holds the first-turn prompts (left-padded ``prompt_ids``/``prompt_mask``) and
    their ``tasks``, so a module can generate actions and measure tool-call accuracy."""

    def __init__(
        self,
        num_train_tasks: int = 3000,
        num_eval_tasks: int = 200,
        seed: int = 0,
        vocab_size: int = 512,
        tokenizer_cache: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 50,
    ) -> None:
        """
        Args:
            num_train_tasks: Training tasks (two demonstration turns each).
            num_eval_tasks: Validation and test tasks each.
            seed: Seed of the tasks.
            vocab_size: Size of the BPE tokenizer trained on the demonstrations.
            tokenizer_cache: Folder of cached tokenizers (``null``: the default cache).
            batch_size: Training batch size (turns), summed over devices.
            eval_batch_size: Validation / test batch size per device.
        """
        super().__init__()
        if min(num_train_tasks, num_eval_tasks, batch_size, eval_batch_size) < 1:
            raise ValueError("task counts and batch sizes must be >= 1")
        self.save_hyperparameters()
        rng = random.Random(seed)
        self.tools = default_tools()
        self.tasks = {split: [make_task(rng, self.tools) for _ in range(n)] for split, n in
                      (("train", num_train_tasks), ("val", num_eval_tasks), ("test", num_eval_tasks))}
        texts = [f"{c} {a}" for task in self.tasks["train"] for c, a in demonstrations(task)]
        self.tokenizer = build_tokenizer(texts, vocab_size, tokenizer_cache)
        self.batch_size = batch_size

    def encode(self, context: str, action: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        prompt = [tok.bos_token_id, *tok(context, add_special_tokens=False).input_ids]
        return prompt, [*tok(" " + action, add_special_tokens=False).input_ids, tok.eos_token_id]

    def items(self, split: str) -> list[tuple[list[int], list[int], Task, bool]]:
        return [(*self.encode(c, a), task, turn == 0) for task in self.tasks[split]
                for turn, (c, a) in enumerate(demonstrations(task))]

    def collate(self, items: list) -> dict:
        prompts, actions, tasks, first = zip(*items)
        batch = lm_batch(prompts, actions, self.tokenizer.pad_token_id, completion_only=True)
        starts = [p for p, f in zip(prompts, first) if f] or [prompts[0]]
        batch["prompt_ids"], batch["prompt_mask"] = pad_with_mask(starts, self.tokenizer.pad_token_id, left=True)
        batch["tasks"] = [t for t, f in zip(tasks, first) if f] or [tasks[0]]
        return batch

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        items = self.items(split)
        if not shuffle:  # evaluation: whole batches dealt to the processes, none twice; placeholders are ``{}``
            return evaluation_loader(self, Chunks(items, batch_size, self.collate), empty={})
        order = torch.utils.data.RandomSampler(items, generator=torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(items, batch_size=batch_size, sampler=resumable(self, order, batch_size),
                          collate_fn=self.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", per_device_batch(self, self.batch_size)[0], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)
