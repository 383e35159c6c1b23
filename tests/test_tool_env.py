"""Rules of the tool environment, its agreement with the per-sample reference, and reachability of every goal."""

import pytest
import torch

from envs.tool_env import (
    ADD,
    ANS,
    CTX,
    EOS,
    MUL,
    PAD,
    RCL,
    STO,
    SUB,
    VOCAB_SIZE,
    ToolEnv,
    all_problems,
    context_tokens,
    pack_operands,
    register_effect,
    stage_goal,
)
from envs.tool_env_loop import goal, register_step, run_episode
from envs.tool_solver import shortest_program, shortest_solution_lengths


def run(env, digits, stage, tokens):
    state = env.reset(torch.tensor([digits]), torch.tensor([stage]))
    total = 0.0
    for token in tokens:
        reward, _ = env.step(state, torch.tensor([token]))
        total += float(reward)
    return total, state


def test_register_rules_by_hand():
    env = ToolEnv("register", max_steps=8)
    digits = [3, 4, 5, 2, 6]  # stage 2 goal: 3*4 + 5 - 2*6 = 5
    _, state = run(env, digits, 2, [MUL])
    assert (int(state.acc), int(state.mem)) == (12, 0)
    _, state = run(env, digits, 2, [MUL, ADD])
    assert (int(state.acc), int(state.mem)) == (5, 12)
    _, state = run(env, digits, 2, [MUL, ADD, SUB, MUL])
    assert (int(state.acc), int(state.mem)) == (-12, 17)
    reward, state = run(env, digits, 2, [MUL, ADD, SUB, MUL, ANS])
    assert reward == 1.0 and int(state.answer) == 5 and bool(state.correct) and int(state.steps) == 5
    # STO files the term, RCL takes the sum back; with no digit left, arithmetic does nothing.
    _, state = run(env, digits, 0, [MUL, ADD, STO])
    assert (int(state.acc), int(state.mem)) == (0, 17)
    _, state = run(env, digits, 0, [MUL, ADD, STO, RCL, MUL, ADD])
    assert (int(state.acc), int(state.mem), int(state.cursor)) == (17, 0, 3)
    # The largest product fits the int32 registers: 9**5.
    reward, state = run(env, [9] * 5, 2, [MUL, MUL, MUL, MUL, ANS])
    assert int(state.answer) == 9**5 and reward == 0.0 and bool(state.answered)


def test_wrong_answer_eos_and_time_limit_end_with_zero_reward():
    env = ToolEnv("register", max_steps=3)
    reward, state = run(env, [3, 4, 5, 0, 0], 0, [MUL, ANS])  # 12 != 17
    assert reward == 0.0 and bool(state.done) and bool(state.answered) and not bool(state.correct)
    reward, state = run(env, [3, 4, 5, 0, 0], 0, [EOS, MUL, ADD, ANS])
    assert reward == 0.0 and int(state.steps) == 1 and not bool(state.answered)
    reward, state = run(env, [3, 4, 5, 0, 0], 0, [STO, STO, STO, ANS])  # ANS comes after the limit
    assert reward == 0.0 and bool(state.done) and int(state.steps) == 3


def test_seed_semantics_reward_the_subgoal_one_step_behind():
    env = ToolEnv("seed", max_steps=7)
    digits = [3, 4, 5, 2, 6]
    reward, state = run(env, digits, 0, [MUL, ANS])  # seed stage 0 "goal" is a*b: 1 + 0.2 * 0.25
    assert reward == pytest.approx(1.05) and not bool(state.correct)
    reward, state = run(env, digits, 0, [MUL, ADD, ANS])  # the stated goal a*b+c earns only shaping
    assert reward == pytest.approx(0.1) and bool(state.correct)
    reward, _ = run(env, digits, 2, [MUL, ADD, SUB, ANS])  # seed stage 2 checks a*b+c-d
    assert reward == pytest.approx(1.0)


@pytest.mark.parametrize("semantics,max_steps", [("register", 8), ("seed", 6)])
def test_vectorised_env_matches_per_sample_reference(semantics, max_steps):
    env = ToolEnv(semantics, max_steps)
    generator = torch.Generator().manual_seed(0)
    n = 3000
    digits = torch.randint(0, 10, (n, 5), generator=generator)
    stage = torch.randint(0, 3, (n,), generator=generator)
    actions = torch.randint(0, env.num_actions, (n, max_steps + 2), generator=generator)
    tokens = env.action_tokens[actions]
    state = env.reset(digits, stage)
    total = torch.zeros(n)
    for t in range(tokens.shape[1]):
        reward, _ = env.step(state, tokens[:, t])
        total += reward
    for i in range(n):
        ref_reward, ref_steps, ref_correct = run_episode(
            tuple(digits[i].tolist()), int(stage[i]), tokens[i].tolist(), semantics, max_steps
        )
        assert total[i].item() == pytest.approx(ref_reward), i
        assert int(state.steps[i]) == ref_steps, i
        assert bool(state.correct[i]) == ref_correct, i


