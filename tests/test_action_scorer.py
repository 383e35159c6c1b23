"""Batched candidate scoring equals one forward pass per candidate."""

import pytest
import torch

from envs.tiny_shop import TinyShopEnv
from envs.web_shop import WebShopEnv, make_catalog, make_goals
from models.action_scorer import batched_scores, choose_action, naive_scores, score_candidates
from models.lm_factory import LoraSettings, build_causal_lm, build_tokenizer
from models.lm_text import completion_loss


@pytest.fixture(scope="module")
def states():
    catalog = make_catalog()
    prompts, candidates = [], []
    for goal in make_goals(catalog, "train", 2):
        env = WebShopEnv(catalog, goal)
        while env.page != "done":
            prompts.append(env.observation() + "\nAction: ")
            candidates.append(env.candidate_actions())
            env.step(env.expert_action())
    shop = TinyShopEnv()
    prompts.append(shop.observation() + "\nAction: ")
    candidates.append(shop.candidate_actions())
    return prompts, candidates


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-smollm3"])
def lm(request, states, tmp_path_factory):
    prompts, candidates = states
    texts = prompts + [c for cs in candidates for c in cs]
    tokenizer = build_tokenizer(texts, vocab_size=400, cache_dir=tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    return build_causal_lm(request.param, tokenizer, hidden_size=32, num_heads=2).eval(), tokenizer


@pytest.mark.parametrize("length_normalize", [False, True])
def test_batched_scores_equal_naive_scores(lm, states, length_normalize):
    model, tokenizer = lm
    prompts, candidates = states
    batched = score_candidates(model, tokenizer, prompts, candidates, length_normalize)
    assert [len(b) for b in batched] == [len(c) for c in candidates]
    for prompt, cands, scores in zip(prompts, candidates, batched):
        naive = naive_scores(model, tokenizer, prompt, cands, length_normalize)
        assert torch.allclose(scores, naive, atol=1e-4), (scores - naive).abs().max()
        assert torch.allclose(batched_scores(model, tokenizer, prompt, cands, length_normalize), naive, atol=1e-4)


def test_length_normalisation_divides_by_token_count(lm, states):
    model, tokenizer = lm
    prompt, cands = states[0][0], states[1][0]
    total = batched_scores(model, tokenizer, prompt, cands)
    mean = batched_scores(model, tokenizer, prompt, cands, length_normalize=True)
    lengths = torch.tensor([len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in cands])
    assert torch.allclose(mean, total / lengths, atol=1e-5)
    assert (total < 0).all()


def test_choose_action_takes_the_best_and_rejects_empty_input(lm, states):
    model, tokenizer = lm
    prompt, cands = states[0][0], states[1][0]
    action, scores = choose_action(model, tokenizer, prompt, cands)
    assert action == cands[int(scores.argmax())]
    with pytest.raises(ValueError, match="no candidate"):
        batched_scores(model, tokenizer, prompt, [])
    with pytest.raises(ValueError, match="prompts but"):
        score_candidates(model, tokenizer, [prompt], [cands, cands])


def test_batched_scores_equal_naive_scores_through_a_lora_adapter(lm, states):
    model, tokenizer = lm
    torch.manual_seed(1)
    adapted = build_causal_lm(model.config, tokenizer, lora=LoraSettings(r=4)).eval()
    adapted.load_state_dict({f"base_model.model.{k}": v for k, v in model.state_dict().items()}, strict=False)
    for name, weight in adapted.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapter change the scores
            torch.nn.init.normal_(weight, std=0.5)
    prompts, candidates = states
    batched = score_candidates(adapted, tokenizer, prompts[:3], candidates[:3])
    for prompt, cands, scores in zip(prompts, candidates, batched):
        assert torch.allclose(scores, naive_scores(adapted, tokenizer, prompt, cands), atol=1e-4)
        assert not torch.allclose(scores, naive_scores(model, tokenizer, prompt, cands), atol=1e-3)


def test_completion_loss_equals_the_models_own_loss_and_its_gradients(lm, states):
    model, tokenizer = lm
    prompts, candidates = states
    rows = [tokenizer(p + c[0], add_special_tokens=False)["input_ids"] for p, c in zip(prompts[:3], candidates)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    attention_mask = (torch.arange(width) < torch.tensor([[len(r)] for r in rows])).long()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :5] = -100  # an unlabelled prompt
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    expected_grad = torch.autograd.grad(expected, model.get_output_embeddings().weight)[0]
    loss = completion_loss(model, input_ids, attention_mask, labels)
    grad = torch.autograd.grad(loss, model.get_output_embeddings().weight)[0]
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(grad, expected_grad, atol=1e-6)
