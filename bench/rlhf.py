"""Benchmark of the small-LM RLHF pipeline on the offline story corpus: SFT -> reward model -> PPO, and agentic SFT.

    python bench/rlhf.py [--seeds 0 1 2] [--jobs 3 --threads 1] [--out bench/results] [--ppo-steps N]

Every phase runs with ``python train.py fit`` semantics from ``configs/rlhf/*.yaml`` (the later phases start from
the earlier checkpoints through ``init_from``), then is tested on the held-out split: SFT perplexity, reward-model
pairwise accuracy on held-out pairs, PPO against the SFT model on the same held-out prompts (paired win rate judged
by the reward model, reward delta, sequence KL, ROUGE/BLEU against the held-out completions, Distinct-1/2), and
the agentic SFT model's tool-call accuracy. Writes ``<out>/rlhf.json`` (``<out>/rlhf_<seed>.json`` per seed with
``--seeds`` of one); the last line printed is
``rlhf: rm_acc=<x> win_rate=<y> kl=<z> tool_call_acc=<w> rollout_tokens_per_s=<t>`` (means over seeds).
``--accelerator gpu`` runs every phase on one GPU; ``--ppo-args "<overrides>"`` passes extra settings to the PPO
phase (the sweep in ``docs/rlhf.md``); ``--plot <png>`` draws the PPO curves; ``--merge <json> ...`` combines the
runs of earlier result files (to merge seeds run apart, or to redraw) without training. The per-seed lines also
give the largest training KL, to compare with the controller's band (``kl_target`` x 0.8 to 1.2).

Every file written records ``provenance`` (commit, uncommitted changes, library and Python versions; see
``cli_runs.provenance``); with ``--merge`` each run also keeps the provenance of the file it came from (``null`` for
files written before provenance was recorded).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from cli_runs import add_wandb_option, csv_column, in_processes, provenance, run_phase, start_wandb, test_phase  # noqa: E402

from models.lm_rollout import AdaptiveKLController  # noqa: E402

CONFIGS = {name: str(REPO / f"configs/rlhf/{name}.yaml") for name in ("sft", "reward", "ppo", "agentic_sft")}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    device = ["--trainer.accelerator", args.accelerator, "--trainer.devices", "1"]
    with tempfile.TemporaryDirectory() as root:
        out: dict = {"seed": seed}
        sft, out["sft"], out["sft_seconds"] = run_phase(
            CONFIGS["sft"], seed, f"{root}/sft", "--trainer.max_epochs", str(args.sft_epochs), *device
        )
        sft_ckpt = sft.trainer.checkpoint_callback.last_model_path
        rm, out["reward"], out["reward_seconds"] = run_phase(
            CONFIGS["reward"],
            seed,
            f"{root}/rm",
            "--trainer.max_epochs",
            str(args.rm_epochs),
            "--model.init_args.init_from",
            sft_ckpt,
            *device,
        )
        rm_ckpt = rm.trainer.checkpoint_callback.last_model_path
        steps = ["--trainer.max_steps", str(args.ppo_steps)] if args.ppo_steps else []
        ppo, _, out["ppo_seconds"] = run_phase(
            CONFIGS["ppo"],
            seed,
            f"{root}/ppo",
            *steps,
            "--model.init_args.init_from",
            sft_ckpt,
            "--model.init_args.reward_model_from",
            rm_ckpt,
            *device,
            *shlex.split(args.ppo_args),
            test=False,
        )
        out["ppo_curve"] = {k: csv_column(ppo, f"train/{k}") for k in ("score", "kl", "kl_coef")}
        out["ppo_val"] = {k: csv_column(ppo, f"val/{k}") for k in ("win_rate", "tie_rate", "reward_delta", "kl")}
        speeds = [v for _, v in csv_column(ppo, "train/rollout_tokens_per_s")]
        out["rollout_tokens_per_s"] = statistics.median(speeds) if speeds else float("nan")
        out["kl_target"] = ppo.model.hparams.kl_target
        out["kl_rollbacks"] = int(ppo.model.rollback_count)  # rollouts rejected by the KL guard (or non-finite)
        out["ppo_steps"] = ppo.trainer.global_step
        # The policy the run ends with, then (when the config keeps one) the checkpoint with the best validation
        # win rate in the KL band, which is the reported policy.
        out["ppo"] = out["ppo_last"] = test_phase(ppo)
        best = ppo.trainer.checkpoint_callback
        if best is not None and best.monitor and best.best_model_path:
            out["ppo_selected_step"] = torch.load(best.best_model_path, map_location="cpu", weights_only=True)[
                "global_step"]
            out["ppo"] = test_phase(ppo, ckpt_path="best")
        _, out["agentic"], out["agentic_seconds"] = run_phase(
            CONFIGS["agentic_sft"], seed, f"{root}/agentic", "--trainer.max_epochs", str(args.agentic_epochs), *device
        )
    return out


KL_BAND = 1 + AdaptiveKLController.max_error  # the controller saturates above KL_BAND x kl_target (and below 2 - it)


def kl_band(result: dict) -> dict[str, float]:
    """The training KL (mean sequence KL of each rollout batch) against the controller's band: its maximum, the
    share of rollouts above ``KL_BAND x kl_target`` (rejected ones included), the share rejected by the KL guard
    and the mean of the last quarter of the run."""
    kls = [v for _, v in sorted(result["ppo_curve"]["kl"])]
    target = result.get("kl_target") or float("inf")
    if not kls:
        return {"kl_max": float("nan"), "kl_above_band": float("nan"), "kl_rejected": float("nan"),
                "kl_last_quarter": float("nan")}
    return {"kl_max": max(kls), "kl_above_band": sum(k > KL_BAND * target for k in kls) / len(kls),
            "kl_rejected": result.get("kl_rollbacks", 0) / len(kls),
            "kl_last_quarter": statistics.mean(kls[-max(1, len(kls) // 4):])}


def summary(results: list[dict]) -> dict[str, float]:
    def mean(path: tuple[str, str]) -> float:
        return statistics.mean(r[path[0]][path[1]] if path[1] else r[path[0]] for r in results)

    return {
        "kl_max": max(kl_band(r)["kl_max"] for r in results),
        "kl_above_band": statistics.mean(kl_band(r)["kl_above_band"] for r in results),
        "kl_rejected": statistics.mean(kl_band(r)["kl_rejected"] for r in results),
        "tie_rate": statistics.mean(r["ppo"].get("test/tie_rate", float("nan")) for r in results),
        "sft_ppl": mean(("sft", "test/ppl")),
        "rm_acc": mean(("reward", "test/acc")),
        "win_rate": mean(("ppo", "test/win_rate")),
        "reward_delta": mean(("ppo", "test/reward_delta")),
        "kl": mean(("ppo", "test/kl")),
        "tool_call_acc": mean(("agentic", "test/tool_call_acc")),
        "rollout_tokens_per_s": mean(("rollout_tokens_per_s", "")),
    }


def plot_curves(results: list[dict], path: Path) -> None:
    """PPO's reward-model score and sequence KL over training steps, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for r in results:
        for ax, key in zip(axes[:2], ("score", "kl")):
            points = sorted(dict(r["ppo_curve"][key]).items())
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f"seed {r['seed']}")
        points = sorted(dict(r["ppo_val"]["win_rate"]).items())
        line = axes[2].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"seed {r['seed']}")
        kls = dict(r["ppo_val"]["kl"])
        in_band = [p for p in points if kls[p[0]] <= KL_BAND * (r.get("kl_target") or float("inf"))]
        if "ppo_selected_step" in r and in_band:  # the checkpoint kept: the first best validation in band
            step, win_rate = max(in_band, key=lambda p: (p[1], -p[0]))
            axes[2].plot([step], [win_rate], marker="*", ms=14, color=line[0].get_color())
    target = results[0].get("kl_target")
    if target:
        axes[1].axhline(target, color="grey", ls="--", lw=1, label="kl_target")
        axes[1].axhspan((2 - KL_BAND) * target, KL_BAND * target, color="grey", alpha=0.15, label="controller band")
    axes[2].axhline(0.5, color="grey", ls="--", lw=1)
    titles = ("train/score (reward model)", "train/kl (sequence, nats)", "val/win_rate vs SFT (star: policy kept)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("training batch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--rm-epochs", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=None, help="PPO optimiser steps (default: the config's)")
    parser.add_argument("--agentic-epochs", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: all cores / jobs)")
    parser.add_argument("--accelerator", default="cpu", help="every phase's trainer accelerator (cpu, gpu)")
    parser.add_argument("--ppo-args", default="", help='extra PPO overrides, e.g. "--model.init_args.gae_lambda 0.95"')
    parser.add_argument("--merge", nargs="*", default=None, help="combine the runs of earlier JSON files; no training")
    parser.add_argument("--plot", default=None, help="write the PPO curves to this PNG")
    add_wandb_option(parser)
    args = parser.parse_args()
    source = provenance()  # of the code that runs (or merges), taken before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        files = [json.loads(Path(p).read_text()) for p in args.merge]
        results = [r | {"provenance": r.get("provenance", f.get("provenance"))} for f in files for r in f["runs"]]
        settings = files[0]["settings"] | {"seeds": [r["seed"] for r in results]}
    else:
        start_wandb(args, "rlhf")
        settings = vars(args).copy()
        results = []
        for result in in_processes(run_seed, [(seed, args) for seed in args.seeds], args.jobs, args.threads):
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if not k.startswith("ppo_")}, indent=1), flush=True)
        results.sort(key=lambda r: r["seed"])
    settings = {k: v for k, v in settings.items() if k not in ("merge", "plot", "out", "jobs")}  # no machine paths
    figures = summary(results)
    name = f"rlhf_{results[0]['seed']}.json" if len(results) == 1 and not args.merge else "rlhf.json"
    record = {"provenance": source, "settings": settings, "summary": figures, "runs": results}
    (out / name).write_text(json.dumps(record, indent=1))
    if args.plot:
        plot_curves(results, Path(args.plot))
    for r in results:
        print(
            f"seed {r['seed']}: ppl={r['sft']['test/ppl']:.3f} rm_acc={r['reward']['test/acc']:.3f} "
            f"win_rate={r['ppo']['test/win_rate']:.3f} reward_delta={r['ppo']['test/reward_delta']:+.3f} "
            f"kl={r['ppo']['test/kl']:.3f} train_kl_max={kl_band(r)['kl_max']:.2f} "
            f"rejected={kl_band(r)['kl_rejected']:.2f} selected_step={r.get('ppo_selected_step', 'last')} "
            f"last_win_rate={r.get('ppo_last', r['ppo'])['test/win_rate']:.3f} "
            f"last_kl={r.get('ppo_last', r['ppo'])['test/kl']:.3f} "
            f"tool_call_acc={r['agentic']['test/tool_call_acc']:.3f}"
        )
    print(
        f"rlhf: rm_acc={figures['rm_acc']:.3f} win_rate={figures['win_rate']:.3f} kl={figures['kl']:.3f} "
        f"tool_call_acc={figures['tool_call_acc']:.3f} rollout_tokens_per_s={figures['rollout_tokens_per_s']:.0f}"
    )


if __name__ == "__main__":
    main_bench()
