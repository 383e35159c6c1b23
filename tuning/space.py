"""The hyperparameter ranges of a trial and the schema checks that every agent output goes through.

``SPACE`` holds the original design's ranges; it is the only copy: the agents' prompts state it through
``describe_space``, the samplers draw from it and every agent output is clamped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A continuous hyperparameter in ``[low, high]``."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A hyperparameter taking one of ``values``."""

    values: tuple


SPACE: dict[str, Range | Choice] = {
    "lr": Range(1e-5, 5e-4, log=True),
    "batch_size": Choice((1, 2, 4, 8)),
    "epochs": Choice((1, 2)),
    "warmup_ratio": Range(0.0, 0.2),
    "lora_r": Choice((8, 16, 32)),
    "lora_alpha": Choice((16, 32, 64)),
    "lora_dropout": Range(0.0, 0.2),
}
DEFAULT_HPARAMS: dict[str, Any] = {"lr": 2e-4, "batch_size": 4, "epochs": 1, "warmup_ratio": 0.05, "lora_r": 8,
                                   "lora_alpha": 16, "lora_dropout": 0.05}


def sampled_hparams(seed: int) -> dict[str, Any]:
    """The first configuration that random search with sampler seed ``seed`` runs (Optuna's ``RandomSampler``): a
    starting point that favours no method."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return suggest(study.ask())


def describe_space() -> str:
    """``SPACE`` as the agents' prompts state it: ``lr [1e-05, 0.0005] (log scale), batch_size {1, 2, 4, 8}, ...``."""
    parts = []
    for name, spec in SPACE.items():
        if isinstance(spec, Range):
            parts.append(f"{name} [{spec.low:g}, {spec.high:g}]" + (" (log scale)" if spec.log else ""))
        else:
            parts.append(f"{name} {{{', '.join(map(str, spec.values))}}}")
    return ", ".join(parts)


def check_minimums(owner: Any, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None) -> None:
    """``ValueError("<field> must be >= <low>, got <value>")`` (``> <low>`` for ``above``) for the first field of
    ``owner`` out of range: the message starts with the field's name, so the command line can name the key."""
    for bounds, strict in ((at_least or {}, False), (above or {}, True)):
        for name, low in bounds.items():
            value = getattr(owner, name)
            if value < low or (strict and value == low):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")


class SchemaError(ValueError):
    """An agent output that does not fit its schema (after clamping what can be clamped)."""


def to_number(value: Any, name: str) -> float:
    """``value`` as a finite float (numbers and numeric strings); ``SchemaError`` otherwise."""
    if isinstance(value, bool):
        raise SchemaError(f"{name} must be a number, got a boolean")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise SchemaError(f"{name} must be a number, got {value!r}") from error
    if not math.isfinite(number):
        raise SchemaError(f"{name} must be finite, got {value!r}")
    return number


def clamp_value(name: str, value: Any) -> int | float:
    """``value`` moved into the range of ``name``: clipped for a range, the nearest allowed value for a choice
    (ties go to the smaller one)."""
    spec, number = SPACE[name], to_number(value, name)
    if isinstance(spec, Range):
        return min(max(number, spec.low), spec.high)
    return min(spec.values, key=lambda v: (abs(v - number), v))


def clamp_hparams(raw: Any, base: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A full, in-range hyperparameter dict from an agent's ``raw`` proposal, and notes on what was changed.

    Missing or unusable fields come from ``base`` (default: ``DEFAULT_HPARAMS``); unknown fields are dropped.
    """
    base = dict(base or DEFAULT_HPARAMS)
    if not isinstance(raw, dict):
        return base, [f"hparams must be an object, got {type(raw).__name__}: all fields kept"]
    notes, out = [], {}
    for name in SPACE:
        if name not in raw:
            out[name] = base[name]
            continue
        try:
            out[name] = clamp_value(name, raw[name])
        except SchemaError as error:
            out[name], _ = base[name], notes.append(f"{error}: kept {base[name]!r}")
            continue
        if out[name] != raw[name]:
            notes.append(f"{name} {raw[name]!r} -> {out[name]!r}")
    notes += [f"unknown field {k!r} dropped" for k in raw if k not in SPACE]
    return out, notes


def in_space(hparams: dict[str, Any]) -> bool:
    """Whether every hyperparameter is present and inside its range."""
    for name, spec in SPACE.items():
        value = hparams.get(name)
        if isinstance(spec, Range):
            if not isinstance(value, (int, float)) or not spec.low <= value <= spec.high:
                return False
        elif value not in spec.values:
            return False
    return True


def suggest(trial, space: dict[str, Range | Choice] = SPACE) -> dict[str, Any]:
    """Hyperparameters drawn by an Optuna trial (or fixed by an enqueued agent proposal)."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, Range):
            out[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        else:
            out[name] = trial.suggest_categorical(name, list(spec.values))
    return out


# --- schemas of agent outputs ---------------------------------------------------------------------------------
def field(raw: dict, name: str, kind: type | tuple[type, ...], default: Any, notes: list[str]) -> Any:
    """``raw[name]`` when it has type ``kind``; otherwise ``default`` and a note."""
    value = raw.get(name, default)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if kind in (int, float) and not isinstance(value, bool):
        try:
            value = kind(to_number(value, name))
        except SchemaError:
            notes.append(f"{name}: not a number, used {default!r}")
            return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        notes.append(f"{name}: expected {getattr(kind, '__name__', kind)}, used {default!r}")
        return default
    return value


def text(raw: dict, name: str, notes: list[str], limit: int = 2000) -> str:
    """A string field, cut to ``limit`` characters (an agent's prose is kept, not trusted)."""
    value = raw.get(name, "")
    if not isinstance(value, str):
        notes.append(f"{name}: expected a string")
        value = json_safe_str(value)
    return value[:limit]


def json_safe_str(value: Any) -> str:
    try:
        import json

        return json.dumps(value)[:2000]
    except (TypeError, ValueError):
        return str(value)[:2000]
