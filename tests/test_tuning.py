"""The tuning loop: agent schemas under fuzzed output, the HTTP backend against a loopback server, QA scoring,
SEAL's keep filter, the data, the tune command end to end, resume after a real kill, and workers sharing a study on
SQLite and on a real PostgreSQL server."""

import inspect
import json
import math
import multiprocessing
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from datamodules.instructions import InstructionDataModule, parse_qa_text, qa_text
from experiment.cli import ConfigError, main
from lightning_modules.lm_phase import warmup_then_decay
from models.lm_factory import LoraSettings, build_causal_lm
from tests.conftest import REPO
from tests.test_configs import differences
from tuning.agents import Context, Judge, QAEvaluator, QAGenerator, RewardPenalty, SealExpert, Tuner
from tuning.backends import BackendSettings, HTTPBackend, LocalLMBackend, RuleBackend, extract_json
from tuning.qa import score_answers
from tuning.seal import SealSettings, seal_stage, trainable_state
from tuning.space import DEFAULT_HPARAMS, SPACE, Choice, Range, clamp_hparams, in_space, sampled_hparams, suggest
from tuning.study import ClaimLock, StudySettings, Tuning, hparams_of
from tuning.tracking import WandbSettings
from tuning.trial import SEED_TARGETS, TrialSettings

SMALL_DATA = ["--data.num_people", "30", "--data.num_val_people", "4", "--data.num_test_people", "2",
              "--data.num_knowledge_people", "4", "--data.max_length", "128"]
SMALL_TRIAL = ["--trial.lm.hidden_size", "32", "--trial.lm.num_layers", "1", "--trial.lm.num_heads", "2",
               "--trial.max_steps", "12", "--trial.pretrain_steps", "20", "--trial.threads", "1"]
SMALL_SEAL = ["--seal.passages", "2", "--seal.candidates", "1", "--seal.inner_steps", "2",
              "--seal.max_new_tokens", "16"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread on a busy machine; restore the setting for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("tokenizers"))
    return InstructionDataModule(num_people=30, num_val_people=4, num_test_people=2, num_knowledge_people=4,
                                 max_length=128, tokenizer_cache=cache)


def entry(episode, loss, move=None, seal=None, **hparams):
    return {"episode": episode, "hparams": DEFAULT_HPARAMS | hparams, "metrics": {"val_loss": loss},
            "move": move, "seal": seal, "qa": None}


# --- schemas and clamping -------------------------------------------------------------------------------------
JUNK = [None, True, "NaN", float("nan"), float("inf"), -1e9, 1e9, "0.3", "abc", [], {}, [1, 2], {"a": 1}, 0, -0.0,
        "1e-3", 7, 3.5]


def fuzz_value(rng):
    return rng.choice(JUNK + [rng.uniform(-10, 10), rng.randint(-100, 100), "x" * rng.randint(0, 5000)])


def fuzz_output(rng):
    keys = ["say", "hparams", "seal_plan", "continue", "reason", "feedback", "override", "reward_signal",
            "seal_epochs", "edit_kind", "evaluation", "questions", "verdict", "advice", "junk"]
    out = {k: fuzz_value(rng) for k in rng.sample(keys, rng.randint(0, len(keys)))}
    if rng.random() < 0.7:
        out["hparams"] = {n: fuzz_value(rng) for n in rng.sample(list(SPACE) + ["bogus"], rng.randint(0, 8))}
    if rng.random() < 0.5:
        out["override"] = {n: fuzz_value(rng) for n in rng.sample(list(SPACE), rng.randint(0, 7))}
    if rng.random() < 0.3:
        out["edit_kind"] = rng.choice(["qa", "restatement", "implications", "poem", 3])
    return rng.choice([out, json.dumps(out, default=str), "prose " + json.dumps(out, default=str) + " more",
                       "no json here", "{broken", "[1, 2]", ""])


class ScriptedBackend:
    name = "scripted"

    def __init__(self, replies):
        self.replies, self.systems = list(replies), []

    def complete(self, system, user):
        self.systems.append(system)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply if isinstance(reply, str) else json.dumps(reply)


def check_output(agent, out, ctx):
    if isinstance(agent, Tuner):
        assert in_space(out["hparams"]), out
        assert out["seal_plan"]["seal_epochs"] in (1, 2)
    elif isinstance(agent, Judge):
        assert isinstance(out["continue"], bool)
        if len(ctx.history) < agent.force_min_episodes:
            assert out["continue"]
    elif isinstance(agent, RewardPenalty):
        assert set(out["override"]) <= set(SPACE)
        assert in_space(DEFAULT_HPARAMS | out["override"])
    elif isinstance(agent, SealExpert):
        assert out["seal_epochs"] in (1, 2) and out["edit_kind"] in ("qa", "restatement", "implications")
    elif isinstance(agent, QAGenerator):
        passages = " ".join(k["passage"] for k in ctx.extra["knowledge"]).lower()
        assert out["questions"] and all(q["answer"].lower() in passages for q in out["questions"])
    elif isinstance(agent, QAEvaluator):
        assert out["verdict"] in QAEvaluator.VERDICTS
    assert isinstance(out["say"], str) and len(out["say"]) <= 2000


