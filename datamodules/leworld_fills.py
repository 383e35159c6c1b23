"""Ways to fill LeWorld's bit memory (``LeWorldDataModule(population=...)``); docs/leworld.md describes each.

- ``random``: independent fair bits.
- ``structured`` (the default): cells of words that share a random prototype, a few bits flipped per word.
- ``experience``: median-thresholded vectors of a correlated random walk (a stand-in for observed features).
- ``regions``: the original's four-region layout: dynamics, context, history, associations (one quarter each).
- ``experience_file``: a user's states, one JSON line per memory word, median-thresholded like ``experience``.

Every function returns a ``[num_words, word_size]`` float tensor of 0/1 values.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
REGION_NAMES = ("dynamics", "context", "history", "associations")
HISTORY_BITS = 16  # the original counts in the low 16 bits of a word


def populate_random(num_words: int, word_size: int, generator: torch.Generator) -> Tensor:
    """Independent fair bits."""
    return torch.randint(0, 2, (num_words, word_size), generator=generator).float()


def populate_structured(
    num_words: int, word_size: int, generator: torch.Generator, cell_words: int = 8, flip_prob: float = 0.1
) -> Tensor:
    """Cells of ``cell_words`` words that share a random prototype; each word flips ``flip_prob`` of its bits."""
    cells = math.ceil(num_words / cell_words)
    prototypes = torch.randint(0, 2, (cells, word_size), generator=generator).float()
    bits = prototypes.repeat_interleave(cell_words, 0)[:num_words]
    flips = (torch.rand(num_words, word_size, generator=generator) < flip_prob).float()
    return (bits + flips) % 2


def populate_from_experience(experiences: Tensor, num_words: int, word_size: int) -> Tensor:
    """Each experience vector becomes one word: its first ``word_size`` features thresholded at their median.

    Rows after the experiences stay zero; shorter feature vectors are zero-padded. (The seed's quantisation,
    vectorised: a bit is 1 where the feature is strictly above the vector's lower median.)
    """
    n = min(experiences.shape[0], num_words)
    feats = experiences[:n, :word_size]
    bits = torch.zeros(num_words, word_size)
    bits[:n, : feats.shape[1]] = (feats > feats.median(dim=1, keepdim=True).values).float()
    return bits


def random_walk_experience(num_words: int, word_size: int, generator: torch.Generator, rho: float = 0.95) -> Tensor:
    """A correlated random walk in ``R^word_size`` (a stand-in for observed features), one row per word."""
    noise = torch.randn(num_words, word_size, generator=generator)
    walk = torch.empty_like(noise)
    walk[0] = noise[0]
    scale = math.sqrt(1 - rho**2)
    for i in range(1, num_words):  # 64K steps at most, once per task
        walk[i] = rho * walk[i - 1] + scale * noise[i]
    return walk


# --- the original's four regions -----------------------------------------------------------------------------------
def populate_regions(num_words: int, word_size: int, stream: int = 0) -> Tensor:
    """The original's layout, one quarter ``q = num_words / 4`` per region; word ``i``, ``j = i mod q``:

    1. dynamics ``[0, q)``: one bit set, bit ``j mod word_size`` (a cyclic single-bit pattern);
    2. context ``[q, 2q)``: fair bits drawn from a generator seeded with ``stream * q + j``;
    3. history ``[2q, 3q)``: ``j`` in binary, bit ``b`` = ``(j >> b) & 1`` for ``b < 16``, higher bits 0;
    4. associations ``[3q, N)``: the XOR of dynamics word ``j`` and context word ``j``.

    Only the context words are random: ``stream`` 0 gives the original's words exactly (its seeds are ``j``); the
    DataModule uses ``2 * seed`` for the training memory and ``2 * seed + 1`` for the evaluation memory.
    """
    if num_words < 4 or num_words % 4:
        raise ValueError(f"num_words must be a positive multiple of 4 for four regions, got {num_words}")
    q = num_words // 4
    j = torch.arange(q)
    dynamics = torch.nn.functional.one_hot(j % word_size, word_size).float()
    context = torch.stack([
        torch.randint(0, 2, (word_size,), generator=torch.Generator().manual_seed(stream * q + k)).float()
        for k in range(q)
    ])
    history = torch.zeros(q, word_size)
    counted = min(word_size, HISTORY_BITS)
    history[:, :counted] = ((j.unsqueeze(1) >> torch.arange(counted)) & 1).float()
    associations = (dynamics + context) % 2
    return torch.cat([dynamics, context, history, associations])


# --- a user's experience file --------------------------------------------------------------------------------------
def resolve_experience_file(path: str | Path) -> Path:
    """The file ``path`` names: as given (absolute, or relative to the working directory), else relative to the
    repository root (so the shipped configs run from any folder); ``FileNotFoundError`` naming it otherwise."""
    given = Path(path).expanduser()
    for candidate in (given, REPO_ROOT / given):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"experience_file {str(path)!r} not found (nor under the repository root)")


def parse_state(text: str, where: str, word_size: int) -> list[float]:
    """One JSONL line, ``{"state": [word_size numbers]}``, as floats; ``ValueError`` starting with ``where``."""
    if not text.strip():
        raise ValueError(f"{where}: empty line (one state per line, no blank lines)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or "state" not in record:
        raise ValueError(f'{where}: expected an object {{"state": [{word_size} numbers]}}, got {text.strip()[:60]}')
    state = record["state"]
    if not isinstance(state, list) or len(state) != word_size:
        size = f"{len(state)} values" if isinstance(state, list) else type(state).__name__
        raise ValueError(f"{where}: state has {size}, expected a list of word_size={word_size} numbers")
    for k, value in enumerate(state):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: state[{k}] is {value!r}, expected a finite number")
    return [float(v) for v in state]


def read_experience_file(path: str | Path, num_words: int, word_size: int) -> Tensor:
    """The states of a JSONL file, ``[lines, word_size]``; line ``n`` (1-based) is memory word ``n - 1``.

    Errors name the file and line: a missing file, a blank line, malformed JSON, a line that is not
    ``{"state": [...]}``, a state whose length is not ``word_size`` or with a value that is not a finite number, more
    lines than ``num_words``, no line at all.
    """
    file = resolve_experience_file(path)
    states = []
    with file.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if number > num_words:
                raise ValueError(f"{file}:{number}: more states than memory words (num_words={num_words})")
            states.append(parse_state(text, f"{file}:{number}", word_size))
    if not states:
        raise ValueError(f"{file}: no states (expected one JSON object per line)")
    return torch.tensor(states)


def populate_from_experience_file(path: str | Path, num_words: int, word_size: int) -> Tensor:
    """The memory a user's experience file fills: word ``n`` holds line ``n + 1``'s state thresholded at its
    median (:func:`populate_from_experience`); words after the last line are 0 (a warning says how many)."""
    states = read_experience_file(path, num_words, word_size)
    if len(states) < num_words:
        warnings.warn(
            f"experience_file {path}: {len(states)} states fill {len(states)} of {num_words} memory words; "
            f"the other {num_words - len(states)} are 0",
            stacklevel=2,
        )
    return populate_from_experience(states, num_words, word_size)
