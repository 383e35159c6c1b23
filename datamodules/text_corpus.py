"""Text for the LM systems: an offline story corpus the project generates (or local text / JSONL files), and the
DataModules built on it: causal-LM batches (SFT), preference pairs (reward model) and prompts (PPO, evaluation).

The generated stories follow simple templates whose properties are controlled (number of sentences, mood, the
entities involved), so every story is coherent by construction: one protagonist (name, kind, pronoun) and one
object throughout, sentences in narrative order. Preference pairs compare a story with a *corrupted copy of the
same story* (sentences swapped, or the protagonist's name, pronoun or object changed part-way), drawn so that the
rejected text has the same length distribution as the chosen one: a reward model cannot score well by preferring
longer text (the seed's rejected = shuffled half story could).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.distributed import (
    Chunks,
    EpochPermutation,
    evaluation_loader,
    per_device_batch,
    resumable,
    step_generator,
)
from datamodules.sources import column_value, load_records
from models.lm_factory import build_tokenizer, load_tokenizer
from models.lm_text import check_sequence_settings, lm_batch, pad_with_mask

# --- the generated corpus -------------------------------------------------------------------------------------
NAMES = {
    "she": ["Mia", "Lily", "Anna", "Zoe", "Emma", "Lucy", "Sara", "Nina", "Ella", "Rosa"],
    "he": ["Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Finn", "Noah", "Eli", "Owen"],
}
KINDS = ["little girl", "little boy", "cat", "dog", "bunny", "bird", "fox", "bear"]
ADJECTIVES = ["small", "happy", "curious", "brave", "kind", "shy", "funny", "quiet"]
PLACES = ["in a small house", "near the big lake", "in a green forest", "by the sea", "on a busy farm",
          "in a tall tree", "in a sunny town", "next to a park"]
OBJECTS = ["red ball", "blue kite", "shiny stone", "old book", "little boat", "yellow hat", "magic box", "green leaf"]
WHERES = ["under a tree", "in the grass", "near the river", "behind a rock", "in the garden", "on the road"]
FRIENDS = ["a friendly duck", "an old owl", "a tiny mouse", "a big frog", "a kind turtle", "a little lamb"]
FEELINGS = {"happy": ["very happy", "so excited", "full of joy", "very glad"],
            "sad": ["a little sad", "very worried", "quite upset", "a bit scared"]}
ACTIONS = ["played with the {o} together with {f}", "showed the {o} to {f}", "shared the {o} with {f}",
           "carried the {o} home with {f}"]
ENDINGS = {"happy": ["In the end, {n} smiled and was happy.", "From that day on, {n} and {f} were best friends.",
                     "That night, {n} slept with a big smile."],
           "sad": ["In the end, {n} lost the {o} and cried.", "That night, {n} felt lonely and sad.",
                   "Sadly, the {o} broke and {n} went home alone."]}
Mood = Literal["happy", "sad", "mixed"]
Corruption = Literal["shuffle", "name", "pronoun", "object"]
CORRUPTIONS: tuple[str, ...] = ("shuffle", "name", "pronoun", "object")


@dataclass
class Story:
    """One generated story and the entities it must keep consistent."""

    sentences: list[str]
    name: str
    pronoun: str
    object: str
    mood: str

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def make_story(rng: random.Random, mood: Mood = "mixed", min_sentences: int = 5, max_sentences: int = 7) -> Story:
    """A coherent template story with ``min_sentences``..``max_sentences`` sentences (5 to 7)."""
    if not 5 <= min_sentences <= max_sentences <= 7:
        raise ValueError(f"need 5 <= min_sentences <= max_sentences <= 7, got {min_sentences}, {max_sentences}")
    pronoun = rng.choice(["she", "he"])
    name = rng.choice(NAMES[pronoun])
    kind = rng.choice([k for k in KINDS if k != ("little boy" if pronoun == "she" else "little girl")])
    obj, friend = rng.choice(OBJECTS), rng.choice(FRIENDS)
    mood = rng.choice(["happy", "sad"]) if mood == "mixed" else mood
    fill = {"n": name, "o": obj, "f": friend}
    pro = pronoun.capitalize()
    core = [
        f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {kind} named {name}.",
        f"{pro} lived {rng.choice(PLACES)}.",
        f"One day, {name} found a {obj} {rng.choice(WHERES)}.",
        f"{pro} was {rng.choice(FEELINGS[mood])}.",
        f"{name} {rng.choice(ACTIONS).format(**fill)}.",
        f"{friend[0].upper()}{friend[1:]} liked the {obj} too.",
        rng.choice(ENDINGS[mood]).format(**fill),
    ]
    keep = rng.randint(min_sentences, max_sentences)
    optional = [1, 3, 5]  # the others carry the plot
    dropped = set(rng.sample(optional, 7 - keep))
    return Story([s for i, s in enumerate(core) if i not in dropped], name, pronoun, obj, mood)


def generate_stories(count: int, seed: int = 0, mood: Mood = "mixed", min_sentences: int = 5,
                     max_sentences: int = 7) -> list[Story]:
    """``count`` stories, the same for the same arguments."""
    rng = random.Random(seed)
    return [make_story(rng, mood, min_sentences, max_sentences) for _ in range(count)]


def split_sentences(text: str) -> list[str]:
    """Sentences of plain text (split after ``.``, ``!`` or ``?`` followed by white space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def corrupt(sentences: Sequence[str], kind: str, rng: random.Random, story: Story | None = None) -> str:
    """An incoherent copy of a story with the same length distribution.

    ``shuffle`` reorders the sentences (same words); ``name`` / ``pronoun`` / ``object`` replace the protagonist's
    name, pronoun or object in the sentences after the one that introduced it by another drawn from the same pool
    (so longer and shorter replacements are equally likely). The entity corruptions need the ``story``.
    """
    sentences = list(sentences)
    if kind == "shuffle":
        if len(sentences) < 2:
            raise ValueError("shuffle needs at least two sentences")
        order = list(range(len(sentences)))
        while order == sorted(order):
            rng.shuffle(order)
        return " ".join(sentences[i] for i in order)
    if story is None:
        raise ValueError(f"corruption {kind!r} needs the generated story's entities")
    if kind == "name":
        pool = [n for names in NAMES.values() for n in names if n != story.name]
        old, new = story.name, rng.choice(pool)
    elif kind == "pronoun":
        old = story.pronoun.capitalize()
        new = "He" if old == "She" else "She"
    elif kind == "object":
        old, new = story.object, rng.choice([o for o in OBJECTS if o != story.object])
    else:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    # Change every mention after the first one, so the story contradicts itself.
    mentions = [i for i, s in enumerate(sentences) if re.search(rf"\b{re.escape(old)}\b", s)]
    start = mentions[1] if len(mentions) > 1 else 1
    changed = [re.sub(rf"\b{re.escape(old)}\b", new, s) if i >= start else s for i, s in enumerate(sentences)]
    if changed == sentences:  # nothing to change (e.g. no pronoun sentence): fall back to reordering
        return corrupt(sentences, "shuffle", rng)
    return " ".join(changed)


class CorpusDataModule(LightningDataModule):
    """The corpus, its tokenizer and its train/val/test split; the subclasses decide what a batch is.

    Every phase of a pipeline that names the same corpus settings gets the same documents, split and tokenizer
    (the tokenizer is cached by a hash of the training documents).
    """

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        text_column: str = "text",
        prompt_column: str | None = None,
        completion_column: str | None = None,
        num_stories: int = 4000,
        corpus_seed: int = 0,
        mood: Mood = "mixed",
        min_sentences: int = 5,
        max_sentences: int = 7,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        tokenizer: str | None = None,
        vocab_size: int = 512,
        tokenizer_cache: str | None = None,
        prompt_sentences: int = 1,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            dataset: A local ``.jsonl`` / ``.json`` / ``.txt`` / ``.csv`` / ``.parquet`` file, a local folder or a
                ``datasets`` hub name (read by ``datasets.load_dataset``); ``null`` generates the offline story
                corpus.
            dataset_config: Configuration name of a hub dataset.
            split: Split of ``dataset`` that is read (a local file is the split ``train``).
            val_split: Split read for validation; ``null`` holds out ``val_fraction`` of ``split``.
            test_split: Split read for testing; ``null`` holds out ``test_fraction`` of ``split``.
            text_column: Column of a whole document; its first ``prompt_sentences`` sentences are the prompt.
            prompt_column: Column of the prompt, instead of splitting ``text_column`` (``null``: split it).
            completion_column: Column of the completion that follows ``prompt_column`` (needed by SFT; the PPO
                evaluation's reference).
            num_stories: Stories generated when ``dataset`` is null.
            corpus_seed: Seed of the generated stories and of the split.
            mood: Mood of the generated stories: ``happy``, ``sad`` or ``mixed``.
            min_sentences: Fewest sentences of a generated story (5-7).
            max_sentences: Most sentences of a generated story (5-7).
            val_fraction: Share of documents held out for validation.
            test_fraction: Share of documents held out for testing (prompts of the final evaluation).
            tokenizer: A hub name or local folder of a pretrained tokenizer; ``null`` trains a BPE tokenizer on the
                training documents (cached).
            vocab_size: Size of the trained tokenizer.
            tokenizer_cache: Folder of cached tokenizers (``null``: ``~/.cache/experiential-agents/tokenizers``).
            prompt_sentences: Leading sentences that form the prompt; the rest is the completion.
            max_length: Longest token sequence (prompt + completion); longer ones are cut.
            batch_size: Training batch size, summed over all devices.
            eval_batch_size: Validation / test batch size per device.
            num_workers: DataLoader workers.
        """
        super().__init__()
        if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
        if batch_size < 1 or eval_batch_size < 1 or max_length < 8 or prompt_sentences < 1:
            raise ValueError("batch_size, eval_batch_size and prompt_sentences must be >= 1, max_length >= 8")
        if dataset is None and num_stories < 10:
            raise ValueError(f"num_stories must be >= 10, got {num_stories}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.stories: list[Story | None] = []
        parts = {"train": load_records(dataset, split, self.required_columns(), config=dataset_config,
                                       generate=self._generated_records)}
        for part, name in (("val", val_split), ("test", test_split)):
            if name is not None:
                parts[part] = load_records(dataset, name, self.required_columns(), config=dataset_config)
        parts = {part: [r for r in records if self.record_text(r)] for part, records in parts.items()}
        self.records = [r for records in parts.values() for r in records]
        self.stories += [None] * (len(self.records) - len(self.stories))
        documents = [self.record_text(r) for r in self.records]
        self.split_indices = self._split(list(map(len, parts.values())), val_split is None, test_split is None)
        if not self.split_indices["train"]:
            raise ValueError("the corpus is too small: no training documents left after the split")
        self.documents = documents
        train_texts = [" " + documents[i] for i in self.split_indices["train"]]
        self.tokenizer = (build_tokenizer(train_texts, vocab_size, tokenizer_cache) if tokenizer is None
                          else load_tokenizer(tokenizer))

    # --- records -> documents ----------------------------------------------------------------------------------
    def _generated_records(self) -> list[dict]:
        hp = self.hparams
        self.stories = generate_stories(hp.num_stories, hp.corpus_seed, hp.mood, hp.min_sentences, hp.max_sentences)
        return [{hp.text_column: s.text} for s in self.stories]

    def required_columns(self) -> list[str]:
        """Columns every record of a dataset must have."""
        hp = self.hparams
        if hp.prompt_column is None:
            return [hp.text_column]
        return [hp.prompt_column] + ([hp.completion_column] if hp.completion_column else [])

    def record_text(self, record: dict) -> str:
        """The whole document of a record (what the split shuffles and a trained tokenizer learns)."""
        if self.hparams.prompt_column is None:
            return column_value(record, self.hparams.text_column)
        return " ".join(t for t in self.record_prompt_and_completion(record) if t)

    def record_prompt_and_completion(self, record: dict) -> tuple[str, str]:
        """Prompt and completion columns of a record (the completion is empty without ``completion_column``)."""
        hp = self.hparams
        completion = column_value(record, hp.completion_column) if hp.completion_column else ""
        return column_value(record, hp.prompt_column), completion

    def _split(self, sizes: list[int], hold_out_val: bool, hold_out_test: bool) -> dict[str, list[int]]:
        """Indices of train / val / test: a seeded permutation of the first part (the ``split``), with the
        validation and test documents held out of it unless their own splits follow it."""
        order = list(range(sizes[0]))
        random.Random(self.hparams.corpus_seed).shuffle(order)
        n_test = int(len(order) * self.hparams.test_fraction) if hold_out_test else 0
        n_val = int(len(order) * self.hparams.val_fraction) if hold_out_val else 0
        given, start = {}, sizes[0]
        for part, held_out in (("val", hold_out_val), ("test", hold_out_test)):
            if not held_out:
                size = sizes[len(given) + 1]
                given[part], start = list(range(start, start + size)), start + size
        return {"test": given.get("test", order[:n_test]), "val": given.get("val", order[n_test:n_test + n_val]),
                "train": order[n_test + n_val:]}

    # --- text -> tokens ---------------------------------------------------------------------------------------
    def split(self, name: str) -> list[int]:
        return self.split_indices[name]

    @property
    def generated(self) -> bool:
        """Whether the documents are the generator's stories (the story judge, ``envs.story_judge``, applies)."""
        return self.stories[0] is not None

    def prompt_sentence_count(self, sentences: Sequence[str]) -> int:
        """How many leading sentences of a document form its prompt (at least one is left to complete)."""
        return min(self.hparams.prompt_sentences, max(1, len(sentences) - 1))

    def prompt_and_completion(self, index: int) -> tuple[str, str]:
        hp = self.hparams
        if hp.prompt_column is not None:
            return self.record_prompt_and_completion(self.records[index])
        sentences = split_sentences(self.documents[index])
        k = self.prompt_sentence_count(sentences)
        return " ".join(sentences[:k]), " ".join(sentences[k:])

    def encode_prompt(self, prompt: str) -> list[int]:
        """``<bos>`` + prompt tokens (what the policy is conditioned on).

        Every text is encoded with a leading space, so a word has the same tokens wherever it stands: reordering
        sentences keeps the token count, and the token length of a corrupted story is no cue.
        """
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + (self.tokenizer(" " + prompt, add_special_tokens=False).input_ids if prompt else [])

    def encode_completion(self, completion: str) -> list[int]:
        """Completion tokens (with the leading space that joins it to the prompt) + ``<eos>``."""
        ids = self.tokenizer(" " + completion, add_special_tokens=False).input_ids
        return ids + [self.tokenizer.eos_token_id]

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p, c = self.encode_prompt(prompt), self.encode_completion(completion)
        return p, c[: max(1, self.hparams.max_length - len(p))]

    def _loader(self, items: list, batch_size: int, shuffle: bool, collate=None) -> DataLoader:
        """Training order when ``shuffle`` (seeded, resumable, through ``train_collate``), else whole batches dealt to
        the processes in order, none twice (through ``collate``, or the ``collate`` given; placeholders are ``{}``)."""
        if not shuffle:
            return evaluation_loader(self, Chunks(items, batch_size, collate or self.collate), empty={},
                                     num_workers=self.hparams.num_workers)
        drop_last = len(items) >= batch_size
        # Seeded, so a resumed run draws the same order and continues where it stopped.
        sampler = resumable(self, EpochPermutation(len(items), self.hparams.corpus_seed), batch_size, drop_last)
        return DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=collate or self.train_collate,
                          num_workers=self.hparams.num_workers, drop_last=drop_last)

    def prompt_items(self, split: str) -> list[tuple[list[int], int]]:
        """``(prompt tokens, document index)`` of every document of a split."""
        return [(self.encode_prompt(self.prompt_and_completion(i)[0]), i) for i in self.split(split)]

    def collate_prompts(self, items: list) -> dict[str, torch.Tensor]:
        """Left-padded ``prompt_ids``/``prompt_mask`` and the documents' ``index``."""
        prompts, index = zip(*items)
        prompt_ids, prompt_mask = pad_with_mask(prompts, self.tokenizer.pad_token_id, left=True)
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "index": torch.tensor(index)}

    def items(self, split: str) -> list:
        raise NotImplementedError

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_collate(self, items: list) -> dict[str, torch.Tensor]:
        """A training batch (the subclass may pack it); ``collate`` unless overridden."""
        return self.collate(items)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.items("train"), per_device_batch(self, self.batch_size)[0], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.items("val"), self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.items("test"), self.hparams.eval_batch_size, shuffle=False)


