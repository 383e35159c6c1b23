"""This project's PPO, GRPO and DPO against TRL's trainers in one process: the same tiny model, tokenizer, prompts,
reward, batch sizes, learning rate, LoRA adapter and number of updates; wall time per update, rollout tokens/s and
each side's gold win rate.

    python bench/vs_trl.py                                    # the short default (a few minutes on 2 CPU cores)
    python bench/vs_trl.py --rollouts 30 --dpo-updates 200 --eval-prompts 200   # longer, tighter gold figures

Needs TRL (``pip install -e ".[bench]"``); the rest of the project does not. The model is the project's SFT model
(``configs/rlhf/sft.yaml``, ``--sft-epochs`` epochs on the generated story corpus), exported as a Hugging Face folder:
our side starts from its checkpoint (``init_from``), TRL's from the folder, so both start from the same weights and
tokenizer. The reward of PPO and GRPO on both sides is the gold judge (``envs.story_judge.gold_score`` of the prompt
and the sampled completion; no reward model, no clip, no missing-EOS penalty), so both optimise the same function.
Every algorithm setting comes from the project's config (``configs/rlhf/{ppo,grpo,dpo}.yaml``) and is mapped onto
TRL's config by ``trl_config`` (rollout size, group size, epochs per rollout, minibatch, clip, KL weight, learning
rate, AdamW eps and weight decay, gradient clip, max new tokens, temperature, LoRA r / alpha / targets).

TRL has no PPO trainer (removed before 1.0), so the ``ppo`` row runs TRL's nearest, ``RLOOTrainer`` (critic-free,
leave-one-out baseline, KL in the reward), with 2 samples per prompt (its minimum) and half the prompts: the same 64
responses per rollout and the same updates per rollout as our PPO, but not the same algorithm (ours also trains a
value head and, by default, an exact-KL loss term). Read that ratio as "our PPO against TRL's closest trainer".

Timing: one CPU process, ``--threads`` torch threads; each side takes ``warm-up`` updates (one rollout's worth for
PPO / GRPO) untimed, then the wall time from the end of the last warm-up update to the end of the last update is
divided by the timed updates (rollouts, reward, log-probs and logging included). Rollout tokens/s = completion
tokens sampled (to and including ``<eos>``) / seconds spent sampling, over the rollouts after the first. The speed
ratio is ``trl_seconds_per_update / ours_seconds_per_update``: above 1 means this project is faster.

Gold win rate: each final policy and its starting SFT model (the same weights, adapter disabled) sample one
completion for each of the first ``--eval-prompts`` held-out test prompts with the same seed; the gold judge scores
both, wins count 1, ties 0.5 (as ``PolicyRL``'s ``gold_win_rate``). The same function evaluates both sides.
``gold_ours`` / ``gold_trl`` on the last line are the means over the algorithms run.

Writes ``<out>/vs_trl.json`` (settings, per-algorithm figures, provenance). Last line:
``vs_trl: ppo_speed_ratio=<x> grpo_speed_ratio=<x> dpo_speed_ratio=<x> gold_ours=<x> gold_trl=<x>`` (``nan`` for an
algorithm not run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import yaml  # noqa: E402
from cli_runs import LIBRARIES, add_wandb_option, provenance, run_phase, start_wandb, wandb_run  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from envs.story_judge import gold_score  # noqa: E402
from lightning_modules.policy_rl import paired_wins  # noqa: E402

ALGORITHMS = ("ppo", "grpo", "dpo")
TRL_TRAINER = {"ppo": "RLOOTrainer", "grpo": "GRPOTrainer", "dpo": "DPOTrainer"}
RLOO_GROUP = 2  # RLOO's leave-one-out baseline needs at least two samples per prompt
NO_CLIP = 1e6  # our reward clip, set out of reach: the gold score is used as it is on both sides


# --- the shared settings: read from the project's configs, mapped onto TRL's ------------------------------------
def config_settings(algo: str) -> dict:
    """The numbers both sides share, from ``configs/rlhf/<algo>.yaml`` (the project's defaults for the algorithm)."""
    config = yaml.safe_load((REPO / f"configs/rlhf/{algo}.yaml").read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    optimizer = model["optimizer"]["init_args"]
    lora = model["lm"]["lora"]
    out = {"lr": optimizer["lr"], "adam_eps": optimizer.get("eps", 1e-8),
           "weight_decay": optimizer.get("weight_decay", 0.0), "batch_size": data["batch_size"],
           "lora_r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora.get("dropout", 0.0),
           "max_new_tokens": model["max_new_tokens"], "temperature": model["temperature"]}
    if algo == "dpo":
        return out | {"beta": model["beta"], "label_smoothing": model["label_smoothing"],
                      "sft_weight": model["sft_weight"], "max_grad_norm": config["trainer"]["gradient_clip_val"]}
    return out | {"ppo_epochs": model["ppo_epochs"], "minibatch_size": model["minibatch_size"],
                  "clip_range": model["clip_range"], "kl_coef": model["kl_coef"],
                  "max_grad_norm": model["max_grad_norm"], "group_size": model.get("group_size", 1)}


def rollout_size(s: dict) -> int:
    """Responses per rollout: prompts x samples per prompt."""
    return s["batch_size"] * s["group_size"]


def updates_per_rollout(s: dict) -> int:
    """Optimiser steps each rollout feeds (``ppo_epochs`` passes of whole minibatches)."""
    return s["ppo_epochs"] * (rollout_size(s) // s["minibatch_size"])


def trl_config(algo: str, s: dict, updates: int, seed: int) -> dict:
    """Keyword arguments of TRL's ``<algo>`` config that give it the settings ``s`` of ours (plus CPU, fp32, no
    gradient checkpointing, constant learning rate, no logging or saving)."""
    common = dict(max_steps=updates, learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=s["weight_decay"], adam_epsilon=s["adam_eps"], max_grad_norm=s["max_grad_norm"],
                  gradient_accumulation_steps=1, seed=seed, use_cpu=True, bf16=False, fp16=False,
                  gradient_checkpointing=False, report_to=[], logging_strategy="no", save_strategy="no",
                  disable_tqdm=True, dataloader_num_workers=0)
    if algo == "dpo":
        # our SFT term on the chosen completion is TRL's "sft" loss beside the sigmoid one
        sft = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, s["sft_weight"]]} if s["sft_weight"] else {
            "loss_type": ["sigmoid"]}
        return common | dict(per_device_train_batch_size=s["batch_size"], beta=s["beta"],
                             label_smoothing=s["label_smoothing"], max_length=s["max_length"],
                             truncation_mode="keep_start", precompute_ref_log_probs=False, **sft)
    size = rollout_size(s)
    generations = s["group_size"] if algo == "grpo" else RLOO_GROUP
    out = common | dict(num_generations=generations, generation_batch_size=size,
                        per_device_train_batch_size=s["minibatch_size"], num_iterations=s["ppo_epochs"],
                        epsilon=s["clip_range"], beta=s["kl_coef"], max_completion_length=s["max_new_tokens"],
                        temperature=s["temperature"], top_p=1.0, top_k=0, mask_truncated_completions=False,
                        shuffle_dataset=True, log_completions=False)
    if algo == "grpo":  # ours: group-normalised advantages, loss averaged over the minibatch's tokens, k3 KL loss
        return out | dict(loss_type="bnpo", scale_rewards="group")
    return out | dict(normalize_advantages=True)  # ours (PPO) normalises advantages too


def ours_settings(algo: str, s: dict) -> dict:
    """Our module's arguments that differ from its config: the gold judge as the reward, used as it is."""
    if algo == "dpo":
        return {}
    return {"reward_clip": NO_CLIP, "missing_eos_penalty": None}


def speed_ratio(trl_seconds: float, ours_seconds: float) -> float:
    """``trl / ours`` seconds per update (above 1: this project is faster); ``nan`` without both."""
    if not (trl_seconds > 0 and ours_seconds > 0) or math.isinf(trl_seconds) or math.isinf(ours_seconds):
        return float("nan")
    return trl_seconds / ours_seconds


def rate(log: list[tuple[int, float]]) -> float:
    """Tokens/s over the logged ``(tokens, seconds)`` rollouts after the first (the warm-up); ``nan`` without."""
    tokens, seconds = sum(t for t, _ in log[1:]), sum(s for _, s in log[1:])
    return tokens / seconds if seconds > 0 else float("nan")


def summary_line(results: dict[str, dict]) -> str:
    """The benchmark's last line from ``{algo: {"ours": {...}, "trl": {...}}}`` (missing algorithms: ``nan``)."""
    ratios = {a: speed_ratio(results[a]["trl"]["seconds_per_update"], results[a]["ours"]["seconds_per_update"])
              if a in results else float("nan") for a in ALGORITHMS}
    gold = {side: statistics.mean(r[side]["gold_win_rate"] for r in results.values()) if results else float("nan")
            for side in ("ours", "trl")}
    return ("vs_trl: " + " ".join(f"{a}_speed_ratio={ratios[a]:.3f}" for a in ALGORITHMS)
            + f" gold_ours={gold['ours']:.3f} gold_trl={gold['trl']:.3f}")


# --- reward and evaluation (the same functions for both sides) ---------------------------------------------------
def gold_reward(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """The reward of PPO and GRPO on both sides: the gold judge's score of the decoded prompt and completion."""
    prompt, completion = (tokenizer.decode(ids, skip_special_tokens=True).strip()
                          for ids in (prompt_ids, completion_ids))
    return gold_score(prompt, completion)


def trl_gold_reward(tokenizer):
    """``gold_reward`` as a TRL reward function (TRL hands it the prompt texts and the completion token ids)."""

    def gold_judge(prompts: list[str], completion_ids: list[list[int]], **kwargs) -> list[float]:
        prompt_ids = tokenizer(text=prompts)["input_ids"]  # as TRL encoded them for sampling
        return [gold_reward(tokenizer, p, c) for p, c in zip(prompt_ids, completion_ids)]

    return gold_judge


class GoldJudge(nn.Module):
    """The gold judge in a reward model's place (``reward_model(ids, mask)``: prompt and response side by side).

    ``prompt_length`` is the width of the left-padded prompts of the rollout being scored (set by ``GoldJudged``)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.prompt_length = tokenizer, 0

    @torch.no_grad()
    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        p, keep = self.prompt_length, mask.bool()
        scores = [gold_reward(self.tokenizer, row[:p][m[:p]].tolist(), row[p:][m[p:]].tolist())
                  for row, m in zip(ids, keep)]
        return torch.tensor(scores, device=ids.device)


@torch.no_grad()
def gold_win_rate(model: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, prompts: list[str],
                  max_new_tokens: int, temperature: float, seed: int) -> dict[str, float]:
    """A LoRA policy against itself with the adapter disabled (its starting model) on the same prompts and sampling
    seed, judged by the gold judge: mean scores and the paired win rate (ties count half)."""
    from models.lm_text import sample

    model.eval()
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, temperature=temperature)

    def scores(reference: bool) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        if reference:
            with model.disable_adapter():
                response, mask = sample(model, prompt_ids, prompt_mask, generator=generator, **kwargs)
        else:
            response, mask = sample(model, prompt_ids, prompt_mask, generator=generator, **kwargs)
        texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, mask)]
        return torch.tensor([gold_score(p, t.strip()) for p, t in zip(prompts, texts)])

    policy, reference = scores(False), scores(True)
    return {"gold_win_rate": float(paired_wins(policy, reference)[0].mean()), "gold_score": float(policy.mean()),
            "gold_score_ref": float(reference.mean())}


# --- our side -----------------------------------------------------------------------------------------------------
class GoldJudged:
    """Mixin for ``PolicyRL`` methods: the gold judge is the reward model (none is loaded), and training rollouts
    are timed into ``rollout_log`` as ``(completion tokens, seconds)``."""

    def _load_reward_model(self) -> nn.Module:
        return GoldJudge(self.tokenizer)

    def generate(self, prompt_ids: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.reward_model.prompt_length = prompt_ids.shape[1]  # the responses scored next follow these prompts
        start = time.perf_counter()
        response, mask = super().generate(prompt_ids, *args, **kwargs)
        if self.training:
            self.__dict__.setdefault("rollout_log", []).append((int(mask.sum()), time.perf_counter() - start))
        return response, mask


def step_clock(warmup: int):
    """A Lightning callback with the time at the end of update ``warmup`` and of the last update."""
    from lightning.pytorch import Callback

    class StepClock(Callback):
        def __init__(self) -> None:
            self.start = self.end = None
            self.steps = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if self.start is None and trainer.global_step >= warmup:
                self.start, self.start_step = time.perf_counter(), trainer.global_step
            self.end, self.steps = time.perf_counter(), trainer.global_step

        def seconds_per_update(self) -> float:
            timed = self.steps - self.start_step if self.start is not None else 0
            return (self.end - self.start) / timed if timed > 0 else float("nan")

    return StepClock()


def run_ours(algo: str, s: dict, sft_ckpt: str, updates: int, warmup: int, seed: int) -> tuple[nn.Module, dict]:
    """Train our ``algo`` for ``updates`` optimiser steps in a Lightning Trainer; returns the policy and timings."""
    from lightning.pytorch import Trainer, seed_everything

    from datamodules.text_corpus import PreferencePromptDataModule, PromptDataModule
    from lightning_modules.dpo import DPO
    from lightning_modules.grpo import GRPO
    from lightning_modules.ppo import PPORLHF
    from models.lm_factory import LMSettings, LoraSettings

    base = {"ppo": PPORLHF, "grpo": GRPO, "dpo": DPO}[algo]
    cls = type(f"Gold{base.__name__}", (GoldJudged, base), {})
    seed_everything(seed)
    lm = LMSettings(lora=LoraSettings(r=s["lora_r"], alpha=s["lora_alpha"], dropout=s["lora_dropout"]))
    optimizer = lambda params: torch.optim.AdamW(params, lr=s["lr"], eps=s["adam_eps"],  # noqa: E731
                                                 weight_decay=s["weight_decay"])
    hp = {k: s[k] for k in ("max_new_tokens", "temperature")}
    if algo == "dpo":
        module = cls(lm=lm, init_from=sft_ckpt, beta=s["beta"], label_smoothing=s["label_smoothing"],
                     sft_weight=s["sft_weight"], optimizer=optimizer, export=False, **hp)
        data = PreferencePromptDataModule(batch_size=s["batch_size"])
    else:
        extra = {"group_size": s["group_size"]} if algo == "grpo" else {}
        module = cls(lm=lm, init_from=sft_ckpt, ppo_epochs=s["ppo_epochs"], minibatch_size=s["minibatch_size"],
                     clip_range=s["clip_range"], kl_coef=s["kl_coef"], max_grad_norm=s["max_grad_norm"],
                     optimizer=optimizer, export=False, **hp, **extra, **ours_settings(algo, s))
        data = PromptDataModule(batch_size=s["batch_size"])
    clock = step_clock(warmup)
    run = wandb_run(f"ours-{algo}", seed)
    logger = False
    if run is not None:
        from experiment.wandb_logger import WandbLogger

        logger = WandbLogger(project="experiential-agents", save_dir="logs", **run)
    Trainer(accelerator="cpu", devices=1, max_steps=updates, max_epochs=-1, logger=logger,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, callbacks=[clock], default_root_dir=tempfile.mkdtemp(),
            gradient_clip_val=s["max_grad_norm"] if algo == "dpo" else None).fit(module, datamodule=data)
    if run is not None:
        import wandb

        wandb.finish()
    return module.lm, {"seconds_per_update": clock.seconds_per_update(), "updates": clock.steps,
                       "rollout_tokens_per_s": rate(module.__dict__.get("rollout_log", []))}


# --- TRL's side ---------------------------------------------------------------------------------------------------
def trl_datasets(algo: str, max_length: int) -> tuple[object, list]:
    """TRL's training set (the same train split as ours; prompts ``<bos> `` + text, which our tokenizer encodes
    exactly as ``encode_prompt``) and our own token ids of the same examples, to check that both sides agree."""
    from datasets import Dataset

    from datamodules.text_corpus import PreferencePromptDataModule, PromptDataModule

    if algo == "dpo":
        data = PreferencePromptDataModule(max_length=max_length)
        rows = [{"prompt": f"<bos> {p}" if p else "<bos>", "chosen": f" {c}", "rejected": f" {r}"}
                for p, c, r in data.prompted_pairs("train")]
        return Dataset.from_list(rows), data.items("train")
    data = PromptDataModule()
    prompts = [data.prompt_and_completion(i)[0] for i in data.split("train")]
    rows = [{"prompt": f"<bos> {p}"} for p in prompts]
    return Dataset.from_list(rows), [ids for ids, _ in data.prompt_items("train")]


def trl_matches_ours(algo: str, trainer, tokenizer, dataset, ours: list) -> bool:
    """Whether TRL's token ids of the training examples are ours (prompt, and for DPO both completions)."""
    if algo == "dpo":
        theirs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
        return [(p + c, p + r) for p, c, r in theirs] == [(p + c, p + r) for p, c, r in ours]
    return tokenizer(text=list(dataset["prompt"]))["input_ids"] == ours  # what TRL's _tokenize_prompts calls


def run_trl(algo: str, s: dict, hf_model: str, updates: int, warmup: int, seed: int) -> tuple[nn.Module, dict]:
    """Train TRL's trainer for ``algo`` (``TRL_TRAINER``) for ``updates`` steps from the same SFT model."""
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from models.lm_factory import lora_targets

    class StepClock(TrainerCallback):
        start = end = None
        steps = start_step = 0

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if self.start is None and state.global_step >= warmup:
                self.start, self.start_step = time.perf_counter(), state.global_step
            self.end, self.steps = time.perf_counter(), state.global_step

    datasets.disable_progress_bars()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_model)
    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                             target_modules=lora_targets(model, "auto"), task_type="CAUSAL_LM")
    name = TRL_TRAINER[algo]
    config_class = getattr(trl, name.replace("Trainer", "Config"))
    run = wandb_run(f"trl-{algo}", seed)
    kwargs = trl_config(algo, s, updates, seed)
    if run is not None:  # transformers' W&B callback reads the group, job type and tags from the environment
        os.environ |= {"WANDB_RUN_GROUP": run["group"], "WANDB_JOB_TYPE": run["job_type"],
                       "WANDB_TAGS": ",".join(run["tags"]), "WANDB_PROJECT": "experiential-agents",
                       "WANDB_DIR": "logs"}
        kwargs |= {"report_to": ["wandb"], "run_name": run["name"], "logging_strategy": "steps", "logging_steps": 1}
    args = config_class(output_dir=tempfile.mkdtemp(), **kwargs)
    dataset, ours = trl_datasets(algo, s.get("max_length", 128))
    clock, log = StepClock(), []
    base = getattr(trl, name)

    class Timed(base):
        def _generate_single_turn(self, *a, **k):
            start = time.perf_counter()
            out = super()._generate_single_turn(*a, **k)  # GRPO: (completion ids, logprobs); RLOO: completion ids
            completion_ids = out[0] if isinstance(out, tuple) else out
            log.append((sum(map(len, completion_ids)), time.perf_counter() - start))
            return out

    extra = {} if algo == "dpo" else {"reward_funcs": trl_gold_reward(tokenizer)}
    trainer = Timed(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                    peft_config=peft_config, callbacks=[clock], **extra)
    same_tokens = trl_matches_ours(algo, trainer, tokenizer, dataset, ours)
    trainer.train()
    if run is not None:
        import wandb

        wandb.finish()
    timed = clock.steps - clock.start_step if clock.start is not None else 0
    seconds = (clock.end - clock.start) / timed if timed > 0 else float("nan")
    return trainer.model, {"seconds_per_update": seconds, "updates": clock.steps, "rollout_tokens_per_s": rate(log),
                           "trainer": name, "trl_version": trl.__version__, "same_token_ids": same_tokens}


