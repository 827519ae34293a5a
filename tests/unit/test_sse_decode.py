"""The upstream SSE decoder: any chunking gives the same events; big events; spec corner cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.upstream.sse_decode import SSEDecoder, SSEEvent


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + list(decoder.flush())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


STREAM = (
    b": keep-alive\r\n\r\n"
    b"event: image_generation.partial_image\r\n"
    b'data: {"type":"image_generation.partial_image","b64_json":"AAAA"}\r\n\r\n'
    b"event: image_generation.completed\n"
    b'data: {"a": 1,\n'
    b'data: "b": 2}\n'
    b"id: 7\n\n"
    b"data:no-space\r\r"
    b'event: error\ndata: {"type":"error"}\n\n'
)
EXPECTED = [
    SSEEvent(
        "image_generation.partial_image", b'{"type":"image_generation.partial_image","b64_json":"AAAA"}'
    ),
    SSEEvent("image_generation.completed", b'{"a": 1,\n"b": 2}', "7"),
    SSEEvent("message", b"no-space", "7"),
    SSEEvent("error", b'{"type":"error"}', "7"),
]


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert decode([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    assert decode(split(STREAM, cuts)) == EXPECTED


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(
                alphabet=st.characters(blacklist_characters="\r\n:", blacklist_categories=("Cs",)), min_size=1
            ),
            st.binary(min_size=0, max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b),
        ),
        max_size=8,
    ),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=20),
)
def test_roundtrip_of_generated_events(events: list[tuple[str, bytes]], cuts: list[int]) -> None:
    wire = b"".join(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n" for name, data in events)
    decoded = decode(split(wire, cuts))
    assert [(e.event, e.data) for e in decoded] == events


def test_a_twenty_megabyte_event_in_small_chunks() -> None:
    payload = b"A" * (20 * 1024 * 1024)
    wire = b"event: image_generation.completed\ndata: " + payload + b"\n\n"
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    (event,) = decode(chunks)
    assert event.event == "image_generation.completed" and event.data == payload


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    assert decode([b"data: x\r", b"\n\r", b"\n"]) == [SSEEvent("message", b"x")]


def test_unterminated_final_event_is_flushed() -> None:
    assert decode([b"event: done\ndata: tail"]) == [SSEEvent("done", b"tail")]
