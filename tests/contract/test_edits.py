"""Image edits (SPEC §1.2, issue 3) through the official SDK, raw multipart and a real process."""

from __future__ import annotations

import base64
import io
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
from PIL import Image

from bench.gateway_process import GatewayProcess
from tests.conftest import ADMIN_KEY, Gateway, fake_upstream_config
from tests.fakes import image_files as files
from tests.fakes.openai_upstream import FakeOpenAI, Fault

EDITS = "/v1/images/edits"


def decode(b64: str | None) -> Image.Image:
    assert b64
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def spool_entries(gw: Gateway) -> list[Path]:
    return list((gw.data_dir / "spool").iterdir())


def wait_for_empty_spool(gw: Gateway) -> list[Path]:
    deadline = time.monotonic() + 30  # bounds a failure only
    while spool_entries(gw) and time.monotonic() < deadline:
        time.sleep(0.05)
    return spool_entries(gw)


# -- the SDK, against the fake upstream and the local backend ---------------------------------------


def test_one_image_through_the_fake_upstream(gateway: Gateway, upstream: FakeOpenAI) -> None:
    image = files.png(512, 512)
    result = gateway.client().images.edit(
        model="gpt-image-1", image=("cat.png", image, "image/png"), prompt="add a hat", quality="low", n=2
    )
    assert result.data and len(result.data) == 2
    recorded = upstream.last
    assert recorded.path == "/v1/images/edits"
    (sent,) = recorded.files
    assert (sent.field, sent.data, sent.content_type) == ("image", image, "image/png")
    assert recorded.form["prompt"] == ["add a hat"]
    assert recorded.form["quality"] == ["low"] and recorded.form["n"] == ["2"]
    assert recorded.form["model"] == ["gpt-image-1"]
    assert spool_entries(gateway) == []


def test_three_images_and_a_mask_arrive_byte_identical(gateway: Gateway, upstream: FakeOpenAI) -> None:
    images = [files.png(256, 256), files.jpeg(256, 256), files.webp(256, 256)]
    mask = files.mask(256, 256)
    gateway.client().images.edit(
        model="gpt-image-1.5",
        image=[
            ("a.png", images[0], "image/png"),
            ("b.jpg", images[1], "image/jpeg"),
            ("c.webp", images[2], "image/webp"),
        ],
        mask=("mask.png", mask, "image/png"),
        prompt="merge them",
        input_fidelity="high",
        background="transparent",
        output_format="webp",
        output_compression=70,
        extra_body={"safety_identifier": "u-1", "future_field": "kept"},
    )
    recorded = upstream.last
    sent_images = recorded.files_for("image[]")
    assert [f.data for f in sent_images] == images
    assert [f.content_type for f in sent_images] == ["image/png", "image/jpeg", "image/webp"]
    (sent_mask,) = recorded.files_for("mask")
    assert sent_mask.data == mask
    for name, value in {
        "prompt": "merge them",
        "input_fidelity": "high",
        "background": "transparent",
        "output_format": "webp",
        "output_compression": "70",
        "safety_identifier": "u-1",
        "future_field": "kept",
    }.items():
        assert recorded.form[name] == [value], name


def test_renamed_model_and_dall_e_2(gateway: Gateway, upstream: FakeOpenAI) -> None:
    client = gateway.client()
    client.images.edit(model="gpt-image-1-mini", image=("a.png", files.png(64, 64), "image/png"), prompt="x")
    assert upstream.last.form["model"] == ["gpt-image-1-mini-2025"]
    square = files.png(256, 256)
    client.images.edit(
        model="dall-e-2",
        image=("a.png", square, "image/png"),
        mask=("m.png", files.mask(256, 256), "image/png"),
        prompt="x",
    )
    assert upstream.last.form["response_format"] == ["b64_json"]
    assert upstream.last.files_for("image")[0].data == square


