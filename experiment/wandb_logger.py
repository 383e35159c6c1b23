"""Weights & Biases logger that stays offline until the user has logged in."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


def wandb_credentials_available() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``wandb login`` stored a key in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline`` decided automatically when it is left unset.

    ``offline: null`` (default): an explicit ``WANDB_MODE`` wins (``disabled`` in tests); otherwise the run is
    online when credentials exist and offline when they don't (sync later with ``wandb sync``).
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = "WANDB_MODE" not in os.environ and not wandb_credentials_available()
        super().__init__(*args, offline=offline, **kwargs)
