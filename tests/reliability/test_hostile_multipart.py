"""Hostile multipart against ``POST /v1/images/edits`` on a live gateway (issue 10).

Raw sockets, so that the bodies can be exactly as broken as a hostile client makes them: truncated,
without or with a wrong boundary, with huge headers, thousands of tiny parts, path characters in
names, stalled or abandoned half-way, or randomly mutated (hypothesis). Each case must get a 4xx with
an OpenAI-shaped error (or a 200 when the mutation left a valid request), never a 5xx, and leave
nothing behind: no spool directory, and no request still counted in flight.
"""

from __future__ import annotations

import http.client
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.traffic import EDIT, GEN, MODEL, openai_error
from tests.conftest import Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes import image_files
from tests.fakes.openai_upstream import FakeOpenAI

BODY_TIMEOUT_S = 1.0
IMAGE = image_files.png(32, 32)


@pytest.fixture(scope="module")
def hostile(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that gives a stalled body 1 s (instead of 30) before answering 408."""
    data_dir = tmp_path_factory.mktemp("hostile")
    settings_ = make_settings(
        data_dir, [fake_upstream_config(fake_upstream)], server={"body_read_timeout_s": BODY_TIMEOUT_S}
    )
    gw = start_gateway(settings_, data_dir)
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def key(hostile: Gateway) -> str:
    return hostile.create_key()[0]


@dataclass
class Answer:
    status: int
    body: bytes

    @property
    def error(self) -> dict[str, object] | None:
        try:
            return openai_error(orjson.loads(self.body))
        except orjson.JSONDecodeError:
            return None


def part(name: str, data: bytes, *, filename: str | None = None, content_type: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"Content-Disposition: {disposition}\r\n" + (
        f"Content-Type: {content_type}\r\n" if content_type else ""
    )
    return head.encode() + b"\r\n" + data


def multipart(boundary: str, parts: list[bytes], *, close: bool = True) -> bytes:
    sep = f"--{boundary}\r\n".encode()
    body = b"".join(sep + p + b"\r\n" for p in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def valid_parts(prompt: bytes = b"a hat") -> list[bytes]:
    return [
        part("model", MODEL.encode()),
        part("prompt", prompt),
        part("quality", b"low"),
        part("image", IMAGE, filename="in.png", content_type="image/png"),
    ]


class Raw:
    """One HTTP/1.1 request over a plain socket, sent in pieces, answer parsed by http.client."""

    def __init__(self, gw: Gateway, key: str) -> None:
        host, port = gw.url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.key = key
        self.data_dir = gw.data_dir

    def head(self, path: str, content_type: str | None, length: int | None, extra: str = "") -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.address[0]}", f"Authorization: Bearer {self.key}"]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()

    def send(
        self,
        body: bytes,
        *,
        path: str = EDIT,
        content_type: str | None = "multipart/form-data; boundary=BOUNDARY",
        length: int | None = None,
        extra_headers: str = "",
        timeout: float = 30.0,
    ) -> Answer:
        """Send the head and ``body``; ``length`` may promise more than is sent (a stalled upload).
        The socket timeout only bounds the test: the gateway must answer well before it."""
        declared = len(body) if length is None else length
        with socket.create_connection(self.address, timeout=timeout) as sock:
            sock.sendall(self.head(path, content_type, declared, extra_headers))
            try:
                sock.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the gateway answered and closed before taking the whole body: read its answer
            return read_answer(sock)


def read_answer(sock: socket.socket) -> Answer:
    response = http.client.HTTPResponse(sock)
    response.begin()
    try:
        body = response.read()
    except http.client.IncompleteRead as exc:
        body = exc.partial
    return Answer(response.status, body)


def spool_entries(gw: Gateway) -> list[Path]:
    return list((gw.data_dir / "spool").iterdir())


def metric(gw: Gateway, name: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def settled(gw: Gateway) -> tuple[list[Path], float]:
    """Spool entries and requests in flight once the gateway had a moment to finish cleaning up
    (the /metrics request that reads the gauge counts itself: 1 means nothing else is running)."""
    deadline = time.monotonic() + 30  # bounds a failure only
    while time.monotonic() < deadline:
        entries, in_flight = spool_entries(gw), metric(gw, "gateway_requests_in_flight")
        if not entries and in_flight == 1:
            break
        time.sleep(0.05)
    return entries, in_flight


def assert_refused(answer: Answer, status: int, code: str | None) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    error = answer.error
    assert error is not None, answer.body[:300]
    assert error["code"] == code, error


# -- broken bodies ---------------------------------------------------------------------------------

WHOLE = multipart("BOUNDARY", valid_parts())
CASES: dict[str, tuple[bytes, str | None, int, str | None]] = {
    # name: (body, content type, expected status, expected code)
    "truncated in a part's headers": (WHOLE[:60], None, 400, "invalid_multipart"),
    "truncated in the file's bytes": (WHOLE[: WHOLE.index(IMAGE) + 40], None, 400, "invalid_multipart"),
    "no closing boundary": (
        multipart("BOUNDARY", valid_parts(), close=False),
        None,
        400,
        "invalid_multipart",
    ),
    "closing boundary without its dashes": (WHOLE[: WHOLE.rindex(b"--\r\n")], None, 400, "invalid_multipart"),
    "empty body": (b"", None, 400, "invalid_multipart"),
    "no boundary parameter": (WHOLE, "multipart/form-data", 400, "invalid_multipart"),
    "empty boundary parameter": (WHOLE, 'multipart/form-data; boundary=""', 400, "invalid_multipart"),
    "a 300-character boundary": (
        WHOLE,
        "multipart/form-data; boundary=" + "b" * 300,
        400,
        "invalid_multipart",
    ),
    "the body uses another boundary": (multipart("OTHER", valid_parts()), None, 400, "invalid_multipart"),
    "not multipart at all": (WHOLE, "application/octet-stream", 400, "invalid_multipart"),
    "a part without Content-Disposition": (
        b"--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nx\r\n--BOUNDARY--\r\n",
        None,
        400,
        "invalid_multipart",
    ),
    "a part without a name": (
        b'--BOUNDARY\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\nx\r\n--BOUNDARY--\r\n',
        None,
        400,
        "invalid_multipart",
    ),
    "a 64 KiB part header": (
        multipart("BOUNDARY", [part("prompt", b"x", filename="f" * 65536), *valid_parts()]),
        None,
        400,
        "invalid_multipart",
    ),
    "200 headers in one part": (
        multipart(
            "BOUNDARY",
            [b"".join(f"X-H{i}: v\r\n".encode() for i in range(200)) + part("prompt", b"x"), *valid_parts()],
        ),
        None,
        400,
        "invalid_multipart",
    ),
    "5,000 tiny fields": (
        multipart("BOUNDARY", [part(f"f{i}", b"x") for i in range(5000)] + valid_parts()),
        None,
        400,
        "invalid_multipart",
    ),
    "3,000 tiny images": (
        multipart("BOUNDARY", valid_parts() + [part("image[]", b"x", filename="x.png")] * 3000),
        None,
        400,
        "too_many_images",
    ),
    "a non-UTF-8 prompt": (multipart("BOUNDARY", valid_parts(b"\xff\xfe\xfa")), None, 400, "invalid_value"),
    "an image that is not one": (
        multipart("BOUNDARY", [*valid_parts()[:3], part("image", b"#!/bin/sh\n", filename="a.png")]),
        None,
        400,
        "invalid_image_format",
    ),
    "two masks": (
        multipart(
            "BOUNDARY",
            [*valid_parts(), part("mask", IMAGE, filename="m.png"), part("mask", IMAGE, filename="m.png")],
        ),
        None,
        400,
        "invalid_multipart",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_bodies_are_refused_cleanly(
    hostile: Gateway, key: str, upstream: FakeOpenAI, case: str
) -> None:
    body, content_type, status, code = CASES[case]
    answer = Raw(hostile, key).send(
        body, content_type=content_type or "multipart/form-data; boundary=BOUNDARY"
    )
    assert_refused(answer, status, code)
    assert upstream.count() == 0
    assert settled(hostile) == ([], 1)


def test_path_characters_in_names_and_filenames_stay_metadata(
    hostile: Gateway, key: str, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    target = tmp_path / "escaped.png"
    traversal = "../" * 12 + str(target).lstrip("/")
    parts = [
        part("model", MODEL.encode()),
        part("prompt", b"a hat"),
        part("../../../../etc/passwd", b"a field with a path for a name"),
        part("image", IMAGE, filename=traversal, content_type="image/png"),
        part("mask", image_files.mask(32, 32), filename="..\\..\\..\\mask.png", content_type="image/png"),
    ]
    answer = Raw(hostile, key).send(multipart("BOUNDARY", parts))
    assert answer.status == 200, answer.body[:300]
    assert not target.exists()
    # Upstream, the files go under names the gateway makes up, whatever the client called them.
    sent = {f.field: f.filename or "" for f in upstream.last.files}
    assert sent.keys() == {"image", "mask"}
    assert not [name for name in sent.values() if "/" in name or "\\" in name or ".." in name], sent
    # An unknown field is forwarded as it came (it is the client's), never used as a path.
    assert upstream.last.form["../../../../etc/passwd"] == ["a field with a path for a name"]
    assert settled(hostile) == ([], 1)


def test_an_image_part_named_with_path_characters_is_not_an_image(hostile: Gateway, key: str) -> None:
    parts = [*valid_parts()[:3], part("image[../../x]", IMAGE, filename="in.png", content_type="image/png")]
    answer = Raw(hostile, key).send(multipart("BOUNDARY", parts))
    # A plain text field then (here: not UTF-8), and the request has no image either way.
    assert answer.status == 400 and answer.error is not None, answer.body[:300]
    assert answer.error["param"] in ("image", "image[../../x]"), answer.error
    assert settled(hostile) == ([], 1)


def test_huge_request_headers_cause_no_5xx(hostile: Gateway, key: str) -> None:
    """uvicorn's httptools parser sets no limit on the request head (reported: a 64 MB header is
    buffered whole); the gateway must at least answer normally and keep nothing."""
    answer = Raw(hostile, key).send(WHOLE, extra_headers=f"X-Big: {'a' * 200_000}\r\n")
    assert answer.status < 500, answer
    assert settled(hostile) == ([], 1)


def test_broken_chunked_framing_is_refused(hostile: Gateway, key: str) -> None:
    body = b"10\r\n" + WHOLE[:16] + b"\r\nzz-not-a-size\r\n" + WHOLE[16:] + b"\r\n0\r\n\r\n"
    raw = Raw(hostile, key)
    with socket.create_connection(raw.address, timeout=30) as sock:
        head = raw.head(
            EDIT, "multipart/form-data; boundary=BOUNDARY", None, "Transfer-Encoding: chunked\r\n"
        )
        sock.sendall(head + body)
        answer = read_answer(sock)
    assert 400 <= answer.status < 500, answer
    assert settled(hostile) == ([], 1)


# -- slow, stalled and abandoned uploads -----------------------------------------------------------


@pytest.mark.parametrize("path", [EDIT, GEN])
def test_a_stalled_upload_is_answered_408_and_releases_everything(
    hostile: Gateway, key: str, upstream: FakeOpenAI, path: str
) -> None:
    """The client sends part of the body, then nothing. The gateway answers 408 after
    `server.body_read_timeout_s` of silence (the socket timeout, 30 s, only bounds the test) and
    keeps nothing: the half-written spool goes, the request stops counting as in flight."""
    if path == EDIT:
        body, content_type = WHOLE[: WHOLE.index(IMAGE) + 10], "multipart/form-data; boundary=BOUNDARY"
    else:
        body, content_type = b'{"model": "gpt-image-1", "prompt": "a ha', "application/json"
    answer = Raw(hostile, key).send(body, path=path, content_type=content_type, length=len(body) + 10_000)
    assert_refused(answer, 408, "request_timeout")
    assert upstream.count() == 0
    assert settled(hostile) == ([], 1)


def test_a_stalled_upload_holds_its_spool_until_the_timeout(
    gateway_with: Callable[..., Gateway], fake_upstream: FakeOpenAI
) -> None:
    """While the body stalls, the spool exists (so the 408 above did release something real).
    The stall bound is 5 s here: the window to see the spool in must outlast a loaded CI box."""
    gw = gateway_with(fake_upstream_config(fake_upstream), server={"body_read_timeout_s": 5})
    raw = Raw(gw, gw.create_key()[0])
    body = WHOLE[: WHOLE.index(IMAGE) + 10]
    with socket.create_connection(raw.address, timeout=30) as sock:
        sock.sendall(raw.head(EDIT, "multipart/form-data; boundary=BOUNDARY", len(body) + 10_000) + body)
        seen = []
        while not seen and not select.select([sock], [], [], 0.01)[0]:  # until the gateway answers
            seen = spool_entries(gw)
        answer = read_answer(sock)
    assert seen, "the upload never reached the spool"
    assert_refused(answer, 408, "request_timeout")
    assert settled(gw) == ([], 1)


def trickle(raw: Raw, path: str, content_type: str, start: bytes, *, every_s: float) -> tuple[Answer, bool]:
    """Send ``start``, then one more byte every ``every_s`` (never a stall) until the gateway answers.
    Returns the answer and whether a spool folder existed while the body was trickling."""
    spool_seen = False
    with socket.create_connection(raw.address, timeout=30) as sock:
        sock.sendall(raw.head(path, content_type, len(start) + 100_000) + start)
        give_up = time.monotonic() + 20  # bounds the test only: the gateway must answer long before
        while not select.select([sock], [], [], every_s)[0]:
            assert time.monotonic() < give_up, "the gateway let the trickle go on"
            spool_seen = spool_seen or bool(list((raw.data_dir / "spool").iterdir()))
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_answer(sock), spool_seen


def test_a_trickled_body_is_answered_408_at_the_body_deadline(
    gateway_with: Callable[..., Gateway], fake_upstream: FakeOpenAI
) -> None:
    """One byte every 0.1 s never trips the stall timeout (10 s here), so only the overall deadline
    (3 s here, `server.body_deadline_s`; long enough for a loaded box to look at the spool meanwhile)
    can end it: 408 as for a stall, nothing kept afterwards."""
    gw = gateway_with(
        fake_upstream_config(fake_upstream), server={"body_read_timeout_s": 10, "body_deadline_s": 3}
    )
    key = gw.create_key()[0]
    raw = Raw(gw, key)
    for path, content_type, start in (
        (EDIT, "multipart/form-data; boundary=BOUNDARY", WHOLE[: WHOLE.index(IMAGE) + 10]),
        (GEN, "application/json", b'{"model": "gpt-image-1", "prompt": "a ha'),
    ):
        answer, spool_seen = trickle(raw, path, content_type, start, every_s=0.1)
        assert_refused(answer, 408, "request_timeout")
        assert answer.error is not None and "3 seconds" in str(answer.error["message"]), answer.error
        assert spool_seen == (path == EDIT), path  # so for an edit the 408 did release a real spool
        assert settled(gw) == ([], 1), path


def test_a_client_that_vanishes_mid_upload_leaves_nothing(hostile: Gateway, key: str) -> None:
    raw = Raw(hostile, key)
    for cut in (40, WHOLE.index(IMAGE) + 5, len(WHOLE) - 5):
        with socket.create_connection(raw.address, timeout=30) as sock:
            sock.sendall(
                raw.head(EDIT, "multipart/form-data; boundary=BOUNDARY", len(WHOLE) + 50) + WHOLE[:cut]
            )
        assert settled(hostile) == ([], 1), cut


# -- random mutations of a valid body -------------------------------------------------------------

mutations = st.lists(
    st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, len(WHOLE))),
        st.tuples(st.just("flip"), st.integers(0, len(WHOLE) - 1), st.integers(1, 255)),
        st.tuples(
            st.just("insert"),
            st.integers(0, len(WHOLE)),
            st.sampled_from([b"\r\n", b"--BOUNDARY\r\n", b"--BOUNDARY--", b'"', b";", b"\x00", b"\r\n\r\n"]),
        ),
        st.tuples(st.just("delete"), st.integers(0, len(WHOLE)), st.integers(1, 64)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(body: bytes, steps: list[tuple[object, ...]]) -> bytes:
    data = bytearray(body)
    for step in steps:
        kind, at = step[0], min(int(step[1]), len(data))  # type: ignore[call-overload]
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and at < len(data):
            data[at] ^= int(step[2])  # type: ignore[call-overload]
        elif kind == "insert":
            data[at:at] = step[2]  # type: ignore[assignment]
        elif kind == "delete":
            del data[at : at + int(step[2])]  # type: ignore[call-overload]
    return bytes(data)


def test_random_mutations_never_cause_a_5xx_or_a_leak(hostile: Gateway, key: str) -> None:
    raw = Raw(hostile, key)
    seen: set[int] = set()

    @settings(
        max_examples=150,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(steps=mutations)
    def check(steps: list[tuple[object, ...]]) -> None:
        answer = raw.send(mutate(WHOLE, steps))
        seen.add(answer.status)
        assert answer.status < 500, (steps, answer)
        if answer.status >= 400:
            assert answer.error is not None, (steps, answer)
        assert settled(hostile) == ([], 1), steps

    check()
    assert {200, 400} <= seen, seen


def test_the_gateway_still_serves_edits_afterwards(hostile: Gateway, key: str) -> None:
    boundary = uuid.uuid4().hex
    answer = Raw(hostile, key).send(
        multipart(boundary, valid_parts()), content_type=f"multipart/form-data; boundary={boundary}"
    )
    assert answer.status == 200, answer.body[:300]
    assert orjson.loads(answer.body)["data"]