class TextCorpusDataModule(CorpusDataModule):
    """Causal-LM batches for SFT: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` where no loss is taken)."""

    def __init__(self, *args, completion_only: bool = True, max_seq_length: int | None = None, packing: bool = False,
                 **kwargs) -> None:
        """
        Args:
            completion_only: Take the loss on the completion only (the prompt sentences are context).
            max_seq_length: Longest example in tokens: a longer prompt loses its start, the completion is kept
                (``null``: no cap beyond ``max_length``).
            packing: Training batches put several examples in one row, each attending only to itself (rows of
                ``max_seq_length`` tokens, or of the batch's longest example); validation and test are not packed.
        """
        super().__init__(*args, **kwargs)
        check_sequence_settings(max_seq_length)
        if self.hparams.prompt_column is not None and self.hparams.completion_column is None:
            raise ValueError("completion_column must be given with prompt_column (SFT learns the completion)")
        self.completion_only, self.max_seq_length, self.packing = completion_only, max_seq_length, packing

    def items(self, split: str) -> list[tuple[list[int], list[int]]]:
        return [self.encode_pair(*self.prompt_and_completion(i)) for i in self.split(split)]

    def collate(self, items: list, packing: bool = False) -> dict[str, torch.Tensor]:
        prompts, completions = zip(*items)
        return lm_batch(prompts, completions, self.tokenizer.pad_token_id, self.completion_only, self.max_seq_length,
                        packing)

    def train_collate(self, items: list) -> dict[str, torch.Tensor]:
        return self.collate(items, packing=self.packing)


