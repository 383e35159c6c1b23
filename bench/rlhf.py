"""Benchmark of the small-LM RLHF pipeline on the offline story corpus: per seed SFT -> reward model -> PPO, GRPO and
DPO from the same SFT checkpoint, each judged by the same reward model (proxy) and by the gold judge; agentic SFT.

    python bench/rlhf.py [--seeds 0 1 2] [--methods ppo grpo dpo] [--jobs 3 --threads 1] [--out bench/results]
    python bench/rlhf.py --seeds 0 1 2 3 4 --jobs 3 --threads 1     # PPO's KL band over 5 seeds
    python bench/rlhf.py --smoke --seeds 0 --threads 1 --out <folder>   # the wiring in minutes (not a result)

Every phase runs with ``python train.py fit`` semantics from ``configs/rlhf/*.yaml`` (the later phases start from
the earlier checkpoints through ``init_from``), then is tested on the held-out split: SFT perplexity, reward-model
pairwise accuracy on held-out pairs, each policy method against the SFT model on the same held-out prompts (paired
win rate judged by the reward model, ``test/win_rate``, and by the gold judge ``envs/story_judge.py``,
``test/gold_win_rate``; reward delta, sequence KL ``test/kl``, ROUGE/BLEU against the held-out completions,
Distinct-1/2), and the agentic SFT model's tool-call accuracy. Each method reports the policy its config keeps
(PPO: best validation win rate in the KL band; GRPO: best validation win rate; DPO: lowest validation DPO loss) and
the one it ends with (``<method>_last``). Per method the bench prints the spread over seeds (mean +- std [min, max])
of the proxy and gold win rates and the KL, and whether proxy and gold agree in sign (both above or both below
0.5); for PPO per seed the kept and final policies' test KL and whether each is in the KL band
(``PPORLHF.in_kl_band``), the largest training KL of the accepted rollouts and of all rollouts (every rollout is
recorded by ``cli_runs.PPORollouts``), and the rollbacks (rejected rollouts and iterations).

Writes ``<out>/rlhf.json`` (``<out>/rlhf_<seed>.json`` per seed with ``--seeds`` of one; ``rlhf_smoke*`` with
``--smoke``); the last line printed is ``rlhf: rm_acc=<x> win_rate=<y> kl=<z> tool_call_acc=<w>
rollout_tokens_per_s=<t> gold_win_rate=<g> grpo_gold=<g> dpo_gold=<g> agentic_success=<s> agentic_sft_success=<s>``
(means over seeds; win_rate, kl and gold_win_rate are PPO's; ``nan`` for what did not run; agentic_* are the
held-out task success of agentic GRPO and of the agentic SFT model it starts from, see ``agentic_rl``).
``--accelerator gpu`` runs every phase on one GPU; ``--ppo-args "<overrides>"`` (and
``--grpo-args``, ``--dpo-args``) pass extra settings to a method (the sweep in ``docs/rlhf.md``); ``--plot <png>``
draws the PPO curves; ``--merge <json> ...`` combines the runs of earlier result files seed by seed, a later file's
methods replacing an earlier one's (to merge seeds or methods run apart, or to redraw) without training; ``--keep
<folder>`` keeps each seed's SFT model and reward model there and reuses them in a later run (to add a method);
``--wandb`` also logs every run to W&B, with the phase or method as job type.

Every file written records ``provenance`` (commit, uncommitted changes, library and Python versions; see
``cli_runs.provenance``); with ``--merge`` each run keeps the provenance of the files its entries came from (``null``
for files written before provenance was recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from cli_runs import add_wandb_option, csv_column, in_processes, provenance, run_phase, start_wandb, test_phase  # noqa: E402

from models.lm_rollout import AdaptiveKLController  # noqa: E402

CONFIGS = {name: str(REPO / f"configs/rlhf/{name}.yaml")
           for name in ("sft", "reward", "ppo", "grpo", "dpo", "agentic_sft", "agentic_grpo")}
METHODS = ("ppo", "grpo", "dpo")
"""The policy methods, each started from the seed's SFT checkpoint and judged by its reward model."""
NAN = float("nan")


