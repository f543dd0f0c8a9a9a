"""How many prompts share a decode step (engines/llamacpp/stepcost.py)."""

from __future__ import annotations

import random

from tokenwell.engines.llamacpp.stepcost import MIN_CHUNK, MIN_STEPS, WINDOW, StepCost


def learnt(
    fixed: float, per_token: float, per_prompt: float, noise: float = 0.0, stalls: float = 0.0
) -> StepCost:
    """A StepCost fed steps that cost what the arguments say, plus some noise,
    and a share ``stalls`` of steps 20x slower (another process took a core)."""
    rng = random.Random(7)
    cost = StepCost()
    for i in range(8 * MIN_STEPS):
        generating = rng.randint(0, 16)
        prompt = rng.choice((0, 0, 0, 10, 45, 200)) if i % 2 else 0
        seconds = fixed + per_token * generating + per_prompt * prompt
        seconds *= 1 + rng.uniform(-noise, noise)
        if rng.random() < stalls:
            seconds *= 20
        cost.add(generating, prompt, seconds)
    return cost


def test_until_enough_steps_are_seen_every_prompt_joins() -> None:
    cost = StepCost()
    for _ in range(MIN_STEPS - 1):
        cost.add(4, 0, 0.02)
    assert cost.fixed is None
    assert cost.worth_joining(3, 500, 0)


def test_only_steps_without_prompts_say_nothing_of_a_prompts_cost() -> None:
    cost = StepCost()
    for i in range(4 * MIN_STEPS):
        cost.add(i % 16, 0, 0.004 + 0.004 * (i % 16))
    assert cost.fixed is None
    assert cost.worth_joining(2, 45, 4)


def test_the_fit_finds_the_parts_of_a_step() -> None:
    cost = learnt(0.004, 0.004, 0.0023, noise=0.05)
    assert cost.fixed is not None
    assert abs(cost.fixed - 0.004) < 0.002
    assert abs(cost.per_token - 0.004) < 0.0005
    assert abs(cost.per_prompt - 0.0023) < 0.0002


def test_the_fit_is_reported_in_milliseconds_once_known() -> None:
    assert StepCost().snapshot() is None
    snapshot = learnt(0.004, 0.004, 0.0023).snapshot()
    assert snapshot is not None
    assert abs(snapshot["fixed_ms"] - 4) < 0.1 and abs(snapshot["per_token_ms"] - 4) < 0.1
    assert abs(snapshot["per_prompt_token_ms"] - 2.3) < 0.01


def test_steps_stalled_by_other_processes_do_not_skew_the_fit() -> None:
    cost = learnt(0.004, 0.004, 0.0023, noise=0.05, stalls=0.05)
    assert cost.fixed is not None
    assert abs(cost.per_token - 0.004) < 0.001
    assert abs(cost.per_prompt - 0.0023) < 0.0005


def test_where_each_token_costs_its_own_time_prompts_take_turns() -> None:
    # A small CPU: a second prompt of 10 tokens would delay the first by ~23 ms,
    # more than the one more step (~12 ms) it would otherwise wait.
    cost = learnt(0.004, 0.004, 0.0023)
    assert cost.worth_joining(0, 10, 1)  # the first prompt of a step always joins
    assert not cost.worth_joining(1, 10, 1)
    # With 15 sequences generating, the next step is long: a short prompt joins.
    assert cost.worth_joining(1, 10, 15)


def test_where_a_step_costs_mostly_its_fixed_part_prompts_share_it() -> None:
    # A GPU-like cost: four prompts cost hardly more than one.
    cost = learnt(0.030, 0.0001, 0.00002)
    assert all(cost.worth_joining(k, 45, 0) for k in range(8))


def test_a_long_prompt_is_read_in_chunks_that_keep_a_step_near_its_target() -> None:
    cost = learnt(fixed=0.005, per_token=0.004, per_prompt=0.002)
    room = cost.prompt_room(4, 0.5)
    assert room is not None
    # 5 ms + 4 x 4 ms + room x 2 ms = 500 ms
    assert abs(room - (0.5 - 0.005 - 0.016) / 0.002) <= 2
    # However slow prompt tokens are, a short prompt still fits in one step.
    assert cost.prompt_room(64, 0.05) == MIN_CHUNK
    # No bound asked for, or nothing learnt yet: prefill_chunk alone decides.
    assert cost.prompt_room(4, 0) is None
    assert StepCost().prompt_room(4, 0.5) is None


def test_drafts_fit_in_a_step_near_its_target() -> None:
    cost = learnt(fixed=0.005, per_token=0.004, per_prompt=0.002)
    room = cost.draft_room(4, 0.15)
    assert room is not None
    # 5 ms + 4 x 4 ms + room x 4 ms = 150 ms
    assert abs(room - (0.15 - 0.005 - 0.016) / 0.004) <= 1
    # Streams that fill the step already: no drafts (never a negative room).
    assert cost.draft_room(64, 0.15) == 0
    assert cost.draft_room(4, 0) is None and StepCost().draft_room(4, 0.15) is None


def _steady(seed: int, fixed: float, per_token: float, per_prompt: float) -> StepCost:
    """Four streams that keep generating, closed-loop: a step holds four
    sequences' tokens, or three and the prompt of the request that replaced
    the fourth; 5% noise. The fixed and per-token parts are then one number."""
    rng = random.Random(seed)
    cost = StepCost()
    for _ in range(WINDOW):
        generating, prompt = (3, rng.randint(40, 50)) if rng.random() < 0.12 else (4, 0)
        seconds = fixed + per_token * generating + per_prompt * prompt
        cost.add(generating, prompt, seconds * (1 + rng.uniform(-0.05, 0.05)))
    return cost


def test_a_generating_token_is_never_priced_below_a_prompt_token() -> None:
    """With about as many streams in every step, the fixed and per-token parts
    are one number to the fit: whatever split it finds, a generating token is
    priced at least as a prompt token, no part is negative, and the steps
    it was fed are still predicted (a drafted token is priced by per_token)."""
    truth = (0.004, 0.004, 0.0023)
    for seed in range(20):
        cost = _steady(seed, *truth)
        assert cost.fixed is not None, seed
        assert cost.per_token >= cost.per_prompt > 0 and cost.fixed >= 0, (seed, cost.snapshot())
        for generating, prompt in ((4, 0), (3, 45), (3, 40)):
            want = truth[0] + truth[1] * generating + truth[2] * prompt
            got = cost.fixed + cost.per_token * generating + cost.per_prompt * prompt
            assert abs(got - want) < 0.1 * want, (seed, generating, prompt, cost.snapshot())