def test_local_backend_paints_inside_the_mask(local_gateway: Gateway) -> None:
    base = Image.new("RGB", (256, 256), (0, 128, 0))
    buffer = io.BytesIO()
    base.save(buffer, "PNG")
    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    for x in range(64, 192):
        for y in range(64, 192):
            mask.putpixel((x, y), (0, 0, 0, 0))
    mask_buffer = io.BytesIO()
    mask.save(mask_buffer, "PNG")
    result = local_gateway.client().images.edit(
        model="gpt-image-1",
        image=("base.png", buffer.getvalue(), "image/png"),
        mask=("mask.png", mask_buffer.getvalue(), "image/png"),
        prompt="a red balloon",
        output_format="jpeg",
    )
    edited = decode(result.data[0].b64_json if result.data else None).convert("RGB")
    assert edited.size == (256, 256)
    # Outside the mask the input is untouched (allowing for JPEG noise); inside it is repainted.
    r, g, b = edited.getpixel((10, 10))
    assert abs(g - 128) < 12 and r < 12 and b < 12
    assert edited.getpixel((128, 128)) != edited.getpixel((10, 10))
    assert result.usage is not None and result.usage.input_tokens_details.image_tokens == 2 * 1024


def test_local_backend_edits_a_list_without_a_mask(local_gateway: Gateway) -> None:
    result = local_gateway.client().images.edit(
        model="gpt-image-1-mini",
        image=[("a.png", files.png(320, 200), "image/png")] * 3,
        prompt="blend",
        size="1536x1024",
    )
    image = decode(result.data[0].b64_json if result.data else None)
    assert image.size == (1536, 1024)


def test_streamed_edit_yields_typed_events(
    gateway: Gateway, local_gateway: Gateway, upstream: FakeOpenAI
) -> None:
    for gw in (gateway, local_gateway):
        events = list(
            gw.client().images.edit(
                model="gpt-image-1",
                image=("a.png", files.png(256, 256), "image/png"),
                prompt="x",
                stream=True,
                partial_images=3,
            )
        )
        assert [type(e) for e in events] == [ImageEditPartialImageEvent] * 3 + [ImageEditCompletedEvent]
        assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
        assert events[-1].usage.total_tokens > 0
    assert upstream.last.form["stream"] == ["true"]
    assert wait_for_empty_spool(gateway) == [] and wait_for_empty_spool(local_gateway) == []


def test_edit_ledger_row_carries_image_input_tokens(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.usage = {
        "input_tokens": 1300,
        "input_tokens_details": {"text_tokens": 20, "image_tokens": 1280},
        "output_tokens": 1056,
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 1056},
        "total_tokens": 2356,
    }
    key, key_id = gateway.create_key(name="edit-ledger")
    raw = gateway.client(key).images.with_raw_response.edit(
        model="gpt-image-1-mini", image=("a.png", files.png(128, 128), "image/png"), prompt="x"
    )
    (row,) = [r for r in gateway.ledger() if r["key_id"] == key_id]
    assert row["endpoint"] == "edits"
    assert (row["text_input_tokens"], row["image_input_tokens"], row["image_output_tokens"]) == (
        20,
        1280,
        1056,
    )
    # gpt-image-1-mini: text in 2, image in 2.5, image out 8 PTC per 1M tokens.
    assert row["cost_micros"] == 20 * 2 + 1280 * 5 // 2 + 1056 * 8
    assert raw.headers["x-gateway-cost"] == f"0.{row['cost_micros']:06d}"


# -- rejections --------------------------------------------------------------------------------------


def multipart(fields: dict[str, str], parts: list[tuple[str, str, bytes, str]]) -> dict[str, Any]:
    return {
        "data": fields,
        "files": [(name, (filename, data, ctype)) for name, filename, data, ctype in parts],
    }


