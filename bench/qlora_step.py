"""Training throughput and peak memory of the early-experience LM loss with LoRA on 4-bit (QLoRA) weights.

    python bench/qlora_step.py [--model tiny-smollm3] [--steps 5] [--batch-size 4]
    python bench/qlora_step.py --model smollm3-3b-shape --device cuda --dtype bfloat16 --load-in-4bit

A few optimiser steps on web-shop IL / IWM / SR examples (completion-only loss), LoRA r 16, alpha 32, dropout
0.05 on q, k, v, o, gate, up and down (the seed's settings). ``smollm3-3b-shape`` has SmolLM3-3B's configuration
and random weights. Tokens/s counts every non-padding token of the batches after a warm-up step. Last line:
``qlora_step: tokens_per_s=<x> peak_mem_gib=<y> loss_first=<a> loss_last=<b>``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from action_scoring import build_model, sync  # noqa: E402

from datamodules.early_experience import EarlyExperienceDataModule  # noqa: E402

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(datamodule: EarlyExperienceDataModule, batch_size: int, count: int, seed: int = 0):
    """``count`` batches mixing the IL, IWM and SR pools (the recipes' three kinds of example)."""
    rng = random.Random(seed)
    pool = [e for kind in ("il", "iwm", "sr") for e in datamodule.pools[kind]]
    return [datamodule.collate(rng.sample(pool, batch_size)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-smollm3", help="tiny-smollm3, tiny-llama or smollm3-3b-shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()

    datamodule = EarlyExperienceDataModule(env="web_shop", train_goals=40, eval_goals=1, recipe="sr")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = build_model(args.model, datamodule.tokenizer, args.device, dtype, args.load_in_4bit)
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=SEED_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora).train()  # adapters go where the base weights are
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    losses, tokens, seconds = [], 0, 0.0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step, batch in enumerate(batches(datamodule, args.batch_size, args.steps + 1)):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        sync(args.device)
        start = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        losses.append(float(loss))
        if step > 0:  # the first step is a warm-up
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    changed = any(not torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    # A 4-bit weight is stored packed, two to a byte; its quant_state keeps the unpacked shape.
    total = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in model.parameters())
    train = sum(p.numel() for p in trainable)
    print(
        f"{args.model} {args.dtype} 4-bit={args.load_in_4bit} on {args.device}: {total / 1e6:.1f} M parameters, "
        f"{train / 1e6:.2f} M trainable (LoRA); {args.steps} steps of {args.batch_size} sequences; "
        f"LoRA weights changed: {changed}"
    )
    print(f"losses: {' '.join(f'{x:.3f}' for x in losses)}")
    print(
        f"qlora_step: tokens_per_s={tokens / seconds:.0f} peak_mem_gib={peak:.2f} "
        f"loss_first={losses[0]:.3f} loss_last={losses[-1]:.3f}"
    )


if __name__ == "__main__":
    main()
