"""Callbacks used by tests that run the CLI in a subprocess, and a two-process fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


def fit_on_two_processes(config: str, args: list[str], cwd: Path, max_steps: int) -> dict[str, dict]:
    """``train.py fit --config configs/<config>`` with ``args`` for ``max_steps`` on two gloo CPU processes
    (``configs/trainer/ddp_cpu.yaml``); every rank saves its starting and final parameters and its first batch
    (``SaveRankParameters``). Returns them by file name: ``rank0.pt``, ``start_rank1.pt``, ``batch_rank0.pt``, ..."""
    out = cwd / "params"
    command = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(REPO / "configs" / config),
               "--config", str(REPO / "configs/trainer/ddp_cpu.yaml"), "--trainer.max_steps", str(max_steps),
               "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", *args,
               "--trainer.callbacks+=tests.helpers.SaveRankParameters", f"--trainer.callbacks.init_args.folder={out}",
               "--trainer.callbacks.init_args.at_start=true"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=500,
                            env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return {path.name: torch.load(path, weights_only=True) for path in out.glob("*.pt")}


class SaveRankParameters(Callback):
    """After fitting, every rank writes its parameters to ``<folder>/rank<k>.pt`` (and, with ``at_start``, those
    it starts training from to ``<folder>/start_rank<k>.pt``, its first batch to ``<folder>/batch_rank<k>.pt``)."""

    def __init__(self, folder: str, at_start: bool = False) -> None:
        self.folder = folder
        self.at_start = at_start

    def _save(self, trainer, pl_module, prefix: str) -> None:
        os.makedirs(self.folder, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.folder, f"{prefix}rank{trainer.global_rank}.pt"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at_start and trainer.global_step == 0 and batch_idx == 0:
            self._save(trainer, pl_module, "start_")
            if isinstance(batch, dict):  # and the first batch this rank sees: ``<folder>/batch_rank<k>.pt``
                tensors = {k: v.detach().cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}
                torch.save(tensors, os.path.join(self.folder, f"batch_rank{trainer.global_rank}.pt"))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "")


class SaveRankMetrics(Callback):
    """After each validation outside the sanity check, every rank writes the metrics Lightning holds
    (``trainer.callback_metrics``), its DataModule's state, when it has one, and the module's ``trajectories``, when
    it has them, to ``<folder>/metrics_rank<k>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        os.makedirs(self.folder, exist_ok=True)
        record = {"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
        if trainer.datamodule is not None:
            record["datamodule"] = trainer.datamodule.state_dict()
        if hasattr(pl_module, "trajectories"):
            record["trajectories"] = list(pl_module.trajectories)
        with open(os.path.join(self.folder, f"metrics_rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


class InjectNaN(Callback):
    """Writes a NaN into one trainable weight after the given steps (before a module's own guard looks: a module's
    callbacks come after the Trainer's)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step in self.steps:
            with torch.no_grad():
                next(p for p in module.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def read_offline_wandb_run(folder) -> dict:
    """What an offline W&B run folder (``wandb/offline-run-*``) recorded: ``group``, ``job_type``, ``tags``,
    ``name``, ``config`` and ``summary`` (last values), read from its ``run-*.wandb`` file: the LevelDB log format
    (a 7-byte W&B header, 32 KiB blocks of chunks with a CRC32, a length and a FULL/FIRST/MIDDLE/LAST type)
    around protobuf ``Record``s. wandb ships no reader for it."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    data = next(Path(folder).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B data file"
    out = {"config": {}, "summary": {}}
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE (or padding): the record goes on
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        kind_of = record.WhichOneof("record_type")
        if kind_of == "run":
            run = record.run
            out |= {"group": run.run_group, "job_type": run.job_type, "tags": list(run.tags),
                    "name": run.display_name}
            items = run.config.update
        elif kind_of in ("config", "summary"):
            items = getattr(record, kind_of).update
        else:
            continue
        target = out["summary"] if kind_of == "summary" else out["config"]
        for item in items:
            target[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