def smoke_overrides(phase: str) -> list[str]:
    """``--smoke``: every phase cut to a few batches on a 400-story corpus (the same for every phase, so they share
    one tokenizer) and 16-token responses, to check the wiring in minutes; its figures are not results."""
    if phase == "agentic_sft":
        return ["--data.init_args.num_train_tasks", "64", "--data.init_args.num_eval_tasks", "20"]
    corpus = ["--data.init_args.num_stories", "400", "--trainer.limit_val_batches", "2",
              "--trainer.limit_test_batches", "2"]
    if phase in ("sft", "reward"):
        return [*corpus, "--trainer.limit_train_batches", "4"]
    short = [*corpus, "--model.init_args.max_new_tokens", "16"]
    if phase == "dpo":
        return [*short, "--trainer.limit_train_batches", "4"]
    return [*short, "--trainer.max_steps", "8", "--trainer.val_check_interval", "4"]  # ppo, grpo: 2 rollouts


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    device = ["--trainer.accelerator", args.accelerator, "--trainer.devices", "1"]

    def phase_args(phase: str) -> list[str]:
        return [*device, *(smoke_overrides(phase) if args.smoke else [])]

    with tempfile.TemporaryDirectory() as scratch:
        root = str(Path(args.keep) / f"seed{seed}") if args.keep else scratch
        out: dict = {"seed": seed}
        start_state = sft_and_reward_model(seed, args, root, phase_args)
        out |= start_state["metrics"]
        start = ["--model.init_args.init_from", start_state["sft"],
                 "--model.init_args.reward_model_from", start_state["reward"]]
        for method in args.methods:
            overrides = [*start, *method_length(method, args), *phase_args(method),
                         *shlex.split(getattr(args, f"{method}_args"))]
            out |= run_ppo(seed, f"{root}/ppo", overrides) if method == "ppo" else run_policy(
                method, seed, f"{root}/{method}", overrides)[1]
        if args.no_agentic:
            return out
        epochs = ["--trainer.max_epochs", str(args.agentic_epochs)] if args.agentic_epochs else []
        agentic, out["agentic"], out["agentic_seconds"] = run_phase(
            CONFIGS["agentic_sft"], seed, f"{root}/agentic", *epochs, *phase_args("agentic_sft"))
        if not args.no_agentic_rl:
            out["agentic_rl"] = agentic_rl(seed, f"{root}/agentic_rl", agentic.trainer.checkpoint_callback
                                           .last_model_path, [*phase_args("agentic_sft"), *agentic_rl_length(args)])
    return out


START_SETTINGS = ("sft_epochs", "rm_epochs", "smoke", "accelerator")
"""The options the SFT and reward-model checkpoints depend on (``--keep`` reuses them only when these match)."""


def sft_and_reward_model(seed: int, args: argparse.Namespace, root: str, phase_args) -> dict:
    """Train the seed's SFT model and reward model in ``root``, or, with ``--keep``, reuse the ones an earlier run
    left there with the same settings: ``{"sft": ckpt, "reward": ckpt, "metrics": their test metrics and times}``."""
    record = Path(root) / "start.json"
    settings = {k: getattr(args, k) for k in START_SETTINGS}
    if args.keep and record.exists():
        kept = json.loads(record.read_text())
        if kept["settings"] != settings:
            raise SystemExit(f"Error: --keep {args.keep}: seed {seed}'s SFT and reward model were trained with "
                             f"{kept['settings']}, not {settings}; use another folder")
        return kept
    metrics: dict = {}
    sft, metrics["sft"], metrics["sft_seconds"] = run_phase(
        CONFIGS["sft"], seed, f"{root}/sft", "--trainer.max_epochs", str(args.sft_epochs), *phase_args("sft"))
    sft_ckpt = sft.trainer.checkpoint_callback.last_model_path
    del sft
    rm, metrics["reward"], metrics["reward_seconds"] = run_phase(
        CONFIGS["reward"], seed, f"{root}/rm", "--trainer.max_epochs", str(args.rm_epochs),
        "--model.init_args.init_from", sft_ckpt, *phase_args("reward"))
    state = {"settings": settings, "sft": sft_ckpt, "reward": rm.trainer.checkpoint_callback.last_model_path,
             "metrics": metrics}
    if args.keep:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(state, indent=1))
    return state


