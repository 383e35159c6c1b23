"""Synthetic state transitions for LeWorld whose dynamics depend on memory regions that the observations point at.

The task (docs/leworld.md has the full story)
-------------------------------------------
Memory: ``num_words`` x ``word_size`` bits, addressed as ``start = hi * lo_size + lo`` (see models/leworld.py).
A state has ``num_pages`` "page" dimensions (a one-hot page ``p_t``; the page advances by one each step) and
``state_dim - num_pages`` continuous dimensions ``x_t``.

Each sequence has ``n`` relevant slots (easy 1, medium 2, hard 3). Slot ``j`` has a group ``g_j``, an offset
``k_j`` and a length ``m_j``, written as +-1 bits into the characteristics vector (one block of bits per slot,
then a fixed random rotation: linearly decodable, never plain). At step ``t`` slot ``j`` points at the range

    start = (g_j * num_pages + p_t) * lo_size + k_j * unit,   end = min(start + m_j * unit, num_words)

with ``unit = lo_size / 8``, ``k_j in 0..7``, ``m_j in 1..4``. So the relevant range follows from what the models
observe (characteristics and the current page), and it changes every step. The content ``c`` of a range is its
mean bit mapped to [-1, 1] and standardised over all ranges, and **every** relevant slot drives the dynamics:

    x_{t+1} = decay * x_t + sum_j B_j c_{j,t} + noise_std * eps,     B_j ~ N(0, 1/word_size), fixed per task.

The previous transition reveals only the previous page's content (pages do not repeat within a sequence when
``num_pages >= seq_len - 1``), so without a read the next state is unknown
up to ``Var(sum_j B_j c)`` (about ``n`` per continuous dimension); with the right reads, up to ``noise_std^2``.

Difficulty ``latent`` (2 relevant slots) adds a hidden regime ``r_t in {0, 1}``: a Markov chain per sequence
(``r_0`` a fair coin, each step it flips with probability ``regime_switch_prob``) that is in no state and no
characteristic. It fixes two things at once:

    offset of slot j at step t = k_j + 4 r_t   (k_j in 0..3 is in the characteristics),
    x_{t+1} = (1 - 2 r_t) * decay * x_t + sum_j B_j c_{j,t} + noise_std * eps.

So the range to read depends on ``r_t`` (the lower or upper half of the page), and ``r_t`` shows only in the sign of
the transition ``x_{t-1} -> x_t``: a model that sees two consecutive states (the BLM) can infer it, a model that sees
one state (the SLMs with ``LeWorldSystem(slm_sees_past=False)``) cannot (the marginal of ``x_t`` is the same in both
regimes). The SLMs can find the range only if the BLM's info query tells them the regime.

Seed bugs fixed here: the seed rebuilt the whole sequence for each relevant region, so only the last region
mattered (1); its characteristics were noise, so nothing told the SLMs where to look (2).

Memory population strategies: ``random`` (iid bits: range means hover near 1/2, the standardisation rescales
them), ``structured`` (cells of ``cell_words`` words share a random prototype, each word flips ``flip_prob`` of
its bits), ``experience`` (words are median-thresholded vectors of a correlated random walk, the seed's
quantisation of "observed features"), ``regions`` (the seed's four-region layout: dynamics, context, history,
associations) and ``experience_file`` (a user's states from a JSONL file, one per word); ``datamodules/leworld_fills``
holds them all.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from datamodules.distributed import evaluation_loader, per_device_batch
from datamodules.leworld_fills import (
    populate_from_experience,
    populate_from_experience_file,
    populate_random,
    populate_regions,
    populate_structured,
    random_walk_experience,
)
from models.leworld import address_split, centered_prefix, prefix_range_mean

Difficulty = Literal["easy", "medium", "hard", "latent"]
Population = Literal["random", "structured", "experience", "regions", "experience_file"]
POPULATIONS = get_args(Population)
NUM_RELEVANT = {"easy": 1, "medium": 2, "hard": 3, "latent": 2}
MAX_SLOTS = 3
OFFSETS, LENGTHS = 8, 4
REGIME_SHIFT = OFFSETS // 2  # in regime 1 (``latent``) a slot reads the upper half of its page: offset k + 4


# --- the task ---------------------------------------------------------------------------------------------------
class LeWorldTask:
    """The fixed parts of one task (memory, codes, dynamics matrices) and a sequence generator."""

    def __init__(
        self,
        num_words: int,
        word_size: int,
        state_dim: int,
        char_dim: int,
        num_pages: int,
        difficulty: Difficulty,
        population: Population,
        decay: float,
        noise_std: float,
        cell_words: int,
        flip_prob: float,
        seed: int,
        experience_file: str | None = None,
        regime_switch_prob: float = 0.05,
    ) -> None:
        self.hi_size, self.lo_size = address_split(num_words)
        if difficulty not in NUM_RELEVANT:
            raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {list(NUM_RELEVANT)}")
        if population not in POPULATIONS:
            raise ValueError(f"unknown population {population!r}; expected one of {list(POPULATIONS)}")
        if (population == "experience_file") != (experience_file is not None):
            raise ValueError("experience_file must be set exactly when population is 'experience_file'")
        if num_pages < 1 or num_pages & (num_pages - 1) or self.hi_size % num_pages or self.hi_size // num_pages < 2:
            raise ValueError(
                f"num_pages must be a power of two with at least 2 groups of pages in {self.hi_size} "
                f"high addresses, got {num_pages}"
            )
        if self.lo_size < OFFSETS:
            raise ValueError(f"num_words={num_words} is too small: need at least {OFFSETS} low addresses")
        if state_dim <= num_pages:
            raise ValueError(f"state_dim={state_dim} must exceed num_pages={num_pages}")
        self.groups = self.hi_size // num_pages
        self.group_bits = self.groups.bit_length() - 1
        self.slot_bits = self.group_bits + 3 + 2
        if MAX_SLOTS * self.slot_bits > char_dim:
            raise ValueError(
                f"char_dim={char_dim} cannot hold {MAX_SLOTS} slots of {self.slot_bits} bits; "
                f"raise char_dim or num_pages"
            )
        self.num_words, self.word_size, self.state_dim, self.char_dim = num_words, word_size, state_dim, char_dim
        self.num_pages, self.num_relevant = num_pages, NUM_RELEVANT[difficulty]
        self.latent = difficulty == "latent"
        if not 0.0 <= regime_switch_prob <= 1.0:
            raise ValueError(f"regime_switch_prob must be in [0, 1], got {regime_switch_prob}")
        self.regime_switch_prob = regime_switch_prob
        self.decay, self.noise_std = decay, noise_std
        self.unit = self.lo_size // OFFSETS
        self.max_range = LENGTHS * self.unit
        g = torch.Generator().manual_seed(seed)
        self.bits = self.populate(population, cell_words, flip_prob, g, 2 * seed, experience_file)
        self.prefix = centered_prefix(self.bits)
        # A second memory, filled the same way, for evaluation (``eval_memory="fresh"``); a user's file is one memory.
        eval_g = torch.Generator().manual_seed(seed + 7919)
        self.eval_bits = (
            self.bits
            if population == "experience_file"
            else self.populate(population, cell_words, flip_prob, eval_g, 2 * seed + 1)
        )
        self.eval_prefix = centered_prefix(self.eval_bits)
        self.rotation = torch.linalg.qr(torch.randn(char_dim, char_dim, generator=g))[0]
        x_dim = state_dim - num_pages
        self.mixing = torch.randn(MAX_SLOTS, x_dim, word_size, generator=g) / math.sqrt(word_size)
        # Standardise contents over every range the task can point at.
        hi = torch.arange(self.hi_size).view(-1, 1, 1)
        k = torch.arange(OFFSETS).view(1, -1, 1)
        m = torch.arange(1, LENGTHS + 1).view(1, 1, -1)
        starts = (hi * self.lo_size + k * self.unit).expand(-1, -1, LENGTHS)
        ends = (starts + m * self.unit).clamp(max=num_words)
        content = 2 * prefix_range_mean(self.prefix, starts, ends) - 1
        self.content_mean = content.reshape(-1, word_size).mean(0)
        self.content_std = (content - self.content_mean).std().clamp(min=1e-3)

    def populate(
        self,
        population: Population,
        cell_words: int,
        flip_prob: float,
        g: torch.Generator,
        stream: int,
        experience_file: str | None = None,
    ) -> Tensor:
        """One memory; ``g`` draws the random fills, ``stream`` picks the context words of ``regions``."""
        n, w = self.num_words, self.word_size
        if population == "random":
            return populate_random(n, w, g)
        if population == "structured":
            return populate_structured(n, w, g, cell_words, flip_prob)
        if population == "regions":
            return populate_regions(n, w, stream)
        if population == "experience_file":
            return populate_from_experience_file(experience_file, n, w)
        return populate_from_experience(random_walk_experience(n, w, g), n, w)

    def ranges(
        self, group: Tensor, offset: Tensor, length: Tensor, pages: Tensor, shift: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Ranges ``[B, T, 3]`` from per-slot codes ``[B, 3]``, pages ``[B, T]`` and an offset shift ``[B, T]``
        (``latent``: ``REGIME_SHIFT * r_t``)."""
        hi = group.unsqueeze(1) * self.num_pages + pages.unsqueeze(-1)
        offsets = offset.unsqueeze(1) if shift is None else offset.unsqueeze(1) + shift.unsqueeze(-1)
        starts = hi * self.lo_size + offsets * self.unit
        ends = (starts + length.unsqueeze(1) * self.unit).clamp(max=self.num_words)
        return starts, ends

    def characteristics(self, group: Tensor, offset: Tensor, length: Tensor, valid: Tensor) -> Tensor:
        """+-1 bits of (group, offset, length - 1) per valid slot, zeros elsewhere, rotated."""
        fields = [(group, self.group_bits), (offset, 3), (length - 1, 2)]
        bits = torch.cat([(v.unsqueeze(-1) >> torch.arange(nb)) & 1 for v, nb in fields], -1).float()  # [B, 3, b]
        code = (2 * bits - 1) * valid.unsqueeze(-1)
        flat = torch.zeros(group.shape[0], self.char_dim)
        flat[:, : MAX_SLOTS * self.slot_bits] = code.flatten(1)
        return flat @ self.rotation.T

    def content(self, starts: Tensor, ends: Tensor, eval_memory: bool = False) -> Tensor:
        """Standardised content of ranges (naive slicing would give the same; see the tests)."""
        prefix = self.eval_prefix if eval_memory else self.prefix
        return (2 * prefix_range_mean(prefix, starts, ends) - 1 - self.content_mean) / self.content_std

    def regimes(self, num: int, seq_len: int, generator: torch.Generator) -> Tensor:
        """``latent``'s hidden regimes ``[B, T]`` (0/1): a fair first coin, then each step flips with
        ``regime_switch_prob``."""
        first = torch.randint(0, 2, (num, 1), generator=generator)
        flips = (torch.rand(num, seq_len - 1, generator=generator) < self.regime_switch_prob).long()
        return torch.cat([first, first + flips.cumsum(1)], 1) % 2

    def sample(
        self, num: int, seq_len: int, generator: torch.Generator, eval_memory: bool = False
    ) -> dict[str, Tensor]:
        """``num`` sequences of ``seq_len`` states with their characteristics and relevant ranges, driven by the
        training memory or (``eval_memory``) the evaluation memory; ``latent`` adds ``regime [B, T]`` (the regime
        of step ``t`` drives ``t -> t + 1``). The draws of the other difficulties are those of earlier versions."""
        g = generator
        group = torch.randint(0, self.groups, (num, MAX_SLOTS), generator=g)
        offset = torch.randint(0, OFFSETS, (num, MAX_SLOTS), generator=g)
        length = torch.randint(1, LENGTHS + 1, (num, MAX_SLOTS), generator=g)
        valid = torch.arange(MAX_SLOTS).expand(num, -1) < self.num_relevant
        pages = (torch.randint(0, self.num_pages, (num, 1), generator=g) + torch.arange(seq_len)) % self.num_pages
        x = torch.empty(num, seq_len, self.state_dim - self.num_pages)
        x[:, 0] = torch.randn(num, x.shape[-1], generator=g)
        noise = torch.randn(num, seq_len, x.shape[-1], generator=g) * self.noise_std
        decay = torch.full((num, seq_len), self.decay)
        shift, extra = None, {}
        if self.latent:  # drawn last, so that the other difficulties' draws stay as they were
            offset = offset % REGIME_SHIFT  # the characteristics give k in 0..3; the regime adds 0 or 4
            regime = self.regimes(num, seq_len, g)
            shift, decay, extra = REGIME_SHIFT * regime, self.decay * (1 - 2 * regime).float(), {"regime": regime}
        starts, ends = self.ranges(group, offset, length, pages, shift)
        drive = torch.einsum("jxw,btjw->btjx", self.mixing, self.content(starts, ends, eval_memory))
        drive = (drive * valid[:, None, :, None]).sum(2)  # every relevant slot contributes
        for t in range(1, seq_len):
            x[:, t] = decay[:, t - 1, None] * x[:, t - 1] + drive[:, t - 1] + noise[:, t]
        states = torch.cat([torch.nn.functional.one_hot(pages, self.num_pages).float(), x], -1)
        chars = self.characteristics(group, offset, length, valid.float())
        return {"states": states, "chars": chars, "starts": starts, "ends": ends, "valid": valid, **extra}