class PreferenceDataModule(CorpusDataModule):
    """Pairs ``(chosen, rejected)``: a document and a corrupted copy of it (same prompt, same length
    distribution). Batches hold ``chosen_ids``/``chosen_mask``/``rejected_ids``/``rejected_mask`` (right-padded,
    ending with ``<eos>``)."""

    def __init__(self, *args, corruptions: list[str] | None = None, pair_seed: int = 0,
                 chosen_column: str | None = None, rejected_column: str | None = None, **kwargs) -> None:
        """
        Args:
            corruptions: Kinds of corruption to draw from (``shuffle``, ``name``, ``pronoun``, ``object``); a
                dataset supports ``shuffle`` only. ``null``: all that the corpus supports.
            pair_seed: Seed of the corruptions.
            chosen_column: Column of the preferred text of a dataset's preference pairs, after ``prompt_column``
                when that is given (``null``: pair each document with a corrupted copy).
            rejected_column: Column of the rejected text, given together with ``chosen_column``.
        """
        if (chosen_column is None) != (rejected_column is None):
            raise ValueError("chosen_column and rejected_column must be given together")
        if chosen_column is not None and corruptions:
            raise ValueError("corruptions must be null with chosen_column / rejected_column (the pairs are given)")
        super().__init__(*args, **kwargs)
        generated = self.stories[0] is not None
        corruptions = list(corruptions or (CORRUPTIONS if generated else ("shuffle",)))
        for kind in corruptions:
            if kind not in CORRUPTIONS:
                raise ValueError(f"unknown corruption {kind!r}; expected some of {CORRUPTIONS}")
            if kind != "shuffle" and not generated:
                raise ValueError(f"corruption {kind!r} needs the generated corpus; a dataset supports 'shuffle'")
        self.corruptions = corruptions
        self.pair_seed = pair_seed

    def required_columns(self) -> list[str]:
        hp = self.hparams
        if hp.chosen_column is None:
            return super().required_columns()
        return [c for c in (hp.prompt_column, hp.chosen_column, hp.rejected_column) if c is not None]

    def record_text(self, record: dict) -> str:
        return self.given_pair(record)[0] if self.hparams.chosen_column else super().record_text(record)

    def given_pair(self, record: dict) -> tuple[str, str]:
        """``(chosen, rejected)`` of a dataset record, each after the record's prompt when there is one."""
        hp = self.hparams
        prompt = column_value(record, hp.prompt_column) if hp.prompt_column else ""
        return tuple(" ".join(t for t in (prompt, column_value(record, c)) if t)
                     for c in (hp.chosen_column, hp.rejected_column))

    def pairs(self, split: str) -> list[tuple[str, str]]:
        """``(chosen, rejected)`` texts of a split; the same for the same seeds."""
        if self.hparams.chosen_column:
            return [self.given_pair(self.records[i]) for i in self.split(split)]
        rng = random.Random(f"{self.pair_seed}-{split}")
        out = []
        for i in self.split(split):
            sentences = split_sentences(self.documents[i])
            if len(sentences) < 2:
                continue
            out.append((self.documents[i], corrupt(sentences, rng.choice(self.corruptions), rng, self.stories[i])))
        return out

    def encode_text(self, text: str) -> list[int]:
        ids = self.encode_prompt(text) + [self.tokenizer.eos_token_id]
        return ids[-self.hparams.max_length:]

    def items(self, split: str) -> list[tuple[list[int], list[int]]]:
        return [(self.encode_text(c), self.encode_text(r)) for c, r in self.pairs(split)]

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        chosen, rejected = zip(*items)
        pad_id = self.tokenizer.pad_token_id
        (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = pad_with_mask(chosen, pad_id), pad_with_mask(
            rejected, pad_id)
        return {"chosen_ids": chosen_ids, "chosen_mask": chosen_mask, "rejected_ids": rejected_ids,
                "rejected_mask": rejected_mask}


class PreferencePromptDataModule(PreferenceDataModule):
    """The reward model's preference pairs (``PreferenceDataModule``, same seeds: the same pairs) as one prompt and
    two completions, for DPO; validation and test also give the split's prompts for the paired generation
    evaluation.

    A pair's prompt is the chosen story's leading ``prompt_sentences`` sentences when the rejected copy starts with
    the same ones (always for the ``name``, ``pronoun`` and ``object`` corruptions, which keep the introduction);
    a shuffle that moved them gets an empty prompt: the pair is conditioned on ``<bos>`` alone and both whole texts
    are the completions. Pair batches hold ``input_ids``/``attention_mask``/``labels`` with ``2B`` rows, the ``B``
    chosen completions first and the ``B`` rejected ones after them (labels ``-100`` on prompts and padding).
    Validation and test give two loaders: these pairs, then prompt batches (``prompt_ids``/``prompt_mask``/
    ``index``, as ``PromptDataModule``).
    """

    def prompted_pairs(self, split: str) -> list[tuple[str, str, str]]:
        """``(prompt, chosen completion, rejected completion)`` texts of a split."""
        out = []
        for chosen, rejected in self.pairs(split):
            sentences = split_sentences(chosen)
            prompt = " ".join(sentences[: self.prompt_sentence_count(sentences)])
            if rejected.startswith(prompt + " "):
                out.append((prompt, chosen[len(prompt) + 1:], rejected[len(prompt) + 1:]))
            else:
                out.append(("", chosen, rejected))
        return out

    def items(self, split: str) -> list[tuple[list[int], list[int], list[int]]]:
        out = []
        for prompt, chosen, rejected in self.prompted_pairs(split):
            prompt_ids, chosen_ids = self.encode_pair(prompt, chosen)
            out.append((prompt_ids, chosen_ids, self.encode_pair(prompt, rejected)[1]))
        return out

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        prompts, chosen, rejected = zip(*items)
        return lm_batch(prompts * 2, chosen + rejected, self.tokenizer.pad_token_id, completion_only=True)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        batch_size = self.hparams.eval_batch_size
        return [self._loader(self.items(split), batch_size, shuffle=False),
                self._loader(self.prompt_items(split), batch_size, shuffle=False, collate=self.collate_prompts)]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")


class PromptDataModule(CorpusDataModule):
    """Prompts for PPO and generation: left-padded ``prompt_ids``/``prompt_mask`` and ``index`` (the document,
    whose completion is the reference for ROUGE/BLEU)."""

    def __init__(self, *args, batch_size: int = 64, eval_batch_size: int = 50, batches_per_epoch: int = 1000,
                 **kwargs) -> None:
        """
        Args:
            batch_size: Prompts per rollout, summed over all devices.
            eval_batch_size: Validation / test prompts per batch per device.
            batches_per_epoch: Training batches (one rollout each) per epoch; prompts are reshuffled.
        """
        super().__init__(*args, batch_size=batch_size, eval_batch_size=eval_batch_size, **kwargs)
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batches_per_epoch = batches_per_epoch

    def reference(self, index: int) -> str:
        return self.prompt_and_completion(index)[1]

    def items(self, split: str) -> list[tuple[list[int], int]]:
        return self.prompt_items(split)

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        return self.collate_prompts(items)

    def train_dataloader(self) -> DataLoader:
        items = self.items("train")
        per_device, rank, _ = per_device_batch(self, self.batch_size)
        generator = step_generator(self.hparams.corpus_seed, rank)
        sampler = torch.utils.data.RandomSampler(items, replacement=True,
                                                 num_samples=per_device * self.batches_per_epoch, generator=generator)
        return DataLoader(items, batch_size=per_device, sampler=resumable(self, sampler, per_device),
                          collate_fn=self.collate, num_workers=self.hparams.num_workers)
