"""Streaming multipart parsing: parts spooled to disk, limits enforced as bytes arrive, nothing left over."""

from __future__ import annotations

import asyncio
import os
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.errors import GatewayError, InvalidRequestError, PayloadTooLargeError
from app.images.intake.spool import UploadForm, UploadLimits, field_role, parse_multipart
from tests.fakes import image_files as f

MB = 1024 * 1024
LIMITS = UploadLimits(max_file_bytes=50 * MB, max_files=16)
BOUNDARY = "test-boundary-0123"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def encode(files: Any = None, data: Any = None) -> tuple[bytes, str]:
    """A body exactly as httpx (the openai SDK's transport) sends it, and its content type."""
    request = httpx.Request("POST", "http://127.0.0.1/v1/images/edits", files=files, data=data)
    return request.read(), request.headers["content-type"]


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Source:
    """An async chunk source that records how many chunks the parser pulled."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.consumed = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.consumed += 1
            yield chunk


async def parse(
    data: bytes, content_type: str, root: Path, *, chunk: int = 65536, limits: UploadLimits = LIMITS
) -> UploadForm:
    return await parse_multipart(
        Source(split(data, chunk)).stream(), content_type=content_type, spool_root=root, limits=limits
    )


def leftovers(root: Path) -> list[Path]:
    return sorted(root.rglob("*")) if root.exists() else []


def raw_part(name: str, payload: bytes, *, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + payload + b"\r\n"


CLOSE = f"--{BOUNDARY}--\r\n".encode()


def test_field_roles() -> None:
    assert [field_role(n) for n in ("image", "image[]", "image[3]", "mask")] == [
        "image",
        "image",
        "image",
        "mask",
    ]
    assert [field_role(n) for n in ("images", "image[x]", "prompt", "../mask")] == ["field"] * 4


async def test_one_image_with_fields_as_strings(tmp_path: Path) -> None:
    image = f.png(64, 48)
    data, ctype = encode(
        files={"image": ("cat.png", image, "image/png")},
        data={"prompt": "a cat wearing a hat", "n": "2", "stream": "false", "model": "gpt-image-1"},
    )
    form = await parse(data, ctype, tmp_path)
    assert form.field("prompt") == "a cat wearing a hat"
    assert (form.field("n"), form.field("stream"), form.field("missing")) == ("2", "false", None)
    [spooled] = form.images()
    assert (spooled.field, spooled.filename, spooled.content_type, spooled.size) == (
        "image",
        "cat.png",
        "image/png",
        len(image),
    )
    assert spooled.path.read_bytes() == image
    assert spooled.path.parent == form.spool_dir and form.spool_dir.parent == tmp_path
    assert form.mask() is None
    form.cleanup()


@pytest.mark.parametrize("name", ["image", "image[]"])
@pytest.mark.parametrize("chunk", [1, 7, 1000, 10**9])
async def test_several_images_and_a_mask_in_arrival_order(tmp_path: Path, name: str, chunk: int) -> None:
    images = [f.png(16, 16), f.jpeg(20, 10), f.webp(8, 8)]
    mask = f.mask(16, 16)
    files = [(name, (f"{i}.img", body, "application/octet-stream")) for i, body in enumerate(images)]
    data, ctype = encode(files=[*files, ("mask", ("m.png", mask, "image/png"))], data={"prompt": "x"})
    form = await parse(data, ctype, tmp_path, chunk=chunk)
    assert [s.path.read_bytes() for s in form.images()] == images
    assert [s.filename for s in form.images()] == ["0.img", "1.img", "2.img"]
    spooled_mask = form.mask()
    assert spooled_mask is not None and spooled_mask.path.read_bytes() == mask
    assert form.field("prompt") == "x"
    form.cleanup()


async def test_indexed_and_mixed_image_names_keep_arrival_order(tmp_path: Path) -> None:
    files = [("image[1]", ("b", b"B", None)), ("image", ("a", b"A", None)), ("image[]", ("c", b"C", None))]
    form = await parse(*encode(files=files), tmp_path)
    assert [s.path.read_bytes() for s in form.images()] == [b"B", b"A", b"C"]
    form.cleanup()


@pytest.mark.parametrize("chunk", [1, 3, 65536])
async def test_file_bytes_survive_boundary_lookalikes(tmp_path: Path, chunk: int) -> None:
    # Near-boundaries inside the data force the parser's look-behind across chunk edges.
    rng = random.Random(7)
    tricky = b"".join(
        rng.randbytes(rng.randrange(1, 50)) + b"\r\n--" + BOUNDARY.encode()[: rng.randrange(len(BOUNDARY))]
        for _ in range(200 if chunk < 10 else 20_000)
    )
    data = raw_part("prompt", b"p\r\n-") + raw_part("image", tricky, filename="t.bin") + CLOSE
    form = await parse(data, CONTENT_TYPE, tmp_path, chunk=chunk)
    assert form.images()[0].path.read_bytes() == tricky
    assert form.field("prompt") == "p\r\n-"
    form.cleanup()


async def test_repeated_fields_keep_every_value_and_field_returns_the_last(tmp_path: Path) -> None:
    data = raw_part("user", b"a") + raw_part("user", b"b") + raw_part("prompt", "h\u00e9".encode()) + CLOSE
    form = await parse(data, CONTENT_TYPE, tmp_path)
    assert form.fields == {"user": ["a", "b"], "prompt": ["h\u00e9"]}
    assert form.field("user") == "b"
    form.cleanup()


async def test_an_image_part_without_filename_is_still_spooled(tmp_path: Path) -> None:
    data = raw_part("image", b"\x89PNG not really") + CLOSE
    form = await parse(data, CONTENT_TYPE, tmp_path)
    assert form.fields == {}
    [spooled] = form.images()
    assert (spooled.filename, spooled.path.read_bytes()) == (None, b"\x89PNG not really")
    form.cleanup()


async def test_an_empty_file_part_is_kept_as_an_empty_file(tmp_path: Path) -> None:
    form = await parse(*encode(files={"image": ("e.png", b"", "image/png")}), tmp_path)
    assert form.images()[0].size == 0 and form.images()[0].path.read_bytes() == b""
    form.cleanup()


async def test_cleanup_removes_the_spool_and_is_idempotent(tmp_path: Path) -> None:
    form = await parse(*encode(files={"image": ("a.png", f.png(), "image/png")}), tmp_path)
    assert form.images()[0].path.exists()
    form.cleanup()
    form.cleanup()
    assert not form.spool_dir.exists() and leftovers(tmp_path) == []


async def test_an_oversized_part_is_refused_while_it_is_still_arriving(tmp_path: Path) -> None:
    data, ctype = encode(files={"image": ("big.png", f.big_bytes(5 * MB), "image/png")}, data={"prompt": "x"})
    source = Source(split(data, 64 * 1024))
    limits = UploadLimits(max_file_bytes=1 * MB, max_files=16)
    with pytest.raises(PayloadTooLargeError) as caught:
        await parse_multipart(source.stream(), content_type=ctype, spool_root=tmp_path, limits=limits)
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (
        413,
        "payload_too_large",
        "image",
    )
    total = len(split(data, 64 * 1024))
    # 1 MB of data is 16 chunks of 64 KiB; the parser stopped right after the one that crossed it.
    assert source.consumed <= 18 < total
    assert leftovers(tmp_path) == []


async def test_the_mask_has_its_own_smaller_limit(tmp_path: Path) -> None:
    files = {"image": ("a.png", f.png(), "image/png"), "mask": ("m.png", f.big_bytes(5 * MB), "image/png")}
    with pytest.raises(PayloadTooLargeError) as caught:
        await parse(*encode(files=files), tmp_path)
    assert caught.value.param == "mask"
    assert leftovers(tmp_path) == []


async def test_a_field_over_its_limit_is_413_and_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLargeError) as caught:
        await parse(raw_part("prompt", b"x" * (300 * 1024)) + CLOSE, CONTENT_TYPE, tmp_path)
    assert (caught.value.status_code, caught.value.param) == (413, "prompt")


async def test_all_fields_together_are_bounded(tmp_path: Path) -> None:
    body = b"".join(raw_part(f"f{i}", b"y" * (200 * 1024)) for i in range(6)) + CLOSE
    with pytest.raises(PayloadTooLargeError) as caught:
        await parse(body, CONTENT_TYPE, tmp_path)
    assert caught.value.param == "f5"  # each field is under its own limit; the sixth passes the total


async def test_too_many_images_are_refused_before_the_extra_one_is_read(tmp_path: Path) -> None:
    files = [("image[]", (f"{i}.png", f.big_bytes(200 * 1024, i), "image/png")) for i in range(4)]
    data, ctype = encode(files=files)
    source = Source(split(data, 1024))
    limits = UploadLimits(max_file_bytes=MB, max_files=3)
    with pytest.raises(InvalidRequestError) as caught:
        await parse_multipart(source.stream(), content_type=ctype, spool_root=tmp_path, limits=limits)
    assert (caught.value.status_code, caught.value.param, caught.value.code) == (
        400,
        "image",
        "too_many_images",
    )
    assert source.consumed < 3 * 200 + 5  # three images' worth of 1 KiB chunks, not four
    assert leftovers(tmp_path) == []


def malformed_bodies() -> list[tuple[str, bytes, str]]:
    image_body, ctype = encode(files={"image": ("a.png", f.png(), "image/png")}, data={"prompt": "x"})
    good = raw_part("prompt", b"x") + CLOSE
    nameless = f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode() + CLOSE
    no_disposition = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n".encode() + CLOSE
    huge_header = raw_part("prompt", b"x", extra=f"X-Pad: {'a' * 100_000}\r\n") + CLOSE
    many_headers = raw_part("prompt", b"x", extra="X-A: 1\r\n" * 40) + CLOSE
    two_masks = raw_part("mask", b"a", filename="m") + raw_part("mask", b"b", filename="m") + CLOSE
    tiny_parts = b"".join(raw_part(f"f{i}", b"v") for i in range(5_000)) + CLOSE
    return [
        ("no boundary", good, "multipart/form-data"),
        ("not multipart", good, "application/json"),
        ("empty content type", good, ""),
        ("empty body", b"", CONTENT_TYPE),
        ("garbage", b"\x00\xffhello there" * 100, CONTENT_TYPE),
        ("truncated in a file", image_body[: len(image_body) // 2], ctype),
        ("truncated before the close", image_body[: -len(b"--\r\n") - 40], ctype),
        ("missing final boundary", raw_part("image", b"abc", filename="a.png"), CONTENT_TYPE),
        ("wrong boundary", good, "multipart/form-data; boundary=other"),
        ("part without a name", nameless, CONTENT_TYPE),
        ("part without disposition", no_disposition, CONTENT_TYPE),
        ("huge header line", huge_header, CONTENT_TYPE),
        ("too many headers", many_headers, CONTENT_TYPE),
        ("two masks", two_masks, CONTENT_TYPE),
        ("thousands of tiny parts", tiny_parts, CONTENT_TYPE),
    ]


@pytest.mark.parametrize(
    ("body", "ctype"), [c[1:] for c in malformed_bodies()], ids=[c[0] for c in malformed_bodies()]
)
@pytest.mark.parametrize("chunk", [1, 4096])
async def test_hostile_bodies_are_400_and_leave_nothing(
    tmp_path: Path, body: bytes, ctype: str, chunk: int
) -> None:
    if chunk == 1 and len(body) > 200_000:
        body = body[:200_000]  # keep 1-byte feeding quick; still hostile (and now also truncated)
    with pytest.raises(GatewayError) as caught:
        await asyncio.wait_for(parse(body, ctype, tmp_path, chunk=chunk), timeout=30)
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_multipart"
    assert leftovers(tmp_path) == []


async def test_thousands_of_tiny_parts_are_refused_early(tmp_path: Path) -> None:
    body = b"".join(raw_part(f"f{i}", b"v") for i in range(5_000)) + CLOSE
    source = Source(split(body, 1024))
    with pytest.raises(InvalidRequestError):
        await parse_multipart(source.stream(), content_type=CONTENT_TYPE, spool_root=tmp_path, limits=LIMITS)
    assert source.consumed < 20  # ~100 parts of ~80 bytes, not 5,000


async def test_path_characters_in_names_and_filenames_are_harmless(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    data = (
        raw_part("image", b"data", filename="../../etc/passwd")
        + raw_part("image", b"more", filename="..\\..\\windows\\win.ini")
        + raw_part("../../outside", b"field value", filename="../../x.png")
        + CLOSE
    )
    form = await parse(data, CONTENT_TYPE, root)
    assert [s.filename for s in form.images()] == ["passwd", "win.ini"]
    assert all(s.path.parent == form.spool_dir for s in form.images())
    assert form.fields == {"../../outside": ["field value"]}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["000-image", "001-image"]
    form.cleanup()


async def test_a_non_utf8_field_is_a_clear_400(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await parse(raw_part("prompt", b"\xff\xfe") + CLOSE, CONTENT_TYPE, tmp_path)
    assert (caught.value.param, caught.value.code) == ("prompt", "invalid_value")


async def test_reading_stops_at_the_closing_boundary(tmp_path: Path) -> None:
    source = Source([raw_part("prompt", b"x") + CLOSE, b"epilogue", b"more epilogue", b"and more"])
    form = await parse_multipart(
        source.stream(), content_type=CONTENT_TYPE, spool_root=tmp_path, limits=LIMITS
    )
    assert source.consumed == 1 and form.field("prompt") == "x"
    form.cleanup()


class ClientDisconnect(Exception):
    pass


async def test_a_client_that_goes_away_leaves_no_spool(tmp_path: Path) -> None:
    async def source() -> AsyncIterator[bytes]:
        yield raw_part("image", f.big_bytes(3 * MB), filename="a.png")
        yield raw_part("image", b"partial", filename="b.png")[:-5]
        raise ClientDisconnect

    with pytest.raises(ClientDisconnect):
        await parse_multipart(source(), content_type=CONTENT_TYPE, spool_root=tmp_path, limits=LIMITS)
    assert leftovers(tmp_path) == []


async def test_cancellation_mid_body_leaves_no_spool(tmp_path: Path) -> None:
    reached = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield (
            raw_part("image", f.png(), filename="a.png") + raw_part("image", b"x" * 10, filename="b.png")[:-4]
        )
        reached.set()
        await asyncio.Event().wait()  # the client stalls; the server gives up on the request
        yield b""

    task = asyncio.create_task(
        parse_multipart(source(), content_type=CONTENT_TYPE, spool_root=tmp_path, limits=LIMITS)
    )
    await reached.wait()
    assert [p.name for p in leftovers(tmp_path) if p.is_file()] == ["000-image"]  # the first file was written
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(tmp_path) == []


async def test_memory_stays_flat_for_a_200_mb_upload(tmp_path: Path) -> None:
    chunk = os.urandom(MB)  # one preallocated chunk, yielded again and again
    count = 200
    head = (
        raw_part("prompt", b"big")
        + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; '.encode()
    )
    head += b'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    tail = b"\r\n" + CLOSE

    async def source() -> AsyncIterator[bytes]:
        yield head
        for _ in range(count):
            yield chunk
        yield tail

    limits = UploadLimits(max_file_bytes=count * MB, max_files=1)
    tracemalloc.start()
    try:
        form = await parse_multipart(source(), content_type=CONTENT_TYPE, spool_root=tmp_path, limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    try:
        [spooled] = form.images()
        assert spooled.size == spooled.path.stat().st_size == count * MB
        with spooled.path.open("rb") as fh:
            fh.seek(123 * MB)
            assert fh.read(MB) == chunk
        assert peak < 16 * MB
    finally:
        form.cleanup()