def test_fuzzed_agent_outputs_are_clamped_or_fall_back():
    rng = random.Random(0)
    knowledge = [{"passage": "Mara lives in Oakvale. Mara works as a baker.",
                  "questions": [("Where does Mara live?", "Oakvale")]}]
    agents = [Tuner(), Judge(force_min_episodes=3), RewardPenalty(), SealExpert(), QAGenerator(), QAEvaluator()]
    fallbacks = 0
    for i in range(400):
        agent = agents[i % len(agents)]
        past = [entry(k, 2.0 - 0.1 * k) for k in range(rng.randint(0, 4))]
        ctx = Context(past, len(past), extra={"knowledge": knowledge, "scores": {"f1": 0.5}})
        reply = fuzz_output(rng)
        backend = ScriptedBackend([reply if rng.random() < 0.9 else RuntimeError("connection refused")])
        out, message = agent.act(ctx, backend)
        check_output(agent, out, ctx)
        fallbacks += message["fallback"] is not None
        json.dumps(message)  # every message can be stored
    assert 50 < fallbacks < 400  # malformed replies fall back, usable ones are clamped and kept


def test_clamping_moves_values_into_the_seed_ranges():
    hparams, notes = clamp_hparams({"lr": 1.0, "batch_size": 5, "epochs": 7, "warmup_ratio": -3, "lora_r": 12,
                                    "lora_alpha": "64", "lora_dropout": float("nan"), "extra": 1})
    assert hparams == {"lr": 5e-4, "batch_size": 4, "epochs": 2, "warmup_ratio": 0.0, "lora_r": 8,
                       "lora_alpha": 64, "lora_dropout": DEFAULT_HPARAMS["lora_dropout"]}
    assert any("extra" in n for n in notes) and any("finite" in n for n in notes)
    assert clamp_hparams("not a dict")[0] == DEFAULT_HPARAMS
    for name, spec in SPACE.items():
        if isinstance(spec, Choice):
            assert clamp_hparams({name: 10_000})[0][name] == max(spec.values)


def test_agent_prompts_state_the_search_space_as_it_is(monkeypatch):
    def prompt(agent):
        backend = ScriptedBackend([{}])
        agent.act(Context([], 0), backend)
        return backend.systems[0]

    assert "lr [1e-05, 0.0005] (log scale)" in prompt(Tuner()) and "lora_r {8, 16, 32}" in prompt(Judge())
    monkeypatch.setitem(SPACE, "lr", Range(1e-6, 1e-2, log=True))
    monkeypatch.setitem(SPACE, "epochs", Choice((1, 2, 3)))
    tuner, seal = prompt(Tuner()), prompt(SealExpert())
    assert "lr [1e-06, 0.01] (log scale)" in tuner and "0.0005" not in tuner
    assert "epochs {1, 2, 3}" in tuner and "seal_epochs 1, 2 or 3" in tuner and '"seal_epochs" (1, 2 or 3)' in seal


def test_judge_cannot_stop_before_the_minimum_and_stops_on_a_plateau():
    judge = Judge(force_min_episodes=3, patience=2)
    early = Context([entry(0, 1.0), entry(1, 1.5)], 2)
    out, message = judge.act(early, ScriptedBackend([{"continue": False, "say": "stop"}]))
    assert out["continue"] and "overruled" in " ".join(message["notes"])
    plateau = Context([entry(0, 1.0), entry(1, 1.2), entry(2, 1.1)], 3)
    assert not judge.act(plateau, RuleBackend())[0]["continue"]


def test_a_regression_is_undone_not_repeated():
    # The original lowered the lr again after lowering it had made the loss worse.
    move = {"param": "lr", "direction": -1, "base_loss": 1.0}
    past = [entry(0, 1.0, lr=2e-4), entry(1, 1.3, move=move, lr=1e-4)]
    ctx = Context(past, 2, extra={"started": 0})  # the coordinate order starts at lr
    proposal, _ = Tuner().act(ctx, RuleBackend())
    assert proposal["hparams"]["lr"] == pytest.approx(4e-4)  # from the best (2e-4), the other way
    assert {k: v for k, v in proposal["hparams"].items() if k != "lr"} == {
        k: v for k, v in past[0]["hparams"].items() if k != "lr"}
    reward, _ = RewardPenalty().act(ctx, RuleBackend())
    assert reward["reward_signal"]["penalty"] > 0 and reward["override"] == {}


def test_extract_json_finds_the_object_in_prose():
    assert extract_json('Sure! ```json\n{"a": "}{", "b": {"c": [1]}}\n``` done') == {"a": "}{", "b": {"c": [1]}}
    assert extract_json('{oops} then {"ok": true}') == {"ok": True}
    for bad in ["", "no json", "[1, 2]", '{"a": 1']:
        with pytest.raises(ValueError):
            extract_json(bad)


ADVERSARIAL_JSON = [
    '{"a":' * 5000 + "1" + "}" * 5000,  # deeper than json reads: RecursionError inside
    "[" * 100_000, "{" * 100_000, "}" * 100_000, '{"a":' * 20_000, '{"a":"' * 16_000, "{[}" * 33_000,
    '{"a": ' + "9" * 100_000 + "}",  # an integer over Python's 4,300-digit limit
    ('{"a":[' + "0," * 20) * 2_000, '"' + "{" * 100_000, "\\" * 100_000 + "{", "{" + "\\" * 100_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL_JSON, ids=range(len(ADVERSARIAL_JSON)))
