"""LeWorld's memory fills: the seed's four regions and a user's experience file, against hand computations."""

import json
import re

import pytest
import torch

from datamodules.leworld_data import LeWorldDataModule
from datamodules.leworld_fills import populate_from_experience_file, populate_regions, read_experience_file
from experiment.cli import main
from tests.conftest import REPO

TINY_DATA = dict(num_words=256, word_size=8, state_dim=16, char_dim=32, num_pages=4, seq_len=6,
                 difficulty="medium", train_sequences=128, val_sequences=32, test_sequences=32, batch_size=32,
                 eval_batch_size=32)
CONFIGS = REPO / "configs" / "leworld"


def seed_context_word(seed: int, word_size: int) -> torch.Tensor:
    """The seed's context word: ``torch.manual_seed(seed)`` then ``torch.randint`` on the global generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.randint(0, 2, (word_size,)).float()


def as_bytes(bits: torch.Tensor) -> list[int]:
    """Each 8-bit word as a byte, bit ``b`` worth ``2**b``."""
    return (bits.long() << torch.arange(8)).sum(1).tolist()


# --- four regions -----------------------------------------------------------------------------------------------
def test_regions_fill_puts_the_seeds_content_in_each_quarter():
    bits = populate_regions(16, 4)  # q = 4 words per region
    dynamics = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # bit j
    history = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]]  # j = 0, 1, 2, 3 in binary
    context = torch.stack([seed_context_word(j, 4) for j in range(4)])
    assert bits[0:4].tolist() == dynamics
    assert torch.equal(bits[4:8], context)
    assert bits[8:12].tolist() == history
    assert torch.equal(bits[12:16], (torch.tensor(dynamics) != context).float())  # XOR
    assert context.sum() not in (0, 16)  # the context words are not constant (the check above could not fail)


def test_regions_wrap_and_truncate_at_the_word_size():
    bits = populate_regions(32, 3)  # q = 8 words per region, 3-bit words
    assert bits[0:8].argmax(1).tolist() == [0, 1, 2, 0, 1, 2, 0, 1] and bits[0:8].sum(1).eq(1).all()
    assert bits[16 + 5].tolist() == [1, 0, 1] and bits[16 + 4].tolist() == [0, 0, 1]  # 5 = 101b, 4 = 100b
    assert bits[16 + 7].tolist() == [1, 1, 1]


def test_regions_streams_change_only_the_context_and_associations():
    first, second = populate_regions(64, 8, stream=0), populate_regions(64, 8, stream=1)
    q = 16
    assert torch.equal(second[q : 2 * q], torch.stack([seed_context_word(q + j, 8) for j in range(q)]))
    assert torch.equal(first[: q], second[: q]) and torch.equal(first[2 * q : 3 * q], second[2 * q : 3 * q])
    assert not torch.equal(first[q : 2 * q], second[q : 2 * q]) and not torch.equal(first[3 * q :], second[3 * q :])


def test_regions_in_the_datamodule_training_and_evaluation_memories():
    data = LeWorldDataModule(**TINY_DATA, population="regions", seed=1)
    assert torch.equal(data.memory_bits_for("train"), populate_regions(256, 8, stream=2))
    assert torch.equal(data.memory_bits_for("val"), populate_regions(256, 8, stream=3))
    # 4 groups of 4 pages x 16 words: a slot's group is the region its range starts in, fixed over the sequence
    batch = data.split("train")
    region = batch["starts"] // 64
    assert torch.equal(region, region[:, :1].expand_as(region))
    assert set(region[batch["valid"][:, None, :].expand_as(region)].unique().tolist()) == {0, 1, 2, 3}


# --- experience file ---------------------------------------------------------------------------------------------
HAND_WRITTEN = [
    '{"state": [0, 1, 2, 3, 4, 5, 6, 7]}',  # median 3 -> 4..7 above -> bits 4-7 -> 0xF0
    '{"state": [7, 6, 5, 4, 3, 2, 1, 0]}',  # -> bits 0-3 -> 0x0F
    '{"state": [0.5, -1, 2, 2, 2, -3, 10, 0]}',  # lower median 0.5 -> bits 2, 3, 4, 6 -> 0x5C
    '{"state": [1, 1, 1, 0, 0, 1, 0, 1]}',  # median 1: nothing above it -> 0x00 (0/1 states are not stored as is)
    '{"state": [-2.5e-3, 1e3, 0, 0, 0, 0, 0, 0], "note": "extra keys are ignored"}',  # median 0 -> bit 1 -> 0x02
]
HAND_BYTES = [0xF0, 0x0F, 0x5C, 0x00, 0x02]


def write(tmp_path, lines, name="experiences.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_experience_file_round_trips_into_the_expected_memory_bytes(tmp_path):
    path = write(tmp_path, HAND_WRITTEN)
    with pytest.warns(UserWarning, match="5 of 256 memory words"):
        data = LeWorldDataModule(**TINY_DATA, population="experience_file", experience_file=str(path),
                                 eval_memory="same")
    memory = data.memory_bits_for("train")
    assert as_bytes(memory) == HAND_BYTES + [0] * 251
    assert data.memory_bits_for("test") is memory  # one memory for every split
    assert read_experience_file(path, 256, 8)[2].tolist() == [0.5, -1, 2, 2, 2, -3, 10, 0]


@pytest.mark.parametrize(
    "lines,line,message",
    [
        (HAND_WRITTEN[:1] + ['{"state": [0, 1, 2'], 2, "not valid JSON"),
        (HAND_WRITTEN[:2] + [""], 3, "empty line"),
        (['[0, 1, 2, 3, 4, 5, 6, 7]'], 1, 'expected an object {"state"'),
        (['{"states": [0, 1, 2, 3, 4, 5, 6, 7]}'], 1, 'expected an object {"state"'),
        (HAND_WRITTEN[:1] + ['{"state": [0, 1, 2, 3, 4, 5, 6]}'], 2, "state has 7 values, expected a list of "
                                                                     "word_size=8"),
        (['{"state": "01010101"}'], 1, "state has str"),
        (['{"state": [0, 1, "2", 3, 4, 5, 6, 7]}'], 1, r"state\[2\] is '2', expected a finite number"),
        (['{"state": [0, 1, 2, NaN, 4, 5, 6, 7]}'], 1, r"state\[3\] is nan"),
        (['{"state": [0, 1, 2, 3, true, 5, 6, 7]}'], 1, r"state\[4\] is True"),
        (HAND_WRITTEN[:1] * 5, 5, r"more states than memory words \(num_words=4\)"),
    ],
)
def test_experience_file_errors_name_the_file_and_line(tmp_path, lines, line, message):
    path = write(tmp_path, lines)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + message):
        populate_from_experience_file(path, 4, 8)


def test_experience_file_errors_for_the_file_and_the_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="experience_file 'missing.jsonl' not found"):
        populate_from_experience_file("missing.jsonl", 4, 8)
    empty = write(tmp_path, [], "empty.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no states")):
        populate_from_experience_file(empty, 4, 8)
    path = str(write(tmp_path, HAND_WRITTEN))
    with pytest.raises(ValueError, match="eval_memory must be 'same'"):
        LeWorldDataModule(**TINY_DATA, population="experience_file", experience_file=path)
    with pytest.raises(ValueError, match="experience_file must be set exactly when"):
        LeWorldDataModule(**TINY_DATA, population="structured", experience_file=path)
    with pytest.raises(ValueError, match="experience_file must be set exactly when"):
        LeWorldDataModule(**TINY_DATA, population="experience_file", eval_memory="same")


def test_the_shipped_example_file_fills_its_overlays_memory(in_tmp):
    bits = populate_from_experience_file("configs/leworld/experiences.jsonl", 256, 32)  # found from any folder
    lines = (CONFIGS / "experiences.jsonl").read_text().splitlines()
    states = [json.loads(line)["state"] for line in lines]
    expected = [[float(x > sorted(state)[15]) for x in state] for state in states]  # above the lower median
    assert len(lines) == 256 and bits.tolist() == expected


# --- a fit with each fill ----------------------------------------------------------------------------------------
def fit(*args):
    run = main(["fit", *args, "--trainer.fast_dev_run", "1"])
    assert run.trainer.state.finished and run.trainer.global_step == 1
    return run


def test_fast_dev_run_with_the_regions_fill(in_tmp):
    run = fit("--config", str(CONFIGS / "fill_regions.yaml"))
    assert torch.equal(run.datamodule.memory_bits_for("train"), populate_regions(4096, 32, stream=0))
    assert torch.equal(run.model.system.memory.bits, populate_regions(4096, 32, stream=1))  # validated last


def test_fast_dev_run_with_a_users_experience_file(in_tmp):
    values = torch.tensor([[(7 * n + 3 * b) % 32 for b in range(32)] for n in range(3)])
    path = write(in_tmp, [json.dumps({"state": row}) for row in values.tolist()])
    with pytest.warns(UserWarning, match="3 of 256"):
        run = fit("--config", str(CONFIGS / "fill_experience_file.yaml"), "--data.init_args.experience_file",
                  str(path))
    # state n holds a permutation of 0..31: the 16 values above the lower median 15 are 16..31
    expected = torch.zeros(256, 32)
    expected[:3] = (values >= 16).float()
    assert torch.equal(run.model.system.memory.bits, expected)
