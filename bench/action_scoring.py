"""Batched candidate-action scoring against one forward pass per candidate (the seed's way).

    python bench/action_scoring.py [--states 32] [--repeats 5] [--model tiny-smollm3]

States are web-shop pages visited by the scripted expert; each is scored over all of its candidate actions with
the same tiny model both ways, in one run. Last line: ``action_scoring: speedup=<ratio> max_abs_diff=<x>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.web_shop import WebShopEnv, make_catalog, make_goals  # noqa: E402
from models.action_scorer import naive_scores, score_candidates  # noqa: E402
from models.lm_factory import build_causal_lm, build_tokenizer  # noqa: E402


def expert_states(count: int) -> tuple[list[str], list[list[str]], list[str]]:
    """Prompts and candidate lists of ``count`` expert-visited pages, and the text to train a tokenizer on."""
    catalog = make_catalog()
    prompts, candidates, texts = [], [], []
    for goal in make_goals(catalog, "train", count):
        env = WebShopEnv(catalog, goal)
        while env.page != "done":
            prompts.append(f"{env.observation()}\nAction: ")
            candidates.append(env.candidate_actions())
            texts += [env.observation(), *env.candidate_actions()]
            env.step(env.expert_action())
    return prompts[:count], candidates[:count], texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="tiny-smollm3")
    args = parser.parse_args()

    prompts, candidates, texts = expert_states(args.states)
    tokenizer = build_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    model = build_causal_lm(args.model, tokenizer).eval()

    batched = score_candidates(model, tokenizer, prompts, candidates)
    naive = [naive_scores(model, tokenizer, p, c) for p, c in zip(prompts, candidates)]
    max_abs_diff = max(float((b - n).abs().max()) for b, n in zip(batched, naive))

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    batched_s = timed(lambda: score_candidates(model, tokenizer, prompts, candidates))
    naive_s = timed(lambda: [naive_scores(model, tokenizer, p, c) for p, c in zip(prompts, candidates)])
    pairs = sum(len(c) for c in candidates)
    print(f"{len(prompts)} states, {pairs} candidates, model {args.model} on {next(model.parameters()).device}")
    print(f"batched: {batched_s * 1e3:.1f} ms   one pass per candidate: {naive_s * 1e3:.1f} ms")
    print(f"action_scoring: speedup={naive_s / batched_s:.2f} max_abs_diff={max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
