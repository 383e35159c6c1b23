"""The LM factory: tokenizer training and caching, tiny models, LoRA, 4-bit + LoRA training, offline hub errors."""

import pytest
import torch

from models.lm_factory import LoraSettings, build_causal_lm, build_tokenizer, count_parameters, merged_state_dict

TEXTS = [f"Once upon a time, {name} found a {thing} in the park." for name in ("Tom", "Mia", "Sam") for thing in
         ("ball", "kite", "box")] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


def test_tokenizer_round_trip_special_tokens_and_cache(tmp_path):
    tok = build_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    text = "Once upon a time, Mia found a kite. Zebra!"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text  # byte-level BPE is lossless, also on unseen words
    assert len(ids) < len(text.encode())  # merges were learned
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").exists()
    again = build_tokenizer(TEXTS, vocab_size=300, cache_dir=tmp_path)
    assert again.get_vocab() == tok.get_vocab() and len(list(tmp_path.iterdir())) == 1
    build_tokenizer([*TEXTS, "A different corpus."], vocab_size=300, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # another corpus gets another tokenizer


def test_split_digits_gives_every_digit_its_own_token_and_its_own_cache_entry(tmp_path):
    texts = [f"price ${p}.{p % 7}9 lower than {p + 10} dollars" for p in range(10, 99)] * 3
    merged = build_tokenizer(texts, vocab_size=320, cache_dir=tmp_path)
    digits = build_tokenizer(texts, vocab_size=320, cache_dir=tmp_path, split_digits=True)
    assert len(list(tmp_path.iterdir())) == 2
    text = "price $65.14 lower than 70 dollars"
    assert [t for t in digits.tokenize("$65.14") if t != "$"] == ["6", "5", ".", "1", "4"]
    assert any(len(t.lstrip("Ġ")) > 1 and t.lstrip("Ġ").isdigit() for t in merged.tokenize("65 70 10 20"))  # merged
    assert digits.decode(digits(text).input_ids) == text


def test_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(TEXTS, vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        build_tokenizer([""], cache_dir=tmp_path)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-smollm3"])
def test_tiny_model_forward_shape(tokenizer, arch):
    model = build_causal_lm(arch, tokenizer, hidden_size=64, num_layers=2)
    ids = torch.randint(3, len(tokenizer), (2, 7))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, len(tokenizer))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_lora_adapter_is_trainable_and_base_frozen(tokenizer, tmp_path):
    model = build_causal_lm("tiny-llama", tokenizer, lora=LoraSettings(r=4), hidden_size=64)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # A saved adapter comes back trainable (the seed's adapters were silently frozen by is_trainable=False).
    model.save_pretrained(tmp_path / "adapter")
    reloaded = build_causal_lm("tiny-llama", tokenizer, adapter_path=str(tmp_path / "adapter"), hidden_size=64)
    assert count_parameters(reloaded)[0] == count_parameters(model)[0] > 0


def test_merged_weights_reproduce_the_adapted_model(tokenizer):
    model = build_causal_lm("tiny-llama", tokenizer, lora=LoraSettings(r=4), hidden_size=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-zero update
    ids = torch.randint(3, len(tokenizer), (1, 6))
    plain = build_causal_lm("tiny-llama", tokenizer, state_dict=merged_state_dict(model), hidden_size=64)
    assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
    assert any("lora_" in n for n in model.state_dict())  # the live model keeps its adapter


def test_bad_lora_targets_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="not in this model"):
        build_causal_lm("tiny-llama", tokenizer, lora=LoraSettings(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        build_causal_lm("tiny-llama")


def test_4bit_lora_trains_one_step_on_cpu(tokenizer):
    torch.manual_seed(0)
    model = build_causal_lm("tiny-llama", tokenizer, lora=LoraSettings(r=4), load_in_4bit=True, hidden_size=64)
    linear = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear).__name__ == "Linear4bit"
    with torch.no_grad():  # lora_B starts at zero: give the step a gradient into lora_A too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_before = linear.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, len(tokenizer), (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert torch.equal(linear.weight.detach(), base_before)  # the quantised base did not move


def test_4bit_without_adapter_is_refused(tokenizer):
    with pytest.raises(ValueError, match="adapters"):
        build_causal_lm("tiny-llama", tokenizer, load_in_4bit=True, hidden_size=64)


def test_offline_hub_name_fails_with_instructions(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time, not from env
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(OSError, match="local-dir") as info:
        build_causal_lm("EleutherAI/pythia-70m-deduped")
    assert "pythia-70m-deduped" in str(info.value) and "tiny-llama" in str(info.value)
    with pytest.raises(OSError, match="local-dir"):
        from models.lm_factory import load_tokenizer

        load_tokenizer("EleutherAI/pythia-70m-deduped")


def test_local_folder_loads_like_a_hub_model(tokenizer, tmp_path):
    from models.lm_factory import load_tokenizer

    model = build_causal_lm("tiny-llama", tokenizer, hidden_size=64).eval()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = build_causal_lm(str(tmp_path / "m"), lora=LoraSettings(r=2, target_modules="auto")).eval()
    ids = torch.randint(3, len(tokenizer), (1, 5))
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)  # LoRA B = 0
    assert load_tokenizer(str(tmp_path / "m")).get_vocab() == tokenizer.get_vocab()
