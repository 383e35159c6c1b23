"""A LightningModule base for phases that train a causal LM: build it once the tokenizer is known, on the device
and in the precision the Trainer chose, and export its merged weights for the next phase.

A subclass implements ``_build`` (usually ``self.lm = self._build_lm(self._init_state())`` plus any heads) and its
own steps; it passes its LM settings (``models.lm_factory.LMSettings``: model, size, LoRA, 4-bit, gradient
checkpointing), ``init_from``, ``optimizer`` and the learning-rate schedule through ``**kwargs``. Checkpoints carry
the LM's merged weights under ``merged_lm`` (LoRA folded in), so another phase can start from them with
``init_from`` whatever adapters this one trained.

Contract with the DataModule: it has a ``tokenizer`` attribute (``TokenizerSource``); outside a Trainer, call
``build(tokenizer)``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from lightning_modules.guarded import GuardedModule, non_finite_names, read_checkpoint
from models.lm_factory import LMSettings, LoraSettings, build_causal_lm, export_hf, merged_state_dict

LRDecay = Literal["constant", "linear", "cosine"]
PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}  # prefix of Lightning's precision -> compute dtype


@runtime_checkable
class TokenizerSource(Protocol):
    """What an LM phase needs from its DataModule: the tokenizer its text was encoded with."""

    tokenizer: Any


def check_settings(kind: str, checks: dict[str, bool], given: dict[str, Any]) -> None:
    """``ValueError("invalid <kind> settings: name=value, ...")`` naming every setting whose check is false."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"invalid {kind} settings: {', '.join(f'{n}={given[n]!r}' for n in bad)}")


def load_phase_checkpoint(path: str) -> dict[str, Any]:
    """An earlier phase's checkpoint (tensors and plain values only: ``weights_only=True``)."""
    checkpoint = read_checkpoint(path)
    if "merged_lm" not in checkpoint:
        raise ValueError(
            f"{path!r} has no merged LM weights: it was not written by an LM phase, or its LM was 4-bit "
            "(train the phase that feeds another one without load_in_4bit)"
        )
    bad = non_finite_names(checkpoint["merged_lm"]) + non_finite_names(checkpoint.get("reward_head", {}))
    if bad:
        raise ValueError(f"{path!r} has non-finite weights ({bad[:3]}): refusing to start from it")
    return checkpoint


def checkpoint_lm_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model name and tiny-model size a phase checkpoint was trained with (nested ``lm`` settings, or the flat
    arguments of checkpoints written before them)."""
    hparams = checkpoint.get("hyper_parameters", {})
    settings = hparams.get("lm", hparams)
    return {k: settings[k] for k in ("model_name", "hidden_size", "num_layers", "num_heads") if k in settings}


def lm_settings_from_dict(settings: dict[str, Any]) -> LMSettings:
    """``LMSettings`` from the plain dict a checkpoint's hyperparameters hold."""
    lora = settings.get("lora")
    return LMSettings(**{**settings, "lora": LoraSettings(**lora) if isinstance(lora, dict) else lora})


