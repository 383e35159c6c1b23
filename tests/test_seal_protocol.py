"""SEAL's knowledge-incorporation protocol: the writer's drills, the ReST-EM filter against the passage-only update,
the student's reset, the chance baseline and the whole protocol on a tiny base."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import tuning.seal_protocol as protocol
from datamodules.instructions import ASK, ATTRIBUTES, WRITE, Knowledge, generate_people, self_edit
from models.lm_factory import build_causal_lm, build_tokenizer, export_hf
from tests.conftest import REPO
from tuning.seal import RECALL


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A one-layer model and a tokenizer trained on the world's text, saved as a pretrained folder."""
    folder = tmp_path_factory.mktemp("seal")
    people = generate_people(200, seed=3)
    texts = [p.passage + " " + self_edit(p, k) for p in people for k in WRITE] + list(WRITE.values())
    tokenizer = build_tokenizer(texts, 400, str(folder / "tok"))
    torch.manual_seed(0)
    model = build_causal_lm("tiny-llama", tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    return export_hf(model, tokenizer, folder / "base")["model"]


def test_drills_copy_fresh_facts_of_the_given_names_in_every_kind():
    people = generate_people(5, seed=1)
    drills = protocol.writing_drills(people, 9, seed=0)
    assert [d.instruction for d in drills] == [WRITE[k] for k in ("qa", "restatement", "implications")] * 3
    names = {p.name for p in people}
    for drill in drills:
        name = drill.input.split()[0]
        assert name in names
        facts = dict(zip(ATTRIBUTES, [s.split()[-1].rstrip(".") for s in drill.input.split(". ")]))
        assert all(v in drill.output for v in facts.values())  # the response restates the input's facts
    assert drills == protocol.writing_drills(people, 9, seed=0)
    assert drills != protocol.writing_drills(people, 9, seed=1)


def test_an_update_trains_on_the_passage_and_the_self_edits_examples():
    qa = "Q: Where does Ana live? A: Oakvale"
    examples = protocol.update_examples("Ana lives in Oakvale.", qa, "qa")
    assert [(e.instruction, e.input, e.output) for e in examples] == [
        (RECALL, "", "Ana lives in Oakvale."), (ASK, "Where does Ana live?", "Oakvale")]
    assert len(protocol.update_examples("Ana lives in Oakvale.", None, "qa")) == 1


def test_chance_is_one_over_the_values_of_each_attribute():
    assert protocol.chance_exact_match() == pytest.approx(1 / 8)


def test_facts_copied_counts_the_answers_a_self_edit_carries_about_the_right_person():
    person = generate_people(1, seed=2)[0]
    knowledge = Knowledge(person.passage, tuple(person.questions()))
    whole = {"name": 1.0, "answers": 1.0}
    assert protocol.facts_copied(knowledge, self_edit(person, "implications")) == whole
    assert protocol.facts_copied(knowledge, self_edit(person, "qa")) == whole
    city = person.facts[0][1]
    assert protocol.facts_copied(knowledge, f"{person.name} lives in {city}.") == {"name": 1.0, "answers": 0.2}
    renamed = self_edit(person, "qa").replace(person.name, "Zezo")
    assert protocol.facts_copied(knowledge, renamed) == {"name": 0.0, "answers": 1.0}


@pytest.mark.parametrize("change", [{"kind": "poem"}, {"keep": "all"}, {"rounds": -1}, {"inner_lr": 0.0},
                                    {"test_passages": 0}])
def test_bad_settings_are_refused(change):
    with pytest.raises(ValueError):
        protocol.SealProtocolSettings(base="b", **change)


@pytest.mark.parametrize("keep, kept", [("improving", ["good one", "good two"]), ("best", ["good two"])])
def test_rest_em_keeps_only_self_edits_that_beat_the_passage_alone(monkeypatch, keep, kept):
    """Reward = exact match after passage + self-edit > after the passage alone; the writer trains on the kept
    (``best``: only the best of a passage's candidates)."""
    settings = protocol.SealProtocolSettings(base="b", candidates=3, rounds=1, keep=keep)
    passages = [Knowledge(f"P{i} lives in Oakvale.", (("Where does P live?", "Oakvale"),)) for i in range(2)]
    edits = [["good one", "bad", "good two"], ["bad", "bad", "bad"]]
    monkeypatch.setattr(protocol, "write", lambda *args, **kwargs: edits)

    class Student:
        data = None

        def exact_match(self, knowledge, examples, seed):
            text = examples[-1].output
            if len(examples) == 1:
                return 0.5  # the passage alone
            return 1.0 if "two" in text else 0.8 if "good" in text else 0.2

    trained = {}
    monkeypatch.setattr(protocol, "finetune", lambda lm, data, examples, steps, *a: trained.update(
        examples=examples, steps=steps))
    record = protocol.rest_em_round(object(), Student(), passages, settings, 0)
    assert record["sampled"] == 6 and record["kept"] == len(kept)
    assert [(e.input, e.output) for e in trained["examples"]] == [(passages[0].passage, text) for text in kept]
    assert trained["steps"] == settings.writer_steps
    assert record["mean_gain_over_passage"] == pytest.approx((0.3 + 0.5 - 0.3 * 4) / 6)


def test_the_student_is_reset_after_every_update_and_the_instruct_model_untouched(base):
    settings = protocol.SealProtocolSettings(base=base, training_people=8, rest_em_passages=1, val_passages=1,
                                             test_passages=1, inner_steps=3, inner_lr=0.05)
    data = protocol.InstructionDataModule(num_people=40, num_knowledge_people=3, tokenizer=base, max_length=256)
    instruct = build_causal_lm(base)
    before = {k: v.clone() for k, v in instruct.state_dict().items()}
    student = protocol.Student(instruct, data, settings)
    fresh = {k: v.clone() for k, v in student.fresh.items()}
    knowledge = data.knowledge[0]
    score = student.exact_match(knowledge, protocol.update_examples(knowledge.passage, None, "qa"), seed=0)
    assert 0.0 <= score <= 1.0
    assert all(torch.equal(student.fresh[k], fresh[k]) for k in fresh)
    now = dict(student.lm.named_parameters())
    assert all(torch.equal(now[k], fresh[k]) for k in fresh)
    assert all(torch.equal(instruct.state_dict()[k], before[k]) for k in before)
    assert any("lora_" in k for k in fresh) and all("lora_" in k for k in fresh)


def test_the_protocol_scores_every_condition_on_held_out_passages(base):
    settings = protocol.SealProtocolSettings(base=base, training_people=8, rest_em_passages=2, val_passages=1,
                                             test_passages=2, writing_drills=6, instruct_steps=2, inner_steps=1,
                                             rounds=1, candidates=2, writer_steps=1, max_new_tokens=8)
    result = protocol.run_protocol(settings)
    assert result["chance"] == pytest.approx(1 / 8)
    assert result["rest_em"][0]["sampled"] == 4 and 0 <= result["rest_em"][0]["kept"] <= 4
    for split, passages in (("val", 1), ("test", 2)):
        scores = result[split]["exact_match"]
        assert set(scores) == {"no_update", "passage", "base_self_edit", "rest_em_self_edit"}
        for value in scores.values():  # a mean of per-passage exact matches over five questions
            assert 0.0 <= value <= 1.0 and round(value * 5 * passages, 6) == round(value * 5 * passages)
        assert set(result[split]["facts_copied"]) == {"base_self_edit", "rest_em_self_edit"}
    val_passage = result["val"]["example_edits"]["base_self_edit"]["passage"]
    test_passage = result["test"]["example_edits"]["base_self_edit"]["passage"]
    assert val_passage != test_passage


@pytest.fixture(scope="module")
def bench():
    """bench/tuning.py, loaded by path (the name ``tuning`` is the package)."""
    sys.path.insert(0, str(REPO / "bench"))  # it imports its neighbour cli_runs
    spec = importlib.util.spec_from_file_location("bench_tuning", REPO / "bench/tuning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_casts_seal_options_to_their_fields_and_refuses_unknown_ones(bench):

    assert bench.seal_options(["kind=qa", "instruct_steps=1500", "recall_training_passages=true",
                               "inner_lr=0.01"]) == {"kind": "qa", "instruct_steps": 1500,
                                                     "recall_training_passages": True, "inner_lr": 0.01}
    assert bench.seal_options(["recall_training_passages=no"]) == {"recall_training_passages": False}
    for bad in (["colour=red"], ["kind"], ["seed=3"], ["instruct_steps=many"], ["recall_training_passages=flase"]):
        with pytest.raises(ValueError):
            bench.seal_options(bad)


def test_the_last_line_prints_nan_for_a_part_that_is_missing(bench, tmp_path):
    summary = {"test": {c: {"mean": 0.25 + 0.125 * i} for i, c in enumerate(bench.SEAL_CONDITIONS)}}
    seal = {"summary": summary, "chance": 0.125}
    line = bench.last_line(None, seal)
    assert line.startswith("tuning: agentic=nan tpe=nan random=nan trials=nan")
    assert line.endswith("seal_passage=0.375 seal_base_edit=0.500 seal_writer=0.625 seal_chance=0.125")
    assert bench.previous_part(tmp_path, "studies") is None  # no results file: nothing to keep, no exit
