"""The tool-call parser: generated text in, content and call events out."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from tokenwell.engines.llamacpp.toolcalls import ToolCallParser, render_call
from tokenwell.protocol.events import TextDelta, ToolCallArguments, ToolCallStart


def run(text: str, step: int = 1) -> list[object]:
    parser = ToolCallParser(0)
    events: list[object] = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    return events + parser.finish()


def calls(events: list[object]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for e in events:
        if isinstance(e, ToolCallStart):
            out.append((e.name, ""))
        elif isinstance(e, ToolCallArguments):
            out[-1] = (out[-1][0], out[-1][1] + e.fragment)
    return out


def text_of(events: list[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


CALL = (
    '<tool_call>\n{"name": "get_weather", '
    '"arguments": {"city": "Paris", "n": [1, {"x": "}"}]}}\n</tool_call>'
)


def test_a_call_streamed_character_by_character() -> None:
    events = run(CALL)
    assert isinstance(events[0], ToolCallStart) and events[0].name == "get_weather"
    assert events[0].id.startswith("call_") and events[0].index == 0
    assert calls(events) == [("get_weather", '{"city": "Paris", "n": [1, {"x": "}"}]}')]
    assert sum(isinstance(e, ToolCallArguments) for e in events) > 5  # as generated
    assert text_of(events) == ""


def test_text_before_a_call_is_content_and_parallel_calls_are_indexed() -> None:
    two = CALL + "\n" + CALL.replace("get_weather", "get_time")
    events = run("Let me check. " + two, step=3)
    assert text_of(events) == "Let me check. "
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_time")]


def test_a_partial_marker_is_held_until_it_is_not_one() -> None:
    events = run("a <tool and <b>")
    assert text_of(events) == "a <tool and <b>"


def test_rendering_and_parsing_agree() -> None:
    rendered = render_call("f", '{"a": 1}')
    assert calls(run(rendered)) == [("f", '{"a": 1}')]


@given(
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8)),
        max_size=4,
    ),
    st.integers(1, 7),
)
def test_any_arguments_round_trip(args: dict[str, object], step: int) -> None:
    events = run(render_call("fn", orjson.dumps(args).decode()), step)
    assert [(n, orjson.loads(a)) for n, a in calls(events)] == [("fn", args)]
