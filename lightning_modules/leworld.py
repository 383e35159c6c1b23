"""LeWorld training: Phase 1 (separate pre-training), Phase 2 (end to end), Phase 3 (info-request refinement) and
two baselines (a BLM with no memory, a BLM with oracle reads), all on ``LeWorldDataModule``.

Where things are: ``leworld_base.py`` (the data contract, metrics, memory loading, predictions),
``leworld_phases.py`` (the phases), ``leworld_losses.py`` (every loss term), ``leworld_baseline.py``. This module
re-exports them, so configs name ``lightning_modules.leworld.<Class>``.

Each phase is its own LightningModule; ``init_from`` names the previous phase's checkpoint (its ``system.*``
weights are loaded before training). The model (``models.leworld``) returns predictions, gates and address logits;
every loss is computed here, in the training modules.

Data contract: a module whose model has a memory needs a datamodule implementing :class:`LeWorldData` (``task``
with ``num_words``, ``word_size``, ``max_range``, and ``memory_bits_for(split)``); ``setup`` checks it once and
raises a ``TypeError`` naming what is missing. Before each batch the module copies the bits of the split it runs
into the model's memory.

Every module logs the same evaluation metrics (one ``torchmetrics.MetricCollection`` per split):

- ``val/mse``, ``val/mae``: next-state error, teacher forced (true past and current states), over all steps.
- ``val/mse/h<k>``: error ``k`` steps ahead when predictions are fed back (open loop), from the first state.
- ``val/hit_rate``: share of relevant ranges that some SLM's range overlaps with IoU >= 0.5; ``val/address_iou``
  the mean of that best IoU (systems only).
- ``val/routing_entropy``: entropy of the normalised SLM usage; ``val/usage/slm_<i>``: how often SLM ``i`` is on.
- the same under ``test/``.

``predict`` returns, per batch of test sequences, the teacher-forced ``predictions`` and ``targets``
``[B, T - 1, S]``, ``sq_error`` ``[B, T - 1]`` and, for the phases, the read ranges ``starts``/``ends`` and the
``gates`` ``[B, T - 1, M]``; :class:`PredictionsToFile` saves them.
"""

from lightning_modules.leworld_base import (
    EvalMetrics,
    LeWorldData,
    LeWorldModule,
    PredictionsToFile,
    SystemModule,
    TaskShape,
    flatten_steps,
    load_system_weights,
    range_iou,
)
from lightning_modules.leworld_baseline import LeWorldBaseline
from lightning_modules.leworld_phases import LeWorldPhase1, LeWorldPhase2, LeWorldPhase3

__all__ = [
    "EvalMetrics",
    "LeWorldBaseline",
    "LeWorldData",
    "LeWorldModule",
    "LeWorldPhase1",
    "LeWorldPhase2",
    "LeWorldPhase3",
    "PredictionsToFile",
    "SystemModule",
    "TaskShape",
    "flatten_steps",
    "load_system_weights",
    "range_iou",
]
