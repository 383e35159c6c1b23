import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder so logs and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
