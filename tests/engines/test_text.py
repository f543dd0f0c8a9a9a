from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tokenwell.engines.text import TextAssembler


def feed(assembler: TextAssembler, pieces: list[bytes]) -> tuple[str, bool]:
    out = []
    stopped = False
    for piece in pieces:
        released = assembler.push(piece)
        out.append(released.text)
        if released.stopped:
            stopped = True
            break
    if not stopped:
        out.append(assembler.flush().text)
    return "".join(out), stopped


def test_utf8_character_split_across_tokens_is_released_whole() -> None:
    a = TextAssembler()
    euro = "€".encode()
    assert a.push(euro[:1]).text == ""
    assert a.push(euro[1:2]).text == ""
    assert a.push(euro[2:] + b"!").text == "€!"


def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    text, stopped = feed(TextAssembler(stops=("END",)), [b"abc E", b"N", b"D more"])
    assert (text, stopped) == ("abc ", True)


def test_held_back_prefix_is_released_when_it_stops_matching() -> None:
    a = TextAssembler(stops=("END",))
    assert a.push(b"x E").text == "x "
    assert a.push(b"Nx").text == "ENx"


def test_earliest_of_several_stops_wins() -> None:
    text, _ = feed(TextAssembler(stops=("b", "a")), [b"xxab"])
    assert text == "xx"


def test_flush_releases_held_text_at_the_end() -> None:
    text, stopped = feed(TextAssembler(stops=("END",)), [b"the E"])
    assert (text, stopped) == ("the E", False)


def test_logprobs_travel_with_their_text_and_stop_drops_the_rest() -> None:
    a = TextAssembler(stops=("!!",), logprobs=True)
    r1 = a.push(b"hi", {"t": 1})
    r2 = a.push(b"!", {"t": 2})
    r3 = a.push(b"!", {"t": 3})
    assert (r1.text, r1.logprobs) == ("hi", [{"t": 1}])
    assert (r2.text, r2.logprobs) == ("", [])
    assert (r3.text, r3.logprobs, r3.stopped) == ("", [], True)


@given(st.text(), st.lists(st.text(min_size=1, max_size=3), max_size=3), st.integers(1, 5))
def test_output_is_the_text_before_the_first_stop(text: str, stops: list[str], step: int) -> None:
    data = text.encode()
    pieces = [data[i : i + step] for i in range(0, len(data), step)]
    out, stopped = feed(TextAssembler(stops=tuple(stops)), pieces)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    assert out == (text[:cut] if cut >= 0 else text)
    assert stopped == (cut >= 0)


def test_a_character_cut_off_at_the_end_is_dropped_not_replaced() -> None:
    a = TextAssembler()
    assert a.push(b"ok " + "€".encode()[:2]).text == "ok "
    assert a.flush().text == ""
