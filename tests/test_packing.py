"""Sequence cap and packing in the LM data path: truncation keeps the completion, packed rows keep the labels and
give the loss of the same examples unpacked (no attention across examples)."""

import pytest
import torch

from datamodules.early_experience import EarlyExperienceDataModule
from datamodules.text_corpus import TextCorpusDataModule
from models.lm_factory import build_causal_lm, build_tokenizer
from models.lm_text import IGNORE_INDEX, causal_lm_loss, completion_loss, lm_batch, model_inputs, truncate_prompt

PAD = 0


def examples(seed: int = 0, count: int = 6) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, *torch.randint(3, 200, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()]
               for _ in range(count)]
    completions = [torch.randint(3, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist() + [2]
                   for _ in range(count)]
    return prompts, completions


def spans(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every packed example (and padding run), read from the position restarts."""
    out = []
    for row, positions in enumerate(position_ids.tolist()):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        out += [(row, a, b) for a, b in zip(starts, starts[1:])]
    return out


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion():
    assert truncate_prompt([1, 5, 6, 7, 8], [9, 2], 5) == ([6, 7, 8], [9, 2])
    assert truncate_prompt([1, 5], [9, 2], 5) == ([1, 5], [9, 2])  # short enough: unchanged
    assert truncate_prompt([1, 5, 6], [9, 10, 11, 2], 3) == ([6], [9, 10])  # only an over-long completion is cut
    with pytest.raises(ValueError, match="max_seq_length must be >= 2"):
        truncate_prompt([1], [2], 1)
    prompts, completions = examples()
    full, capped = lm_batch(prompts, completions, PAD, True), lm_batch(prompts, completions, PAD, True, 8)
    assert capped["input_ids"].shape[1] == 8
    for row in range(len(prompts)):  # the same completion tokens are labelled, ending with <eos>
        kept = capped["labels"][row][capped["labels"][row] != IGNORE_INDEX]
        assert kept.tolist() == completions[row] == full["labels"][row][full["labels"][row] != IGNORE_INDEX].tolist()


@pytest.mark.parametrize("completion_only", [True, False])
def test_packed_rows_hold_each_example_with_its_own_labels_and_positions(completion_only):
    prompts, completions = examples()
    plain = lm_batch(prompts, completions, PAD, completion_only)
    packed = lm_batch(prompts, completions, PAD, completion_only, max_seq_length=24, packing=True)
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= 24
    assert len(packed["input_ids"]) < len(prompts)  # short examples share rows
    starts = [s for s in spans(packed["position_ids"]) if packed["input_ids"][s[0], s[1]] == 1]  # each <bos>
    assert len(starts) == len(prompts)
    for i in range(len(prompts)):
        n = len(prompts[i]) + len(completions[i])
        row, start, end = next(s for s in starts if s[2] - s[1] >= n and torch.equal(
            packed["input_ids"][s[0], s[1]:s[1] + n], plain["input_ids"][i, :n]))  # where example i went
        starts.remove((row, start, end))
        assert packed["position_ids"][row, start:start + n].tolist() == list(range(n))
        # The first label is never a target (nothing before it in the example); every other one is unchanged.
        assert packed["labels"][row, start] == IGNORE_INDEX
        assert torch.equal(packed["labels"][row, start + 1:start + n], plain["labels"][i, 1:n])
        assert (packed["labels"][row, start + n:end] == IGNORE_INDEX).all()  # padding after it
    if completion_only:  # the same targets, no more
        assert torch.equal(packed["labels"][packed["labels"] != IGNORE_INDEX].sort().values,
                           plain["labels"][plain["labels"] != IGNORE_INDEX].sort().values)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"token {i} and {j}" for i in range(40) for j in range(5)]
    return build_tokenizer(texts, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-smollm3"])
def test_the_loss_of_a_packed_batch_is_the_token_weighted_loss_of_the_examples(tokenizer, arch):
    torch.manual_seed(0)
    model = build_causal_lm(arch, tokenizer, hidden_size=32, num_layers=2, num_heads=2).eval()
    with torch.no_grad():  # weights far from the near-uniform initial ones, so context changes the loss clearly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    prompts, completions = examples(1, count=8)
    plain = lm_batch(prompts, completions, PAD, True)
    packed = lm_batch(prompts, completions, PAD, True, max_seq_length=32, packing=True)
    with torch.no_grad():
        per_example = [causal_lm_loss(model(**model_inputs(plain)).logits[i:i + 1], plain["labels"][i:i + 1], "sum")
                       for i in range(len(prompts))]
        tokens = sum(len(c) for c in completions)
        expected = torch.stack(per_example).sum() / tokens  # token-weighted mean over the unpacked examples
        assert torch.allclose(causal_lm_loss(model(**model_inputs(packed)).logits, packed["labels"]), expected,
                              atol=1e-4)
        assert torch.allclose(completion_loss(model, packed["input_ids"], None, packed["labels"],
                                              packed["position_ids"]), expected, atol=1e-4)
        # A flat concatenation (every token attending to the examples before it) gives another loss: the test can
        # tell the two apart.
        flat = model(input_ids=packed["input_ids"], attention_mask=torch.ones_like(packed["input_ids"])).logits
        assert not torch.allclose(causal_lm_loss(flat, packed["labels"]), expected, atol=1e-2)


def test_data_modules_pack_training_batches_only(tmp_path):
    data = TextCorpusDataModule(num_stories=40, vocab_size=320, batch_size=8, tokenizer_cache=str(tmp_path / "t"),
                                max_seq_length=256, packing=True)
    plain = TextCorpusDataModule(num_stories=40, vocab_size=320, batch_size=8, tokenizer_cache=str(tmp_path / "t"))
    packed, unpacked = next(iter(data.train_dataloader())), next(iter(plain.train_dataloader()))
    assert "position_ids" in packed and len(packed["input_ids"]) < 8
    assert torch.equal(packed["labels"][packed["labels"] != IGNORE_INDEX].sort().values,
                       unpacked["labels"][unpacked["labels"] != IGNORE_INDEX].sort().values)  # the same targets
    assert "attention_mask" in next(iter(data.val_dataloader()))  # evaluation is not packed
    experience = EarlyExperienceDataModule(env="tiny_shop", train_goals=4, eval_goals=1, batch_size=6,
                                           tokenizer_cache=str(tmp_path / "t"), max_seq_length=256, packing=True)
    batch = next(iter(experience.train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].shape[1] <= 256 and len(batch["input_ids"]) < 6
    with pytest.raises(ValueError, match="max_seq_length"):
        TextCorpusDataModule(num_stories=40, vocab_size=320, tokenizer_cache=str(tmp_path / "t"), max_seq_length=1)
