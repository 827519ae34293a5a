"""The S3 image store against a real S3-compatible server on 127.0.0.1 (moto + presign checks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.config import Config

from app.core.errors import NotFoundError
from app.storage import StorageSettings, build_store
from app.storage.s3 import S3ImageStore
from tests.fakes.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, FakeS3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def s3_server() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


@pytest.fixture
def fake_s3(s3_server: FakeS3) -> Iterator[FakeS3]:
    s3_server.clock_offset_s = 0.0
    yield s3_server
    s3_server.clock_offset_s = 0.0


@pytest.fixture
def bucket() -> str:
    """A fresh bucket per test, so tests sharing the server never see each other's objects."""
    return f"images-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(fake_s3: FakeS3, bucket: str) -> AsyncIterator[S3ImageStore]:
    built = build_store(fake_s3.settings(bucket=bucket, prefix="gw/"), signing_secret=b"unused" * 8)
    assert isinstance(built, S3ImageStore)
    await built.start()
    yield built
    await built.aclose()


@pytest.fixture
def raw_client(fake_s3: FakeS3) -> Iterator[S3Client]:
    """A plain boto3 client for arranging and inspecting the bucket behind the store's back."""
    client = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION
    ).client("s3", endpoint_url=fake_s3.endpoint_url, config=Config(signature_version="s3v4"))
    yield client
    client.close()


def keys(client: S3Client, bucket: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=bucket)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


async def test_put_read_and_presigned_link(store: S3ImageStore, raw_client: S3Client, bucket: str) -> None:
    stored = await store.put(PNG, content_type="image/png")
    assert stored.size == len(PNG) and stored.name.endswith(".png")
    assert keys(raw_client, bucket) == [f"gw/{stored.name}"]
    assert await store.read(stored.name) == PNG

    url = await store.url_for(stored.name, base_url="http://ignored.example", ttl_s=300)
    assert url.startswith(f"{store._client.meta.endpoint_url}/{bucket}/gw/{stored.name}?")
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["300"]
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


async def test_expired_link_is_refused_by_the_store(store: S3ImageStore, fake_s3: FakeS3) -> None:
    stored = await store.put(PNG, content_type="image/png")
    url = await store.url_for(stored.name, base_url="", ttl_s=60)
    assert httpx.get(url).status_code == 200
    fake_s3.clock_offset_s = 120  # the server's clock moves past the link's expiry
    refused = fake_s3.check.refused
    response = httpx.get(url)
    assert response.status_code == 403 and fake_s3.check.refused == refused + 1
    assert "<Code>AccessDenied</Code>" in response.text and "expired" in response.text


async def test_tampered_links_are_refused(store: S3ImageStore, fake_s3: FakeS3) -> None:
    stored = await store.put(PNG, content_type="image/png")
    other = await store.put(b"another image", content_type="image/png")
    url = await store.url_for(stored.name, base_url="", ttl_s=60)
    sig = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    forged_sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")

    tampered = {
        "signature": url.replace(sig, forged_sig),
        "object": url.replace(stored.name, other.name),
        "lifetime": url.replace("X-Amz-Expires=60", "X-Amz-Expires=86400"),
        "no signature": url.split("?", 1)[0],
        "non-ASCII signature": url.replace(sig, "%C3%A9" * 32),
    }
    for what, bad in tampered.items():
        response = httpx.get(bad)
        assert response.status_code == 403, what
    assert "SignatureDoesNotMatch" in httpx.get(tampered["signature"]).text
    # A link with its query stripped is anonymous, and moto refuses the private object itself.
    refused = fake_s3.check.refused
    assert httpx.get(tampered["no signature"]).status_code == 403 and fake_s3.check.refused == refused
    assert httpx.get(url).content == PNG  # the genuine link still works


