"""Choosing a replica: the least busy, or a placement hint's own (pure, no network)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tokenwell.engines.upstream.pool import AFFINITY_SLACK, Pool
from tokenwell.engines.upstream.settings import UpstreamURL


def pool(n: int) -> Pool:
    urls = [UpstreamURL(url=f"http://10.0.0.{i}:8000/v1") for i in range(n)]
    return Pool(urls, client=None, interval=60)  # type: ignore[arg-type]


def test_without_a_hint_the_least_busy_is_chosen_and_ties_rotate() -> None:
    p = pool(3)
    p.replicas[0].outstanding = 1
    picked = Counter(p.pick(set()) for _ in range(10))
    assert set(picked) == {p.replicas[1], p.replicas[2]}


def test_a_key_keeps_its_replica_and_keys_spread() -> None:
    p = pool(4)
    homes = {key: p.pick(set(), key) for key in (f"session-{i}" for i in range(200))}
    for key, home in homes.items():
        assert all(p.pick(set(), key) is home for _ in range(3))
    spread = Counter(homes.values())
    assert len(spread) == 4 and min(spread.values()) >= 25  # about 50 each


def test_a_busy_home_sends_the_key_to_its_next_replica_in_turn() -> None:
    p = pool(3)
    key = "session-x"
    home = p.pick(set(), key)
    assert home is not None
    home.outstanding = AFFINITY_SLACK  # at most twice the least (0) plus the slack
    assert p.pick(set(), key) is home
    home.outstanding = AFFINITY_SLACK + 1
    second = p.pick(set(), key)
    assert second is not home and second is not None
    # The second choice is the key's own too: stable while the home is busy.
    assert all(p.pick(set(), key) is second for _ in range(3))
    # When the home is gone, the key moves to that same second choice.
    home.outstanding = 0
    home.healthy = False
    assert p.pick(set(), key) is second
    assert p.pick({second}, key) not in (home, second)


@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=6),
    st.one_of(st.none(), st.text(max_size=20)),
)
def test_the_choice_is_never_much_busier_than_the_least_busy(loads: list[int], key: Any) -> None:
    p = pool(len(loads))
    for replica, load in zip(p.replicas, loads, strict=True):
        replica.outstanding = load
    chosen = p.pick(set(), key)
    assert chosen is not None
    assert chosen.outstanding <= 2 * min(loads) + AFFINITY_SLACK
    if key is None:
        assert chosen.outstanding == min(loads)
