"""Issue 23 item 14: an ``Idempotency-Key`` is bound to the request it was first used with.

On 9a64885 a reused key with a different body silently answered the first task (202, same id),
and a duplicate sent while the first was still being submitted was admitted a second time (its
hold taken, then given back) and answered the first task too. Now: the same request again gets
the first task; another request with the key gets 422 ``idempotency_key_reused`` in OpenAI's error
shape, with nothing created, held or billed; a duplicate in flight gets 409.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import LOCAL_UPSTREAM, Gateway

GEN = "/v1/images/generations"


@pytest.fixture
def gw(gateway_with: Callable[..., Gateway]) -> Gateway:
    return gateway_with(LOCAL_UPSTREAM)


def _post(gw: Gateway, key: str, idem: str, body: dict[str, Any], **params: str) -> httpx.Response:
    return httpx.post(
        gw.url + GEN,
        params={"async": "true", **params},
        json=body,
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idem},
        timeout=30,
    )


def test_the_same_body_in_another_order_gets_the_first_task(gw: Gateway) -> None:
    key, _ = gw.create_key()
    first = _post(gw, key, "same", {"model": "gpt-image-1.5", "prompt": "a", "size": "1024x1024"})
    again = _post(gw, key, "same", {"size": "1024x1024", "prompt": "a", "model": "gpt-image-1.5"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]


@pytest.mark.parametrize(
    ("second", "params"),
    [
        ({"model": "gpt-image-1.5", "prompt": "b", "size": "1024x1024"}, {}),
        ({"model": "gpt-image-1.5", "prompt": "a", "size": "1536x1024"}, {}),
        ({"model": "gpt-image-1.5", "prompt": "a", "size": "1024x1024"}, {"response_format": "b64_json"}),
    ],
)
def test_a_reused_key_with_another_request_is_a_422_and_creates_nothing(
    gw: Gateway, second: dict[str, Any], params: dict[str, str]
) -> None:
    key, key_id = gw.create_key()
    first = _post(gw, key, "order-7", {"model": "gpt-image-1.5", "prompt": "a", "size": "1024x1024"})
    assert first.status_code == 202
    reused = _post(gw, key, "order-7", second, **params)
    assert reused.status_code == 422, reused.text
    error = reused.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["type"] == "invalid_request_error"
    assert error["param"] == "Idempotency-Key" and "different request" in error["message"]
    # The official SDK reads it as an UnprocessableEntityError.
    client = gw.client(key)
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(
            model="gpt-image-1.5",
            prompt="c",
            extra_query={"async": "true"},
            extra_headers={"Idempotency-Key": "order-7"},
        )
    tasks = gw.query(f"SELECT id FROM tasks WHERE key_id = '{key_id}'")
    assert [t["id"] for t in tasks] == [first.json()["id"]]
    holds = gw.query(f"SELECT id FROM reservations WHERE key_id = '{key_id}'")
    assert len(holds) <= 1  # the first task's, while it runs; none of the refused requests'


def test_another_key_may_use_the_same_idempotency_key(gw: Gateway) -> None:
    body = {"model": "gpt-image-1.5", "prompt": "a", "size": "1024x1024"}
    one, _ = gw.create_key()
    two, _ = gw.create_key()
    a, b = _post(gw, one, "shared", body), _post(gw, two, "shared", {**body, "prompt": "b"})
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]


def test_a_duplicate_while_the_first_is_in_flight_is_a_409(gw: Gateway) -> None:
    key, key_id = gw.create_key()
    service = gw.server.app.state.gateway.tasks
    images = service._images
    admit = images.admit
    entered = threading.Event()
    release = threading.Event()

    async def slow_admit(**kwargs: Any) -> Any:
        entered.set()
        await asyncio.to_thread(release.wait, 30)
        return await admit(**kwargs)

    images.admit = slow_admit
    body = {"model": "gpt-image-1.5", "prompt": "in flight", "size": "1024x1024"}
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(_post(gw, key, "flight", body)))
    first.start()
    try:
        assert entered.wait(30)
        duplicate = _post(gw, key, "flight", body)
        other = _post(gw, key, "flight", {**body, "prompt": "another"})
    finally:
        release.set()
        first.join(30)
        images.admit = admit
    assert duplicate.status_code == 409, duplicate.text
    assert duplicate.json()["error"]["code"] == "idempotency_key_in_use"
    assert duplicate.headers["retry-after"] == "1"
    assert other.status_code == 422
    (done,) = answers
    assert done.status_code == 202
    # Once it is in, the same request gets the task.
    again = _post(gw, key, "flight", body)
    assert again.status_code == 202 and again.json()["id"] == done.json()["id"]
    assert len(gw.query(f"SELECT id FROM tasks WHERE key_id = '{key_id}'")) == 1


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def test_an_edit_is_bound_to_its_files_bytes(gw: Gateway) -> None:
    key, key_id = gw.create_key()

    def edit(image: bytes) -> httpx.Response:
        return httpx.post(
            gw.url + "/v1/images/edits",
            params={"async": "true"},
            data={"model": "gpt-image-1.5", "prompt": "same words"},
            files={"image": ("in.png", image, "image/png")},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "edit-1"},
            timeout=30,
        )

    first, again = edit(_png((200, 10, 10))), edit(_png((200, 10, 10)))
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = edit(_png((10, 200, 10)))
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert len(gw.query(f"SELECT id FROM tasks WHERE key_id = '{key_id}'")) == 1