def lm_state(module_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The LM's weights in a phase's state dict (its ``lm.`` entries, without the prefix)."""
    return {k.removeprefix("lm."): v for k, v in module_state.items() if k.startswith("lm.")}


def _import(path: str | None) -> Any:
    module, _, name = (path or "").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_arguments(hparams: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}


def export_checkpoint(ckpt_path: str, output: str | os.PathLike | None = None) -> dict[str, str]:
    """The Hugging Face folders that fitting writes at its end (``LMPhase.on_fit_end``), from a saved checkpoint of an
    LM phase: ``model`` (merged weights + tokenizer) and, with LoRA, ``adapter``; a 4-bit phase writes its adapter
    only. The tokenizer comes from the checkpoint's DataModule settings. ``output`` defaults to ``<run>/hf`` for a
    checkpoint in ``<run>/checkpoints/``. Returns the paths written."""
    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    name = checkpoint.get("module_class") or hparams.get("_class_path")
    phase = _import(name)
    if not (isinstance(phase, type) and issubclass(phase, LMPhase)):
        raise ValueError(f"{ckpt_path!r} was written by {name or 'an unknown model'}, not by an LM phase: export "
                         "takes the checkpoint of an SFT, reward-model, PPO, GRPO, DPO, pretraining or "
                         "early-experience run")
    data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    datamodule = _import(data_hparams.get("_class_path"))
    if datamodule is None:
        raise ValueError(f"{ckpt_path!r} does not name its DataModule, so its tokenizer cannot be rebuilt: export "
                         "checkpoints written by `train.py fit`")
    tokenizer = datamodule(**_init_arguments(data_hparams)).tokenizer
    settings = lm_settings_from_dict(hparams.get("lm", {}))
    four_bit = settings.load_in_4bit  # its base was quantised: the trained adapter is what there is to export
    module = phase(**{**_init_arguments(hparams), "lm": replace(settings, load_in_4bit=False), "init_from": None})
    module.tokenizer = tokenizer
    lm = module._build_lm(None)
    saved = lm_state(checkpoint["state_dict"])
    if four_bit:
        expected = {k for k in lm.state_dict() if "lora_" in k}
        saved = {k: v for k, v in saved.items() if k in expected}
        if set(saved) != expected:
            raise ValueError(f"{ckpt_path!r} lacks LoRA weights {sorted(expected - set(saved))[:3]}")
        lm.load_state_dict(saved, strict=False)
    else:
        lm.load_state_dict(saved)
    if output is None:
        folder = Path(ckpt_path).resolve().parent
        output = (folder.parent if folder.name == "checkpoints" else folder) / "hf"
    return export_hf(lm, tokenizer, output, merged=not four_bit)


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                      decay: LRDecay) -> LRScheduler:
    """Per-step learning-rate factor from torch schedulers: a linear warmup over ``warmup_steps`` (``k + 1`` / ``(w +
    1)`` at step ``k``, so no step is taken at rate 0), then down to 0 at ``total_steps`` along a line or a half
    cosine, or kept at 1 (``constant``)."""
    after = max(1, total_steps - warmup_steps)
    schedules = {
        "constant": lambda: ConstantLR(optimizer, factor=1.0, total_iters=0),
        "linear": lambda: LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=after),
        "cosine": lambda: CosineAnnealingLR(optimizer, T_max=after, eta_min=0.0),
    }
    if warmup_steps == 0:
        return schedules[decay]()
    warmup = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, schedules[decay]()], milestones=[warmup_steps])


class LMPhase(GuardedModule):
    """Builds the LM in ``configure_model`` and exports merged weights.

    The optimiser sees every parameter that requires a gradient (override ``configure_optimizers`` to narrow it);
    with ``lr_decay`` or ``warmup_ratio`` it is stepped by a per-step schedule over the run's optimiser steps.
    """

    def __init__(
        self,
        *,
        lm: LMSettings = LMSettings(),
        init_from: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_decay: LRDecay = "constant",
        warmup_ratio: float = 0.0,
        export: bool = True,
        export_dir: str | None = None,
    ) -> None:
        """
        Args:
            lm: The causal LM: model name or tiny size, LoRA adapter, 4-bit base, gradient checkpointing.
            init_from: Checkpoint of an earlier phase whose merged LM weights to start from (``null``: the base).
            optimizer: Optimiser factory, called with the trainable parameters.
            lr_decay: Learning-rate decay after the warmup, per optimiser step, reaching zero at the last step
                (``linear`` or ``cosine``), or ``constant`` (see ``warmup_then_decay``).
            warmup_ratio: Share of the optimiser steps over which the learning rate rises linearly from zero.
            export: After fitting, write Hugging Face folders to ``<run folder>/hf``: ``model`` (merged weights and
                tokenizer) and, with LoRA, ``adapter`` (see ``models.lm_factory.export_hf``).
            export_dir: A fixed folder for those Hugging Face folders instead of ``<run folder>/hf`` (e.g. the
                pretrained base's, which later configs name); what an earlier fit wrote there is replaced, except
                by a ``fast_dev_run``, which exports to its run folder instead.
        """
        super().__init__()
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        # Records this class's arguments and those of every subclass calling it; the settings as a plain dict, so
        # checkpoints load with ``weights_only=True``.
        self.save_hyperparameters(ignore=["optimizer"])
        for hparams in (self.hparams, self._hparams_initial):
            hparams["lm"] = asdict(lm)
        self.lm_settings = lm
        self.optimizer_factory = optimizer
        self.tokenizer = None
        self.lm: nn.Module | None = None

    # --- building ---------------------------------------------------------------------------------------------
    def _tokenizer(self):
        if self.tokenizer is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if not isinstance(datamodule, TokenizerSource):
                raise RuntimeError(f"{type(self).__name__} needs a tokenizer: use a DataModule with a `tokenizer` "
                                   "attribute, or call build(tokenizer)")
            self.tokenizer = datamodule.tokenizer
        return self.tokenizer

    def _placement(self) -> tuple[str | dict | None, torch.dtype]:
        """Where a 4-bit base is quantised (the Trainer's device) and the compute dtype (from its precision)."""
        if self._trainer is None:
            return None, torch.float32
        precision = str(self.trainer.precision)
        dtype = next((d for prefix, d in PRECISION_DTYPES.items() if precision.startswith(prefix)), torch.float32)
        device = self.trainer.strategy.root_device
        return ({"": device} if device.type != "cpu" else "cpu"), dtype

    def _build_lm(self, state_dict: dict[str, Tensor] | None, adapter: bool = True, **overrides) -> nn.Module:
        """The LM of this phase's settings, loaded with ``state_dict`` when given, with the LoRA adapter of the
        settings when ``adapter``; ``overrides`` replace the model name or size (e.g. a reward model of another)."""
        settings = self.lm_settings
        lora = settings.lora if adapter else None
        four_bit = settings.load_in_4bit and lora is not None
        if four_bit:
            self._check_strategy_for_4bit()
        if lora is not None and self._sharded():
            raise ValueError(f"a LoRA adapter is not trained under {type(self.trainer.strategy).__name__}: use DDP "
                             "(configs/trainer/ddp.yaml; each process holds the frozen base), or shard full "
                             "fine-tuning with --model.init_args.lm.lora null")
        device_map, dtype = self._placement()
        size = settings.size | {k: v for k, v in overrides.items() if k != "model_name"}
        lm = build_causal_lm(
            overrides.get("model_name", settings.model_name), self.tokenizer, lora=lora, load_in_4bit=four_bit,
            state_dict=state_dict, trust_remote_code=settings.trust_remote_code, dtype=dtype if four_bit else
            torch.float32, device_map=device_map if four_bit else None, **size,
        )
        rows = lm.get_input_embeddings().weight.shape[0]
        if rows < len(self.tokenizer):
            raise ValueError(f"the model has {rows} token embeddings; the tokenizer has {len(self.tokenizer)} tokens")
        if settings.gradient_checkpointing and adapter:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lora is not None:  # the frozen embeddings give no gradient for checkpointed blocks to pass back
                lm.enable_input_require_grads()
        return lm

    def _sharded(self) -> bool:
        """Whether the Trainer shards the weights across processes (FSDP, DeepSpeed)."""
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        return "FSDP" in strategy or "DeepSpeed" in strategy

    def _check_strategy_for_4bit(self) -> None:
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(f"load_in_4bit cannot be sharded by {strategy}: use one device or DDP (each process "
                             "holds its own 4-bit copy), or train without load_in_4bit")

    def build(self, tokenizer=None) -> None:
        """Build the networks (Lightning calls this through ``configure_model``; call it yourself outside a
        Trainer)."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.lm is None:
            self._tokenizer()
            self._build()

    def configure_model(self) -> None:
        self.build()

    def _build(self) -> None:
        """Set ``self.lm`` (and any heads); ``self.tokenizer`` is known here."""
        self.lm = self._build_lm(self._init_state())

    def _init_state(self) -> dict[str, Tensor] | None:
        """The merged LM weights of ``init_from`` (``None`` without one)."""
        if self.hparams.init_from is None:
            return None
        return load_phase_checkpoint(self.hparams.init_from)["merged_lm"]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        decay, warmup_ratio = self.hparams.lr_decay, self.hparams.warmup_ratio
        if decay == "constant" and warmup_ratio == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = warmup_then_decay(optimizer, int(warmup_ratio * total), total, decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self) -> None:
        if not self.hparams.export:
            return
        lm = self.lm
        if self._sharded():  # every process takes part in gathering the whole weights; the first one writes them
            state = lm_state(self.trainer.strategy.lightning_module_state_dict())
            lm = self._build_lm(state, adapter=False) if self.trainer.is_global_zero else None
        if self.trainer.is_global_zero:
            from experiment.save_config import run_dir

            fixed = self.hparams.export_dir if not self.trainer.fast_dev_run else None  # keep a trained base
            folder = fixed or os.path.join(run_dir(self.trainer), "hf")
            written = export_hf(lm, self.tokenizer, folder, replace=fixed is not None)
            self.print(f"Hugging Face folders: {', '.join(written.values())}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._sharded():  # the strategy gathered the whole weights into the checkpoint (no adapter to merge)
            checkpoint["merged_lm"] = lm_state(checkpoint["state_dict"])
        elif not self.lm_settings.load_in_4bit:
            checkpoint["merged_lm"] = merged_state_dict(self.lm)