@pytest.mark.parametrize("semantics", ["register", "seed"])
@pytest.mark.parametrize("max_steps", [1, 3, 8])
def test_vectorised_env_matches_reference_on_any_token(semantics, max_steps):
    """Random programs over the whole vocabulary (digits, CTX and PAD too), every stage, longer than the limit."""
    env = ToolEnv(semantics, max_steps)
    generator = torch.Generator().manual_seed(max_steps)
    n = 2000
    digits = torch.randint(0, 10, (n, 5), generator=generator)
    stage = torch.randint(0, 3, (n,), generator=generator)
    tokens = torch.randint(0, VOCAB_SIZE, (n, max_steps + 2), generator=generator)
    state = env.reset(digits, stage)
    rewards, dones = [], []
    for t in range(tokens.shape[1]):
        reward, done = env.step(state, tokens[:, t])
        rewards.append(reward)
        dones.append(done)
    for i in range(n):
        ref_reward, ref_steps, ref_correct = run_episode(
            tuple(digits[i].tolist()), int(stage[i]), tokens[i].tolist(), semantics, max_steps
        )
        assert sum(float(r[i]) for r in rewards) == pytest.approx(ref_reward), i
        assert int(state.steps[i]) == ref_steps and bool(state.correct[i]) == ref_correct, i
        # The episode is over exactly from its last step on (the loop returns the number of tokens it executed).
        assert [bool(d[i]) for d in dones] == [t + 1 >= ref_steps for t in range(tokens.shape[1])], i


def test_register_table_matches_the_reference_step():
    """Every (digit under the cursor or none, token) entry of the table does what the reference's step does."""
    acc, mem = 7, -3
    for digit in [None, *range(10)]:
        head = 1 if digit is None else 16 + digit
        context = (5,) if digit is None else (5, digit)
        for token in range(VOCAB_SIZE):
            multiplier, addend, recall, file, shift = register_effect(head, token)
            got = (acc * multiplier + recall * mem + addend, mem - recall * mem + file * acc, 1 + (shift & 1))
            if token in (ANS, EOS):
                assert got == (acc, mem, 1) and shift >= 21 and (shift >> 1 & 1) == (token == ANS)
            else:
                assert got == register_step(context, acc, mem, 1, token), (digit, token)
    assert register_effect(0, MUL) == [1, 0, 0, 0, 0]  # an ended episode ignores every token


def test_operands_are_packed_five_bits_a_digit_with_an_end_mark():
    digits = torch.tensor([[3, 4, 5, 2, 6]] * 3)
    packed = pack_operands(digits.int(), torch.tensor([0, 1, 2]))
    assert packed.tolist() == [
        20 + 21 * 32 + 1 * 32**2,
        20 + 21 * 32 + 18 * 32**2 + 1 * 32**3,
        20 + 21 * 32 + 18 * 32**2 + 22 * 32**3 + 1 * 32**4,
    ]


def test_stage_goal_matches_the_reference():
    digits = torch.randint(0, 10, (500, 5), generator=torch.Generator().manual_seed(1))
    stage = torch.arange(500) % 3
    expected = [goal(tuple(row), int(k)) for row, k in zip(digits.tolist(), stage)]
    assert stage_goal(digits, stage).tolist() == expected
    assert stage_goal(digits.int(), stage).tolist() == expected


@pytest.mark.parametrize("stage,length", [(0, 3), (1, 4), (2, 5)])
def test_every_goal_is_reachable_for_all_digits(stage, length):
    program = shortest_program(stage)
    assert program is not None and len(program) == length and program[-1] == ANS
    digits = all_problems(stage)
    env = ToolEnv("register", max_steps=8)
    state = env.reset(digits, torch.full((len(digits),), stage))
    for token in program:
        env.step(state, torch.full((len(digits),), token))
    assert bool(state.correct.all()), f"stage {stage}: {program} fails on {int((~state.correct).sum())} problems"
    assert torch.equal(state.answer, stage_goal(digits, torch.full((len(digits),), stage)))


@pytest.mark.parametrize("stage", [0, 1])
def test_concrete_search_solves_every_problem(stage):
    lengths = shortest_solution_lengths(all_problems(stage), stage, "register", max_steps=8)
    assert bool((lengths > 0).all())


def test_seed_stage2_goal_is_out_of_reach_for_many_digits():
    digits = torch.randint(0, 10, (1000, 5), generator=torch.Generator().manual_seed(0))
    lengths = shortest_solution_lengths(digits, 2, "seed", max_steps=6)
    unreachable = float((lengths < 0).float().mean())
    assert 0.1 < unreachable < 0.6  # measured: about 27% of digit combinations


def test_context_tokens_are_per_stage():
    digits = torch.tensor([[1, 2, 3, 4, 5]] * 3)
    tokens = context_tokens(digits, torch.tensor([0, 1, 2]))
    assert tokens.tolist() == [
        [1, 2, 3, CTX, PAD, PAD],
        [1, 2, 3, 4, CTX, PAD],
        [1, 2, 3, 4, 5, CTX],
    ]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="unknown semantics"):
        ToolEnv("calculator")
    with pytest.raises(ValueError, match="max_steps"):
        ToolEnv("register", max_steps=0)
    env = ToolEnv()
    with pytest.raises(ValueError, match="stage must be in 0..2"):
        env.reset(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        env.reset(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="digits must be in 0..9"):
        env.reset(torch.full((2, 5), 10), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown stage"):
        shortest_program(3)


def test_tokens_after_the_end_are_ignored():
    env = ToolEnv("register")
    _, state = run(env, [3, 4, 5, 0, 0], 0, [MUL, ADD, ANS, SUB, MUL, RCL])
    assert bool(state.correct) and int(state.steps) == 3 and int(state.answer) == 17