class EpochBatches(IterableDataset):
    """Shuffled training batches: the permutation depends on (seed, epoch), each rank takes its share of a batch.

    Stateful, so a resume continues the epoch where the checkpoint was taken: ``state_dict`` records the epoch and the
    batches handed out in it, and the first epoch iterated after ``load_state_dict`` skips them if it is that epoch
    (Lightning saves and restores the state through :class:`ResumableLoader`).
    """

    def __init__(
        self, datamodule: LeWorldDataModule, data: dict[str, Tensor], local_batch: int, rank: int, world_size: int
    ) -> None:
        self.dm, self.data, self.local_batch, self.rank, self.world_size = (
            datamodule,
            data,
            local_batch,
            rank,
            world_size,
        )
        self.global_batch = local_batch * world_size
        self.batches = len(data["states"]) // self.global_batch
        self.epoch, self.handed_out = 0, 0
        self._resume_at: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.handed_out}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_at = dict(state_dict)

    def __iter__(self):
        trainer = self.dm.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        resume, self._resume_at = self._resume_at, None
        start = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self.epoch, self.handed_out = epoch, start
        order = torch.randperm(len(self.data["states"]), generator=torch.Generator().manual_seed(self.dm.seed + epoch))
        for b in range(start, self.batches):
            rows = order[b * self.global_batch : (b + 1) * self.global_batch]
            rows = rows[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
            self.handed_out = b + 1
            yield {k: v[rows] for k, v in self.data.items()}


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints and restores on resume (its dataset's state)."""

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state_dict)


class FixedBatches(Dataset):
    """Evaluation sequences cut into batches (dealt whole to the processes: ``datamodules.distributed.RankBatches``)."""

    def __init__(self, data: dict[str, Tensor], batch_size: int) -> None:
        self.data, self.chunks = data, torch.arange(len(data["states"])).split(batch_size)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[self.chunks[index]] for k, v in self.data.items()}


