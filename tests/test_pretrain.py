"""Pretraining: the generated corpus (true number facts, nothing of the web shop), the byte-level tokenizer, the
config's round trip through its Hugging Face folder, and the error for a pretrained base that was never built."""

import inspect
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from datamodules.pretrain_corpus import PretrainCorpusDataModule
from datamodules.pretrain_text import generate_documents, number_fact, shopping_request
from envs.web_shop import BRANDS, PRODUCT_TYPES, make_catalog, make_goals
from experiment.cli import main
from models.lm_factory import build_causal_lm, export_hf, load_tokenizer, pretrain_command
from tests.conftest import REPO

CONFIG = str(REPO / "configs/pretrain/tiny.yaml")
FOLDER = "checkpoints/pretrain/tiny/hf/model"  # where the config exports, relative to the working folder
TINY = ["--data.init_args.num_documents", "300", "--data.init_args.val_documents", "60",
        "--data.init_args.vocab_size", "400", "--model.init_args.lm.hidden_size", "32",
        "--model.init_args.lm.num_layers", "2", "--model.init_args.lm.num_heads", "2", "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return PretrainCorpusDataModule(num_documents=300, val_documents=60, vocab_size=400, block_size=64,
                                    tokenizer_cache=str(tmp_path_factory.mktemp("tok")))


def test_the_corpus_is_seeded_and_its_number_facts_are_true():
    assert generate_documents(50, seed=3) == generate_documents(50, seed=3) != generate_documents(50, seed=4)
    rng, checked = random.Random(0), 0
    for _ in range(2000):
        fact = number_fact(rng)
        lower = re.fullmatch(r"Which price is lower, \$([\d.]+) or \$([\d.]+)\? \$([\d.]+) is lower\.", fact)
        if lower:
            assert float(lower.group(3)) == min(float(lower.group(1)), float(lower.group(2)))
        cheapest = re.fullmatch(r"Of (.*), the (cheapest|most expensive) is \$([\d.]+)\.", fact)
        if cheapest:
            prices = [float(p) for p in re.findall(r"\$([\d.]+)", cheapest.group(1))]
            assert float(cheapest.group(3)) == (min if cheapest.group(2) == "cheapest" else max)(prices)
        under = re.fullmatch(r"\$([\d.]+) is (?:under|below|less than) \$(\d+), so it fits.*", fact)
        over = re.fullmatch(r"\$([\d.]+) is not (?:under|below|less than) \$(\d+): it is \$([\d.]+) over.*", fact)
        if under:
            assert float(under.group(1)) <= int(under.group(2))
        if over:
            assert float(over.group(1)) > int(over.group(2))
            assert float(over.group(3)) == pytest.approx(float(over.group(1)) - int(over.group(2)), abs=0.006)
        ordered = re.fullmatch(r"Sorted from (lowest|highest) to \w+, (.*) become (.*)\.", fact)
        if ordered:
            values = [int(v) for v in ordered.group(2).split(", ")]
            descending = ordered.group(1) == "highest"
            assert [int(v) for v in ordered.group(3).split(", ")] == sorted(values, reverse=descending)
        checked += bool(lower or cheapest or under or over or ordered)
    assert checked > 1100  # every form but the sum and total ones was checked


def test_a_shopping_request_names_exactly_the_offers_that_fit_it():
    rng, answered = random.Random(1), 0
    for _ in range(300):
        text = shopping_request(rng)
        want = re.match(r"Request: I need an? (\S+) .+? with (\w+) (.+?), and I want to pay less than (\d+) dollars",
                        text)
        material, group, value, limit = want.groups()
        offers = re.findall(r"Offer: (\w+ (\S+) .+?), (\w+) (.+?), \$([\d.]+)\.", text)
        fits = [name for name, m, _, values, cost in offers
                if m == material and value in values.split(" or ") and float(cost) < int(limit)]
        assert text.endswith(f"Fits the request: {'; '.join(fits)}." if fits else "Nothing fits the request.")
        answered += bool(fits)
    assert 50 < answered < 250  # both answers are common


def test_the_corpus_holds_nothing_of_the_web_shop():
    """At the DataModule's default size and seed: no goal instruction of any split (the web shop config's sizes and
    seed), no product type, attribute, brand or unit-valued option of the shop, none of its action grammar."""
    defaults = inspect.signature(PretrainCorpusDataModule.__init__).parameters
    count = defaults["num_documents"].default + defaults["val_documents"].default
    text = "\n".join(generate_documents(count, defaults["corpus_seed"].default)).lower()
    catalog = make_catalog(seed=0)
    goals = [g for split, n in (("train", 1000), ("held_out", 50), ("out_of_domain", 50))
             for g in make_goals(catalog, split, n, seed=0)]
    assert not [g.instruction for g in goals if g.instruction in text]
    shop_phrases = set(PRODUCT_TYPES) | set(BRANDS)
    shop_phrases |= {a for vocabulary, _ in PRODUCT_TYPES.values() for a in vocabulary}
    shop_phrases |= {v for _, groups in PRODUCT_TYPES.values() for values in groups.values() for v in values
                     if re.search(r"\d", v) and re.search(r"[a-z]", v)}  # "12 oz", "x1": not plain numbers
    # Word-bounded; a price's cents ("$12.68 in total") are not the option "68 in".
    found = re.findall(r"(?<![\w.$-])(" + "|".join(map(re.escape, sorted(shop_phrases, key=len, reverse=True)))
                       + r")(?![\w-])", text)
    assert not found, sorted(set(found))
    assert not re.search(r"search\[|click\[|instruction:|results for|page:|\[p\d{4}\]", text)  # its grammar, pages
    assert {"price", "$"} <= set(re.findall(r"price|\$", text))  # generic shopping words overlap by design


