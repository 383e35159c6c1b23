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

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
"""The smallest LM the tests train (``LMSettings`` keyword arguments)."""
TINY_CLI = ["--model.init_args.lm.hidden_size", "32", "--model.init_args.lm.num_layers", "1",
            "--model.init_args.lm.num_heads", "2"]
"""The same on the command line."""
TINY_STORIES = dict(num_stories=120, vocab_size=320)
"""A small story corpus for the RLHF DataModules."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A tokenizer cache shared by a test module's DataModules (a tokenizer is trained once per module)."""
    return str(tmp_path_factory.mktemp("tokenizers"))

