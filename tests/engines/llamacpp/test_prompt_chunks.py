"""Which waiting prompts join a decode step (scheduler.prompt_chunks)."""

from __future__ import annotations

from collections import deque

from tokenwell.engines.llamacpp.scheduler import Job, prompt_chunks
from tokenwell.engines.llamacpp.stepcost import StepCost


def job(tokens: int) -> Job:
    return Job(
        generation=None, prompt=list(range(tokens)), n=1, max_tokens=8, stops=(), sampling=[]
    )  # type: ignore[arg-type]


def cpu_cost() -> StepCost:
    """A 2-core CPU's fit: a prompt token costs about what a decode of one token
    does, so a second prompt in a step is never worth it by the sum of waits."""
    cost = StepCost()
    cost.fixed, cost.per_token, cost.per_prompt = 0.012, 0.0037, 0.003
    return cost


def steps_to_first_token(prompts: list[Job], generating: int, cost: StepCost) -> list[int]:
    """The step (from 1) in which each prompt is read whole; at most 512 tokens a step."""
    # The scheduler's own queue: a deque.
    waiting, done, step = deque(prompts), {}, 0
    while waiting:
        step += 1
        for chosen, _, end in prompt_chunks(waiting, 512, generating, cost):
            chosen.prefill_pos = end
            if end == len(chosen.prompt):
                done[id(chosen)] = step
        waiting = deque(j for j in waiting if id(j) not in done)
    return [done[id(j)] for j in prompts]


def test_prompts_that_arrive_together_wait_one_step_at_most() -> None:
    cost = cpu_cost()
    assert not cost.worth_joining(1, 20, 3)  # the premise: one prompt a step by the sum
    prompts = [job(20) for _ in range(6)]
    # The first alone, then every one that waited behind it together.
    assert steps_to_first_token(prompts, 3, cost) == [1, 2, 2, 2, 2, 2]


def test_where_prompts_share_a_step_cheaply_they_all_join_at_once() -> None:
    cost = StepCost()
    cost.fixed, cost.per_token, cost.per_prompt = 0.030, 0.0001, 0.00002  # a GPU-like fit
    assert steps_to_first_token([job(45) for _ in range(5)], 4, cost) == [1, 1, 1, 1, 1]


def test_the_room_still_bounds_a_step_and_long_prompts_are_read_in_chunks() -> None:
    cost = cpu_cost()
    waiting = [job(300), job(20), job(20)]
    steps = []
    while waiting[0].prefill_pos < 300:
        chosen = prompt_chunks(waiting, 128, 3, cost)
        steps.append([end - start for _, start, end in chosen])
        for j, _, end in chosen:
            j.prefill_pos = end
    # The long prompt in chunks of the room, the short ones never beyond it.
    assert steps == [[128], [128], [44]]
    # Left out of the last step by the cost: both join the next.
    assert [end for _, _, end in prompt_chunks(waiting[1:], 128, 3, cost)] == [20, 20]


def test_a_prompt_that_joined_is_judged_afresh_next_time() -> None:
    cost = cpu_cost()
    waiting = [job(20), job(20)]
    prompt_chunks(waiting, 512, 3, cost)
    assert waiting[1].deferred
    assert len(prompt_chunks(waiting[1:], 512, 3, cost)) == 1
    assert not waiting[1].deferred
