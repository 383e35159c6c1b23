"""The tuning team: Tuner, Judge, Reward-Penalty, SEAL Expert, QA Generator and QA Evaluator.

Each agent has one prompt (for LLM backends), one deterministic rule (the offline default, and the fallback) and
one schema. ``Agent.act`` asks the backend, extracts the JSON object, validates it against the schema and clamps
it to the ranges; a failed call or a reply that does not fit falls back to the rule, and the message records why.
Agents see only the study history (finished episodes) and the other agents' feedback.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from datamodules.instructions import EDIT_KINDS
from tuning.backends import extract_json
from tuning.space import DEFAULT_HPARAMS, SPACE, Choice, SchemaError, clamp_hparams, clamp_value, describe_space, text
from tuning.space import field as typed_field

# Order in which the rule-based tuner moves one hyperparameter at a time around the best configuration.
COORDINATES = ("lr", "batch_size", "lora_r", "warmup_ratio", "epochs", "lora_alpha", "lora_dropout")
SYSTEM = ("You are {role} in a team that tunes LoRA fine-tuning of a language model. Reply with one JSON object "
          "and nothing else, with exactly these fields: {fields}. Allowed hyperparameter ranges: {space}. "
          "Lower validation loss is better.")


def one_of(values) -> str:
    """``a, b or c``: allowed values as a prompt states them."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


@dataclass
class Context:
    """What an agent sees: the finished episodes, this episode's number and the other agents' feedback."""

    history: list[dict[str, Any]]
    episode: int
    feedback: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def best(self) -> dict[str, Any] | None:
        return min(self.history, key=lambda e: e["metrics"]["val_loss"], default=None)

    def prompt(self) -> str:
        view = {"history": [{k: e.get(k) for k in ("episode", "hparams", "metrics", "seal", "qa")}
                            for e in self.history[-20:]], "episode": self.episode, "feedback": self.feedback}
        return json.dumps(view | self.extra, default=str)


