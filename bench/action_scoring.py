"""Batched candidate-action scoring against one forward pass per candidate (the seed's way).

    python bench/action_scoring.py [--states 32] [--repeats 5] [--model tiny-smollm3]
    python bench/action_scoring.py --model smollm3-3b-shape --device cuda --dtype bfloat16 [--load-in-4bit]

States are web-shop pages visited by the scripted expert; each is scored over all of its candidate actions with
the same model both ways, in one run. ``smollm3-3b-shape`` is a model with SmolLM3-3B's configuration and random
weights (no download). Last line: ``action_scoring: speedup=<ratio> max_abs_diff=<x>``.
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
from models.lm_factory import build_causal_lm, build_tokenizer, quantize_4bit  # noqa: E402


def build_model(name: str, tokenizer, device: str, dtype: torch.dtype, load_in_4bit: bool) -> torch.nn.Module:
    """The tiny model, or one with SmolLM3-3B's shape and random weights; optionally 4-bit NF4."""
    if name == "smollm3-3b-shape":
        from transformers import SmolLM3Config

        name = SmolLM3Config(  # SmolLM3Config's defaults are SmolLM3-3B's sizes
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    with torch.device(device):  # initialise a large model where it will run
        model = build_causal_lm(name, tokenizer, dtype=dtype)
    if load_in_4bit:  # bitsandbytes quantises while loading saved weights
        model = quantize_4bit(model, dtype, device)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    parser.add_argument("--model", default="tiny-smollm3", help="tiny-smollm3, tiny-llama or smollm3-3b-shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (bitsandbytes)")
    args = parser.parse_args()

    prompts, candidates, texts = expert_states(args.states)
    tokenizer = build_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    model = build_model(args.model, tokenizer, args.device, getattr(torch, args.dtype), args.load_in_4bit)

    batched = score_candidates(model, tokenizer, prompts, candidates)
    naive = [naive_scores(model, tokenizer, p, c) for p, c in zip(prompts, candidates)]
    max_abs_diff = max(float((b - n).abs().max()) for b, n in zip(batched, naive))

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            best = min(best, time.perf_counter() - start)
        return best

    batched_s = timed(lambda: score_candidates(model, tokenizer, prompts, candidates))
    naive_s = timed(lambda: [naive_scores(model, tokenizer, p, c) for p, c in zip(prompts, candidates)])
    pairs = sum(len(c) for c in candidates)
    device = next(model.parameters()).device
    print(f"{len(prompts)} states, {pairs} candidates, {args.model} {args.dtype} 4-bit={args.load_in_4bit} {device}")
    print(f"batched: {batched_s * 1e3:.1f} ms   one pass per candidate: {naive_s * 1e3:.1f} ms")
    print(f"action_scoring: speedup={naive_s / batched_s:.2f} max_abs_diff={max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