def test_extract_json_raises_only_value_error_on_adversarial_text(text):
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json(text)
    # the object after the junk (or inside it, where the junk's braces stay open) is still found
    assert extract_json(text + ' {"ok": 1}') == {"ok": 1}


def test_extract_json_fuzz_raises_value_error_or_returns_a_dict():
    rng = random.Random(0)
    pieces = ["{", "}", "[", "]", '"', "\\", ":", ",", '"a"', "1", "9" * 50, " ", "\n", "x", '{"k": 1}']
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 2000)))
        try:
            assert isinstance(extract_json(text), dict)
        except ValueError:
            pass


def test_parse_qa_text_on_long_adversarial_text():
    assert parse_qa_text("Q:" * 32_000) == [] and parse_qa_text("Q: x" * 20_000 + "?") == []
    assert parse_qa_text("Q: a? A: b " * 20_000) == [("a?", "b")] * 20_000
    assert parse_qa_text("?" * 50_000 + " A: b") == [] and parse_qa_text("Q: " + "? " * 50_000) == []
    assert parse_qa_text("Q: x? A: y\n" * 20_000) == [("x?", "y")] * 20_000
    assert parse_qa_text("Q: Who? Q: Where is it? A: here. Q: no answer? A:") == [("Where is it?", "here")]


# --- HTTP backend ---------------------------------------------------------------------------------------------
class ChatHandler(BaseHTTPRequestHandler):
    requests: list = []
    replies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatHandler.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        status, content = ChatHandler.replies.pop(0)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = HTTPServer(("127.0.0.1", 0), ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ChatHandler.requests, ChatHandler.replies = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_http_backend_against_a_loopback_server(chat_server, monkeypatch):
    secret = "sk-test-never-logged-1234"
    monkeypatch.setenv("TUNING_TEST_KEY", secret)
    backend = HTTPBackend(BackendSettings(kind="http", model="served-model", base_url=chat_server,
                                          api_key_env="TUNING_TEST_KEY", retries=0))
    reply = {"say": "bigger lr", "hparams": {"lr": 0.5, "batch_size": 8, "lora_r": 32}, "seal_plan": {"seal_epochs": 2}}
    ChatHandler.replies = [(200, "Here you go: " + json.dumps(reply)), (500, "boom"), (200, "not json at all")]
    ctx = Context([entry(0, 1.0)], 1)
    out, message = Tuner().act(ctx, backend)
    assert out["hparams"]["lr"] == 5e-4 and out["hparams"]["batch_size"] == 8 and out["hparams"]["lora_r"] == 32
    assert out["seal_plan"]["seal_epochs"] == 2 and message["fallback"] is None
    sent = ChatHandler.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == f"Bearer {secret}"
    assert sent["body"]["model"] == "served-model" and sent["body"]["messages"][0]["role"] == "system"
    fallbacks = []
    for _ in range(2):  # a server error, then a reply without JSON: the rule answers
        out, message = Tuner().act(ctx, backend)
        assert in_space(out["hparams"]) and secret not in json.dumps(message)
        fallbacks.append(message["fallback"])
    assert "HTTP 500" in fallbacks[0] and fallbacks[1].startswith("ValueError")
    assert secret not in json.dumps(BackendSettings(api_key_env="TUNING_TEST_KEY").__dict__)


def test_http_backend_sends_no_key_unless_its_variable_is_named(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-key-must-not-leak")
    assert BackendSettings().api_key_env is None
    backend = HTTPBackend(BackendSettings(kind="http", base_url=chat_server, retries=0))
    ChatHandler.replies = [(200, "{}")]
    backend.complete("system", "user")
    assert ChatHandler.requests[0]["auth"] is None


@pytest.mark.parametrize("base_url", ["http://example.com/v1", "http://10.0.0.5:8000/v1", "http://127.0.0.1.nip.io/v1",
                                      "http://[2001:db8::1]/v1"])
def test_a_key_is_refused_over_plain_http_to_another_host(base_url, monkeypatch):
    with pytest.raises(ValueError, match="clear text"):
        BackendSettings(kind="http", base_url=base_url, api_key_env="OPENAI_API_KEY")
    BackendSettings(kind="http", base_url=base_url)  # without a key: allowed
    settings = BackendSettings(kind="http", base_url="https://api.example.com/v1", api_key_env="OPENAI_API_KEY")
    settings.base_url = base_url  # changed after validation: the backend checks again
    with pytest.raises(ValueError, match="clear text"):
        HTTPBackend(settings)


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://[::1]:80/v1",
                                      "https://api.example.com/v1", "HTTPS://API.EXAMPLE.COM/v1"])
def test_a_key_may_go_over_https_or_to_loopback(base_url):
    HTTPBackend(BackendSettings(kind="http", base_url=base_url, api_key_env="OPENAI_API_KEY"))


def test_base_url_must_be_http():
    for bad in ["ftp://example.com/v1", "example.com/v1", "http:///v1"]:
        with pytest.raises(ValueError, match="base_url"):
            BackendSettings(base_url=bad)


def test_http_backend_reply_that_is_not_utf8_is_a_runtime_error(chat_server, monkeypatch):
    def not_utf8(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"choices": [{"message": {"content": "\xff\xfe"}}]}')

    monkeypatch.setattr(ChatHandler, "do_POST", not_utf8)
    backend = HTTPBackend(BackendSettings(kind="http", base_url=chat_server, retries=0))
    with pytest.raises(RuntimeError, match="not UTF-8"):
        backend.complete("system", "user")