async def test_missing_image_delete_and_bad_names(
    store: S3ImageStore, raw_client: S3Client, bucket: str
) -> None:
    stored = await store.put(PNG, content_type="image/webp")
    await store.delete(stored.name)
    await store.delete(stored.name)  # idempotent
    assert keys(raw_client, bucket) == []
    with pytest.raises(NotFoundError):
        await store.read(stored.name)
    for name in ["../x.png", "%2e%2e/x", f"{stored.name}/../../other"]:
        with pytest.raises(NotFoundError):
            await store.read(name)
        with pytest.raises(NotFoundError):
            await store.url_for(name, base_url="", ttl_s=60)


async def test_purge_removes_only_old_images_of_this_store(
    store: S3ImageStore, raw_client: S3Client, bucket: str
) -> None:
    old = await store.put(PNG, content_type="image/png")
    foreign = "elsewhere/img_" + "0" * 32 + ".png"  # same shape, outside the store's prefix
    raw_client.put_object(Bucket=bucket, Key=foreign, Body=b"x")
    raw_client.put_object(Bucket=bucket, Key="gw/notes.txt", Body=b"x")
    old_modified = raw_client.head_object(Bucket=bucket, Key=f"gw/{old.name}")["LastModified"]
    # LastModified has one-second resolution: wait for the next second so the two puts differ.
    for _ in range(100):
        if datetime.now(UTC) >= old_modified + timedelta(seconds=1):
            break
        time.sleep(0.05)
    fresh = await store.put(PNG, content_type="image/png")
    cutoff = raw_client.head_object(Bucket=bucket, Key=f"gw/{fresh.name}")["LastModified"]
    assert old_modified < cutoff

    assert await store.purge_older_than(cutoff) == 1
    assert keys(raw_client, bucket) == sorted([foreign, "gw/notes.txt", f"gw/{fresh.name}"])
    assert await store.purge_older_than(cutoff + timedelta(days=1)) == 1
    assert keys(raw_client, bucket) == sorted([foreign, "gw/notes.txt"])


async def test_purge_deletes_in_batches(
    store: S3ImageStore, raw_client: S3Client, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(5):
        await store.put(b"tiny", content_type="image/png")
    monkeypatch.setattr("app.storage.s3._DELETE_BATCH", 2)
    assert await store.purge_older_than(datetime.now(UTC) + timedelta(hours=1)) == 5
    assert keys(raw_client, bucket) == []


async def test_start_creates_the_bucket_once(fake_s3: FakeS3, bucket: str, raw_client: S3Client) -> None:
    first = S3ImageStore(fake_s3.settings(bucket=bucket))
    second = S3ImageStore(fake_s3.settings(bucket=bucket))
    try:
        await first.start()
        await second.start()  # already there: not an error
        assert bucket in [b["Name"] for b in raw_client.list_buckets()["Buckets"]]
    finally:
        await first.aclose()
        await second.aclose()


async def test_public_endpoint_is_used_for_links(fake_s3: FakeS3, bucket: str) -> None:
    port = urlsplit(fake_s3.endpoint_url).port
    public = f"http://files.test:{port}"  # how clients would reach the store; never resolved here
    store = S3ImageStore(fake_s3.settings(bucket=bucket, public_endpoint_url=public))
    try:
        await store.start()
        stored = await store.put(PNG, content_type="image/png")
        url = await store.url_for(stored.name, base_url="", ttl_s=60)
        assert url.startswith(public + "/")
        # The signature covers the public host: sent with that Host header it is accepted, and the
        # same link presented under the gateway's own name for the store is not.
        loopback = url.replace(public, fake_s3.endpoint_url, 1)
        response = httpx.get(loopback, headers={"Host": f"files.test:{port}"})
        assert response.status_code == 200 and response.content == PNG
        assert httpx.get(loopback).status_code == 403
    finally:
        await store.aclose()


def test_settings_come_from_config_only(fake_s3: FakeS3) -> None:
    settings = fake_s3.settings()
    assert isinstance(settings, StorageSettings) and settings.kind == "s3"
    assert settings.secret_access_key is not None
    assert SECRET_ACCESS_KEY not in repr(settings)