def method_length(method: str, args: argparse.Namespace) -> list[str]:
    """The training length a method's options set (none: its config's)."""
    if method == "dpo":
        return ["--trainer.max_epochs", str(args.dpo_epochs)] if args.dpo_epochs else []
    steps = getattr(args, f"{method}_steps")
    return ["--trainer.max_steps", str(steps)] if steps else []


def run_policy(method: str, seed: int, folder: str, overrides: list[str]) -> tuple[object, dict]:
    """Fit one policy method and test the policy it ends with (``<method>_last``) and the one its config's
    ModelCheckpoint keeps (``<method>``: PPO's best validation win rate in the KL band, GRPO's best validation win
    rate, DPO's lowest validation DPO loss; the last one when none was kept)."""
    cli, _, seconds = run_phase(CONFIGS[method], seed, folder, *overrides, test=False)
    out = {f"{method}_seconds": seconds, f"{method}_steps": cli.trainer.global_step}
    out[method] = out[f"{method}_last"] = test_phase(cli)
    best = cli.trainer.checkpoint_callback
    if best is not None and best.monitor and best.best_model_path:
        out[f"{method}_selected_step"] = torch.load(best.best_model_path, map_location="cpu", weights_only=True)[
            "global_step"]
        out[method] = test_phase(cli, ckpt_path="best")
    return cli, out


def run_ppo(seed: int, folder: str, overrides: list[str]) -> dict:
    """PPO as ``run_policy``, with its training curves, every rollout's KL and the KL-band report."""
    ppo, out = run_policy("ppo", seed, folder, [*overrides, "--trainer.callbacks+=cli_runs.PPORollouts"])
    out["ppo_curve"] = {k: csv_column(ppo, f"train/{k}") for k in ("score", "kl", "kl_coef")}
    out["ppo_val"] = {k: csv_column(ppo, f"val/{k}") for k in ("win_rate", "tie_rate", "reward_delta", "kl")}
    speeds = [v for _, v in csv_column(ppo, "train/rollout_tokens_per_s")]
    out["rollout_tokens_per_s"] = statistics.median(speeds) if speeds else NAN
    out["kl_target"] = ppo.model.hparams.kl_target
    out["kl_rollbacks"] = int(ppo.model.rollback_count)  # rollouts and iterations rolled back (KL guard, non-finite)
    recorder = next(c for c in ppo.trainer.callbacks if type(c).__name__ == "PPORollouts")
    out["ppo_rollouts"] = recorder.rollouts
    out["ppo_policy_kl_max"] = recorder.policy_kl_max
    out["ppo_epoch_end_kl"] = [v for _, v in csv_column(ppo, "train/epoch_end_kl")]
    out["ppo_kl_report"] = ppo_kl_report(out, ppo.model.in_kl_band)
    return out


def agentic_rl(seed: int, folder: str, agentic_sft_ckpt: str, overrides: list[str]) -> dict[str, float]:
    """Agentic SFT -> agentic GRPO (``configs/rlhf/agentic_grpo.yaml``) on the environment's reward: the held-out
    ``test/success`` of the policy GRPO keeps (``success``) and of the agentic SFT model it starts from, played by
    the same module on the same tasks (``sft_success``: a fit of 0 steps)."""
    start = ["--model.init_args.init_from", agentic_sft_ckpt, *overrides]
    _, sft_test, _ = run_phase(CONFIGS["agentic_grpo"], seed, f"{folder}/start", *start, "--trainer.max_steps", "0",
                               job_type="agentic_sft_start")
    _, out = run_policy("agentic_grpo", seed, folder, start)
    return {"success": out["agentic_grpo"].get("test/success", NAN), "sft_success": sft_test.get("test/success", NAN),
            "invalid_call_rate": out["agentic_grpo"].get("test/invalid_call_rate", NAN),
            "selected_step": out.get("agentic_grpo_selected_step")}