class Agent:
    """One role: a prompt, a rule and a schema."""

    name = "agent"
    role = "an agent"
    fields = "say"

    def rule(self, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        """The output in schema, clamped; ``SchemaError`` when it cannot be used at all."""
        raise NotImplementedError

    def system_prompt(self) -> str:
        """What an LLM backend is told; the ranges are read from ``SPACE`` at every call, never copied."""
        return SYSTEM.format(role=self.role, fields=self.fields, space=describe_space())

    def act(self, ctx: Context, backend) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(output, message)``: the validated output and the record of this call (kept in the study)."""
        system, user = self.system_prompt(), ctx.prompt()
        message: dict[str, Any] = {"agent": self.name, "episode": ctx.episode, "backend": backend.name,
                                   "time": time.time(), "fallback": None}
        started = time.perf_counter()
        try:
            reply = backend.complete(system, user)
            message["reply"] = reply if reply is None else str(reply)[:4000]
            raw = self.rule(ctx) if reply is None else extract_json(reply)
            output, notes = self.validate(raw, ctx)
        except Exception as error:  # any backend or schema failure: the rule answers and the study goes on
            message["fallback"] = f"{type(error).__name__}: {str(error)[:300]}"
            output, notes = self.validate(self.rule(ctx), ctx)
        message.update(output=output, notes=notes, seconds=round(time.perf_counter() - started, 4))
        return output, message


def _dict(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise SchemaError(f"expected a JSON object, got {type(raw).__name__}")
    return raw


# --- Tuner ----------------------------------------------------------------------------------------------------
def step(name: str, value: Any, direction: int) -> Any:
    """``value`` moved one step along ``name``'s range: x2 / /2 for lr, one allowed value for a choice, 0.05
    for the other ranges (clamped)."""
    spec = SPACE[name]
    if isinstance(spec, Choice):
        values = list(spec.values)
        return values[min(max(values.index(value) + direction, 0), len(values) - 1)]
    if spec.log:
        return clamp_value(name, value * (2.0 ** direction))
    return round(clamp_value(name, value + 0.05 * direction), 6)


def last_move(history: list[dict], name: str) -> tuple[int, bool] | None:
    """``(direction, improved)`` of the latest episode that moved ``name`` away from the then-best config."""
    for entry in reversed(history):
        move = entry.get("move") or {}
        if move.get("param") == name:
            return move["direction"], entry["metrics"]["val_loss"] < move.get("base_loss", float("inf"))
    return None


class Tuner(Agent):
    """Proposes the next hyperparameters and the SEAL plan.

    Rule: coordinate search around the best episode so far. One hyperparameter moves per episode (in the order of
    ``COORDINATES``, offset by the episodes already started so that parallel workers try different ones), in the
    direction that last helped; a move that made things worse is tried the other way next time. A regression never
    compounds: every proposal starts from the best configuration, not from the last one.
    """

    name, role = "tuner", "the tuner (an expert ML engineer)"

    @property
    def fields(self) -> str:
        return (f'"say" (string), "hparams" (object with {", ".join(SPACE)}), '
                f'"seal_plan" (object with seal_epochs {one_of(SPACE["epochs"].values)})')

    def rule(self, ctx: Context) -> dict[str, Any]:
        best = ctx.best()
        in_flight = ctx.extra.get("in_flight", [])  # configurations other workers are running now
        start_hparams = ctx.extra.get("start_hparams", DEFAULT_HPARAMS)  # the study's starting configuration
        if best is None and start_hparams not in in_flight:
            return {"say": "First episode: the starting configuration.", "hparams": dict(start_hparams),
                    "seal_plan": {"seal_epochs": 1}}
        base = dict(best["hparams"] if best else start_hparams)
        origin = f"the best episode {best['episode']}" if best else "the starting configuration (running elsewhere)"
        start = ctx.extra.get("started", ctx.episode)
        for offset in range(len(COORDINATES)):
            name = COORDINATES[(start + offset) % len(COORDINATES)]
            previous = last_move(ctx.history, name)
            direction = 1 if previous is None else (previous[0] if previous[1] else -previous[0])
            for d in (direction, -direction):  # at a bound, go the other way
                value = step(name, base[name], d)
                if value != base[name] and base | {name: value} not in in_flight:
                    proposal = base | {name: value}
                    say = f"From {origin}: {name} {base[name]} -> {value}."
                    return {"say": say, "hparams": proposal, "seal_plan": {"seal_epochs": 1},
                            "move": {"param": name, "direction": d}}
        return {"say": "Every neighbour was tried; repeat the best.", "hparams": base, "seal_plan": {"seal_epochs": 1}}

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        raw = _dict(raw)
        best = ctx.best()
        hparams, notes = clamp_hparams(raw.get("hparams"), best["hparams"] if best else None)
        plan = raw.get("seal_plan") if isinstance(raw.get("seal_plan"), dict) else {}
        try:
            seal_epochs = int(clamp_value("epochs", plan.get("seal_epochs", 1)))
        except SchemaError as error:
            seal_epochs = 1
            notes.append(f"seal_plan {error}: used 1")
        out = {"say": text(raw, "say", notes), "hparams": hparams, "seal_plan": {"seal_epochs": seal_epochs}}
        move = raw.get("move")
        if isinstance(move, dict) and move.get("param") in SPACE and move.get("direction") in (-1, 1):
            out["move"] = {"param": move["param"], "direction": move["direction"]}
        return out, notes


# --- Judge ----------------------------------------------------------------------------------------------------
class Judge(Agent):
    """Decides whether to continue. Rule: continue until ``force_min_episodes``; then stop once the best loss has
    not improved for ``patience`` episodes. A stop before the minimum is overruled by the schema."""

    name, role = "judge", "the judge, who decides whether tuning continues"
    fields = '"say" (string), "continue" (boolean), "reason" (string), "feedback" (string)'

    def __init__(self, force_min_episodes: int = 3, patience: int = 4) -> None:
        self.force_min_episodes, self.patience = force_min_episodes, patience

    def rule(self, ctx: Context) -> dict[str, Any]:
        losses = [e["metrics"]["val_loss"] for e in ctx.history]
        if not losses:
            return {"say": "Nothing to judge yet.", "continue": True, "reason": "no episodes", "feedback": ""}
        best_at = losses.index(min(losses))
        stale = len(losses) - 1 - best_at
        go = len(losses) < self.force_min_episodes or stale < self.patience
        reason = f"best val loss {losses[best_at]:.4f} at episode {ctx.history[best_at]['episode']}, " \
                 f"{stale} episode(s) without improvement"
        feedback = "Explore around the best configuration." if stale else "The last change helped; keep going."
        return {"say": ("Continue: " if go else "Stop: ") + reason, "continue": go, "reason": reason,
                "feedback": feedback}

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        raw, notes = _dict(raw), []
        go = typed_field(raw, "continue", bool, True, notes)
        if not go and len(ctx.history) < self.force_min_episodes:
            go = True
            notes.append(f"stop overruled: fewer than force_min_episodes={self.force_min_episodes} episodes")
        return {"say": text(raw, "say", notes), "continue": go, "reason": text(raw, "reason", notes),
                "feedback": text(raw, "feedback", notes)}, notes


# --- Reward-Penalty -------------------------------------------------------------------------------------------
def reward_signal(history: list[dict]) -> dict[str, float]:
    """The original's signal, on relative changes: train improvement of the last episode over the previous one,
    SEAL improvement of held-out QA (answer loss) over its base, total = train + 0.5 * seal."""
    train = seal = 0.0
    if len(history) >= 2:
        previous, last = history[-2]["metrics"]["val_loss"], history[-1]["metrics"]["val_loss"]
        train = (previous - last) / max(abs(previous), 1e-8)
    if history and history[-1].get("seal"):
        seal = float(history[-1]["seal"].get("qa_improvement", 0.0))
    total = train + 0.5 * seal
    return {"train_improvement": train, "seal_improvement": seal, "total_improvement": total,
            "reward": max(total, 0.0), "penalty": max(-total, 0.0) or 0.0}


class RewardPenalty(Agent):
    """Turns the last episode's outcome into a reward or penalty and overrides.

    Rule: a clear reward (total improvement above ``tolerance``) pushes the hyperparameter that just moved one more
    step the same way; a penalty adds no override (the next proposal restarts from the best configuration, so
    a harmful change is undone instead of being repeated); a plateau changes nothing.
    """

    name, role = "reward_penalty", "the reward-penalty agent, who scores the last episode and overrides settings"
    fields = '"say" (string), "reward_signal" (object), "override" (object with any of the hyperparameters)'

    def __init__(self, tolerance: float = 0.005) -> None:
        self.tolerance = tolerance

    def rule(self, ctx: Context) -> dict[str, Any]:
        signal = reward_signal(ctx.history)
        move = ctx.history[-1].get("move") if ctx.history else None
        if signal["total_improvement"] > self.tolerance and move:
            last = ctx.history[-1]["hparams"]
            value = step(move["param"], last[move["param"]], move["direction"])
            say = f"Reward {signal['reward']:.4f}: push {move['param']} further ({last[move['param']]} -> {value})."
            return {"say": say, "reward_signal": signal, "override": {move["param"]: value}}
        kind = "penalty" if signal["total_improvement"] < -self.tolerance else "plateau"
        return {"say": f"{kind}: no override.", "reward_signal": signal, "override": {}}

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        raw, notes = _dict(raw), []
        override = raw.get("override") if isinstance(raw.get("override"), dict) else {}
        clean = {}
        for name, value in override.items():
            if name not in SPACE:
                notes.append(f"unknown override {name!r} dropped")
                continue
            try:
                clean[name] = clamp_value(name, value)
            except SchemaError as error:
                notes.append(f"override {error}: dropped")
        # The signal is recomputed from the history: a model's arithmetic is not trusted.
        return {"say": text(raw, "say", notes), "reward_signal": reward_signal(ctx.history),
                "override": clean}, notes


# --- SEAL Expert ----------------------------------------------------------------------------------------------
class SealExpert(Agent):
    """Plans the SEAL stage: its epochs (1 or 2) and the kind of self-edit. Rule: try every kind once, then use
    the kind whose self-edits were kept most often; 2 epochs when the last SEAL stage improved held-out QA."""

    name, role = "seal_expert", "the SEAL expert, who plans the self-edit stage"

    @property
    def fields(self) -> str:
        kinds = ", ".join(f'"{k}"' for k in EDIT_KINDS)
        return (f'"say" (string), "seal_epochs" ({one_of(SPACE["epochs"].values)}), "edit_kind" (one of {kinds}), '
                '"evaluation" (string)')

    def rule(self, ctx: Context) -> dict[str, Any]:
        seals = [e["seal"] for e in ctx.history if e.get("seal")]
        tried = {s["edit_kind"]: [] for s in seals}
        for s in seals:
            tried[s["edit_kind"]].append(s["kept"] / max(1, s["candidates"]))
        untried = [k for k in EDIT_KINDS if k not in tried]
        kind = untried[0] if untried else max(tried, key=lambda k: sum(tried[k]) / len(tried[k]))
        helped = bool(seals) and seals[-1].get("qa_improvement", 0.0) > 0
        evaluation = "no SEAL stage yet" if not seals else (
            f"last SEAL {'improved' if helped else 'did not improve'} held-out QA "
            f"({seals[-1].get('qa_improvement', 0.0):+.4f}); keep rates {json.dumps(tried)}")
        return {"say": f"SEAL with {kind} self-edits.", "seal_epochs": 2 if helped else 1, "edit_kind": kind,
                "evaluation": evaluation}

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        raw, notes = _dict(raw), []
        epochs = int(clamp_value("epochs", typed_field(raw, "seal_epochs", float, 1, notes)))
        kind = raw.get("edit_kind")
        if kind not in EDIT_KINDS:
            notes.append(f"edit_kind {kind!r} is not one of {EDIT_KINDS}: used 'qa'")
            kind = "qa"
        return {"say": text(raw, "say", notes), "seal_epochs": epochs, "edit_kind": kind,
                "evaluation": text(raw, "evaluation", notes)}, notes


# --- QA -------------------------------------------------------------------------------------------------------
class QAGenerator(Agent):
    """Chooses held-out questions with reference answers. Rule: the questions stored with the held-out passages.
    A model's questions are kept only when their answer appears in a passage (references are never invented)."""

    name, role = "qa_generator", "the QA generator, who writes held-out questions about the passages"
    fields = '"say" (string), "questions" (list of objects with "question" and "answer"; each answer must be ' \
             'copied from a passage)'

    def __init__(self, max_questions: int = 40) -> None:
        self.max_questions = max_questions

    def rule(self, ctx: Context) -> dict[str, Any]:
        pairs = [{"question": q, "answer": a} for k in ctx.extra.get("knowledge", []) for q, a in k["questions"]]
        return {"say": f"{len(pairs[:self.max_questions])} stored questions.", "questions": pairs[:self.max_questions]}

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        raw, notes = _dict(raw), []
        passages = " ".join(k["passage"] for k in ctx.extra.get("knowledge", [])).lower()
        items = raw.get("questions") if isinstance(raw.get("questions"), list) else []
        kept = []
        for item in items:
            ok = isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip()
                                                for k in ("question", "answer"))
            if ok and item["answer"].strip().lower() in passages:
                kept.append({"question": item["question"].strip(), "answer": item["answer"].strip()})
            else:
                notes.append(f"question dropped (malformed or answer not in a passage): {str(item)[:80]}")
        if not kept:
            raise SchemaError("no usable question")
        return {"say": text(raw, "say", notes), "questions": kept[:self.max_questions]}, notes


