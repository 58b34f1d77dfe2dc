"""SSE framing and the incremental parser, byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.wire import sse
from tokenwire.wire.sse import SSEParser, SSETooLarge


def test_event_with_and_without_id() -> None:
    """An event is 'data: …' plus a blank line, with an 'id:' line first when given."""
    assert sse.event(b"{}") == b"data: {}\n\n"
    assert sse.event(b"{}", event_id=7) == b"id: 7\ndata: {}\n\n"
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.retry(1500) == b"retry: 1500\n"  # a line of the event it starts


def test_named_event_puts_the_event_line_first() -> None:
    """A named event is 'event: name', then the id when given, then the data; the parser agrees."""
    assert sse.event(b"{}", name=b"ping") == b"event: ping\ndata: {}\n\n"
    framed = sse.event(b"{}", event_id=3, name=b"response.created")
    assert framed == b"event: response.created\nid: 3\ndata: {}\n\n"
    (parsed,) = SSEParser().feed(framed)
    assert (parsed.event, parsed.id, parsed.data) == ("response.created", "3", "{}")


def test_parser_handles_comments_ids_multiline_and_crlf() -> None:
    """Comments are skipped, data lines join with newlines, CRLF and CR end lines too."""
    parser = SSEParser()
    events = parser.feed(b": ping\r\nid: 3\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\ndata: c\r\r")
    assert [(e.data, e.event, e.id) for e in events] == [("a\nb", "x", "3"), ("c", "message", "3")]
    assert parser.last_event_id == "3"


def test_parser_waits_for_complete_events() -> None:
    """Bytes split anywhere, even inside a CRLF, produce the same events once complete."""
    parser = SSEParser()
    assert parser.feed(b"data: hel") == []
    assert parser.feed(b"lo\r") == []
    events = parser.feed(b"\n\r\n")
    assert [e.data for e in events] == ["hello"]


def test_parser_strips_bom_and_single_leading_space() -> None:
    """A leading BOM is dropped; only one space after the colon is removed."""
    events = SSEParser().feed(b"\xef\xbb\xbfdata:  two\n\n")
    assert [e.data for e in events] == [" two"]


@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
            max_size=30,
        ),
        max_size=8,
    ),
    st.lists(st.integers(min_value=1, max_value=40), max_size=30),
)
def test_parser_is_split_invariant(payloads: list[str], cuts: list[int]) -> None:
    """However a stream of events is cut into chunks, the parser yields the same data."""
    stream = b"".join(sse.event(p.encode()) for p in payloads)
    parser = SSEParser()
    got: list[str] = []
    position = 0
    for cut in cuts:
        got += [e.data for e in parser.feed(stream[position : position + cut])]
        position += cut
    got += [e.data for e in parser.feed(stream[position:])]
    assert got == payloads


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_a_line_that_never_ends_is_cut_at_the_limit(ending: bytes) -> None:
    """An endless line raises SSETooLarge once past max_event_bytes; the buffer never holds more."""
    parser = SSEParser(max_event_bytes=1000)
    assert [e.data for e in parser.feed(b"data: ok" + ending + ending)] == ["ok"]
    if ending == b"\r\n":
        parser.feed(b"\r")  # a CR seen: the CR-aware path parses what follows
    with pytest.raises(SSETooLarge):
        for _ in range(100):
            parser.feed(b"data: " + b"x" * 100)
    assert len(parser._buffer) <= 1000


def test_an_event_that_never_ends_is_cut_at_the_limit() -> None:
    """Many data lines without the blank line that ends an event: SSETooLarge past the limit."""
    parser = SSEParser(max_event_bytes=1000)
    with pytest.raises(SSETooLarge):
        for _ in range(100):
            parser.feed(b"data: " + b"y" * 50 + b"\n")


def test_events_up_to_the_limit_pass_and_the_default_is_one_mebibyte() -> None:
    """An event of exactly max_event_bytes is fine, one after another; the default is 1 MiB."""
    parser = SSEParser(max_event_bytes=1000)
    for _ in range(5):
        assert [len(e.data) for e in parser.feed(b"data: " + b"z" * 999 + b"\n\n")] == [999]
    assert sse.MAX_EVENT_BYTES == 1 << 20
    big = b"data: " + b"w" * 500_000 + b"\n\n"
    assert [len(e.data) for e in SSEParser().feed(big)] == [500_000]
