from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwell.protocol.sse import DONE, KEEPALIVE, SSEDecoder, encode

FIXTURES = Path(__file__).parents[1] / "fixtures" / "openai-recorded"


def test_encode_is_one_data_line_and_a_blank_line() -> None:
    assert encode(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    assert KEEPALIVE.startswith(b":")


def test_decoder_splits_on_cr_lf_and_crlf_across_reads() -> None:
    decoder = SSEDecoder()
    events = []
    for piece in [b"data: a\r", b"\n\r", b"\ndata: b\n", b"\n", b"data: c\r\r"]:
        events += decoder.feed(piece)
    assert [e.data for e in events] == ["a", "b", "c"]


def test_comments_are_skipped_and_counted() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b": keep-alive\n\ndata: x\n\n")
    assert [e.data for e in events] == ["x"]
    assert decoder.comments == 1


def test_multi_line_data_joins_with_newline_and_fields_are_kept() -> None:
    events = SSEDecoder().feed(b"event: e\nid: 7\nretry: 10\ndata: a\ndata: b\n\n")
    assert events[0].data == "a\nb"
    assert (events[0].event, events[0].id, events[0].retry) == ("e", "7", 10)


def test_unterminated_event_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: half") == []
    assert decoder.flush() == []


@given(st.text(min_size=1), st.integers(min_value=1, max_value=7))
def test_a_character_split_across_reads_survives(text: str, step: int) -> None:
    body = encode(orjson.dumps({"content": text}))
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(body), step):
        events += decoder.feed(body[i : i + step])
    assert [orjson.loads(e.data)["content"] for e in events] == [text]


@pytest.mark.parametrize("name", ["text", "short", "tool-calls", "json-schema", "refusal"])
def test_recorded_openai_streams_decode(name: str) -> None:
    body = (FIXTURES / f"{name}.sse").read_bytes()
    events = SSEDecoder().feed(body)
    assert events[-1].data == "[DONE]"
    chunks = [orjson.loads(e.data) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]


def _shape(value: object) -> object:
    """Keys (in order) and value types, recursively: the layout, not the content."""
    if isinstance(value, dict):
        return [(k, _shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


@pytest.mark.parametrize("name", ["text", "short", "tool-calls"])
def test_our_chunks_are_laid_out_as_openais(name: str) -> None:
    """Replay a recording's content through our renderer: same chunks, same layout."""
    from tokenwell.protocol.events import Finish, Meter, TextDelta, ToolCallArguments, ToolCallStart
    from tokenwell.protocol.render import Identity, StreamRenderer

    recorded = [
        orjson.loads(e.data)
        for e in SSEDecoder().feed((FIXTURES / f"{name}.sse").read_bytes())[:-1]
    ]
    first = recorded[0]
    renderer = StreamRenderer(
        Identity(first["model"], first["system_fingerprint"], first["id"], first["created"]),
        include_usage=False,
    )
    ours = b""
    for chunk in recorded:
        if not chunk["choices"]:
            usage = chunk["usage"]
            ours += renderer.usage(Meter(usage["prompt_tokens"], 0, usage["completion_tokens"]))
            continue
        choice = chunk["choices"][0]
        delta = choice["delta"]
        for call in delta.get("tool_calls", []):
            if "id" in call:
                ours += renderer.render(
                    ToolCallStart(0, call["index"], call["id"], call["function"]["name"])
                )
            if call["function"].get("arguments"):
                ours += renderer.render(
                    ToolCallArguments(0, call["index"], call["function"]["arguments"])
                )
        if delta.get("content"):
            ours += renderer.render(TextDelta(0, delta["content"]))
        if choice["finish_reason"]:
            ours += renderer.render(Finish(0, choice["finish_reason"]))
    mine = [orjson.loads(e.data) for e in SSEDecoder().feed(ours)]
    assert len(mine) == len(recorded)
    for got, want in zip(mine, recorded, strict=True):
        # OpenAI's role chunk also carries "refusal": null; CONTRACT.md leaves it out.
        if want["choices"] and "role" in want["choices"][0]["delta"]:
            want["choices"][0]["delta"].pop("refusal", None)
        # Our usage object adds prompt_tokens_details, as OpenAI's newer API does.
        if "usage" in want:
            got["usage"].pop("prompt_tokens_details", None)
        assert got == want
        assert _shape(got) == _shape(want)
