"""Task inputs in the object store (app/storage/inputs.py), gateway links from an S3 store, and the
orphan sweep over both, against a real S3-compatible server on 127.0.0.1 (moto + presign checks)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from pydantic import ValidationError

from app.core.errors import GatewayError, NotFoundError, PermissionDeniedError, StorageUnavailableError
from app.domain.catalog import Catalog
from app.domain.jobs import ImageJob, InputImage
from app.images.intake.sweep import SweepPolicy, Swept, sweep
from app.storage import LocalInputStore, StorageSettings, build_input_store, build_store
from app.storage.inputs import PART_BYTES, S3InputStore
from app.storage.s3 import S3ImageStore
from app.storage.signing import UrlSigner
from app.tasks.inputs import job_spec
from app.tasks.queue import new_task_id
from tests.conftest import closed_port
from tests.fakes.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, FakeS3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SIGNING_KEY = "k" * 40
HOUR = 3600.0


@pytest.fixture(scope="module")
def s3_server() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


@pytest.fixture
def bucket() -> str:
    return f"inputs-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def images(s3_server: FakeS3, bucket: str) -> AsyncIterator[S3ImageStore]:
    built = build_store(s3_server.settings(bucket=bucket, prefix="gw/"), signing_secret=b"unused" * 8)
    assert isinstance(built, S3ImageStore)
    await built.start()
    yield built
    await built.aclose()


@pytest.fixture
def inputs(s3_server: FakeS3, images: S3ImageStore, tmp_path: Path) -> S3InputStore:
    store = build_input_store(s3_server.settings(bucket=images.bucket), images, tmp_path / "worker")
    assert isinstance(store, S3InputStore)
    return store


@pytest.fixture
def raw(s3_server: FakeS3) -> Iterator[S3Client]:
    client = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION
    ).client("s3", endpoint_url=s3_server.endpoint_url, config=Config(signature_version="s3v4"))
    yield client
    client.close()


def keys(raw: S3Client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in raw.list_objects_v2(Bucket=bucket).get("Contents", []) if "Key" in o)


def spool(folder: Path, name: str, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_inputs_go_to_the_bucket_and_come_back_on_another_node(
    inputs: S3InputStore, images: S3ImageStore, raw: S3Client, tmp_path: Path
) -> None:
    task_id = new_task_id()
    # One part and several (the multipart threshold is one part): both paths of the transfer.
    small = spool(tmp_path / "spool", "000-image", 1000)
    large = spool(tmp_path / "spool", "001-mask", PART_BYTES * 2 + 123)
    await inputs.keep(task_id, [("000-image", small), ("001-mask", large)])
    assert keys(raw, images.bucket) == [
        f"gw/task-inputs/{task_id}/000-image",
        f"gw/task-inputs/{task_id}/001-mask",
    ]
    # Another node: its own folder, nothing shared but the bucket.
    other = S3InputStore(images.client, bucket=images.bucket, prefix="gw/", root=tmp_path / "node-b")
    folder = await other.fetch(task_id, ["000-image", "001-mask"])
    assert folder == tmp_path / "node-b" / task_id
    assert sorted(p.name for p in folder.iterdir()) == ["000-image", "001-mask"]
    assert digest(folder / "000-image") == digest(small)
    assert digest(folder / "001-mask") == digest(large)
    await other.drop(task_id)
    assert keys(raw, images.bucket) == []
    assert not folder.exists()
    await other.drop(task_id)  # nothing left: not an error


async def test_names_outside_the_gateways_shape_are_refused(inputs: S3InputStore, tmp_path: Path) -> None:
    path = spool(tmp_path / "spool", "x", 10)
    for task_id, name in (("../etc", "x"), ("task_1", "../x"), ("task_1", "a/b"), ("", "x")):
        with pytest.raises(ValueError, match="not a task input name"):
            await inputs.keep(task_id, [(name, path)])
    with pytest.raises(ValueError, match="not a task input name"):
        await inputs.drop("../../x")


async def test_listing_remove_and_stale_uploads(
    inputs: S3InputStore, images: S3ImageStore, raw: S3Client, tmp_path: Path
) -> None:
    first, second = new_task_id(), new_task_id()
    await inputs.keep(first, [("000-image", spool(tmp_path / "s", "a", 10))])
    await inputs.keep(
        second, [("000-image", spool(tmp_path / "s", "b", 10)), ("001-mask", spool(tmp_path / "s", "c", 10))]
    )
    # Not ours: an image beside them and a stray key in the folder are never listed nor removed.
    raw.put_object(Bucket=images.bucket, Key="gw/img_" + "0" * 32 + ".png", Body=b"x")
    raw.put_object(Bucket=images.bucket, Key="gw/task-inputs/stray", Body=b"x")
    listed = await inputs.listing()
    assert set(listed) == {first, second}
    assert all(abs(when - time.time()) < 600 for when in listed.values())
    assert await inputs.remove([first]) == 1
    assert set(await inputs.listing()) == {second}
    assert "gw/task-inputs/stray" in keys(raw, images.bucket)
    # An upload a killed process left half done: aborted once begun before the cutoff. (moto dates
    # every upload 2010-11-10, so "fresh" is a cutoff before that.) Uploads elsewhere are not ours.
    key = f"gw/task-inputs/{new_task_id()}/000-image"
    raw.create_multipart_upload(Bucket=images.bucket, Key=key)
    raw.create_multipart_upload(Bucket=images.bucket, Key="gw/img_" + "2" * 32 + ".png")
    assert await inputs.abort_stale_uploads(datetime(2001, 1, 1, tzinfo=UTC)) == 0
    assert await inputs.abort_stale_uploads(datetime.now(UTC)) == 1
    left = raw.list_multipart_uploads(Bucket=images.bucket).get("Uploads", [])
    assert [u.get("Key") for u in left] == ["gw/img_" + "2" * 32 + ".png"]


class Objects:
    """An InputObjects with ages set by the test, recording what the sweep removed."""

    def __init__(self, ages: dict[str, float]) -> None:
        self.newest = {task_id: time.time() - age for task_id, age in ages.items()}
        self.removed: list[str] = []
        self.cutoffs: list[datetime] = []

    async def listing(self) -> dict[str, float]:
        return dict(self.newest)

    async def remove(self, task_ids: Sequence[str]) -> int:
        self.removed.extend(task_ids)
        return len(task_ids)

    async def abort_stale_uploads(self, cutoff: datetime) -> int:
        self.cutoffs.append(cutoff)
        return 0


async def test_the_sweep_applies_the_folder_rule_to_objects(tmp_path: Path) -> None:
    live, finished, unknown_old, unknown_new = (new_task_id() for _ in range(4))
    objects = Objects(
        {live: 2 * HOUR, finished: 0.0, unknown_old: 2 * HOUR, unknown_new: 60.0, "not-a-task": 2 * HOUR}
    )

    async def activity(task_ids: list[str]) -> dict[str, bool]:
        rows = {live: True, finished: False}
        return {t: rows[t] for t in task_ids if t in rows}

    policy = SweepPolicy(
        spool_root=tmp_path / "spool",
        inputs_root=tmp_path / "inputs",
        spool_age_s=HOUR,
        inputs_age_s=HOUR,
        objects=objects,
    )
    swept = await sweep(policy, activity)
    assert swept == Swept(spools=0, inputs=0, objects=2)
    assert sorted(objects.removed) == sorted([finished, unknown_old])
    (cutoff,) = objects.cutoffs
    assert abs((datetime.now(UTC) - cutoff).total_seconds() - HOUR) < 600


async def test_the_sweep_against_the_bucket(inputs: S3InputStore, tmp_path: Path) -> None:
    live, finished, unknown = new_task_id(), new_task_id(), new_task_id()
    for task_id in (live, finished, unknown):
        await inputs.keep(task_id, [("000-image", spool(tmp_path / task_id, "f", 10))])

    async def activity(task_ids: list[str]) -> dict[str, bool]:
        return {t: t == live for t in task_ids if t in (live, finished)}

    policy = SweepPolicy(
        spool_root=tmp_path / "spool",
        inputs_root=inputs.root,
        spool_age_s=HOUR,
        inputs_age_s=HOUR,
        objects=inputs.objects,
    )
    assert await sweep(policy, activity) == Swept(spools=0, inputs=0, objects=1)
    # The unknown task's inputs are fresh: they may belong to a submission not yet committed.
    assert set(await inputs.listing()) == {live, unknown}


async def test_a_local_store_moves_the_spool_in(tmp_path: Path) -> None:
    store = build_input_store(
        StorageSettings(), build_store(StorageSettings(), signing_secret=b"s" * 32), tmp_path / "in"
    )
    assert isinstance(store, LocalInputStore) and store.objects is None
    path = spool(tmp_path / "spool", "000-image", 100)
    task_id = new_task_id()
    await store.keep(task_id, [("000-image", path)])
    assert not path.exists()
    assert await store.fetch(task_id, ["000-image"]) == tmp_path / "in" / task_id
    assert (tmp_path / "in" / task_id / "000-image").stat().st_size == 100
    with pytest.raises(FileExistsError):
        await store.keep(task_id, [])
    await store.drop(task_id)
    assert not (tmp_path / "in" / task_id).exists()


# -- links the gateway signs for an S3 store -------------------------------------------------------


def test_gateway_links_need_a_configured_signing_key(s3_server: FakeS3) -> None:
    with pytest.raises(ValidationError, match="signing_key is required with gateway_links"):
        s3_server.settings(gateway_links=True)
    assert s3_server.settings(gateway_links=True, signing_key=SIGNING_KEY).gateway_links


async def test_a_gateway_link_verifies_on_every_node_with_the_shared_key(
    s3_server: FakeS3, bucket: str
) -> None:
    settings = s3_server.settings(bucket=bucket, gateway_links=True, signing_key=SIGNING_KEY)
    node_a = build_store(settings, signing_secret=SIGNING_KEY.encode())
    node_b = build_store(settings, signing_secret=SIGNING_KEY.encode())
    stranger = build_store(settings, signing_secret=b"z" * 40)
    await node_a.start()
    try:
        body = os.urandom(700_000)
        stored = await node_a.put(body, content_type="image/png")
        url = await node_a.url_for(stored.name, base_url="http://node-a:8080/", ttl_s=60)
        parts = urlsplit(url)
        assert (parts.netloc, parts.path) == ("node-a:8080", f"/v1/files/images/{stored.name}")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        image = await node_b.open_signed_stream(stored.name, expires=query["expires"], sig=query["sig"])
        assert image.size == len(body)
        assert b"".join([chunk async for chunk in image.chunks]) == body
        with pytest.raises(PermissionDeniedError):
            await stranger.open_signed_stream(stored.name, expires=query["expires"], sig=query["sig"])
        with pytest.raises(PermissionDeniedError):
            await node_b.open_signed_stream(stored.name, expires=query["expires"], sig="0" * 64)
        other = UrlSigner(SIGNING_KEY.encode()).query("img_" + "1" * 32 + ".png", 60)
        with pytest.raises(NotFoundError):
            await node_b.open_signed_stream("img_" + "1" * 32 + ".png", **other)
    finally:
        for store in (node_a, node_b, stranger):
            await store.aclose()


async def test_presigned_stores_serve_nothing_through_the_gateway(images: S3ImageStore) -> None:
    stored = await images.put(b"\x89PNG", content_type="image/png")
    query = UrlSigner(b"unused" * 8).query(stored.name, 60)
    with pytest.raises(NotFoundError):
        await images.open_signed_stream(stored.name, **query)


def test_a_stored_job_keeps_its_markup_file_as_json(catalog: Catalog, tmp_path: Path) -> None:
    def spooled(name: str) -> InputImage:
        return InputImage(
            path=tmp_path / name, filename=name, format="png", width=8, height=8, has_alpha=True, size=10
        )

    caps = catalog.get("gpt-image-1")
    assert caps is not None
    job = ImageJob(
        request_id="req_1",
        endpoint="edits",
        model="gpt-image-1",
        caps=caps,
        prompt="p",
        n=1,
        size="auto",
        quality="auto",
        background=None,
        output_format="png",
        output_compression=None,
        moderation="auto",
        stream=False,
        partial_images=0,
        response_format="b64_json",
        images=(spooled("000-image"),),
        markup=spooled("001-markup"),
    )
    spec = json.loads(json.dumps(job_spec(job)))
    assert spec["markup"]["spooled"] == str(tmp_path / "001-markup")
    assert spec["images"][0]["spooled"] == str(tmp_path / "000-image") and spec["mask"] is None


async def test_a_store_that_fails_is_a_503_and_lost_inputs_a_clear_error(
    s3_server: FakeS3, inputs: S3InputStore, tmp_path: Path
) -> None:
    down = build_store(
        s3_server.settings(endpoint_url=f"http://127.0.0.1:{closed_port()}", connect_timeout_s=0.5),
        signing_secret=b"unused" * 8,
    )
    unreachable = build_input_store(s3_server.settings(), down, tmp_path / "down")
    path = spool(tmp_path / "spool", "000-image", 100)
    with pytest.raises(StorageUnavailableError) as refused:
        await unreachable.keep(new_task_id(), [("000-image", path)])
    assert refused.value.status_code == 503 and refused.value.headers["retry-after"] == "1"
    assert refused.value.to_body()["error"]["code"] == "storage_unavailable"
    await down.aclose()
    with pytest.raises(GatewayError) as missing:
        await inputs.fetch(new_task_id(), ["000-image"])
    assert missing.value.to_body()["error"]["code"] == "task_inputs_missing"
