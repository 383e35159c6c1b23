"""Benchmark of pretraining: fit ``configs/pretrain/tiny.yaml`` (or another pretraining config) once.

    python bench/pretrain.py [--config configs/pretrain/tiny.yaml] [--seed 0] [--out bench/results] \
        [--args "<overrides>"]

Runs from the repository root with ``python train.py fit`` semantics, so the Hugging Face folder lands where the
config exports it (``checkpoints/pretrain/<name>/hf/model``). Writes ``<out>/pretrain.json`` (figures, the
validation curve, provenance); the last line printed is
``pretrain: params=<n> tokens=<n> val_ppl=<x> tokens_per_s=<x>``: parameters of the LM, training tokens (updates x
batch x block size), validation perplexity at the end, and training tokens per second of the training loop
(its validations included; corpus generation and tokenizer training excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

from cli_runs import TrainClock, csv_column, provenance, run_phase  # noqa: E402

from models.lm_factory import count_parameters  # noqa: E402


def figures(cli) -> dict:
    """The benchmark's figures of a fitted pretraining CLI."""
    trainer, data = cli.trainer, cli.datamodule
    clock = next(c for c in trainer.callbacks if type(c).__name__ == TrainClock.__name__)
    tokens = trainer.global_step * data.hparams.batch_size * data.hparams.block_size
    return {
        "params": count_parameters(cli.model.lm)[1],
        "tokens": tokens,
        "val_ppl": float(trainer.callback_metrics["val/ppl"]),
        "tokens_per_s": tokens / clock.seconds,
        "train_seconds": clock.seconds,
        "val_ppl_curve": csv_column(cli, "val/ppl"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pretrain/tiny.yaml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    parser.add_argument("--args", default="", help="extra overrides for the fit, e.g. '--trainer.max_steps 50'")
    args = parser.parse_args()
    source = provenance()
    os.chdir(REPO)
    with tempfile.TemporaryDirectory() as logs:
        cli, _, seconds = run_phase(args.config, args.seed, logs, "--trainer.callbacks+=cli_runs.TrainClock",
                                    *shlex.split(args.args), test=False)
        result = figures(cli) | {"fit_seconds": seconds, "config": args.config, "args": args.args,
                                 "model_folder": cli.model.hparams.export_dir, "provenance": source}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pretrain.json").write_text(json.dumps(result, indent=1))
    print(f"fit {seconds:.0f} s (training loop {result['train_seconds']:.0f} s); model: {result['model_folder']}")
    print(f"pretrain: params={result['params']} tokens={result['tokens']} val_ppl={result['val_ppl']:.3f} "
          f"tokens_per_s={result['tokens_per_s']:.0f}")


if __name__ == "__main__":
    main()
