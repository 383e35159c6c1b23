"""The action-sentinel grammar of an LM agent, a registry of deterministic tools and a multi-turn environment.

An agent's output is read for the *earliest* of three sentinels:

    <tool name="add">{"a": 2, "b": 3}</tool>     call a registered tool with JSON keyword arguments
    <ask>Which number?</ask>                     ask the user a question
    <finish>5</finish>                           give the final answer

Anything else (no sentinel, an unclosed tag, malformed JSON, arguments that are not an object) is an ``invalid``
action with a reason; the parser never raises. The environment runs an episode under budgets (turns and tool
calls) and rewards a correct final answer.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SENTINELS = {"tool": re.compile(r"<tool\s+name\s*=\s*\""), "ask": re.compile(r"<ask>"),
             "finish": re.compile(r"<finish>")}
_TOOL = re.compile(r"<tool\s+name\s*=\s*\"([^\"<>]*)\"\s*>(.*?)</tool>", re.DOTALL)
_CLOSING = {"ask": "</ask>", "finish": "</finish>"}


@dataclass
class Action:
    """One parsed agent output."""

    kind: str  # tool | ask | finish | invalid
    name: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    error: str | None = None


def parse_action(output: Any) -> Action:
    """The action of the earliest sentinel in ``output``; ``invalid`` (with ``error``) when it is malformed."""
    try:
        return _parse(output if isinstance(output, str) else str(output))
    except Exception as error:  # the grammar must never crash an episode
        return Action("invalid", error=f"unparseable output ({type(error).__name__})")


def _parse(text: str) -> Action:
    found = [(m.start(), kind) for kind, pattern in SENTINELS.items() if (m := pattern.search(text))]
    if not found:
        return Action("invalid", error="no <tool>, <ask> or <finish> sentinel")
    start, kind = min(found)
    if kind == "tool":
        match = _TOOL.match(text, start)
        if match is None:
            return Action("invalid", error="unclosed or malformed <tool name=\"...\"> tag")
        name, body = match.group(1).strip(), match.group(2).strip()
        if not name:
            return Action("invalid", error="empty tool name")
        try:
            args = json.loads(body) if body else {}
        except (json.JSONDecodeError, RecursionError) as error:
            return Action("invalid", name=name, error=f"tool arguments are not valid JSON: {error}")
        if not isinstance(args, dict):
            return Action("invalid", name=name, error="tool arguments must be a JSON object")
        return Action("tool", name=name, args=args, text=match.group(0))
    content_start = text.index(">", start) + 1
    end = text.find(_CLOSING[kind], content_start)
    if end < 0:
        return Action("invalid", error=f"unclosed <{kind}> tag")
    return Action(kind, text=text[content_start:end].strip())


# --- tools ----------------------------------------------------------------------------------------------------
@dataclass
class Tool:
    """A deterministic function with typed keyword arguments."""

    name: str
    fn: Callable[..., Any]
    params: dict[str, type]
    description: str = ""


class ToolRegistry:
    """Registered tools; validates calls and runs them without ever raising."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools or []:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self.tools[tool.name] = tool

    def validate(self, action: Action) -> str | None:
        """Why ``action`` is not a valid call of a registered tool (``None`` when it is)."""
        if action.kind != "tool":
            return action.error or f"not a tool call ({action.kind})"
        tool = self.tools.get(action.name or "")
        if tool is None:
            return f"unknown tool {action.name!r}; registered: {sorted(self.tools)}"
        if set(action.args) != set(tool.params):
            return f"{tool.name} takes arguments {sorted(tool.params)}, got {sorted(action.args)}"
        for key, kind in tool.params.items():
            value = action.args[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
                return f"{tool.name}: argument {key!r} must be an integer"
            if kind is str and not isinstance(value, str):
                return f"{tool.name}: argument {key!r} must be a string"
        return None

    def is_valid_call(self, action: Action) -> bool:
        return self.validate(action) is None

    def call(self, action: Action) -> tuple[bool, str]:
        """``(ok, observation)``: the tool's result, or the reason the call failed."""
        problem = self.validate(action)
        if problem is not None:
            return False, f"error: {problem}"
        try:
            return True, str(self.tools[action.name].fn(**action.args))
        except Exception as error:  # a tool failure is an observation, not a crash
            return False, f"error: {action.name} failed ({type(error).__name__}: {error})"


def default_tools() -> ToolRegistry:
    """The deterministic tool suite of the agentic tasks."""
    return ToolRegistry([
        Tool("add", lambda a, b: a + b, {"a": int, "b": int}, "a + b"),
        Tool("multiply", lambda a, b: a * b, {"a": int, "b": int}, "a * b"),
        Tool("count_letter", lambda word, letter: word.count(letter), {"word": str, "letter": str},
             "occurrences of letter in word"),
        Tool("reverse", lambda word: word[::-1], {"word": str}, "the word backwards"),
    ])


# --- tasks and the environment --------------------------------------------------------------------------------
WORDS = ["apple", "banana", "kite", "forest", "rabbit", "garden", "yellow", "turtle", "pebble", "balloon"]


@dataclass
class Task:
    """A question, the tool call that answers it and the answer."""

    question: str
    tool: str
    args: dict[str, Any]
    answer: str

    @property
    def call(self) -> str:
        return f'<tool name="{self.tool}">{json.dumps(self.args)}</tool>'


def make_task(rng: random.Random, tools: ToolRegistry | None = None) -> Task:
    """A random one-tool task of the default suite."""
    tools = tools or default_tools()
    kind = rng.choice(["add", "multiply", "count_letter", "reverse"])
    if kind in ("add", "multiply"):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        question = f"What is {a} plus {b}?" if kind == "add" else f"What is {a} times {b}?"
        args: dict[str, Any] = {"a": a, "b": b}
    elif kind == "count_letter":
        word = rng.choice(WORDS)
        args = {"word": word, "letter": rng.choice(sorted(set(word)))}
        question = f"How many times does the letter {args['letter']} appear in {word}?"
    else:
        args = {"word": rng.choice(WORDS)}
        question = f"What is {args['word']} spelled backwards?"
    ok, answer = tools.call(Action("tool", name=kind, args=args))
    assert ok, answer
    return Task(question, kind, args, answer)


def episode_prompt(task: Task) -> str:
    return f"Task: {task.question}\nAction:"


def observation_text(observation: str) -> str:
    """What the environment appends to the transcript after an action: its observation and the next turn's cue."""
    return f"\nObservation: {observation}\nAction:"


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    action: Action
    invalid: bool = False
    """The action was malformed, or a tool call the registry rejects (unknown tool, wrong arguments)."""


class AgenticEnv:
    """A multi-turn episode: the agent acts, tools answer, the episode ends at ``<finish>`` or when a budget runs
    out. Reward 1 for a correct final answer, 0 otherwise, minus ``invalid_penalty`` per invalid action (malformed,
    or a tool call the registry rejects); with ``end_on_invalid`` the first invalid action also ends the episode."""

    def __init__(self, tools: ToolRegistry | None = None, max_turns: int = 6, max_tool_calls: int = 10,
                 invalid_penalty: float = 0.1, user_reply: str = "Please answer the task as asked.",
                 end_on_invalid: bool = False) -> None:
        if max_turns < 1 or max_tool_calls < 0:
            raise ValueError("max_turns must be >= 1 and max_tool_calls >= 0")
        self.tools = tools or default_tools()
        self.max_turns, self.max_tool_calls = max_turns, max_tool_calls
        self.invalid_penalty, self.user_reply = invalid_penalty, user_reply
        self.end_on_invalid = end_on_invalid

    def reset(self, task: Task) -> str:
        self.task, self.turns, self.tool_calls, self.done = task, 0, 0, False
        self.transcript = episode_prompt(task)
        return self.transcript

    def step(self, output: str) -> StepResult:
        if self.done:
            raise RuntimeError("the episode is over; call reset()")
        action = parse_action(output)
        self.turns += 1
        reward, observation = 0.0, ""
        invalid = action.kind == "invalid" or (action.kind == "tool" and not self.tools.is_valid_call(action))
        if action.kind == "finish":
            self.done = True
            reward = float(action.text.strip() == self.task.answer)
            observation = "correct" if reward else "wrong"
        elif action.kind == "tool":
            self.tool_calls += 1
            if self.tool_calls > self.max_tool_calls:
                self.done, observation = True, "error: tool-call budget exhausted"
            else:
                _, observation = self.tools.call(action)
        elif action.kind == "ask":
            observation = self.user_reply
        else:
            observation = f"error: {action.error}"
        if invalid:
            reward = -self.invalid_penalty
            self.done = self.done or self.end_on_invalid
        shown = action.text if action.kind in ("tool",) else output.strip()
        self.transcript += f" {shown}{observation_text(observation)}"
        if not self.done and self.turns >= self.max_turns:
            self.done = True
        return StepResult(observation, reward, self.done, action, invalid)


def run_episode(env: AgenticEnv, task: Task, act: Callable[[str], str]) -> tuple[float, int]:
    """Play one episode with ``act(transcript) -> output``; returns ``(return, turns)``."""
    transcript, total = env.reset(task), 0.0
    while not env.done:
        total += env.step(act(transcript)).reward
        transcript = env.transcript
    return total, env.turns


def demonstrations(task: Task) -> list[tuple[str, str]]:
    """Expert ``(context, action)`` turns of a task: call the tool, then finish with its result."""
    first = episode_prompt(task)
    second = f"{first} {task.call}\nObservation: {task.answer}\nAction:"
    return [(first, task.call), (second, f"<finish>{task.answer}</finish>")]
