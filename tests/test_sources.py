"""Data by name: records through ``datasets.load_dataset`` (local files, folders, hub names) into the RLHF and
tuning DataModules; a dataset of the generated records gives the generated batches; the default is unchanged."""

import json

import datasets
import pytest
import torch

from datamodules.instructions import InstructionDataModule
from datamodules.sources import load_records
from datamodules.text_corpus import PreferenceDataModule, PromptDataModule, TextCorpusDataModule

SMALL = {"num_stories": 60, "vocab_size": 300, "batch_size": 4}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def assert_same_batch(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_local_files_are_read_by_suffix(tmp_path):
    rows = [{"text": "One. Two.", "n": 1}, {"text": "Three.", "n": 2}]
    assert load_records(write_jsonl(tmp_path / "a.jsonl", rows), "train", ["text"]) == rows
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "a.json"), "train", ["n"]) == rows
    (tmp_path / "a.txt").write_text("First story. It goes on.\nSame story.\n\nSecond story.\n")
    texts = [r["text"].strip() for r in load_records(str(tmp_path / "a.txt"))]
    assert texts == ["First story. It goes on.\nSame story.", "Second story."]  # one record per paragraph
    assert load_records(None, generate=lambda: rows) == rows


def test_missing_file_column_or_split_is_one_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "stories.jsonl", [{"body": "A. B."}])
    with pytest.raises(ValueError, match=r"'.*stories.jsonl'.*no column 'text' \(its columns: body\)"):
        load_records(path, "train", ["text"])
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_records(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ValueError, match="stories.jsonl.*split 'validation'"):
        load_records(path, "validation")


def test_a_hub_name_fails_fast_when_the_hub_cannot_be_reached(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("datamodules.sources.hub_connection_error", lambda timeout=3.0: OSError("no route"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the library was asked"))
    with pytest.raises(OSError, match="could not load dataset 'org/stories'.*neither a local file or folder"):
        TextCorpusDataModule(dataset="org/stories")


def test_a_jsonl_of_the_generated_records_gives_the_generated_batches(tmp_path, cache):
    for cls in (TextCorpusDataModule, PromptDataModule, PreferenceDataModule):
        generated = cls(tokenizer_cache=cache, **SMALL)
        path = write_jsonl(tmp_path / "stories.jsonl", generated.records)
        extra = {"corruptions": ["shuffle"]} if cls is PreferenceDataModule else {}
        if extra:  # entity corruptions need the generated stories; compare like with like
            generated = cls(tokenizer_cache=cache, **SMALL, **extra)
        loaded = cls(dataset=path, tokenizer_cache=cache, **SMALL, **extra)
        assert loaded.split_indices == generated.split_indices
        assert loaded.tokenizer.get_vocab() == generated.tokenizer.get_vocab()
        assert_same_batch(next(iter(loaded.train_dataloader())), next(iter(generated.train_dataloader())))
        assert_same_batch(next(iter(loaded.test_dataloader())), next(iter(generated.test_dataloader())))


def test_the_default_corpus_is_unchanged(cache):
    """The first training batches of the generated default, as recorded before datasets could be named."""
    sft, ppo = TextCorpusDataModule(tokenizer_cache=cache, **SMALL), PromptDataModule(tokenizer_cache=cache, **SMALL)
    batch, prompts = next(iter(sft.train_dataloader())), next(iter(ppo.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128) and prompts["prompt_ids"].shape == (4, 33)
    first = sft.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert first.startswith(" Once upon a time, there was a quiet bird named Jack. He lived in a sunny town.")
    assert ppo.tokenizer.decode(prompts["prompt_ids"][0], skip_special_tokens=True) == (
        " Once upon a time, there was a quiet bird named Jack.")


def test_prompt_completion_and_preference_columns(tmp_path, cache):
    rows = [{"q": f"Say {i}.", "a": f"Number {i}.", "good": f"Yes {i}.", "bad": f"No {i}."} for i in range(30)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    sft = TextCorpusDataModule(dataset=path, prompt_column="q", completion_column="a", tokenizer_cache=cache,
                               vocab_size=300, batch_size=4)
    prompt, completion = sft.prompt_and_completion(sft.split("train")[0])
    assert completion == f"Number {prompt.split()[1][:-1]}."
    batch = next(iter(sft.val_dataloader()))
    labels = batch["labels"][0][batch["labels"][0] != -100]
    assert sft.tokenizer.decode(labels, skip_special_tokens=True) == " " + sft.prompt_and_completion(
        sft.split("val")[0])[1]  # the loss is on the completion column only
    reward = PreferenceDataModule(dataset=path, prompt_column="q", chosen_column="good", rejected_column="bad",
                                  tokenizer_cache=cache, vocab_size=300)
    chosen, rejected = reward.pairs("train")[0]
    i = chosen.split()[1][:-1]
    assert (chosen, rejected) == (f"Say {i}. Yes {i}.", f"Say {i}. No {i}.")
    half = write_jsonl(tmp_path / "half.jsonl", [{"good": "x"}])
    with pytest.raises(ValueError, match="half.jsonl.*no column 'bad'"):
        PreferenceDataModule(dataset=half, chosen_column="good", rejected_column="bad", tokenizer_cache=cache)
    with pytest.raises(ValueError, match="completion_column must be given with prompt_column"):
        TextCorpusDataModule(dataset=path, prompt_column="q", tokenizer_cache=cache)


def test_named_splits_of_a_folder(tmp_path, cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, count in (("train", 40), ("validation", 6), ("test", 5)):
        write_jsonl(folder / f"{split}.jsonl", [{"text": f"{split} {i} starts. It ends."} for i in range(count)])
    dm = PromptDataModule(dataset=str(folder), val_split="validation", test_split="test", tokenizer_cache=cache,
                          vocab_size=300)
    assert {s: len(dm.split(s)) for s in ("train", "val", "test")} == {"train": 40, "val": 6, "test": 5}
    assert all(dm.documents[i].startswith("validation") for i in dm.split("val"))
    assert all(dm.documents[i].startswith("test") for i in dm.split("test"))


def test_an_instruction_folder_of_the_generated_world_gives_its_batches(tmp_path):
    small = {"num_people": 30, "num_val_people": 4, "num_test_people": 2, "num_knowledge_people": 4,
             "vocab_size": 300, "tokenizer_cache": str(tmp_path / "tokenizers")}
    generated = InstructionDataModule(**small)
    folder = tmp_path / "world"
    folder.mkdir()
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        write_jsonl(folder / f"{name}.jsonl", [vars(e) for e in generated.examples[split]])
    knowledge = write_jsonl(tmp_path / "knowledge.jsonl", [
        {"passage": k.passage, "questions": [{"question": q, "answer": a} for q, a in k.questions]}
        for k in generated.knowledge])
    loaded = InstructionDataModule(dataset=str(folder), val_split="validation", test_split="test",
                                   knowledge_file=knowledge, **small)
    assert loaded.examples == generated.examples and loaded.knowledge == generated.knowledge
    assert loaded.tokenizer.get_vocab() == generated.tokenizer.get_vocab()
    assert_same_batch(next(iter(loaded.val_dataloader())), next(iter(generated.val_dataloader())))