class QAEvaluator(Agent):
    """Comments on the scored answers. The scores (exact match, token F1) are computed from the model's answers
    and the references, never by the agent; the agent only gives a verdict. Rule: compare F1 with the previous
    episode's."""

    name, role = "qa_evaluator", "the QA evaluator, who reviews the model's scored answers"
    fields = '"say" (string), "verdict" ("improved", "unchanged" or "worse"), "advice" (string)'
    VERDICTS = ("improved", "unchanged", "worse")

    def rule(self, ctx: Context) -> dict[str, Any]:
        now = ctx.extra.get("scores", {}).get("f1", 0.0)
        before = next((e["qa"]["f1"] for e in reversed(ctx.history) if e.get("qa")), None)
        if before is None or abs(now - before) < 1e-9:
            verdict = "unchanged"
        else:
            verdict = "improved" if now > before else "worse"
        return {"say": f"QA F1 {now:.3f} (previous {before}).", "verdict": verdict,
                "advice": "Prefer self-edits and settings that raise held-out F1."}

    def validate(self, raw: Any, ctx: Context) -> tuple[dict[str, Any], list[str]]:
        raw, notes = _dict(raw), []
        verdict = raw.get("verdict")
        if verdict not in self.VERDICTS:
            raise SchemaError(f"verdict {verdict!r} is not one of {self.VERDICTS}")
        return {"say": text(raw, "say", notes), "verdict": verdict, "advice": text(raw, "advice", notes)}, notes


def merge(tuner: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The episode's hyperparameters: the tuner's proposal with the reward-penalty overrides on top, clamped."""
    hparams, _ = clamp_hparams(tuner["hparams"] | override, tuner["hparams"])
    return hparams


__all__ = ["Agent", "Context", "Judge", "QAEvaluator", "QAGenerator", "RewardPenalty", "SealExpert", "Tuner",
           "merge", "reward_signal", "step"]