REJECTIONS = [
    (
        "gif behind a .png name",
        "gpt-image-1",
        [("image", "a.png", files.gif(), "image/png")],
        [],
        {},
        400,
        "image",
        "invalid_image_format",
    ),
    (
        "text behind a .png name",
        "gpt-image-1",
        [("image", "a.png", b"hello world" * 10, "image/png")],
        [],
        {},
        400,
        "image",
        "invalid_image_format",
    ),
    (
        "17 images",
        "gpt-image-1",
        [("image[]", f"{i}.png", files.png(8, 8), "image/png") for i in range(17)],
        [],
        {},
        400,
        "image",
        "too_many_images",
    ),
    (
        "mask without alpha",
        "gpt-image-1",
        [("image", "a.png", files.png(64, 48), "image/png")],
        [("mask", "m.png", files.mask(64, 48, alpha=False), "image/png")],
        {},
        400,
        "mask",
        "invalid_mask",
    ),
    (
        "mask of other dimensions",
        "gpt-image-1",
        [("image", "a.png", files.png(64, 48), "image/png")],
        [("mask", "m.png", files.mask(32, 32), "image/png")],
        {},
        400,
        "mask",
        "invalid_mask",
    ),
    (
        "jpeg mask",
        "gpt-image-1",
        [("image", "a.png", files.png(64, 48), "image/png")],
        [("mask", "m.jpg", files.jpeg(64, 48), "image/jpeg")],
        {},
        400,
        "mask",
        "invalid_image_format",
    ),
    (
        "input_fidelity high on mini",
        "gpt-image-1-mini",
        [("image", "a.png", files.png(64, 48), "image/png")],
        [],
        {"input_fidelity": "high"},
        400,
        "input_fidelity",
        "invalid_value",
    ),
    (
        "dall-e-2 non-square",
        "dall-e-2",
        [("image", "a.png", files.png(64, 48), "image/png")],
        [],
        {},
        400,
        "image",
        "invalid_value",
    ),
    (
        "dall-e-2 jpeg",
        "dall-e-2",
        [("image", "a.jpg", files.jpeg(64, 64), "image/jpeg")],
        [],
        {},
        400,
        "image",
        "invalid_image_format",
    ),
    (
        "empty image part",
        "gpt-image-1",
        [("image", "a.png", b"", "image/png")],
        [],
        {},
        400,
        "image",
        "invalid_image",
    ),
    (
        "truncated png",
        "gpt-image-1",
        [("image", "a.png", files.truncated(files.png(256, 256)), "image/png")],
        [],
        {},
        400,
        "image",
        "invalid_image",
    ),
    (
        "pixel bomb",
        "gpt-image-1",
        [("image", "a.png", files.png_bomb(), "image/png")],
        [],
        {},
        400,
        "image",
        "image_too_large",
    ),
    (
        "no image at all",
        "gpt-image-1",
        [("note", "note.txt", b"multipart, but no image", "text/plain")],
        [],
        {},
        400,
        "image",
        "missing_required_parameter",
    ),
    (
        "dall-e-3 has no edits",
        "dall-e-3",
        [("image", "a.png", files.png(64, 64), "image/png")],
        [],
        {},
        400,
        "model",
        "invalid_value",
    ),
    (
        "style is not an edit field",
        "gpt-image-1",
        [("image", "a.png", files.png(64, 64), "image/png")],
        [],
        {"style": "vivid"},
        400,
        "style",
        "unsupported_parameter",
    ),
    (
        "n as text",
        "gpt-image-1",
        [("image", "a.png", files.png(64, 64), "image/png")],
        [],
        {"n": "two"},
        400,
        "n",
        "invalid_type",
    ),
    (
        "dall-e-2 image over 4 MB",
        "dall-e-2",
        [("image", "a.png", files.padded_png(5 * 1024 * 1024, 64, 64), "image/png")],
        [],
        {},
        413,
        "image",
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("model", "images", "extra_files", "fields", "status", "param", "code"),
    [r[1:] for r in REJECTIONS],
    ids=[r[0] for r in REJECTIONS],
)
def test_rejections(
    gateway: Gateway,
    upstream: FakeOpenAI,
    model: str,
    images: list[tuple[str, str, bytes, str]],
    extra_files: list[tuple[str, str, bytes, str]],
    fields: dict[str, str],
    status: int,
    param: str,
    code: str,
) -> None:
    key, _ = gateway.create_key(name="edit-rejections")
    response = httpx.post(
        gateway.url + EDITS,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        **multipart({"model": model, "prompt": "x", **fields}, images + extra_files),
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"
    assert upstream.count() == 0
    assert spool_entries(gateway) == []


def test_malformed_multipart_is_a_400(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key()
    headers = {"Authorization": f"Bearer {key}"}
    no_boundary = httpx.post(
        gateway.url + EDITS, content=b"garbage", headers={**headers, "content-type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 400 and no_boundary.json()["error"]["code"] == "invalid_multipart"
    truncated = httpx.post(
        gateway.url + EDITS,
        content=b'--XX\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhello',
        headers={**headers, "content-type": "multipart/form-data; boundary=XX"},
    )
    assert truncated.status_code == 400
    assert upstream.count() == 0 and spool_entries(gateway) == []


# -- limits while arriving, memory, and spool hygiene ----------------------------------------------


def test_sixty_megabyte_part_is_refused_while_arriving(gateway: Gateway, upstream: FakeOpenAI) -> None:
    key, _ = gateway.create_key()
    boundary = "b" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    total = len(head) + 60 * 1024 * 1024
    host, port = gateway.url.removeprefix("http://").split(":")
    chunk = b"\x00" * (256 * 1024)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {EDITS} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n"
            ).encode()
            + head
        )
        sock.setblocking(False)
        answer = b""
        while sent < total - len(head):
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer
    # The gateway answered before the body was through: it stopped reading after its 50 MB limit.
    assert sent < 60 * 1024 * 1024
    assert upstream.count() == 0
    assert wait_for_empty_spool(gateway) == []


def test_client_leaving_mid_upload_leaves_no_spool(gateway: Gateway) -> None:
    key, _ = gateway.create_key()
    boundary = "leaver"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"POST {EDITS} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 99999999\r\n\r\n"
            ).encode()
            + head
            + b"\x00" * (3 * 1024 * 1024)
        )
        deadline = time.monotonic() + 30  # bounds a failure only
        while not spool_entries(gateway) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool_entries(gateway), "the upload should be spooling"
    assert wait_for_empty_spool(gateway) == []


def test_upstream_failure_leaves_no_spool(gateway: Gateway, upstream: FakeOpenAI) -> None:
    upstream.enqueue_fault(Fault.status(500, "boom", times=3))  # every retry fails too
    with pytest.raises(openai.InternalServerError):
        gateway.client().images.edit(
            model="gpt-image-1", image=("a.png", files.png(64, 64), "image/png"), prompt="x"
        )
    assert wait_for_empty_spool(gateway) == []


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def gateway_process(upstream: FakeOpenAI, tmp_path: Path) -> Iterator[GatewayProcess]:
    config = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(tmp_path / "data"),
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"},
        "logging": {"level": "WARNING"},
        "upstreams": [fake_upstream_config(upstream, timeout_s=120)],
    }
    process = GatewayProcess(config, tmp_path).wait_ready()
    yield process
    process.stop()


