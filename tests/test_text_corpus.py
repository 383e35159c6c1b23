"""The story corpus, its corruptions and DataModules: coherence by construction, no length shortcut, masks."""

import json
import random

import pytest
import torch

from datamodules.text_corpus import (
    NAMES,
    PreferenceDataModule,
    PromptDataModule,
    TextCorpusDataModule,
    corrupt,
    generate_stories,
    split_sentences,
)


def test_generated_stories_are_coherent_and_controlled():
    stories = generate_stories(200, seed=3, mood="sad", min_sentences=5, max_sentences=6)
    assert generate_stories(200, seed=3, mood="sad", min_sentences=5, max_sentences=6)[0].text == stories[0].text
    for story in stories:
        assert 5 <= len(story.sentences) <= 6 and story.mood == "sad"
        assert story.sentences[0].startswith("Once upon a time") and story.sentences[0].endswith(f"{story.name}.")
        other_names = {n for names in NAMES.values() for n in names} - {story.name}
        assert not any(n in story.text.split() for n in other_names)
        assert story.name in NAMES[story.pronoun]
    with pytest.raises(ValueError, match="min_sentences"):
        generate_stories(1, min_sentences=4)


def test_corruptions_break_consistency_but_keep_the_words():
    rng = random.Random(0)
    story = generate_stories(1, seed=5, min_sentences=7, max_sentences=7)[0]
    shuffled = corrupt(story.sentences, "shuffle", rng)
    assert shuffled != story.text and sorted(split_sentences(shuffled)) == sorted(story.sentences)
    renamed = corrupt(story.sentences, "name", rng, story)
    assert renamed.split()[:10] == story.text.split()[:10]  # the introduction is kept...
    assert renamed.count(story.name) == 1  # ...and the protagonist is called something else afterwards
    moved = corrupt(story.sentences, "object", rng, story)
    assert moved.count(story.object) == 1
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(story.sentences, "drop", rng, story)


def test_length_alone_does_not_separate_chosen_from_rejected(cache):
    dm = PreferenceDataModule(num_stories=2000, tokenizer_cache=cache, vocab_size=400)
    pairs = dm.items("train")
    chosen = torch.tensor([len(c) for c, _ in pairs], dtype=torch.float)
    rejected = torch.tensor([len(r) for _, r in pairs], dtype=torch.float)
    # Paired rule "the longer one is chosen" (ties half right) is at chance...
    longer_wins = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()
    assert abs(longer_wins - 0.5) < 0.03
    # ...and so is the best length threshold over the pooled texts (a length-only classifier).
    lengths = torch.cat([chosen, rejected])
    labels = torch.cat([torch.ones_like(chosen), torch.zeros_like(rejected)])
    best = max(max(((lengths > t) == labels.bool()).float().mean(), ((lengths <= t) == labels.bool()).float().mean())
               for t in lengths.unique())
    assert best < 0.53
    assert abs(chosen.mean() - rejected.mean()) < 0.5


def test_seed_style_pairs_would_have_a_length_shortcut():
    # The seed's rejected = shuffled half story: the longer text is always the chosen one.
    stories = generate_stories(200, seed=1)
    rng = random.Random(0)
    halves = [" ".join(rng.sample(s.sentences, len(s.sentences) // 2)) for s in stories]
    assert all(len(s.text) > len(h) for s, h in zip(stories, halves))


def test_sft_batches_mask_prompt_and_padding(cache):
    dm = TextCorpusDataModule(num_stories=100, batch_size=4, tokenizer_cache=cache, vocab_size=400)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert (labels[n:] == -100).all() and (ids[n:] == tok.pad_token_id).all()
        assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id and labels[n - 1] == tok.eos_token_id
        prompt = tok.decode(ids[: int((labels == -100)[:n].sum())], skip_special_tokens=True)
        assert prompt.strip().startswith("Once upon a time") and prompt.strip().endswith(".")
        assert split_sentences(prompt.strip()) == [prompt.strip()]  # one sentence of prompt
    full = TextCorpusDataModule(num_stories=100, batch_size=4, tokenizer_cache=cache, vocab_size=400,
                                completion_only=False)
    batch = next(iter(full.train_dataloader()))
    assert (batch["labels"] != -100).sum() == batch["attention_mask"].sum()


def test_splits_are_disjoint_and_shared_across_phases(cache):
    sft = TextCorpusDataModule(num_stories=200, tokenizer_cache=cache, vocab_size=400)
    ppo = PromptDataModule(num_stories=200, tokenizer_cache=cache, vocab_size=400, batch_size=8, batches_per_epoch=50)
    assert sft.split_indices == ppo.split_indices
    assert sft.tokenizer.get_vocab() == ppo.tokenizer.get_vocab()
    train, val, test = (set(sft.split(s)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and len(train | val | test) == 200
    batch = next(iter(ppo.test_dataloader()))
    assert (batch["prompt_ids"][:, -1] != ppo.tokenizer.pad_token_id).all()  # left-padded
    assert len(ppo.train_dataloader()) == 50


def test_local_files_and_bad_input(tmp_path, cache):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"First line {i}. Second line {i}. Third."}) for i in range(40)))
    dm = PreferenceDataModule(dataset=str(jsonl), text_column="body", tokenizer_cache=cache, vocab_size=300)
    chosen, rejected = dm.pairs("train")[0]
    assert sorted(split_sentences(chosen)) == sorted(split_sentences(rejected)) and chosen != rejected
    with pytest.raises(ValueError, match="needs the generated corpus"):
        PreferenceDataModule(dataset=str(jsonl), text_column="body", corruptions=["name"], tokenizer_cache=cache,
                             vocab_size=300)
    with pytest.raises(ValueError, match="c.jsonl.*no column 'text'"):
        TextCorpusDataModule(dataset=str(jsonl), tokenizer_cache=cache)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TextCorpusDataModule(dataset=str(tmp_path / "missing.txt"), tokenizer_cache=cache)
    with pytest.raises(ValueError, match="val_fraction"):
        TextCorpusDataModule(val_fraction=0.6, test_fraction=0.5, tokenizer_cache=cache)
