"""The gold judge of the story corpus: clean generated stories are clean, every corruption is caught, and the gold
win rate of the RL evaluation against a hand count."""

import random

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.text_corpus import CORRUPTIONS, PreferenceDataModule, PromptDataModule, corrupt, generate_stories
from envs.story_judge import CHECKS, gold_score, judge, protagonist
from lightning_modules.ppo import PPORLHF
from models.lm_factory import LMSettings, LoraSettings
from tests.conftest import TINY_STORIES as DATA

STORY = ("Once upon a time, there was a brave fox named Mia. She lived by the sea. One day, Mia found a red ball "
         "in the grass. She was very happy. Mia shared the red ball with a tiny mouse. A tiny mouse liked the red "
         "ball too. In the end, Mia smiled and was happy.")
PROMPT = "Once upon a time, there was a brave fox named Mia."


def test_generated_stories_are_clean():
    for story in generate_stories(200, seed=7):
        verdict = judge(story.text, story.sentences[0])
        assert verdict.clean and verdict.score == 0.0, (story.text, verdict)
        assert gold_score(story.sentences[0], " ".join(story.sentences[1:])) == 0.0


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_corruption_scores_worse_than_the_clean_story_and_trips_its_check(kind):
    rng = random.Random(kind)
    for story in generate_stories(200, seed=11):
        verdict = judge(corrupt(story.sentences, kind, rng, story), story.sentences[0])
        assert verdict.score < judge(story.text, story.sentences[0]).score
        has_pronoun = any(s.startswith(("She ", "He ")) for s in story.sentences)
        check = {"shuffle": "order", "name": "name", "object": "object"}.get(kind, "pronoun" if has_pronoun else
                                                                             "order")  # no pronoun: reordered
        assert verdict.violations[check] > 0, (kind, verdict)


def test_the_judge_prefers_the_chosen_text_of_every_preference_pair(cache):
    pairs = PreferenceDataModule(**DATA, tokenizer_cache=cache).pairs("train")
    for chosen, rejected in pairs:
        prompt = chosen.split(". ")[0] + "."
        assert judge(chosen, prompt).clean and judge(rejected, prompt).score < 0


def test_each_check_by_hand():
    assert judge(STORY, PROMPT).clean
    assert protagonist(PROMPT) == ("Mia", "she")
    cases = {  # an edit of the clean story -> the violations it makes
        ("She was very happy.", "She was a little sad."): {"mood": 1},  # a sad feeling, a happy ending
        ("A tiny mouse liked", "An old owl liked"): {"friend": 1},
        ("She lived", "He lived"): {"pronoun": 1},
        ("Mia shared", "Tom shared"): {"name": 1},
        ("Mia shared the red ball", "Mia shared the blue kite"): {"object": 1},
        ("She was very happy.", "She was very happy. She was very happy."): {"order": 1},  # a repeat
        (" In the end, Mia smiled and was happy.", ""): {"missing": 1},  # no ending
        ("She lived by the sea.", "She lived by the moon."): {"unparsed": 1},  # no template writes this
    }
    for (old, new), expected in cases.items():
        verdict = judge(STORY.replace(old, new), PROMPT)
        assert verdict.violations == {c: expected.get(c, 0) for c in CHECKS}, (new, verdict)
        assert verdict.score == -sum(expected.values())
    assert judge(PROMPT, PROMPT).violations["missing"] == 3  # the opening alone: no find, action or ending
    with pytest.raises(ValueError, match="not the opening"):
        judge(STORY, "She lived by the sea.")


def test_gold_win_rate_and_scores_of_the_rl_evaluation_against_a_hand_count(cache):
    data = PromptDataModule(**DATA, tokenizer_cache=cache, batch_size=8, eval_batch_size=4)
    module = PPORLHF(lm=LMSettings(hidden_size=32, num_layers=1, num_heads=2, lora=LoraSettings(r=4, alpha=32.0)),
                     max_new_tokens=8, minibatch_size=4)
    module.build(data.tokenizer)
    # Per prompt (policy vs reference): clean vs empty (0 vs -3: a win), clean vs clean (a tie), empty vs clean (a
    # loss), one unparsed sentence and nothing else vs empty (-4 vs -3: a loss).
    pick = {"clean": lambda c: c, "empty": lambda c: "", "garbled": lambda c: "Hello world."}
    policy, reference = ["clean", "clean", "empty", "garbled"], ["empty", "clean", "clean", "empty"]

    def compare(batch, generator=None):
        completions = [data.prompt_and_completion(int(i))[1] for i in batch["index"]]
        n = len(completions)
        return {"reward": torch.zeros(n), "reward_ref": torch.zeros(n), "kl": torch.zeros(n), "length": torch.ones(n),
                "texts": [pick[k](c) for k, c in zip(policy, completions)],
                "ref_texts": [pick[k](c) for k, c in zip(reference, completions)]}

    module.compare = compare
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/gold_win_rate"] == pytest.approx(1.5 / 4)
    assert metrics["val/gold_score"] == pytest.approx((0 + 0 - 3 - 4) / 4)
    assert metrics["val/gold_score_ref"] == pytest.approx((-3 + 0 + 0 - 3) / 4)
    assert metrics["val/win_rate"] == pytest.approx(0.5)  # the proxy saw only ties
