"""One data contract for the LM corpora: plain records (dicts) read through ``datasets.load_dataset`` from a local
file, a local folder or a hub name; ``None`` means the caller's generated offline corpus.

    records = load_records("data/stories.jsonl", "train", ["text"])            # a local JSON Lines file
    records = load_records("org/instructions", "train", ["instruction", "output"], config="en")   # a hub name
    records = load_records(None, "train", ["text"], generate=make_records)     # the generated default

Local files are read by their suffix (``.json`` / ``.jsonl``: ``json``, ``.txt``: ``text`` with one record
``{"text": ...}`` per blank-line separated paragraph, ``.csv``, ``.parquet``) and serve the split ``train``; a
folder is read as ``datasets`` reads one (split names from the file names: ``train.jsonl``, ``validation.jsonl``).
A hub name fails at once, naming it, when the hub cannot be reached (``datasets`` itself retries for a long time);
with ``HF_DATASETS_OFFLINE=1`` the library reads its cache instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from models.lm_factory import hub_connection_error

BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}
Record = dict


def load_records(source: str | None, split: str = "train", columns: Sequence[str] = (), *,
                 config: str | None = None, generate: Callable[[], list[Record]] | None = None) -> list[Record]:
    """Records of ``split`` of ``source``, each with every one of ``columns``; ``source=None``: ``generate()``."""
    if source is None:
        if generate is None:
            raise ValueError("dataset must be given: there is no generated default here")
        records = generate()
        where = "the generated corpus"
    else:
        table = _load(source, split, config)
        where = f"dataset {source!r} (split {split!r})"
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{where} has no column {missing[0]!r} (its columns: {', '.join(table.column_names)})")
        records = table.to_list()
    if not records:
        raise ValueError(f"{where} holds no records")
    return records


def column_value(record: Record, column: str) -> str:
    """A record's ``column`` as stripped text (a missing value, ``None``, is an empty string)."""
    return "" if record.get(column) is None else str(record[column]).strip()


def _load(source: str, split: str, config: str | None):
    """The ``datasets.Dataset`` of one split of a local file, a local folder or a hub name."""
    import datasets

    builder = BUILDERS.get(Path(source).suffix.lower())
    try:
        if builder is not None and not os.path.isdir(source):
            if not any(ch in source for ch in "*?[") and not os.path.isfile(source):
                raise FileNotFoundError(f"dataset file {source!r} does not exist")
            options = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files={"train": source}, split=split, **options)
        if not os.path.isdir(source):
            require_dataset_reachable(source)
        return datasets.load_dataset(source, config, split=split)
    except OSError:  # a missing file, an unreachable hub: already one clear line
        raise
    except Exception as error:  # the library's own errors (unknown split or config, unreadable file) in one line
        raise ValueError(f"could not read dataset {source!r} (split {split!r}): {error}") from error


def require_dataset_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail at once, naming ``name``, when it is not local and the hub cannot be reached (offline mode, where the
    library reads its cache, is left to the library)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    error = hub_connection_error(timeout)
    if error is not None:
        raise OSError(
            f"could not load dataset {name!r}: it is neither a local file or folder nor reachable on the hub "
            f"({type(error).__name__}). Download it on a machine with internet access (`huggingface-cli download "
            f"{name} --repo-type dataset --local-dir <folder>`) and pass that folder, set HF_DATASETS_OFFLINE=1 to "
            f"read a cached copy, or leave dataset null for the generated corpus."
        ) from error
