"""Training throughput of this project's LM path (``CausalLMSFT`` in a Lightning ``Trainer``, as ``train.py fit``
runs it, non-finite guard included) against ``transformers.Trainer``, on the same model and the same batches.

    python bench/lm_throughput.py                                   # tiny model on the CPU
    python bench/lm_throughput.py --device cuda --model smollm3-3b-shape --load-in-4bit --lora \\
        --precision bf16-mixed --batch-size 8 --seq-len 512 --steps 20

Both sides start from the same weights (built twice from one seed), take AdamW steps at a constant rate without
gradient clipping on the same full-length random token rows (loss on every token), and are timed from the end of
the warm-up steps to the end of the last step (wall clock: data loading, logging and callbacks included).
``smollm3-3b-shape`` has SmolLM3-3B's configuration and random weights. MFU (GPU only) counts 6 N FLOPs per token
for full fine-tuning and 4 N + 6 N_lora with LoRA (forward and input gradients through the frozen base, weight
gradients only for the adapter; attention scores left out), over ``--peak-tflops``. Last line:
``lm_throughput: ours_tokens_per_s=<x> hf_trainer_tokens_per_s=<x> ratio=<x> mfu=<x or nan on CPU>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from action_scoring import build_model, sync  # noqa: E402

from models.lm_factory import build_tokenizer, lora_targets  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H100_H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM


def make_model(args, tokenizer) -> torch.nn.Module:
    """The benchmark's model (the same weights at every call), with a LoRA adapter unless ``--full``."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    if args.load_in_4bit and args.precision.startswith("bf16"):
        dtype = torch.bfloat16  # the 4-bit layers compute in bf16
    model = build_model(args.model, tokenizer, args.device, dtype, args.load_in_4bit).train()
    if args.full:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=lora_targets(model, LORA_TARGETS), task_type="CAUSAL_LM")
    return get_peft_model(model, config).train()


def make_batches(vocab: int, count: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def time_ours(args, tokenizer, batches) -> float:
    """Seconds of the timed steps through ``CausalLMSFT`` in a Lightning ``Trainer``."""
    from lightning.pytorch import Callback, Trainer
    from torch.utils.data import DataLoader

    from lightning_modules.sft import CausalLMSFT

    class StepClock(Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            sync(args.device)
            if trainer.global_step == args.warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    module = CausalLMSFT(optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
                         export=False)
    module.tokenizer, module.lm = tokenizer, make_model(args, tokenizer)  # build() keeps a model set beforehand
    clock = StepClock()
    Trainer(accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1, precision=args.precision,
            max_steps=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=args.progress_bar,
            enable_model_summary=False, limit_val_batches=0, callbacks=[clock],
            default_root_dir=tempfile.mkdtemp()).fit(module, DataLoader(batches, batch_size=None))
    return clock.end - clock.start


def time_hf_trainer(args, tokenizer, batches) -> float:
    """Seconds of the timed steps through ``transformers.Trainer`` (the same rows, batched alike)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start = self.end = 0.0

        def on_step_end(self, training_args, state, control, **kwargs) -> None:
            sync(args.device)
            if state.global_step == args.warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(batch["input_ids"]))]
    clock = StepClock()
    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=len(batches), per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        optim="adamw_torch", bf16=args.precision == "bf16-mixed", use_cpu=not args.device.startswith("cuda"),
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=not args.progress_bar,
        dataloader_num_workers=0, seed=0)
    Trainer(model=make_model(args, tokenizer), args=training_args, train_dataset=rows,
            data_collator=default_data_collator, callbacks=[clock]).train()
    return clock.end - clock.start


def flops_per_token(model: torch.nn.Module, full: bool) -> float:
    """6 N for full fine-tuning; 4 N + 6 N_lora with LoRA (N counts a 4-bit weight at its unpacked size)."""
    total = sum(p.quant_state.shape.numel() if hasattr(p, "quant_state") else p.numel() for p in model.parameters())
    if full:
        return 6.0 * total
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4.0 * (total - adapter) + 6.0 * adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-smollm3", help="tiny-smollm3, tiny-llama or smollm3-3b-shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--load-in-4bit", action="store_true")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="full", action="store_false", help="train a LoRA adapter (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="train every weight")
    parser.set_defaults(full=False)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_TFLOPS, help="the card's bf16 peak")
    parser.add_argument("--progress-bar", action="store_true", help="show both trainers' progress bars")
    args = parser.parse_args()
    if args.load_in_4bit and args.full:
        parser.error("--load-in-4bit trains through a LoRA adapter: drop --full")
    if args.precision == "bf16-true" and not args.full:
        parser.error("bf16-true is for full fine-tuning here: use bf16-mixed with LoRA")

    tokenizer = build_tokenizer([f"item {i} costs {i % 97} dollars" for i in range(2000)], vocab_size=512)
    batches = make_batches(len(tokenizer), args.warmup + args.steps, args.batch_size, args.seq_len)
    tokens = args.steps * args.batch_size * args.seq_len
    ours = tokens / time_ours(args, tokenizer, batches)
    hf = tokens / time_hf_trainer(args, tokenizer, batches)
    flops = flops_per_token(make_model(args, tokenizer), args.full)
    mfu = ours * flops / (args.peak_tflops * 1e12) if args.device.startswith("cuda") else float("nan")
    print(f"{args.model} {'full' if args.full else 'LoRA r 16'} 4-bit={args.load_in_4bit} {args.precision} on "
          f"{args.device}: {args.steps} timed steps of {args.batch_size} x {args.seq_len} tokens, "
          f"{flops / 6e6:.2f} M parameter-equivalents")
    print(f"lm_throughput: ours_tokens_per_s={ours:.0f} hf_trainer_tokens_per_s={hf:.0f} ratio={ours / hf:.3f} "
          f"mfu={mfu:.4f}")


if __name__ == "__main__":
    main()
