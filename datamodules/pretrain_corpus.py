"""Pretraining batches: the generated corpus (``datamodules/pretrain_text.py``) packed into fixed-length blocks
for the plain causal-LM loss on every token, and the byte-level BPE tokenizer trained on it.

    python train.py fit --config configs/pretrain/tiny.yaml

Documents are ``<bos> text <eos>``, concatenated in order and cut into blocks of ``block_size`` tokens (the tail
that does not fill a block is dropped), so no position is padding. The validation documents come from the same
generator and seed, after the training ones; any that also occur in the training documents are dropped.
"""

from __future__ import annotations

import itertools

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.distributed import Chunks, EpochPermutation, evaluation_loader, per_device_batch, resumable
from datamodules.pretrain_text import generate_documents
from models.lm_factory import build_tokenizer


class PretrainCorpusDataModule(LightningDataModule):
    """Blocks of the generated pretraining corpus: ``input_ids``, ``attention_mask`` (all ones) and ``labels``
    (equal to ``input_ids``: the loss is taken on every token)."""

    def __init__(
        self,
        num_documents: int = 24000,
        val_documents: int = 400,
        corpus_seed: int = 0,
        vocab_size: int = 4096,
        tokenizer_cache: str | None = None,
        block_size: int = 256,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            num_documents: Training documents generated.
            val_documents: Validation documents generated after them (same generator and seed).
            corpus_seed: Seed of the generated corpus and of the shuffling of training blocks.
            vocab_size: Size of the byte-level BPE tokenizer trained on the training documents (digits split).
            tokenizer_cache: Folder of cached tokenizers (``null``: the user cache).
            block_size: Tokens per training sequence (documents are packed across block boundaries).
            batch_size: Blocks per update, summed over all devices.
            eval_batch_size: Validation blocks per batch per device.
            num_workers: DataLoader workers.
        """
        super().__init__()
        if min(num_documents, val_documents, batch_size, eval_batch_size) < 1 or block_size < 8:
            raise ValueError("num_documents, val_documents and batch sizes must be >= 1, block_size >= 8")
        self.save_hyperparameters()
        self.batch_size = batch_size
        documents = generate_documents(num_documents + val_documents, corpus_seed)
        train = documents[:num_documents]
        seen = set(train)
        self.documents = {"train": train, "val": [d for d in documents[num_documents:] if d not in seen]}
        self.tokenizer = build_tokenizer(train, vocab_size, tokenizer_cache, split_digits=True)
        self._blocks: dict[str, torch.Tensor] = {}

    def blocks(self, split: str) -> torch.Tensor:
        """``[n, block_size]`` token ids of a split's packed documents (built once)."""
        if split not in self._blocks:
            tok = self.tokenizer
            ids = tok(self.documents[split], add_special_tokens=False)["input_ids"]
            stream = list(itertools.chain.from_iterable([tok.bos_token_id, *row, tok.eos_token_id] for row in ids))
            size = self.hparams.block_size
            count = len(stream) // size
            if count == 0:
                raise ValueError(f"the {split} documents hold {len(stream)} tokens, fewer than one block of {size}")
            self._blocks[split] = torch.tensor(stream[: count * size]).view(count, size)
        return self._blocks[split]

    @staticmethod
    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack(rows)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def train_dataloader(self) -> DataLoader:
        blocks = self.blocks("train")
        per_device = per_device_batch(self, self.batch_size)[0]
        drop_last = len(blocks) >= per_device
        # Seeded, so a resumed run draws the same order and continues where it stopped.
        sampler = resumable(self, EpochPermutation(len(blocks), self.hparams.corpus_seed), per_device, drop_last)
        return DataLoader(blocks, batch_size=per_device, sampler=sampler, collate_fn=self.collate,
                          num_workers=self.hparams.num_workers, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        # Whole batches dealt to the processes, none twice (placeholders ``{}``), as every evaluation loader.
        return evaluation_loader(self, Chunks(self.blocks("val"), self.hparams.eval_batch_size, self.collate),
                                 empty={}, num_workers=self.hparams.num_workers)
