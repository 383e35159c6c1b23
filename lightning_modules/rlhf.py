"""The class paths that run configs of the small-LM RLHF phases named before the phases got a file each
(``sft.py``, ``reward_model.py``, ``ppo.py``), so that those saved configs still load."""

from lightning_modules.ppo import PPORLHF
from lightning_modules.reward_model import PairwiseRewardModel
from lightning_modules.sft import AgenticSFT, CausalLMSFT

__all__ = ["AgenticSFT", "CausalLMSFT", "PPORLHF", "PairwiseRewardModel"]