def test_http_backend_unreachable_falls_back():
    backend = HTTPBackend(BackendSettings(kind="http", base_url="http://127.0.0.1:9/v1", retries=0, timeout_s=2))
    out, message = Judge().act(Context([entry(0, 1.0)], 1), backend)
    assert message["fallback"].startswith("RuntimeError") and out["continue"]


def test_local_lm_backend_reply_is_validated_and_falls_back(data):
    settings = BackendSettings(kind="local", model="tiny-llama", max_new_tokens=8, temperature=0.0)
    backend = LocalLMBackend(settings, data.tokenizer)  # an untrained model: its reply is not JSON
    out, message = Tuner().act(Context([entry(0, 1.0)], 1), backend)
    assert message["backend"] == "local" and message["fallback"].startswith("ValueError")
    assert isinstance(message["reply"], str) and in_space(out["hparams"])


# --- QA -------------------------------------------------------------------------------------------------------
def test_qa_scores_against_references():
    assert score_answers(["The Oakvale."], ["oakvale"]) == {"em": 1.0, "f1": 1.0}  # SQuAD's normalisation
    assert score_answers(["Oakvale town"], ["Oakvale"])["em"] == 0.0
    assert score_answers(["in Oakvale town"], ["Oakvale"])["f1"] == pytest.approx(0.5)
    assert score_answers(["baker"], ["farmer"])["f1"] == 0.0 and score_answers([""], ["farmer"])["f1"] == 0.0
    preds, refs = ["the Oakvale", "in Oakvale town", "nothing"], ["Oakvale", "Oakvale", "baker"]
    scores = score_answers(preds, refs)
    assert scores["em"] == pytest.approx(1 / 3) and scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        score_answers(["a"], [])


# --- data -----------------------------------------------------------------------------------------------------
def test_instruction_batches_take_the_loss_on_the_response_only(data):
    batch = next(iter(data.val_dataloader()))
    example = data.examples["val"][0]
    prompt, response = data.encode_example(example)
    row = batch["labels"][0]
    assert (row[:len(prompt)] == -100).all() and row[len(prompt):len(prompt) + len(response)].tolist() == response
    assert (row[batch["attention_mask"][0] == 0] == -100).all()
    held_out = {p.name for p in data.people["knowledge"]}
    assert not any(name in t for t in data.pretraining_texts() for name in held_out)
    assert not any(name in e.input + e.output for e in data.examples["train"] for name in held_out)