def test_a_word_never_seen_round_trips_through_byte_fallback(small_data):
    tokenizer = small_data.tokenizer
    corpus = " ".join(small_data.documents["train"])
    word = "".join(random.Random(7).choices("bcdfghjklmnpqrstvwxz", k=14))
    assert word not in corpus
    for text in (f" {word}", " naïve Zürich café 東京", " qzx$97.13"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert len(tokenizer(f" {word}", add_special_tokens=False).input_ids) > 1  # split into known pieces
    assert tokenizer.tokenize(" 407") == ["Ġ", "4", "0", "7"]  # one token per digit


def test_blocks_pack_whole_documents_and_the_loss_covers_every_token(small_data):
    blocks = small_data.blocks("train")
    tok = small_data.tokenizer
    assert blocks.shape[1] == 64 and blocks[0, 0] == tok.bos_token_id
    first = tok(small_data.documents["train"][0], add_special_tokens=False).input_ids
    assert blocks.flatten()[1:len(first) + 2].tolist() == [*first, tok.eos_token_id][:len(first) + 1]
    assert set(small_data.documents["val"]).isdisjoint(small_data.documents["train"])
    batch = next(iter(small_data.val_dataloader()))
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())


def test_the_pretrain_config_exports_a_folder_that_reloads_to_the_same_logits(in_tmp):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = main(["fit", "--config", CONFIG, *TINY, "--data.init_args.tokenizer_cache", str(in_tmp / "tok")])
    module, data = run.model, run.datamodule
    assert module.lm_settings.lora is None and all(p.requires_grad for p in module.lm.parameters())
    ids = data.blocks("val")[:2]
    module.lm.eval()
    with torch.no_grad():
        expected = module.lm(input_ids=ids).logits
        exported = AutoModelForCausalLM.from_pretrained(FOLDER).eval()
        assert torch.allclose(exported(input_ids=ids).logits, expected, atol=1e-5)
        # What an LM config does with `lm.model_name <folder>` and `data.init_args.tokenizer <folder>`:
        tokenizer = load_tokenizer(FOLDER)
        rebuilt = build_causal_lm(FOLDER, tokenizer).eval()
        assert torch.allclose(rebuilt(input_ids=ids).logits, expected, atol=1e-5)
    assert AutoTokenizer.from_pretrained(FOLDER).get_vocab() == data.tokenizer.get_vocab()
    assert not torch.allclose(build_causal_lm("tiny-llama", tokenizer, hidden_size=32, num_layers=2,
                                              num_heads=2)(input_ids=ids).logits, expected, atol=1e-3)


def test_exporting_again_to_a_fixed_folder_replaces_it_whole(tmp_path, small_data):
    from transformers import AutoModelForCausalLM

    tok, folder = small_data.tokenizer, tmp_path / "pretrain" / "hf"
    models = [build_causal_lm("tiny-llama", tok, hidden_size=16, num_layers=1, num_heads=2) for _ in range(2)]
    export_hf(models[0], tok, folder, replace=True)
    (folder / "model" / "stale.txt").write_text("from the first export")
    written = export_hf(models[1], tok, folder, replace=True)
    assert written == {"model": str(folder / "model")} and os.listdir(folder.parent) == ["hf"]
    assert not (folder / "model" / "stale.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "model")
    assert torch.equal(reloaded.model.embed_tokens.weight, models[1].model.embed_tokens.weight)


def test_a_missing_pretrained_base_names_the_command_that_builds_it(tmp_path):
    assert pretrain_command("checkpoints/pretrain/tiny/hf/model") == (
        "python train.py fit --config configs/pretrain/tiny.yaml")
    assert pretrain_command("/data/run/checkpoints/pretrain/wide/hf/model").endswith("configs/pretrain/wide.yaml")
    assert pretrain_command("EleutherAI/pythia-70m-deduped") is None
    assert pretrain_command("my_checkpoints/pretrain/tiny/hf/model") is None
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs/rlhf/sft.yaml"),
               "--model.init_args.lm.model_name", FOLDER, "--data.init_args.tokenizer", FOLDER,
               "--data.init_args.num_stories", "20"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("Error: ") and f"'{FOLDER}' does not exist" in lines[-1]
    assert "`python train.py fit --config configs/pretrain/tiny.yaml`" in lines[-1]


def test_a_fast_dev_run_leaves_the_pretrained_base_alone(in_tmp):
    os.makedirs(FOLDER)
    (in_tmp / FOLDER / "config.json").write_text("{}")
    run = main(["fit", "--config", CONFIG, *TINY, "--data.init_args.tokenizer_cache", str(in_tmp / "tok"),
                "--trainer.fast_dev_run", "true"])
    assert (in_tmp / FOLDER / "config.json").read_text() == "{}"
    assert (in_tmp / run.trainer.default_root_dir / "hf" / "model" / "model.safetensors").is_file()