def agentic_rl_length(args: argparse.Namespace) -> list[str]:
    """Agentic GRPO's training length (``--agentic-rl-steps``; the config's when unset, 8 steps with ``--smoke``)."""
    steps = args.agentic_rl_steps or (8 if args.smoke else None)
    smoke = ["--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2",
             "--trainer.limit_test_batches", "2"] if args.smoke else []
    return [*(["--trainer.max_steps", str(steps)] if steps else []), *smoke]


KL_BAND = 1 + AdaptiveKLController.max_error  # the controller saturates above KL_BAND x kl_target (and below 2 - it)


def rollout_kls(result: dict) -> list[float]:
    """The training KL of every rollout in order: from the rollout record, or (results written before it) from the
    CSV log's ``train/kl``, which holds the latest rollout's KL every ``log_every_n_steps`` batches."""
    if "ppo_rollouts" in result:
        return [r["kl"] for r in result["ppo_rollouts"]]
    return [v for _, v in sorted(result["ppo_curve"]["kl"])]


def kl_band(result: dict) -> dict[str, float]:
    """The training KL (mean sequence KL of each rollout batch) against the controller's band: its maximum, the
    share of rollouts above ``KL_BAND x kl_target`` (rejected ones included), the share rolled back by the KL guard
    and the mean of the last quarter of the run."""
    kls = rollout_kls(result)
    target = result.get("kl_target") or float("inf")
    if not kls:
        return {"kl_max": NAN, "kl_above_band": NAN, "kl_rejected": NAN, "kl_last_quarter": NAN}
    return {"kl_max": max(kls), "kl_above_band": sum(k > KL_BAND * target for k in kls) / len(kls),
            "kl_rejected": result.get("kl_rollbacks", 0) / len(kls),
            "kl_last_quarter": statistics.mean(kls[-max(1, len(kls) // 4):])}


def ppo_kl_report(result: dict, in_band: Callable[[float], bool]) -> dict:
    """One PPO run against its KL band (``in_band``: ``PPORLHF.in_kl_band``): the test KL of the policy kept and of
    the policy the run ends with and whether each is in the band; the largest training KL over the accepted rollouts
    and over all of them; the rollbacks (rejected rollouts and iterations, ``train/rollback_count``); the largest
    estimated KL of an updated policy (``train/policy_kl``) and of an epoch-end check (``train/epoch_end_kl``)."""
    rollouts = result.get("ppo_rollouts", [])
    kept, last = result["ppo"].get("test/kl", NAN), result.get("ppo_last", result["ppo"]).get("test/kl", NAN)
    return {
        "kept_kl": kept, "kept_in_band": in_band(kept) if math.isfinite(kept) else None,
        "last_kl": last, "last_in_band": in_band(last) if math.isfinite(last) else None,
        "train_kl_max_accepted": max((r["kl"] for r in rollouts if r["accepted"]), default=NAN),
        "train_kl_max_all": max((r["kl"] for r in rollouts), default=NAN),
        "rollouts": len(rollouts), "rejected": result.get("kl_rollbacks", 0),
        "policy_kl_max": result.get("ppo_policy_kl_max", NAN),
        "epoch_end_kl_max": max(result.get("ppo_epoch_end_kl", []), default=NAN),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std, min and max over the seeds that have a value (``nan`` = not measured), and how many."""
    present = [v for v in values if not math.isnan(v)]
    if not present:
        return {"mean": NAN, "std": NAN, "min": NAN, "max": NAN, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else NAN
    return {"mean": statistics.mean(present), "std": std, "min": min(present), "max": max(present),
            "n": len(present)}


def metric(result: dict, phase: str, name: str) -> float:
    """A test metric of one seed's phase (``nan`` when the phase did not run or did not log it)."""
    return result.get(phase, {}).get(name, NAN)


def proxy_gold_agree(proxy: float, gold: float) -> bool | None:
    """Whether the reward model's and the gold judge's win rates fall on the same side of 0.5 (both above, both
    below or both at it); ``None`` when either is missing."""
    if math.isnan(proxy) or math.isnan(gold):
        return None
    return (proxy > 0.5) - (proxy < 0.5) == (gold > 0.5) - (gold < 0.5)


def method_summary(results: list[dict], method: str) -> dict:
    """One method over the seeds: its proxy (reward-model) and gold win rates over the SFT model and its test KL,
    each as a spread; whether the mean proxy and gold win rates agree in sign, and in how many seeds they do."""
    proxy = spread([metric(r, method, "test/win_rate") for r in results])
    gold = spread([metric(r, method, "test/gold_win_rate") for r in results])
    per_seed = [proxy_gold_agree(metric(r, method, "test/win_rate"), metric(r, method, "test/gold_win_rate"))
                for r in results]
    return {"win_rate": proxy, "gold_win_rate": gold, "kl": spread([metric(r, method, "test/kl") for r in results]),
            "proxy_gold_agree": proxy_gold_agree(proxy["mean"], gold["mean"]),
            "seeds_agreeing": sum(a is True for a in per_seed), "seeds_judged": sum(a is not None for a in per_seed)}


def band_summary(results: list[dict]) -> dict:
    """PPO's KL-band report over the seeds: how many kept / final policies are in the band (of those tested), the
    largest training KL of accepted and of all rollouts, and the rollbacks in all."""
    reports = [r["ppo_kl_report"] for r in results if "ppo_kl_report" in r]
    out = {f"{which}_in_band": sum(rep[f"{which}_in_band"] is True for rep in reports) for which in ("kept", "last")}
    for key in ("train_kl_max_accepted", "train_kl_max_all", "policy_kl_max", "epoch_end_kl_max"):
        out[key] = max((rep[key] for rep in reports if not math.isnan(rep[key])), default=NAN)
    return out | {"seeds": len(reports), "rejected": sum(rep["rejected"] for rep in reports)}


def summary(results: list[dict]) -> dict:
    """The figures of the last line (means over the seeds that have them; ``nan`` where none has), the KL band,
    and per method its spread over seeds."""
    def mean(values: list[float]) -> float:
        return spread(values)["mean"]

    ppo_runs = [r for r in results if "ppo" in r]
    bands = [kl_band(r) for r in ppo_runs]
    methods = {m: method_summary(results, m) for m in METHODS}
    return {
        "kl_max": max((b["kl_max"] for b in bands), default=NAN),
        "kl_above_band": mean([b["kl_above_band"] for b in bands]),
        "kl_rejected": mean([b["kl_rejected"] for b in bands]),
        "tie_rate": mean([metric(r, "ppo", "test/tie_rate") for r in results]),
        "sft_ppl": mean([metric(r, "sft", "test/ppl") for r in results]),
        "rm_acc": mean([metric(r, "reward", "test/acc") for r in results]),
        "win_rate": methods["ppo"]["win_rate"]["mean"],
        "reward_delta": mean([metric(r, "ppo", "test/reward_delta") for r in results]),
        "kl": methods["ppo"]["kl"]["mean"],
        "tool_call_acc": mean([metric(r, "agentic", "test/tool_call_acc") for r in results]),
        "rollout_tokens_per_s": mean([r.get("rollout_tokens_per_s", NAN) for r in results]),
        "gold_win_rate": methods["ppo"]["gold_win_rate"]["mean"],
        "grpo_gold": methods["grpo"]["gold_win_rate"]["mean"],
        "dpo_gold": methods["dpo"]["gold_win_rate"]["mean"],
        "agentic_success": mean([r.get("agentic_rl", {}).get("success", NAN) for r in results]),
        "agentic_sft_success": mean([r.get("agentic_rl", {}).get("sft_success", NAN) for r in results]),
        "ppo_kl_band": band_summary(results),
        "methods": methods,
    }


LAST_LINE = ("rm_acc", "win_rate", "kl", "tool_call_acc", "rollout_tokens_per_s", "gold_win_rate", "grpo_gold",
             "dpo_gold", "agentic_success", "agentic_sft_success")


def last_line(figures: dict) -> str:
    """``rlhf: rm_acc=... agentic_sft_success=...``: the first five fields as before, then the gold win rates of
    PPO, GRPO and DPO and agentic RL's held-out success (``nan``: not run)."""
    return "rlhf: " + " ".join(f"{k}={figures[k]:.0f}" if k == "rollout_tokens_per_s" else f"{k}={figures[k]:.3f}"
                               for k in LAST_LINE)


def method_line(method: str, figures: dict) -> str:
    """One method over the seeds: proxy and gold win rates and test KL as mean +- std [min, max], and whether proxy
    and gold agree in sign."""
    def show(s: dict) -> str:
        return f"{s['mean']:.3f}+-{s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"

    agree = {True: "yes", False: "NO", None: "n/a"}[figures["proxy_gold_agree"]]
    return (f"{method}: win_rate={show(figures['win_rate'])} gold_win_rate={show(figures['gold_win_rate'])} "
            f"kl={show(figures['kl'])} proxy_gold_agree={agree} "
            f"(seeds agreeing {figures['seeds_agreeing']}/{figures['seeds_judged']})")


def seed_line(r: dict) -> str:
    """One seed: SFT, reward model, PPO (kept and last policy, KL band) and each other method, agentic SFT."""
    line = f"seed {r['seed']}: ppl={metric(r, 'sft', 'test/ppl'):.3f} rm_acc={metric(r, 'reward', 'test/acc'):.3f}"
    if "ppo" in r:
        rep = r.get("ppo_kl_report") or ppo_kl_report(r, lambda kl: None)
        line += (f" | ppo win_rate={metric(r, 'ppo', 'test/win_rate'):.3f} "
                 f"gold={metric(r, 'ppo', 'test/gold_win_rate'):.3f} "
                 f"reward_delta={metric(r, 'ppo', 'test/reward_delta'):+.3f} selected_step="
                 f"{r.get('ppo_selected_step', 'last')} kl={rep['kept_kl']:.3f} in_band={rep['kept_in_band']} "
                 f"last_win_rate={metric(r, 'ppo_last', 'test/win_rate'):.3f} last_kl={rep['last_kl']:.3f} "
                 f"last_in_band={rep['last_in_band']} train_kl_max={kl_band(r)['kl_max']:.2f} "
                 f"train_kl_max_accepted={rep['train_kl_max_accepted']:.2f} rejected={rep['rejected']}")
    for method in METHODS[1:]:
        if method in r:
            line += (f" | {method} win_rate={metric(r, method, 'test/win_rate'):.3f} "
                     f"gold={metric(r, method, 'test/gold_win_rate'):.3f} kl={metric(r, method, 'test/kl'):.3f} "
                     f"selected_step={r.get(f'{method}_selected_step', 'last')}")
    return line + f" | tool_call_acc={metric(r, 'agentic', 'test/tool_call_acc'):.3f}"


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


def merge_runs(files: list[dict]) -> list[dict]:
    """The runs of several result files, seed by seed: for the same seed a later file's entries (a method's results,
    a phase's metrics) replace an earlier one's. Each merged run lists the ``provenance`` of the files it draws on
    and ``sources``, the index in that list of each entry's file."""
    by_seed: dict[int, dict] = {}
    for record in files:
        for run in record["runs"]:
            merged = by_seed.setdefault(run["seed"], {"seed": run["seed"], "provenance": [], "sources": {}})
            given = run.get("provenance", record.get("provenance"))
            origins = given if "sources" in run else [given]  # a merged file's run already names its origins
            for key, value in run.items():
                if key in ("seed", "provenance", "sources"):
                    continue
                origin = origins[run["sources"][key]] if "sources" in run else given
                if origin not in merged["provenance"]:
                    merged["provenance"].append(origin)
                merged[key], merged["sources"][key] = value, merged["provenance"].index(origin)
    return [by_seed[seed] for seed in sorted(by_seed)]


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--rm-epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="policy methods run from each seed's SFT model and reward model (default: all)")
    parser.add_argument("--ppo-steps", type=int, default=None, help="PPO optimiser steps (default: the config's)")
    parser.add_argument("--grpo-steps", type=int, default=None, help="GRPO optimiser steps (default: the config's)")
    parser.add_argument("--dpo-epochs", type=int, default=None, help="DPO epochs (default: the config's)")
    parser.add_argument("--agentic-epochs", type=int, default=None,
                        help="agentic SFT epochs (default: its config's, the start agentic GRPO needs)")
    parser.add_argument("--agentic-rl-steps", type=int, default=None, help="agentic GRPO steps (default: its config's)")
    parser.add_argument("--no-agentic-rl", action="store_true", help="agentic SFT only (agentic_* fields nan)")
    parser.add_argument("--no-agentic", action="store_true", help="no agentic SFT nor RL (e.g. extra PPO seeds)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: all cores / jobs)")
    parser.add_argument("--accelerator", default="cpu", help="every phase's trainer accelerator (cpu, gpu)")
    parser.add_argument("--ppo-args", default="", help='extra PPO overrides, e.g. "--model.init_args.gae_lambda 0.95"')
    parser.add_argument("--grpo-args", default="", help="extra GRPO overrides")
    parser.add_argument("--dpo-args", default="", help="extra DPO overrides")
    parser.add_argument("--smoke", action="store_true", help="every phase cut to a few batches: checks the wiring "
                        "in minutes; its figures are not results")
    parser.add_argument("--keep", default=None, help="keep each seed's SFT model and reward model in <keep>/seed<S> "
                        "and reuse them when a later run finds them there (e.g. to add a method)")
    parser.add_argument("--merge", nargs="*", default=None, help="combine the runs of earlier JSON files, seed by seed "
                        "(a later file's methods replace an earlier one's); no training")
    parser.add_argument("--plot", default=None, help="write the PPO curves to this PNG")
    add_wandb_option(parser)
    args = parser.parse_args()
    source = provenance()  # of the code that runs (or merges), taken before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        files = [json.loads(Path(p).read_text()) for p in args.merge]
        results = merge_runs(files)
        settings = files[0]["settings"] | {"seeds": [r["seed"] for r in results]}
    else:
        start_wandb(args, "rlhf")
        settings = vars(args).copy()
        results = []
        for result in in_processes(run_seed, [(seed, args) for seed in args.seeds], args.jobs, args.threads):
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if not k.startswith("ppo_")}, indent=1), flush=True)
        results.sort(key=lambda r: r["seed"])
    settings = {k: v for k, v in settings.items() if k not in ("merge", "plot", "out", "jobs", "keep")}  # no paths
    figures = summary(results)
    stem = "rlhf_smoke" if settings.get("smoke") else "rlhf"  # a smoke run never replaces a results file
    name = f"{stem}_{results[0]['seed']}.json" if len(results) == 1 and not args.merge else f"{stem}.json"
    record = {"provenance": source, "settings": settings, "summary": figures, "runs": results}
    (out / name).write_text(json.dumps(record, indent=1))
    if args.plot and any("ppo_curve" in r for r in results):
        plot_curves([r for r in results if "ppo_curve" in r], Path(args.plot))
    for r in results:
        print(seed_line(r))
    for method in METHODS:
        if any(method in r for r in results):
            print(method_line(method, figures["methods"][method]))
    band = figures["ppo_kl_band"]
    if band["seeds"]:
        print(f"ppo KL band: kept in band {band['kept_in_band']}/{band['seeds']}, last in band "
              f"{band['last_in_band']}/{band['seeds']}, train_kl_max accepted {band['train_kl_max_accepted']:.2f} / "
              f"all {band['train_kl_max_all']:.2f}, policy_kl_max {band['policy_kl_max']:.2f}, epoch_end_kl_max "
              f"{band['epoch_end_kl_max']:.2f}, rolled back {band['rejected']}")
    print(last_line(figures))


if __name__ == "__main__":
    main_bench()