def test_local_instruction_files_and_bad_input(tmp_path):
    path = tmp_path / "set.jsonl"
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    local = InstructionDataModule(dataset=str(path), tokenizer_cache=str(tmp_path), vocab_size=300)
    assert len(local.examples["train"]) == 32 and len(local.examples["val"]) == 4 and local.knowledge == []
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        InstructionDataModule(dataset=str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl.*no column 'output'"):
        InstructionDataModule(dataset=str(tmp_path / "bad.jsonl"))


def test_a_datasets_name_is_read_through_the_library(tmp_path, monkeypatch):
    import datasets

    rows = [{"question": f"Name {i}.", "answer": f"n{i}"} for i in range(30)]
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr("datamodules.sources.hub_connection_error", lambda timeout=3.0: None)  # "online"
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = InstructionDataModule(dataset="org/instructions", dataset_config="en", split="train[:30]",
                                prompt_column="question", input_column=None, completion_column="answer",
                                tokenizer_cache=str(tmp_path), vocab_size=300)
    assert calls == [("org/instructions", "en", "train[:30]")]
    examples = hub.examples["train"] + hub.examples["val"] + hub.examples["test"]
    assert sorted(e.output for e in examples) == sorted(r["answer"] for r in rows) and examples[0].input == ""
    with pytest.raises(ValueError, match="'org/other'.*no column 'instruction'"):
        InstructionDataModule(dataset="org/other", tokenizer_cache=str(tmp_path))


def test_qa_text_round_trips():
    pairs = [("Where does Mara live?", "Oakvale"), ("What is the job of Mara?", "baker")]
    assert parse_qa_text(qa_text(pairs)) == pairs
    assert parse_qa_text("Q: garbage without answer") == []


SEED_LORA = LoraSettings(r=8, alpha=16.0, target_modules=list(SEED_TARGETS))


def _rate_factors(warmup: int, total: int, decay: str) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = warmup_then_decay(optimizer, warmup, total, decay)
    factors = []
    for _ in range(total):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return factors


def test_warmup_then_decay_against_hand_computed_factors():
    linear = _rate_factors(2, 10, "linear")  # warmup (k + 1) / 3, then 1 - (k - 2) / 8
    assert linear == pytest.approx([1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    cosine = _rate_factors(0, 10, "cosine")
    assert [cosine[0], cosine[5]] == pytest.approx([1.0, 0.5])
    assert _rate_factors(2, 7, "constant") == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1])


# --- SEAL -----------------------------------------------------------------------------------------------------
def test_seal_keeps_only_self_edits_that_improve_held_out_qa(data):
    torch.manual_seed(0)
    lm = build_causal_lm("tiny-llama", data.tokenizer, lora=SEED_LORA, hidden_size=32,
                         num_layers=1, num_heads=2)
    people = data.people["knowledge"][:2]
    wrong_city = {"Oakvale": "Pinecrest"}

    def writer(passages):
        out = []
        for person in people:
            right = qa_text(person.questions()[:2])
            wrong = qa_text([(q, wrong_city.get(a, "Oakvale") if i == 0 else "sailor" if a != "sailor" else "baker")
                             for i, (q, a) in enumerate(person.questions()[:2])])
            out.append([right, wrong])
        return out

    settings = SealSettings(passages=2, candidates=2, inner_steps=30, lr=1e-2, reward_questions=2)
    before = trainable_state(lm)
    result = seal_stage(lm, data, data.knowledge[:2], "qa", 1, settings, writer=writer)
    edits = result["self_edits"]
    assert len(edits) == 4 and result["candidates"] == 4
    assert all(e["kept"] == (e["improvement"] > 0) for e in edits)
    assert [e["kept"] for e in edits] == [True, False, True, False]  # the true facts help, the false ones hurt
    assert result["kept"] == 2
    assert any(not torch.equal(before[n], p) for n, p in lm.named_parameters() if n in before)
    # Nothing clears a high bar: nothing kept, the model is left as it was.
    lm2 = build_causal_lm("tiny-llama", data.tokenizer, lora=SEED_LORA, hidden_size=32,
                          num_layers=1, num_heads=2)
    state = trainable_state(lm2)
    strict = SealSettings(passages=2, candidates=2, inner_steps=30, lr=1e-2, min_improvement=1.0)
    result = seal_stage(lm2, data, data.knowledge[:2], "qa", 1, strict, writer=writer)
    assert result["kept"] == 0 and result["qa_after"] == result["qa_before"]
    assert all(torch.equal(state[n], p) for n, p in lm2.named_parameters() if n in state)


# --- the command ----------------------------------------------------------------------------------------------
def tune_args(tmp_path, *extra):
    return ["tune", "--config", str(REPO / "configs/tuning/default.yaml"), "--study.storage",
            f"sqlite:///{tmp_path}/study.db", "--study.export_messages", str(tmp_path / "messages.jsonl"),
            "--trial.cache_dir", str(tmp_path / "base"), "--data.tokenizer_cache", str(tmp_path / "tok"),
            *SMALL_DATA, *SMALL_TRIAL, *SMALL_SEAL, *extra]


def test_default_study_runs_end_to_end_offline(tmp_path):
    summary = main(tune_args(tmp_path, "--study.n_trials", "3"))
    assert summary["finished"] == 3 and math.isfinite(summary["best_val_loss"])
    study = optuna.load_study(study_name="agentic-lora", storage=f"sqlite:///{tmp_path}/study.db")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3  # the tuner explored
    for t in trials:
        assert in_space(t.params) and t.value == t.user_attrs["metrics"]["val_loss"]
        seal = t.user_attrs["seal_summary"]
        assert seal["candidates"] == 2 and 0 <= seal["kept"] <= 2
        assert 0 <= t.user_attrs["qa"]["f1"] <= 1 and t.user_attrs["qa"]["n"] > 0
    rows = [json.loads(line) for line in (tmp_path / "messages.jsonl").read_text().splitlines()]
    agents = {r["agent"] for r in rows}
    assert agents == {"tuner", "judge", "reward_penalty", "seal_expert", "qa_generator", "qa_evaluator"}
    exported = tmp_path / "again.jsonl"
    main(tune_args(tmp_path, "--export_only", "true", "--study.export_messages", str(exported)))
    assert exported.read_text() == (tmp_path / "messages.jsonl").read_text()
    # The same command again finds the study complete and runs nothing.
    assert main(tune_args(tmp_path, "--study.n_trials", "3"))["finished"] == 3
    assert len(optuna.load_study(study_name="agentic-lora", storage=f"sqlite:///{tmp_path}/study.db").trials) == 3


@pytest.mark.parametrize("args,key", [
    (["--study.no_such_key", "1"], "study.no_such_key"),
    (["--study.n_trial", "3"], "study.n_trial"),  # an abbreviation is not --study.n_trials
    (["--study.n_trials", "0"], "study.n_trials"),
    (["--study.grace_period", "2"], "study.grace_period"),
    (["--seal.lr", "-1"], "seal.lr"),
    (["--data.max_length", "3"], "data.max_length"),
    (["--trial.max_steps", "0"], "trial.max_steps"),
    (["--trial.lm.lora.r", "0"], "trial.lm.lora"),
    (["--agents.kind", "psychic"], "agents.kind"),
    (["--agents.timeout_s", "0"], "agents.timeout_s"),
    (["--study", "{bogus: 1}"], "study.bogus"),
    (["--config", "configs/tuning/missing.yaml"], "config"),
])
def test_tune_command_rejects_bad_input_in_one_line(args, key, capsys, monkeypatch):
    monkeypatch.delenv("EXPERIENTIAL_AGENTS_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--config", str(REPO / "configs/tuning/default.yaml"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {key}: ") and err.count("\n") == 1 and len(err.split(": ", 2)[2]) > 3, err


def test_tune_command_reports_an_unknown_key_of_a_config_file(tmp_path, capsys):
    config = tmp_path / "extra.yaml"
    config.write_text("study:\n  n_trials: 2\n  bogus: 1\n")
    with pytest.raises(SystemExit):
        main(["tune", "--config", str(REPO / "configs/tuning/default.yaml"), "--config", str(config)])
    assert capsys.readouterr().err == "Error: study.bogus: unknown option\n"


def test_tune_command_config_error_traceback_with_debug(monkeypatch):
    monkeypatch.setenv("EXPERIENTIAL_AGENTS_DEBUG", "1")
    with pytest.raises(ConfigError, match="must be >= 1"):
        main(["tune", "--config", str(REPO / "configs/tuning/default.yaml"), "--study.n_trials", "0"])


def test_export_only_of_a_missing_study_creates_nothing(tmp_path, capsys):
    storage = tmp_path / "nothing" / "study.db"
    with pytest.raises(SystemExit):
        main(["tune", "--config", str(REPO / "configs/tuning/default.yaml"), "--export_only", "true",
              "--study.storage", f"sqlite:///{storage}", "--study.export_messages", str(tmp_path / "m.jsonl")])
    assert capsys.readouterr().err.startswith("Error: study.storage: no database file")
    assert list(tmp_path.iterdir()) == []
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 'study.db'}")
    with pytest.raises(SystemExit):
        main(["tune", "--config", str(REPO / "configs/tuning/default.yaml"), "--export_only", "true",
              "--study.storage", f"sqlite:///{tmp_path / 'study.db'}", "--study.export_messages", str(tmp_path / "m")])
    assert capsys.readouterr().err == f"Error: study.study_name: no study named 'agentic-lora' in sqlite:///{tmp_path}/study.db\n"
    assert not (tmp_path / "m").exists()


def test_settings_defaults_are_the_default_config():
    config = yaml.safe_load((REPO / "configs/tuning/default.yaml").read_text())
    classes = {"study": StudySettings, "agents": BackendSettings, "seal": SealSettings, "data": InstructionDataModule,
               "wandb": WandbSettings}
    differ = []
    for section, cls in classes.items():
        parameters = inspect.signature(cls).parameters
        differ += [f"{section}.{k}: default {parameters[k].default!r}, config {v!r}"
                   for k, v in config[section].items() if parameters[k].default != v]
    differ += differences(config["trial"], asdict(TrialSettings()), "trial.")  # nested: the LM settings
    assert differ == []


def test_tune_command_prints_its_config(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--config", str(REPO / "configs/tuning/default.yaml"), "--print_config"])
    config = capsys.readouterr().out
    assert "method: agentic" in config and "api_key_env: null" in config


def test_resume_after_a_kill_loses_no_finished_episode(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    args = tune_args(tmp_path, "--study.n_trials", "3", "--study.heartbeat_interval", "1",
                     "--study.grace_period", "2", "--trial.max_steps", "40")  # episodes long enough to be caught
    command = [sys.executable, str(REPO / "train.py"), *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished, deadline = [], time.time() + 240
    try:
        while time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name="agentic-lora", storage=storage)
                trials = study.get_trials()
            except Exception:  # the study is not created yet
                continue
            finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            # kill while an episode runs with its proposal recorded (not in the instant between ask and suggest)
            if finished and any(t.state == optuna.trial.TrialState.RUNNING and t.params for t in trials):
                break
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
    killed = [t for t in optuna.load_study(study_name="agentic-lora", storage=storage).get_trials()
              if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) <= 1  # 0 only if the episode completed between the last poll and the kill
    time.sleep(2.5)  # the dead worker's heartbeat goes stale
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="agentic-lora", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for before in finished:  # finished episodes are kept as they were, never re-run
        after = trials[before.number]
        assert after.state == before.state and after.value == before.value
        assert after.datetime_complete == before.datetime_complete
    for lost in killed:  # the dead worker's episode failed and its proposal ran again
        assert trials[lost.number].state == optuna.trial.TrialState.FAIL
        retried = [t for t in complete if t.system_attrs.get("failed_trial") == lost.number]
        assert len(retried) == 1 and retried[0].params == lost.params
        assert retried[0].user_attrs["messages"][0]["agent"] in ("judge", "reward_penalty")


def fake_trial(seconds: float = 0.0, error: Exception | None = None):
    """``run_trial`` without training: a loss that depends on the hyperparameters, after ``seconds``."""
    def run(hparams, data, settings):
        time.sleep(seconds)
        if error is not None:
            raise error
        loss = 1.0 + abs(math.log(hparams["lr"] / 4e-4)) + hparams["lora_dropout"] + 0.01 * hparams["lora_r"]
        return None, {"val_loss": loss, "val_ppl": math.exp(loss), "steps": 1, "train_seconds": seconds}
    return run


def quick_tuning(storage, data, n_trials, **study):
    settings = StudySettings(storage=storage, n_trials=n_trials, heartbeat_interval=1, grace_period=2, patience=50,
                             qa=False, export_messages=None, **study)
    return Tuning(settings, data, TrialSettings(), BackendSettings(), SealSettings(enabled=False))


def test_a_study_whose_trials_all_fail_exits_non_zero_and_runs_again(tmp_path, monkeypatch, capsys):
    args = tune_args(tmp_path, "--study.n_trials", "2", "--seal.enabled", "false", "--study.qa", "false")
    monkeypatch.setattr("tuning.study.run_trial", fake_trial(error=RuntimeError("out of memory")))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("Error: study 'agentic-lora': 0 of 2 episodes finished, 6 trials failed "
                   "(last: RuntimeError: out of memory); run the same command again to continue")
    monkeypatch.setattr("tuning.study.run_trial", fake_trial())  # the task is fixed: the failures do not block
    assert main(args)["finished"] == 2


def test_a_rerun_fails_and_retries_a_dead_workers_trial_before_it_ends(tmp_path, data, monkeypatch):
    monkeypatch.setattr("tuning.study.run_trial", fake_trial())
    storage = f"sqlite:///{tmp_path}/study.db"
    dead = quick_tuning(storage, data, 2).study  # a worker claims a trial, beats once, and is killed
    dead.enqueue_trial(DEFAULT_HPARAMS)
    claimed = dead.ask()
    suggest(claimed)
    dead._storage.record_heartbeat(claimed._trial_id)
    study = quick_tuning(storage, data, 2).run()  # at once, well within the grace period
    trials = study.get_trials()
    assert trials[claimed.number].state == optuna.trial.TrialState.FAIL
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and [t.params for t in complete if t.system_attrs.get("failed_trial") == claimed.number] \
        == [claimed.params]


def test_a_trial_claimed_by_a_worker_that_died_while_suggesting_has_its_whole_proposal():
    study = optuna.create_study()
    proposal = dict(DEFAULT_HPARAMS, lr=4e-4)
    study.enqueue_trial(proposal)
    trial = study.ask()
    trial.suggest_float("lr", SPACE["lr"].low, SPACE["lr"].high, log=True)  # killed here, one suggestion made
    frozen = study.get_trials()[0]
    assert frozen.params == {"lr": 4e-4} and hparams_of(frozen) == proposal  # what the others must not repeat


def race_two_workers(storage: str, data, n_trials: int, method: str) -> list:
    """Two ``Tuning`` workers (threads, a stand-in trial) started together on one study; its trials at the end."""
    start, errors = threading.Barrier(2), []

    def worker():
        try:
            start.wait()
            quick_tuning(storage, data, n_trials, method=method).run()
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    return optuna.load_study(study_name="agentic-lora", storage=storage).get_trials()


@pytest.mark.parametrize("method", ["agentic", "random"])
def test_two_workers_on_one_sqlite_study_claim_distinct_trials_and_stop_at_n_trials(tmp_path, data, monkeypatch,
                                                                                     method):
    monkeypatch.setattr("tuning.study.run_trial", fake_trial(seconds=0.3))
    storage = f"sqlite:///{tmp_path}/study.db"
    quick_tuning(storage, data, 5, method=method)  # create the study before the race
    trials = race_two_workers(storage, data, 5, method)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 5  # none extra, none failed
    if method == "agentic":  # (two samplers with one seed draw the same configurations: not checked)
        assert len({tuple(sorted(t.params.items())) for t in trials}) == 5  # no proposal run twice


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    command = [sys.executable, str(REPO / "train.py"), *tune_args(tmp_path, "--study.n_trials", "4",
                                                                    "--seal.enabled", "false")]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    main(tune_args(tmp_path, "--study.n_trials", "1", "--seal.enabled", "false"))  # pre-train the base once
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.stderr.read().decode()[-2000:]
    trials = optuna.load_study(study_name="agentic-lora", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and len({tuple(sorted(t.params.items())) for t in complete}) == 4
    assert all("messages" in t.user_attrs and "metrics" in t.user_attrs for t in complete)


@pytest.mark.parametrize("method", ["agentic", "tpe", "random"])
def test_every_method_starts_from_the_same_configuration(tmp_path, data, monkeypatch, method):
    monkeypatch.setattr("tuning.study.run_trial", fake_trial())
    first = {}
    for from_default in (True, False):
        storage = f"sqlite:///{tmp_path}/{method}_{from_default}.db"
        study = quick_tuning(storage, data, 2, method=method, seed=3, start_from_default=from_default).run()
        first[from_default] = study.trials[0].params
    assert first[True] == DEFAULT_HPARAMS  # TPE and random search get the agents' default first
    assert first[False] != DEFAULT_HPARAMS
    if method != "tpe":  # without it, the agents start where random search starts (TPE's startup draws differ)
        assert first[False] == sampled_hparams(3)


# --- several workers on a real PostgreSQL server -------------------------------------------------------------
# All marked slow: they need the PostgreSQL server programs, which a fresh machine lacks (`.ci/run` installs them
# after the default run, then runs `-m slow -k postgres`). Without them they fail, saying what to install.
def postgres_programs() -> Path:
    """Folder of the PostgreSQL server programs: on the PATH, or in Debian's ``/usr/lib/postgresql/<version>/bin``."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # the real folder, with pg_ctl and createdb beside it
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]), reverse=True)
    if not versions:
        pytest.fail("the PostgreSQL server programs (initdb, pg_ctl, createdb) are not installed: "
                    "`apt-get install -y postgresql` (Debian / Ubuntu) or your system's postgresql server package")
    return versions[0].parent


@dataclass
class Postgres:
    """A running throwaway server: ``database(name)`` creates a database and returns its storage URL; the
    password is in ``env`` (``PGPASSWORD``), as the docs ask, never in the URL."""

    programs: Path
    port: int
    env: dict

    def database(self, name: str) -> str:
        run_checked([self.programs / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "tuner", name],
                    env={**os.environ, **self.env})
        return f"postgresql+psycopg://tuner@127.0.0.1:{self.port}/{name}"


def run_checked(command: list, **kwargs) -> None:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, command))}: {done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on a free loopback port, password authentication, stopped and removed at the end. The
    server refuses to run as root: then it runs as ``nobody``, in a folder of its own outside pytest's private
    temporary folder."""
    programs = postgres_programs()
    root = Path(tempfile.mkdtemp(prefix="tuning-postgres-"))
    password = secrets.token_hex(12)
    (root / "password").write_text(password)
    server_user = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (root, root / "password"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        server_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    with socket.socket() as probe:  # a free port (the server binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    run_checked([programs / "initdb", "-D", data, "-U", "tuner", "--auth=scram-sha-256",
                 f"--pwfile={root / 'password'}", "-E", "UTF8", "--no-sync"], cwd=root, **server_user)
    run_checked([programs / "pg_ctl", "start", "-w", "-D", data, "-l", root / "server.log", "-o",
                 f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"], cwd=root, **server_user)
    try:
        yield Postgres(programs, port, {"PGPASSWORD": password})
    finally:
        subprocess.run([str(programs / "pg_ctl"), "stop", "-m", "immediate", "-D", str(data)], cwd=root,
                       capture_output=True, **server_user)
        shutil.rmtree(root, ignore_errors=True)


def hold_claim_lock(storage: str, held) -> None:
    """A worker that takes the claim lock and keeps it until it is killed."""
    ClaimLock(storage, "claim:s").acquire()
    held.set()
    time.sleep(300)


@pytest.mark.slow
def test_the_postgres_claim_lock_excludes_other_workers_and_dies_with_its_holder(postgres, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])
    storage = postgres.database("lock")
    fork = multiprocessing.get_context("fork")  # a separate process, without importing the project again
    held = fork.Event()
    holder = fork.Process(target=hold_claim_lock, args=(storage, held), daemon=True)
    holder.start()
    try:
        assert held.wait(30)
        with ClaimLock(storage, "claim:t"):  # another study's lock is free
            pass
        waiter, got = ClaimLock(storage, "claim:s"), threading.Event()
        thread = threading.Thread(target=lambda: (waiter.acquire(), got.set()), daemon=True)
        thread.start()
        assert not got.wait(1.5)  # held by the other process
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a worker dies holding the lock
        holder.join()
    assert got.wait(10)  # the server ended the dead session, and its lock with it
    waiter.release()


@pytest.mark.slow
def test_two_workers_on_one_postgres_study_claim_distinct_trials_and_stop_at_n_trials(postgres, data, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])
    monkeypatch.setattr("tuning.study.run_trial", fake_trial(seconds=0.3))
    trials = race_two_workers(postgres.database("race"), data, 5, "agentic")  # on an empty database: no tables yet
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 5
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5


@pytest.mark.slow
def test_postgres_workers_lose_no_finished_trial_when_one_is_killed(tmp_path, postgres, monkeypatch):
    """Two ``train.py tune`` processes on one PostgreSQL study (empty database), one killed with SIGKILL while it
    runs a trial, a replacement started at once."""
    monkeypatch.setenv("PGPASSWORD", postgres.env["PGPASSWORD"])
    storage, n_trials = postgres.database("workers"), 4
    command = [sys.executable, str(REPO / "train.py"), *tune_args(
        tmp_path, "--study.storage", storage, "--study.n_trials", str(n_trials), "--study.heartbeat_interval", "1",
        "--study.grace_period", "3", "--trial.max_steps", "40", "--seal.enabled", "false")]
    env = {**os.environ, **postgres.env, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}

    def start():
        return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    workers, deadline, study, trials = [start(), start()], time.time() + 300, None, []
    try:
        while time.time() < deadline and all(w.poll() is None for w in workers):
            time.sleep(0.2)
            try:
                if study is None:
                    with ClaimLock(storage, "open"):  # as the workers do: the first one may be creating the tables
                        study = optuna.load_study(study_name="agentic-lora", storage=storage)
                trials = study.get_trials()
            except KeyError:  # the study is not created yet
                continue
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and len(t.params) == len(SPACE)]
            if len(running) == 2 and any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
                break  # both workers are mid-trial and one trial has finished
        assert all(w.poll() is None for w in workers), [w.stderr.read().decode()[-2000:] for w in workers]
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        at_kill = study.get_trials()
        workers.append(start())  # the machine is replaced (within the grace period)
        for worker in workers[1:]:
            assert worker.wait(timeout=600) == 0, worker.stderr.read().decode()[-3000:]
    finally:
        for worker in workers:
            worker.kill()
    trials = optuna.load_study(study_name="agentic-lora", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(complete) == n_trials and len(failed) == 1 and len(trials) == n_trials + 1
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n_trials  # no configuration run twice
    for before in at_kill:
        if before.state == optuna.trial.TrialState.COMPLETE:  # kept as it was, never re-run
            after = trials[before.number]
            assert after.state == before.state and after.value == before.value
            assert after.datetime_complete == before.datetime_complete
    lost = failed[0]  # the killed worker's trial: running at the kill, failed on its stale heartbeat, re-run
    assert at_kill[lost.number].state == optuna.trial.TrialState.RUNNING
    assert [t.params for t in complete if t.system_attrs.get("failed_trial") == lost.number] == [hparams_of(lost)]
