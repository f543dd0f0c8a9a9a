"""The Redis mirror of a request log (server.requestlog.RedisLogs), against real Redis:
what a replica reads back is the producer's events, one for one."""

from __future__ import annotations

import asyncio
import secrets

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REDIS_URL
from tokenwell.server.requestlog import RedisLogs, RequestLog

# One SSE event: data lines (an ``event:`` line first on the Responses API),
# ending at its only blank line.
_LINE = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=40
)
_EVENT = st.builds(
    lambda kind, lines: (
        (f"event: {kind}\n" if kind else "") + "".join(f"data: {line}\n" for line in lines) + "\n"
    ).encode(),
    st.sampled_from(["", "response.output_text.delta"]),
    st.lists(_LINE, min_size=1, max_size=3),
)


async def _mirror_and_read(batches: list[list[bytes]], max_bytes: int) -> tuple[list[bytes], int]:
    logs = RedisLogs(REDIS_URL, ttl=60, grace=1, prefix=f"tokenwell:test:{secrets.token_hex(4)}:")
    rlog = RequestLog("req_" + secrets.token_hex(8), stream=True, max_bytes=max_bytes)
    try:
        finished = logs.mirror(rlog)
        rlog.start(200, [(b"content-type", b"text/event-stream")])
        for batch in batches:
            rlog.append(batch)
            await asyncio.sleep(0)  # some batches go in one flush, some in several
        rlog.finish()
        await asyncio.wait_for(finished, 10)
        events, done = await logs.view(rlog.request_id).read(rlog.first, 1)
        assert done
        return events, rlog.first
    finally:
        await logs.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_EVENT, max_size=30), max_size=5))
def test_a_replica_reads_back_every_event_the_producer_logged(batches: list[list[bytes]]) -> None:
    events, first = asyncio.run(_mirror_and_read(batches, 4 * 1024 * 1024))
    assert first == 0
    assert events == [event for batch in batches for event in batch]


def test_more_than_a_thousand_events_in_one_flush_and_a_trimmed_log() -> None:
    sent = [b'data: {"n": %d}\n\n' % n for n in range(2500)]
    events, first = asyncio.run(_mirror_and_read([sent], 20_000))
    assert first > 0 and events == sent[first:]