# --- the benchmark ------------------------------------------------------------------------------------------------
def eval_prompts(count: int):
    """The first ``count`` held-out test prompts: left-padded ids, mask and texts."""
    from datamodules.text_corpus import PromptDataModule

    data = PromptDataModule()
    batch = data.collate(data.prompt_items("test")[:count])
    texts = [data.prompt_and_completion(int(i))[0] for i in batch["index"]]
    return batch["prompt_ids"], batch["prompt_mask"], texts, data.tokenizer


def train_sft(args: argparse.Namespace, root: str) -> tuple[str, str, float]:
    """The starting model: our SFT checkpoint and its Hugging Face export."""
    from lightning_modules.lm_phase import export_checkpoint

    cli, _, seconds = run_phase(str(REPO / "configs/rlhf/sft.yaml"), args.seed, f"{root}/sft", "--trainer.max_epochs",
                                str(args.sft_epochs), "--model.init_args.export", "false", test=False)
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    return ckpt, export_checkpoint(ckpt, f"{root}/hf")["model"], seconds


def bench_settings(algo: str, args: argparse.Namespace) -> tuple[dict, int, int]:
    """The shared settings, the updates and the untimed warm-up updates of ``algo``."""
    s = config_settings(algo)
    if algo == "dpo":
        return s | {"max_length": 128}, args.dpo_updates, args.dpo_warmup
    per_rollout = updates_per_rollout(s | ({"group_size": RLOO_GROUP, "batch_size": s["batch_size"] // RLOO_GROUP}
                                           if algo == "ppo" else {}))
    if per_rollout != updates_per_rollout(s):
        raise ValueError(f"{algo}: TRL's rollout would feed {per_rollout} updates, ours {updates_per_rollout(s)}")
    return s, args.rollouts * per_rollout, per_rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--rollouts", type=int, default=4, help="PPO / GRPO rollouts per side (the first untimed)")
    parser.add_argument("--dpo-updates", type=int, default=24, help="DPO updates per side")
    parser.add_argument("--dpo-warmup", type=int, default=4, help="untimed DPO updates first")
    parser.add_argument("--sft-epochs", type=int, default=1, help="SFT epochs of the starting model")
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out test prompts of the gold win rate")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    add_wandb_option(parser)
    args = parser.parse_args()
    if args.rollouts < 2 or args.dpo_updates <= args.dpo_warmup:
        parser.error("need --rollouts >= 2 and --dpo-updates > --dpo-warmup (something to time after the warm-up)")
    source = provenance(LIBRARIES + ("trl", "accelerate", "datasets"))
    if "trl" not in source["versions"]:
        sys.exit('Error: trl is not installed: pip install -e ".[bench]"')
    torch.set_num_threads(args.threads)
    start_wandb(args, "vs_trl")
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as root:
        sft_ckpt, hf_model, sft_seconds = train_sft(args, root)
        prompt_ids, prompt_mask, texts, tokenizer = eval_prompts(args.eval_prompts)
        for algo in args.algos:
            s, updates, warmup = bench_settings(algo, args)
            result = {"settings": s, "updates": updates, "warmup_updates": warmup}
            for side, run in (("ours", run_ours), ("trl", run_trl)):
                model, figures = run(algo, s, sft_ckpt if side == "ours" else hf_model, updates, warmup, args.seed)
                figures |= gold_win_rate(model, tokenizer, prompt_ids, prompt_mask, texts, s["max_new_tokens"],
                                         s["temperature"], seed=10_007 + args.seed)
                result[side] = figures
            results[algo] = result
            o, t = result["ours"], result["trl"]
            print(f"{algo} (trl: {t['trainer']}, same token ids: {t['same_token_ids']}): s/update ours "
                  f"{o['seconds_per_update']:.3f} trl {t['seconds_per_update']:.3f} ratio "
                  f"{speed_ratio(t['seconds_per_update'], o['seconds_per_update']):.3f}; rollout tokens/s ours "
                  f"{o['rollout_tokens_per_s']:.0f} trl {t['rollout_tokens_per_s']:.0f}; gold win rate ours "
                  f"{o['gold_win_rate']:.3f} trl {t['gold_win_rate']:.3f}", flush=True)
    total = time.perf_counter() - started
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"sft_seconds": sft_seconds,
                                                                      "total_seconds": total}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_trl.json").write_text(json.dumps({"provenance": source, "settings": settings, "results": results},
                                                indent=1))
    print(f"total {total:.0f} s (SFT {sft_seconds:.0f} s); speed ratio = trl / ours seconds per update, "
          "above 1: this project is faster; ppo row: TRL has no PPO trainer, RLOOTrainer stands in")
    print(summary_line(results))


if __name__ == "__main__":
    main()