def test_sixteen_twenty_megabyte_images_use_little_memory(
    gateway_process: GatewayProcess, upstream: FakeOpenAI
) -> None:
    key = httpx.post(
        gateway_process.url + "/admin/keys",
        json={"name": "big"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()["key"]
    image = files.padded_png(20 * 1024 * 1024, 64, 64)
    # Warm up (imports, first request) so the measurement sees the upload only.
    httpx.post(
        gateway_process.url + EDITS,
        headers={"Authorization": f"Bearer {key}"},
        **multipart(
            {"model": "gpt-image-1", "prompt": "x"}, [("image", "a.png", files.png(64, 64), "image/png")]
        ),
        timeout=60,
    ).raise_for_status()
    before = peak_rss_kib(gateway_process.proc.pid)
    response = httpx.post(
        gateway_process.url + EDITS,
        headers={"Authorization": f"Bearer {key}"},
        **multipart(
            {"model": "gpt-image-1", "prompt": "x"},
            [("image[]", f"{i}.png", image, "image/png") for i in range(16)],
        ),
        timeout=300,
    )
    assert response.status_code == 200, response.text
    growth_mib = (peak_rss_kib(gateway_process.proc.pid) - before) / 1024
    upload_mib = 16 * len(image) / (1024 * 1024)
    assert upload_mib >= 320
    assert growth_mib < 64, f"gateway peak RSS grew {growth_mib:.0f} MiB for a {upload_mib:.0f} MiB upload"
    forwarded = upstream.last.files_for("image[]")
    assert len(forwarded) == 16 and all(f.data == image for f in forwarded)
    assert not list((Path(gateway_process.config_path).parent / "data" / "spool").iterdir())
