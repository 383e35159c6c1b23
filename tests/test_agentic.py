"""The sentinel grammar (examples and fuzzing), the tool registry, the multi-turn environment and agentic SFT."""

import json
import random

import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.agentic_demos import AgenticDemoDataModule
from envs.agentic import (
    Action,
    AgenticEnv,
    Task,
    default_tools,
    demonstrations,
    make_task,
    parse_action,
    run_episode,
)
from lightning_modules.sft import AgenticSFT
from models.lm_factory import LMSettings


@pytest.mark.parametrize(
    "text,kind,detail",
    [
        ('<tool name="add">{"a": 2, "b": 3}</tool>', "tool", ("add", {"a": 2, "b": 3})),
        ('Thinking. <tool name = "reverse" >{"word": "kite"}</tool> etc', "tool", ("reverse", {"word": "kite"})),
        ("<ask>Which number?</ask>", "ask", "Which number?"),
        ("<finish> 42 </finish><tool name=\"add\">{}</tool>", "finish", "42"),  # the earliest sentinel wins
        ('<ask>why</ask> <finish>1</finish>', "ask", "why"),
        ('<tool name="add">{"a": 1}</tool><finish>2</finish>', "tool", ("add", {"a": 1})),
        ('<tool name="add"></tool>', "tool", ("add", {})),
    ],
)
def test_parser_reads_the_earliest_sentinel(text, kind, detail):
    action = parse_action(text)
    assert action.kind == kind, action
    if kind == "tool":
        assert (action.name, action.args) == detail
    else:
        assert action.text == detail


@pytest.mark.parametrize(
    "text,reason",
    [
        ("just text", "no <tool>"),
        ('<tool name="add">{"a": 1,}</tool>', "not valid JSON"),
        ('<tool name="add">[1, 2]</tool>', "JSON object"),
        ('<tool name="add">{"a": 1}', "unclosed"),
        ("<finish>5", "unclosed <finish>"),
        ('<tool name="">{}</tool>', "empty tool name"),
        ("<ask>unfinished question", "unclosed <ask>"),
    ],
)
def test_parser_reports_malformed_output(text, reason):
    action = parse_action(text)
    assert action.kind == "invalid" and reason in action.error


def test_parser_never_raises_on_fuzzed_output():
    rng = random.Random(0)
    pieces = ['<tool name="', "add", '">', "</tool>", "<ask>", "</ask>", "<finish>", "</finish>", "{", "}", '"a"',
              ":", "1", "[", "]", "\\", "\x00", "é", " ", "<", ">", '"', "name=", "{" * 50, "<tool", "</",
              '<tool name="add">{"a": 1, "b": 2}</tool>']
    kinds = set()
    for _ in range(3000):
        text = "".join(rng.choice(pieces) if rng.random() < 0.8 else chr(rng.randint(0, 0x2FFF))
                       for _ in range(rng.randint(0, 30)))
        action = parse_action(text)
        assert action.kind in {"tool", "ask", "finish", "invalid"}
        assert (action.error is None) == (action.kind != "invalid")
        kinds.add(action.kind)
    assert kinds == {"tool", "ask", "finish", "invalid"}  # the fuzzer reaches every branch
    assert parse_action(None).kind == "invalid" and parse_action(12).kind == "invalid"
    deep = '<tool name="x">' + "[" * 100_000 + "]" * 100_000 + "</tool>"
    assert parse_action(deep).kind == "invalid"


def test_registry_validates_names_argument_sets_and_types():
    tools = default_tools()
    assert tools.call(parse_action('<tool name="add">{"a": 2, "b": 40}</tool>')) == (True, "42")
    assert tools.call(parse_action('<tool name="count_letter">{"word": "banana", "letter": "a"}</tool>')) == (True,
                                                                                                             "3")
    for text, reason in [('<tool name="sub">{"a": 1, "b": 2}</tool>', "unknown tool"),
                         ('<tool name="add">{"a": 1}</tool>', "takes arguments"),
                         ('<tool name="add">{"a": "1", "b": 2}</tool>', "integer"),
                         ('<tool name="add">{"a": true, "b": 2}</tool>', "integer"),
                         ("<finish>3</finish>", "not a tool call")]:
        ok, observation = tools.call(parse_action(text))
        assert not ok and reason in observation
    with pytest.raises(ValueError, match="already registered"):
        tools.register(tools.tools["add"])


def test_environment_budgets_and_rewards():
    task = Task("What is 2 plus 3?", "add", {"a": 2, "b": 3}, "5")
    env = AgenticEnv(max_turns=6, max_tool_calls=2)
    assert run_episode(env, task, lambda _: "<finish>5</finish>") == (1.0, 1)
    assert run_episode(env, task, lambda _: "<finish>6</finish>") == (0.0, 1)
    # Tool calls beyond the budget end the episode.
    env.reset(task)
    results = [env.step(task.call) for _ in range(3)]
    assert [r.observation for r in results[:2]] == ["5", "5"] and results[2].done and "budget" in results[2].observation
    # Malformed outputs cost a penalty each until the turn budget ends the episode.
    total, turns = run_episode(env, task, lambda _: "no sentinel here")
    assert turns == 6 and total == pytest.approx(-0.6)
    env.reset(task)
    assert env.step("<ask>what?</ask>").observation == env.user_reply
    run_episode(env, task, lambda _: "<finish>5</finish>")
    with pytest.raises(RuntimeError, match="over"):
        env.step("<finish>5</finish>")


def test_expert_demonstrations_solve_every_task():
    rng = random.Random(1)
    env = AgenticEnv()
    for _ in range(100):
        task = make_task(rng)
        turns = iter(action for _, action in demonstrations(task))
        assert run_episode(env, task, lambda _, turns=turns: next(turns)) == (1.0, 2)
        assert json.loads(parse_action(task.call).text.split(">", 1)[1].rsplit("<", 1)[0]) == task.args


def test_tool_call_accuracy_rises_with_agentic_sft(tmp_path):
    torch.manual_seed(0)
    data = AgenticDemoDataModule(num_train_tasks=200, num_eval_tasks=24, vocab_size=400, batch_size=16,
                                 eval_batch_size=24, tokenizer_cache=str(tmp_path / "tok"))
    module = AgenticSFT(lm=LMSettings(hidden_size=48, num_layers=2, num_heads=4), max_new_tokens=24,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    module.build(data.tokenizer)
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = Trainer(**kwargs).validate(module, datamodule=data, verbose=False)[0]["val/tool_call_acc"]
    Trainer(max_epochs=4, limit_val_batches=0, enable_checkpointing=False, **kwargs).fit(module, datamodule=data)
    after = Trainer(**kwargs).validate(module, datamodule=data, verbose=False)[0]
    assert before == 0.0 and after["val/tool_call_acc"] >= 0.8
    assert after["val/tool_call_exact"] <= after["val/tool_call_acc"]
    assert isinstance(parse_action(module.first_actions(*_prompt(data))[0]), Action)


def _prompt(data):
    batch = next(iter(data.val_dataloader()))
    return batch["prompt_ids"][:2], batch["prompt_mask"][:2]
