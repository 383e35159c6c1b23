"""The tuning loop on an Optuna study: the study's storage (SQLite by default, PostgreSQL / MySQL for several
machines) is the shared history, holds every agent message and lets a killed run resume.

An episode is one Optuna trial. The agentic method asks the Judge, Reward-Penalty and Tuner agents, enqueues the
merged proposal (with their messages) and lets ``study.optimize`` run it: the trial trains, then the SEAL Expert
plans a SEAL stage, SEAL runs, the QA Generator and Evaluator score held-out answers, and everything is written
to the trial before it completes. A finished episode is therefore complete in the store or not there at all.
Heartbeats mark the trial of a killed worker as failed after ``grace_period`` seconds and re-queue its
hyperparameters, so the same command run again continues where the study stopped.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from tuning.agents import Context, Judge, QAEvaluator, QAGenerator, RewardPenalty, SealExpert, Tuner, merge
from tuning.backends import BackendSettings, make_backend
from tuning.qa import evaluate_qa
from tuning.seal import SealSettings, seal_stage
from tuning.space import DEFAULT_HPARAMS, SPACE, check_minimums, sampled_hparams, suggest
from tuning.tracking import WandbSettings, log_trial
from tuning.trial import TrialSettings, run_trial

# Heartbeats and stale-trial retries are marked experimental by Optuna; they are what resume relies on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class StudySettings:
    """The study: where it is stored, how it searches and when it stops."""

    storage: str = "sqlite:///outputs/tuning/default.db"
    """Optuna storage URL: ``sqlite:///file.db`` on one machine, ``postgresql+psycopg://user@host/db`` (or
    ``mysql://...``) for workers on several machines. The password belongs in the URL's environment
    (e.g. ``PGPASSWORD``), not in a config."""
    study_name: str = "agentic-lora"
    """Name of the study in the storage; the same name resumes it."""
    method: Literal["agentic", "tpe", "random"] = "agentic"
    """``agentic`` (the agent team), or the Optuna baselines ``tpe`` and ``random``."""
    n_trials: int = 8
    """Finished episodes the study should hold (counted over all workers and earlier runs)."""
    seed: int = 0
    """Seed of the baseline samplers (and of the agents' start when ``start_from_default`` is false)."""
    tpe_startup_trials: int = 4
    """Random trials before TPE starts modelling (Optuna's default of 10 would make a 10-trial TPE study a random
    search)."""
    force_min_episodes: int = 3
    """The Judge cannot stop the study before this many episodes."""
    patience: int = 4
    """The rule-based Judge stops after this many episodes without a better validation loss."""
    reward_tolerance: float = 0.005
    """Relative improvement that counts as a reward (or, negated, a penalty) for the Reward-Penalty agent."""
    heartbeat_interval: int = 5
    """Seconds between a running trial's heartbeats."""
    grace_period: int = 15
    """A running trial without a heartbeat for this long belongs to a dead worker: it fails and is re-queued."""
    max_retry: int = 2
    """Times a dead worker's trial is re-queued."""
    start_from_default: bool = True
    """Every method's first episode is the agents' default configuration (``tuning.space.DEFAULT_HPARAMS``; TPE and
    random search have it enqueued), so a comparison does not measure the starting point. ``false``: the agents
    start from random search's first configuration for ``seed``, and the baselines sample from the start."""
    qa: bool = True
    """Score held-out QA after every agentic episode."""
    export_messages: str | None = "outputs/tuning/default_messages.jsonl"
    """Write every agent message of the study to this JSONL file at the end (``null``: don't)."""

    def __post_init__(self) -> None:
        check_minimums(self, {"n_trials": 1, "force_min_episodes": 0, "patience": 1, "tpe_startup_trials": 1,
                              "heartbeat_interval": 1, "max_retry": 0})
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(f"grace_period must be > heartbeat_interval ({self.heartbeat_interval}), "
                             f"got {self.grace_period}")
        if self.storage.split(":", 1)[0].split("+")[0] not in ("sqlite", "postgresql", "mysql"):
            raise ValueError(f"storage must be a sqlite:///, postgresql:// or mysql:// URL, got {self.storage!r}")


def open_study(settings: StudySettings) -> optuna.Study:
    """Create the study, or load it when it exists (the resume path). Workers starting together take turns: on an
    empty PostgreSQL database, concurrent creation of Optuna's tables fails in all but one of them."""
    if settings.storage.startswith("sqlite:///"):
        Path(settings.storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with ClaimLock(settings.storage, "open"):
        return _create_or_load(settings)


def _create_or_load(settings: StudySettings) -> optuna.Study:
    storage = optuna.storages.RDBStorage(
        settings.storage, heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry),
    )
    sampler = {"tpe": optuna.samplers.TPESampler(n_startup_trials=settings.tpe_startup_trials, seed=settings.seed),
               "random": optuna.samplers.RandomSampler(seed=settings.seed)}.get(settings.method)
    study = optuna.create_study(storage=storage, study_name=settings.study_name, direction="minimize",
                                sampler=sampler, load_if_exists=True)
    method = study.user_attrs.get("method")
    if method is None:
        study.set_user_attr("method", settings.method)
    elif method != settings.method:
        raise ValueError(f"study {settings.study_name!r} was created with method {method!r}, not {settings.method!r}")
    return study


TRIAL_ERRORS = (FloatingPointError, RuntimeError, ValueError)
"""Errors that fail one trial (recorded on it) without stopping the study."""


class ClaimLock:
    """Serialises a step among the workers of one storage. ``Tuning`` claims trials under ``claim:<study>``, so that
    deciding whether another trial is needed (finished + running < ``n_trials``), proposing it and claiming it happen
    as one step: two workers never take the same proposal, and together they never start more than ``n_trials``
    trials that could finish. ``open_study`` creates tables and studies under ``open``.

    SQLite: an exclusive ``flock`` on ``<database>.lock`` next to the database (one machine, as SQLite itself; one
    lock whatever the name); PostgreSQL / MySQL: a session advisory lock of the database server, named after
    ``name``, on a connection of its own. Released by ``release`` (idempotent) or when the process ends (the server
    drops a dead client's session and its locks).
    """

    def __init__(self, storage_url: str, name: str) -> None:
        """``name``: workers using the same name (on the same database) exclude each other."""
        url = sqlalchemy.engine.make_url(storage_url)
        self.backend, self.held = url.get_backend_name(), False
        self.key = zlib.crc32(f"tuning-{name}".encode())
        self.name = f"tuning-{self.key}"
        self.path = None if self.backend != "sqlite" or url.database in (None, "", ":memory:") else \
            f"{url.database}.lock"
        # No pool: each claim opens its own connection and closing it really ends the session (and any lock).
        self.engine = sqlalchemy.create_engine(storage_url, poolclass=sqlalchemy.pool.NullPool) \
            if self.backend in ("postgresql", "mysql") else None
        self.file = self.connection = None

    def acquire(self) -> None:
        if self.path is not None:
            if self.file is None:
                self.file = open(self.path, "a")  # noqa: SIM115 (held for the life of the lock)
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        elif self.engine is not None:
            self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            sql = "SELECT pg_advisory_lock(:key)" if self.backend == "postgresql" else "SELECT GET_LOCK(:name, -1)"
            self.connection.execute(sqlalchemy.text(sql), {"key": self.key, "name": self.name})
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.path is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        elif self.connection is not None:
            sql = "SELECT pg_advisory_unlock(:key)" if self.backend == "postgresql" else "SELECT RELEASE_LOCK(:name)"
            self.connection.execute(sqlalchemy.text(sql), {"key": self.key, "name": self.name})
            self.connection.close()
            self.connection = None

    def __enter__(self) -> ClaimLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hparams_of(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's hyperparameters: the enqueued ones (a queued trial, or one claimed by a worker that died before
    suggesting them all) with those already suggested on top."""
    return dict(trial.system_attrs.get("fixed_params", {})) | dict(trial.params)


def history(study: optuna.Study) -> list[dict[str, Any]]:
    """Finished episodes in order: what every agent sees."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = t.user_attrs
        out.append({"episode": t.number, "hparams": dict(t.params), "metrics": attrs.get("metrics", {}),
                    "move": attrs.get("move"), "seal": attrs.get("seal_summary"), "qa": attrs.get("qa")})
    return out


def messages(study: optuna.Study) -> list[dict[str, Any]]:
    """Every agent message of the study, in trial order (a trial's ``messages`` plus the study's stop record)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        for m in t.user_attrs.get("messages", []):
            out.append({"trial": t.number, "state": t.state.name} | m)
    if "stop" in study.user_attrs:
        out.append({"trial": None, "state": "STOP"} | study.user_attrs["stop"])
    return out


def export_messages(study: optuna.Study, path: str) -> int:
    """Write the study's agent messages as JSONL (through a temporary file, so a crash leaves the old file)."""
    rows = messages(study)
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{Path(path).name}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    os.replace(tmp, path)
    return len(rows)


def _move(hparams: dict, best: dict | None, proposed: dict | None) -> dict | None:
    """Which hyperparameter this episode moved away from the best configuration (for the rule-based agents)."""
    if best is None:
        return None
    changed = [n for n in SPACE if hparams[n] != best["hparams"][n]]
    if proposed and proposed.get("param") in changed:
        name, direction = proposed["param"], proposed["direction"]
    elif len(changed) == 1:
        name = changed[0]
        direction = 1 if hparams[name] > best["hparams"][name] else -1
    else:
        return None
    return {"param": name, "direction": direction, "base_loss": best["metrics"]["val_loss"]}


class Tuning:
    """Runs a study: the agentic loop or an Optuna baseline, on one instruction task."""

    def __init__(self, study: StudySettings, data, trial: TrialSettings, agents: BackendSettings,
                 seal: SealSettings, wandb: WandbSettings | None = None) -> None:
        """Wire the study's settings, the task, the agent backend and the W&B logging of trials (off: ``None``)."""
        self.settings, self.data, self.trial_settings, self.seal_settings = study, data, trial, seal
        self.wandb = wandb or WandbSettings()
        self.backend = make_backend(agents, data.tokenizer)
        self.judge = Judge(study.force_min_episodes, study.patience)
        self.reward, self.tuner, self.seal_expert = RewardPenalty(study.reward_tolerance), Tuner(), SealExpert()
        self.qa_generator, self.qa_evaluator = QAGenerator(), QAEvaluator()
        self.study = open_study(study)
        self.lock = ClaimLock(study.storage, f"claim:{study.study_name}")

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        """Run episodes until the study holds ``n_trials`` finished ones, or the Judge stops it, or this run has
        started ``3 x n_trials`` trials (so a task that always fails ends the run; a new run starts afresh).

        Trials of other workers that are running count toward ``n_trials``: while they could reach it, this worker
        waits for them, failing (and re-queueing) any whose heartbeat stops for ``grace_period`` seconds, so a run
        never ends with a dead worker's trial left ``RUNNING``."""
        budget, started = 3 * self.settings.n_trials, 0
        while True:
            self.lock.acquire()
            try:
                action = self._next(started, budget)
                if action == "run":
                    started += 1
                    self.study.optimize(self.objective, n_trials=1, catch=TRIAL_ERRORS)
            finally:
                self.lock.release()  # the objective releases it as soon as its trial is claimed
            if action == "stop":
                break
            if action == "wait":
                time.sleep(self.settings.heartbeat_interval)
        if self.settings.export_messages:
            export_messages(self.study, self.settings.export_messages)
        return self.study

    def _next(self, started: int, budget: int) -> str:
        """Under the claim lock: ``stop``, ``wait`` (other workers' running trials may reach ``n_trials``) or
        ``run`` (with the agents' proposal enqueued, for the agentic method)."""
        optuna.storages.fail_stale_trials(self.study)  # dead workers' trials fail and their proposals are re-queued
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if done >= self.settings.n_trials or "stop" in self.study.user_attrs or started >= budget:
            return "stop"
        if done + len(running) >= self.settings.n_trials:
            return "wait"
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if self.settings.method != "agentic" and self.settings.start_from_default and not trials:
            self.study.enqueue_trial(dict(DEFAULT_HPARAMS))  # the baselines' first episode: the agents' start
        if self.settings.method == "agentic" and not waiting:
            in_flight = [hparams_of(t) for t in running]
            if not self._propose(len(trials), in_flight):
                return "stop"
        return "run"

    def _propose(self, started: int, in_flight: list[dict] = ()) -> bool:
        """Judge -> Reward-Penalty -> Tuner -> merge; enqueue the episode. ``False`` when the Judge stops.
        ``in_flight``: hyperparameters of other workers' running trials, which the proposal must not repeat."""
        past = history(self.study)
        start_hparams = DEFAULT_HPARAMS if self.settings.start_from_default else sampled_hparams(self.settings.seed)
        ctx = Context(past, started, extra={"started": started, "in_flight": list(in_flight),
                                            "start_hparams": start_hparams})
        notes = []
        if past:
            verdict, message = self.judge.act(ctx, self.backend)
            notes.append(message)
            if not verdict["continue"]:
                self.study.set_user_attr("stop", message)
                return False
            ctx.feedback["judge"] = verdict["feedback"]
        reward, message = self.reward.act(ctx, self.backend)
        notes.append(message)
        ctx.feedback["reward_penalty"] = {"say": reward["say"], "signal": reward["reward_signal"]}
        ctx.feedback["seal_summary"] = seal_summary(past)
        proposal, message = self.tuner.act(ctx, self.backend)
        notes.append(message)
        hparams = merge(proposal, reward["override"])
        if hparams in ctx.extra["in_flight"]:  # another worker runs it now: the rule's next configuration instead
            proposal = self.tuner.validate(self.tuner.rule(ctx), ctx)[0]
            hparams = proposal["hparams"]
            message["notes"].append("proposal already running in another worker: replaced by the rule's next one")
        move = _move(hparams, ctx.best(), proposal.get("move"))
        self.study.enqueue_trial(hparams, user_attrs={"messages": notes, "move": move,
                                                      "seal_plan": proposal["seal_plan"]})
        return True

    def objective(self, trial: optuna.Trial) -> float:
        try:
            hparams = suggest(trial)
            self.study._storage.record_heartbeat(trial._trial_id)  # claimed, with a heartbeat, before others go on
        finally:
            self.lock.release()
        try:
            value = self._episode(trial, hparams)
        except Exception as error:  # kept on the trial: the reason a study ended without its episodes
            trial.set_user_attr("error", f"{type(error).__name__}: {str(error)[:300]}")
            self._log_trial(trial, hparams, "FAIL")
            raise
        self._log_trial(trial, hparams, "COMPLETE" if math.isfinite(value) else "FAIL", value)  # Optuna fails NaN
        return value

    def _log_trial(self, trial: optuna.Trial, hparams: dict, state: str, value: float | None = None) -> None:
        attrs = trial.user_attrs
        results = {"value": value, "metrics": attrs.get("metrics", {}), "qa": attrs.get("qa", {}),
                   "seal": attrs.get("seal_summary") or {}}
        log_trial(self.wandb, self.settings.study_name, self.settings.method, trial.number, hparams, state, results)

    def _episode(self, trial: optuna.Trial, hparams: dict) -> float:
        module, metrics = run_trial(hparams, self.data, self.trial_settings)
        trial.set_user_attr("metrics", metrics)
        if self.settings.method == "agentic":
            self._after_training(trial, module, hparams, metrics)
        return metrics["val_loss"]

    def _after_training(self, trial: optuna.Trial, module, hparams: dict, metrics: dict) -> None:
        """SEAL Expert -> SEAL -> QA Generator -> QA -> QA Evaluator, all recorded on the trial."""
        notes = list(trial.user_attrs.get("messages", []))
        past = history(self.study)
        entry = {"episode": trial.number, "hparams": hparams, "metrics": metrics}
        ctx = Context(past + [entry], trial.number, extra={"last_train": entry})
        knowledge = list(self.data.knowledge)[:self.seal_settings.passages]
        if self.seal_settings.enabled and knowledge:
            plan, message = self.seal_expert.act(ctx, self.backend)
            notes.append(message)
            result = seal_stage(module.lm, self.data, knowledge, plan["edit_kind"], plan["seal_epochs"],
                                self.seal_settings, seed=trial.number)
            summary = {k: v for k, v in result.items() if k not in ("self_edits", "answers")}
            trial.set_user_attr("seal_summary", summary)
            trial.set_user_attr("self_edits", result["self_edits"])
        if self.settings.qa and knowledge:
            reward_questions = self.seal_settings.reward_questions
            qa_ctx = Context(ctx.history, trial.number, extra={"knowledge": [
                {"passage": k.passage, "questions": report_for(k, reward_questions)} for k in knowledge]})
            generated, message = self.qa_generator.act(qa_ctx, self.backend)
            notes.append(message)
            pairs = [(self.data.closed_book_prompt(q["question"]), q["answer"]) for q in generated["questions"]]
            scores = evaluate_qa(module.lm, self.data, pairs)
            qa = {k: scores[k] for k in ("em", "f1", "answer_loss", "n")}
            qa_ctx.extra = {"scores": qa}
            verdict, message = self.qa_evaluator.act(qa_ctx, self.backend)
            notes.append(message)
            trial.set_user_attr("qa", qa | {"verdict": verdict["verdict"]})
            trial.set_user_attr("qa_answers", scores["answers"][:20])
        trial.set_user_attr("messages", notes)


def report_for(knowledge, reward_questions: int) -> list[tuple[str, str]]:
    """The questions of a passage that are reported on (not used by the SEAL filter)."""
    return list(knowledge.questions[reward_questions:]) or list(knowledge.questions[:1])


def seal_summary(past: list[dict]) -> str:
    """A sentence on SEAL's effect so far (what the Tuner and the SEAL Expert read)."""
    seals = [e["seal"] for e in past if e.get("seal")]
    if not seals:
        return "no SEAL stage yet"
    kept = sum(s["kept"] for s in seals)
    total = sum(s["candidates"] for s in seals)
    mean = sum(s["qa_improvement"] for s in seals) / len(seals)
    return f"{len(seals)} SEAL stages kept {kept}/{total} self-edits; mean held-out QA loss change {mean:+.4f}"


def best_summary(study: optuna.Study) -> dict[str, Any]:
    """Best finished episode and counts."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = min(complete, key=lambda t: t.value, default=None)
    return {"study": study.study_name, "finished": len(complete), "best_val_loss": best.value if best else None,
            "best_params": best.params if best else None, "best_trial": best.number if best else None,
            "time": time.time()}