class LeWorldDataModule(LightningDataModule):
    """Fixed train / validation / test sets of LeWorld sequences and the memory they were generated from.

    Each batch is a dict: ``states [B, T, state_dim]``, ``chars [B, char_dim]``, ``starts``/``ends [B, T, 3]``
    (the relevant range of each slot at each step; step ``t`` drives ``t -> t + 1``) and ``valid [B, 3]``
    (which slots are relevant). Implements ``lightning_modules.leworld.LeWorldData`` (``task`` and
    :meth:`memory_bits_for`): the LightningModule copies the memory of the split it runs into its model's memory.
    The training order is a function of (seed, epoch); the training loader records how far into its epoch it is, so a
    run resumed from a checkpoint taken mid-epoch continues with the next batch.
    """

    def __init__(
        self,
        num_words: int = 4096,
        word_size: int = 32,
        state_dim: int = 64,
        char_dim: int = 32,
        num_pages: int = 16,
        seq_len: int = 8,
        difficulty: Difficulty = "medium",
        population: Population = "structured",
        decay: float = 0.8,
        noise_std: float = 0.1,
        cell_words: int = 8,
        flip_prob: float = 0.1,
        train_sequences: int = 4096,
        val_sequences: int = 512,
        test_sequences: int = 1024,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        eval_memory: Literal["fresh", "same"] = "fresh",
        seed: int = 0,
        experience_file: str | None = None,
        regime_switch_prob: float = 0.05,
    ) -> None:
        """
        Args:
            num_words: Memory words (a power of two; must match the model).
            word_size: Bits per word (must match the model).
            state_dim: State size (``num_pages`` page dimensions + continuous ones).
            char_dim: Characteristics size; holds 3 slots of (group, offset, length) bits.
            num_pages: Pages per group; the relevant range moves to the next page every step. Keep it >= seq_len - 1:
                a range that comes back within a sequence leaks its content through the state's history.
            seq_len: States per sequence.
            difficulty: ``easy`` / ``medium`` / ``hard``: 1 / 2 / 3 relevant memory ranges per sequence; ``latent``:
                2, and a hidden regime picks the half of the page to read and the sign of the decay (the module
                docstring; pair it with ``LeWorldSystem(slm_sees_past=False)``: configs/leworld/*_latent.yaml).
            population: How the memory is filled: ``random``, ``structured``, ``experience``, ``regions`` (the
                seed's four regions) or ``experience_file`` (the states of ``experience_file``, one per word).
            decay: Decay of the continuous state per step.
            noise_std: Standard deviation of the transition noise (the error floor).
            cell_words: Words per prototype cell (``structured``).
            flip_prob: Bits flipped per word away from its prototype (``structured``).
            train_sequences: Training sequences (fixed set).
            val_sequences: Validation sequences.
            test_sequences: Test sequences.
            batch_size: Sequences per optimisation step, summed over all devices.
            eval_batch_size: Sequences per validation / test batch.
            eval_memory: ``fresh``: validation and test run on a second memory filled the same way from another
                seed, so a model can only succeed by reading (the training memory is small enough to memorise);
                ``same``: the training memory.
            seed: Task seed: memory, codes, dynamics and every sequence.
            experience_file: JSONL file of states, ``{"state": [word_size numbers]}`` per line (with
                ``population: experience_file`` only; a relative path is looked up in the working directory, then
                in the repository root). The file is the only memory: it needs ``eval_memory: same``.
            regime_switch_prob: Chance per step that ``latent``'s hidden regime flips (other difficulties: unused).
        """
        super().__init__()
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 (past, current, next), got {seq_len}")
        if min(train_sequences, val_sequences, test_sequences, batch_size, eval_batch_size) < 1:
            raise ValueError("sequence counts and batch sizes must be positive")
        if eval_memory not in ("fresh", "same"):
            raise ValueError(f"unknown eval_memory {eval_memory!r}; expected 'fresh' or 'same'")
        if not 0.0 <= decay < 1.0 or noise_std < 0:
            raise ValueError(f"need 0 <= decay < 1 and noise_std >= 0, got {decay}, {noise_std}")
        if population == "experience_file" and eval_memory == "fresh":
            raise ValueError(
                "eval_memory must be 'same' with population 'experience_file': the file fills the only memory"
            )
        self.save_hyperparameters()
        self.seed = seed
        self.batch_size = batch_size
        self.task = LeWorldTask(
            num_words,
            word_size,
            state_dim,
            char_dim,
            num_pages,
            difficulty,
            population,
            decay,
            noise_std,
            cell_words,
            flip_prob,
            seed,
            experience_file,
            regime_switch_prob,
        )
        self._sets: dict[str, dict[str, Tensor]] = {}

    @property
    def memory_bits(self) -> Tensor:
        """The training memory."""
        return self.task.bits

    def memory_bits_for(self, split: str) -> Tensor:
        """The memory that drives the ``train`` / ``val`` / ``test`` sequences."""
        fresh = split != "train" and self.hparams.eval_memory == "fresh"
        return self.task.eval_bits if fresh else self.task.bits

    def split(self, name: str) -> dict[str, Tensor]:
        """The ``train``, ``val`` or ``test`` set (generated once, from the task seed)."""
        if name not in self._sets:
            count = {
                "train": self.hparams.train_sequences,
                "val": self.hparams.val_sequences,
                "test": self.hparams.test_sequences,
            }[name]
            offset = {"train": 1, "val": 2, "test": 3}[name]
            generator = torch.Generator().manual_seed(self.seed * 10 + offset)
            fresh = name != "train" and self.hparams.eval_memory == "fresh"
            self._sets[name] = self.task.sample(count, self.hparams.seq_len, generator, eval_memory=fresh)
        return self._sets[name]

    def setup(self, stage: str) -> None:
        self.split("train" if stage == "fit" else "val")

    def train_dataloader(self) -> DataLoader:
        per_device, rank, world_size = per_device_batch(self, self.batch_size)
        if self.batch_size > self.hparams.train_sequences:
            raise ValueError(f"batch_size {self.batch_size} exceeds train_sequences {self.hparams.train_sequences}")
        return ResumableLoader(EpochBatches(self, self.split("train"), per_device, rank, world_size), batch_size=None)

    def _evaluation(self, split: str) -> DataLoader:
        """The split's batches dealt whole to the processes, none twice (placeholders are ``{}``)."""
        return evaluation_loader(self, FixedBatches(self.split(split), self.hparams.eval_batch_size), empty={})

    def val_dataloader(self) -> DataLoader:
        return self._evaluation("val")

    def test_dataloader(self) -> DataLoader:
        return self._evaluation("test")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
