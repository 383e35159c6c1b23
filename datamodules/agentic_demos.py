"""Agentic tasks in the sentinel grammar (``envs.agentic``): expert demonstrations for SFT, and task prompts for RL.

Every episode has one token layout, shared by the demonstrations and the RL rollouts: ``<bos>`` + the task prompt,
then per turn the action (`` " " + text`` and ``<eos>``) and, unless the episode ended, the environment's
observation (``envs.agentic.observation_text``), each piece tokenised on its own. SFT trains on the actions of
exactly the contexts an RL policy sees.

The validation and test tasks are held out: none has the question of a training task (nor of the other split). The
spaces of ``count_letter`` and ``reverse`` tasks are small (about 57 questions, all drawn among 3,000 training
tasks), so with the default sizes the held-out tasks are ``add`` / ``multiply`` questions on unseen numbers.
"""

from __future__ import annotations

import random

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.distributed import Chunks, evaluation_loader, per_device_batch, resumable
from envs.agentic import AgenticEnv, Task, default_tools, demonstrations, episode_prompt, make_task, observation_text
from models.lm_factory import build_tokenizer
from models.lm_text import lm_batch, pad_with_mask

MAX_DRAWS_PER_TASK = 1000  # rejection sampling of held-out tasks gives up after this many draws per task


def encode_prompt(tokenizer, task: Task) -> list[int]:
    """``<bos>`` + the task's first-turn prompt."""
    return [tokenizer.bos_token_id, *tokenizer(episode_prompt(task), add_special_tokens=False).input_ids]


def encode_action(tokenizer, action: str) -> list[int]:
    """An action as the agent writes it: a space, its text, ``<eos>``."""
    return [*tokenizer(" " + action, add_special_tokens=False).input_ids, tokenizer.eos_token_id]


def encode_observation(tokenizer, observation: str) -> list[int]:
    """The environment's reply after an action (not written by the agent)."""
    return tokenizer(observation_text(observation), add_special_tokens=False).input_ids


def held_out_tasks(rng: random.Random, count: int, seen: set[str], tools) -> list[Task]:
    """``count`` tasks whose questions are not in ``seen`` nor repeated (``seen`` gains them)."""
    tasks = []
    for _ in range(count * MAX_DRAWS_PER_TASK):
        if len(tasks) == count:
            return tasks
        task = make_task(rng, tools)
        if task.question not in seen:
            seen.add(task.question)
            tasks.append(task)
    raise ValueError(f"found only {len(tasks)} of {count} tasks unseen in training: lower num_eval_tasks")


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
        split_digits: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 50,
    ) -> None:
        """
        Args:
            num_train_tasks: Training tasks (two demonstration turns each).
            num_eval_tasks: Validation and test tasks each, held out (questions unseen in training).
            seed: Seed of the tasks.
            vocab_size: Size of the BPE tokenizer trained on the demonstrations.
            tokenizer_cache: Folder of cached tokenizers (``null``: the default cache).
            split_digits: Every digit its own token, so a number is the same tokens in the task, the tool call, the
                observation and the answer (merged digits differ with the characters around them: ``" 3"``).
            batch_size: Training batch size (turns), summed over devices.
            eval_batch_size: Validation / test batch size per device.
        """
        super().__init__()
        if min(num_train_tasks, num_eval_tasks, batch_size, eval_batch_size) < 1:
            raise ValueError("task counts and batch sizes must be >= 1")
        self.save_hyperparameters()
        rng = random.Random(seed)
        self.tools = default_tools()
        self.tasks = {"train": [make_task(rng, self.tools) for _ in range(num_train_tasks)]}
        seen = {task.question for task in self.tasks["train"]}
        for split in ("val", "test"):
            self.tasks[split] = held_out_tasks(rng, num_eval_tasks, seen, self.tools)
        texts = [f"{c} {a}" for task in self.tasks["train"] for c, a in demonstrations(task)]
        self.tokenizer = build_tokenizer(texts, vocab_size, tokenizer_cache, split_digits=split_digits)
        self.batch_size = batch_size

    def demonstration_turns(self, task: Task) -> list[tuple[list[int], list[int]]]:
        """``(context, action)`` tokens of each expert turn, in the episode layout the RL rollouts sample."""
        env, tok = AgenticEnv(self.tools), self.tokenizer
        env.reset(task)
        context, turns = encode_prompt(tok, task), []
        for _, action in demonstrations(task):
            tokens = encode_action(tok, action)
            turns.append((context, tokens))
            context = context + tokens + encode_observation(tok, env.step(action).observation)
        return turns

    def items(self, split: str) -> list[tuple[list[int], list[int], Task, bool]]:
        return [(*turn, task, k == 0) for task in self.tasks[split]
                for k, turn in enumerate(self.demonstration_turns(task))]

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


class AgenticTaskDataModule(AgenticDemoDataModule):
    """Tasks for RL: batches of first-turn prompts (left-padded ``prompt_ids``/``prompt_mask``), their ``tasks`` and
    ``index`` (position in the split). Training draws the training tasks (the ones the SFT demonstrations showed)
    in a seeded order; validation and test take the held-out tasks in order. With the same ``num_train_tasks``,
    ``seed`` and ``vocab_size`` as the agentic SFT run it builds the same tokenizer and the same splits."""

    def __init__(self, *args, batch_size: int = 8, eval_batch_size: int = 50, **kwargs) -> None:
        """
        Args:
            batch_size: Tasks per rollout, summed over devices (each played ``group_size`` times by GRPO).
            eval_batch_size: Validation / test tasks per batch and device (one greedy episode each).
        """
        super().__init__(*args, batch_size=batch_size, eval_batch_size=eval_batch_size, **kwargs)

    def items(self, split: str) -> list[tuple[int, Task]]:
        return list(enumerate(self.tasks[split]))

    def collate(self, items: list) -> dict:
        index, tasks = zip(*items)
        prompt_ids, prompt_mask = pad_with_mask([encode_prompt(self.tokenizer, t) for t in tasks],
                                                self.tokenizer.pad_token_id, left=True)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "index": torch.tensor(index),
                "tasks": list(tasks)}
