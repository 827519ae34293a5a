"""Across nodes (issue 24, acceptance 1; SPEC §10): nothing a request needs lives on one node's disk.

The shape runs as real processes on 127.0.0.1, each with its own data directory and no shared disk,
started from the Kubernetes manifests (tests/cluster/nodes.py): API node A and API node B (the API
Deployment's command; the config gives them no workers) and a worker node W (the worker
Deployment's), on PostgreSQL, Redis and a real S3 HTTP server (moto, tests/fakes/s3_server.py).
Every node has the same secrets (admin key, key pepper, signing key), as the manifests' Secret
gives them; nothing else is shared.

- An async edit submitted to A through the official SDK leaves its inputs in the bucket, not on A;
  W streams them back and calls the upstream with the exact bytes; the task succeeds.
- A ``response_format=url`` link A made downloads from B, byte for byte what A serves.
- A's peak memory stays bounded while it takes the edit: inputs are streamed from the request to
  the spool to the bucket, never held whole. The size is ``GATEWAY_CROSS_NODE_EDIT`` (images × MiB
  each, default ``2x40``; ``16x50``, the largest edit the catalog admits, is the full-size run).
  Measured growth of A's peak RSS (VmHWM) over the edit: 8 MiB for 2 × 40 MiB, 11 MiB for 16 × 50
  MiB (peak 159 MiB; 5.5 min for the whole test on a loaded 2-core box), while a store that read
  each file whole (put_object with the bytes) grew by one file, 40 MiB, and fails the bound.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
import openai
import pytest
from botocore.config import Config

from bench.gateway_process import peak_rss_kib
from tests.cluster.nodes import Launcher, service_config, service_secrets
from tests.conftest import ADMIN_KEY, fake_upstream_config, make_settings, start_gateway
from tests.fakes.image_files import PNG_SIGNATURE, png, png_chunk
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, FakeS3
from tests.services import fresh_postgres_database, require_redis

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

MIB = 1024 * 1024
COUNT, SIZE_MIB = (int(n) for n in os.environ.get("GATEWAY_CROSS_NODE_EDIT", "2x40").lower().split("x"))
SIGNING_KEY = "cluster-signing-key-0123456789abcdef0123"
KEY_PEPPER = "cluster-key-pepper-0123456789abcdef012345"
BUCKET = "cluster"


@pytest.fixture(scope="module")
def s3() -> Iterator[FakeS3]:
    with FakeS3() as server:
        yield server


def launcher(tmp_path: Path, upstream: FakeOpenAI, db_url: str, s3: FakeS3) -> Launcher:
    """The shape from the manifests; the database, the bucket and the secrets shared."""
    config = service_config(s3=s3, upstream=upstream, redis_prefix=f"gw:test:{secrets.token_hex(6)}:")
    # Hundreds of MB go to the upstream on a loaded 2-core box: a generous timeout.
    config["upstreams"] = [fake_upstream_config(upstream, timeout_s=600)]
    config["storage"].update(bucket=BUCKET, prefix="")
    config["tasks"] = {"poll_s": 0.1, "lease_s": 30}
    keys = service_secrets(
        database_url=db_url,
        redis_url=require_redis(),
        upstream=upstream,
        key_pepper=KEY_PEPPER,
        signing_key=SIGNING_KEY,
    )
    return Launcher(tmp_path, secrets=keys, config=config)


# Links through the gateway (each node serves every stored image), signed with the shared key. Set
# on the API and worker nodes only: the migrate Job's manifest gives it no signing key, and the
# config refuses gateway_links without one, so in the ConfigMap it would stop the Job.
GATEWAY_LINKS = {"storage": {"gateway_links": True}}


def large_png(path: Path, size: int) -> str:
    """A valid PNG of exactly ``size`` bytes (an 8×8 image and random private chunks, which decoders
    skip), written in 1 MiB steps; returns its SHA-256. Random, so a part moved or lost shows."""
    digest = hashlib.sha256()
    base = png(8, 8)
    head, tail = base[:-12], base[-12:]  # IEND is the last 12 bytes
    assert head.startswith(PNG_SIGNATURE)
    with path.open("wb") as out:

        def put(data: bytes) -> None:
            out.write(data)
            digest.update(data)

        put(head)
        missing = size - len(head) - len(tail)
        while missing:
            body = min(MIB, missing - 12)
            if missing - (body + 12) in range(1, 13):
                body -= 13  # never leave less than a chunk's own 12 bytes for the last one
            put(png_chunk(b"prVt", os.urandom(body)))
            missing -= body + 12
        put(tail)
    assert path.stat().st_size == size
    return digest.hexdigest()


def bucket_keys(s3: FakeS3, prefix: str) -> list[str]:
    client = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION
    ).client("s3", endpoint_url=s3.endpoint_url, config=Config(signature_version="s3v4"))
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if "Key" in o)
    finally:
        client.close()


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def poll(client: openai.OpenAI, task_id: str, timeout: float) -> dict[str, Any]:
    """The task once it has ended; the deadline only bounds a failure (a loaded box is slow)."""
    deadline = time.monotonic() + timeout
    while True:
        task = client.get(f"/tasks/{task_id}", cast_to=object)
        assert isinstance(task, dict)
        if task["status"] in ("succeeded", "failed"):
            return task
        assert time.monotonic() < deadline, f"task still {task['status']} after {timeout} s"
        time.sleep(0.2)


def submit_edit(client: openai.OpenAI, paths: list[Path], prompt: str) -> str:
    """An async edit through the SDK, the images sent from open files (streamed, not read whole)."""
    with ExitStack() as stack:
        images = [stack.enter_context(path.open("rb")) for path in paths]
        raw = client.images.with_raw_response.edit(
            model="gpt-image-1",
            image=images,
            prompt=prompt,
            response_format="url",
            extra_query={"async": "true"},
        )
    assert raw.status_code == 202, raw.http_response.text
    return str(raw.http_response.json()["id"])


def test_an_edit_submitted_on_one_node_runs_on_another_and_its_link_works_everywhere(
    upstream: FakeOpenAI, s3: FakeS3, tmp_path: Path
) -> None:
    with fresh_postgres_database() as db_url:
        nodes = launcher(tmp_path, upstream, db_url, s3)
        try:
            nodes.migrate()
            node_a = nodes.api("a", **GATEWAY_LINKS)
            node_b = nodes.api("b", **GATEWAY_LINKS)
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            created = httpx.post(node_a.url + "/admin/keys", json={"name": "cross"}, headers=admin)
            key = created.json()["key"]
            client_a = openai.OpenAI(api_key=key, base_url=node_a.url + "/v1", max_retries=0, timeout=900)
            client_b = openai.OpenAI(api_key=key, base_url=node_b.url + "/v1", max_retries=0, timeout=900)

            # Warm-up: one edit of one file over a part, so A has run every code path (the
            # multipart upload to the bucket included) before its peak memory is read.
            warm = tmp_path / "warm.png"
            large_png(warm, 9 * MIB)
            warm_id = submit_edit(client_a, [warm], "warm up")
            baseline_kib = peak_rss_kib(node_a.proc.pid)

            paths = [tmp_path / f"in-{i:02d}.png" for i in range(COUNT)]
            digests = [large_png(path, SIZE_MIB * MIB) for path in paths]
            task_id = submit_edit(client_a, paths, "across nodes")
            peak_kib = peak_rss_kib(node_a.proc.pid)

            # No worker runs yet: the inputs wait in the bucket, and nothing of them on A's disk.
            stored = bucket_keys(s3, f"task-inputs/{task_id}/")
            assert len(stored) == COUNT
            assert files_under(node_a.data_dir / "task_inputs") == []
            assert files_under(node_a.data_dir / "spool") == []

            # W: another node, its own data directory; it runs both tasks.
            worker = nodes.worker("w", **GATEWAY_LINKS)
            assert poll(client_b, warm_id, timeout=300)["status"] == "succeeded"
            task = poll(client_b, task_id, timeout=900)
            assert task["status"] == "succeeded", task

            # The upstream got the exact bytes A was sent, read back from the bucket by W.
            (call,) = [r for r in upstream.requests if r.form.get("prompt") == ["across nodes"]]
            sent = call.files_for("image[]") if COUNT > 1 else call.files_for("image")
            assert [hashlib.sha256(f.data).hexdigest() for f in sent] == digests

            # A's link downloads from B (and from A): the nodes share the signing key and the bucket.
            task_on_a = client_a.get(f"/tasks/{task_id}", cast_to=object)
            assert isinstance(task_on_a, dict)
            (item,) = task_on_a["result"]["data"]
            link = urlsplit(item["url"])
            assert link.netloc == urlsplit(node_a.url).netloc
            from_a = httpx.get(item["url"])
            from_b = httpx.get(node_b.url + link.path + "?" + link.query)
            assert from_a.status_code == from_b.status_code == 200
            assert from_b.content == from_a.content and from_b.content.startswith(PNG_SIGNATURE)
            assert from_b.headers["content-type"] == "image/png"
            assert int(from_b.headers["content-length"]) == len(from_b.content)
            # A link is the credential: altered, it is refused on every node.
            forged = httpx.get(node_b.url + link.path + "?" + link.query.replace("sig=", "sig=0"))
            assert forged.status_code == 403

            # A preview W stored while it streamed a task is served by every node too.
            raw = client_a.images.with_raw_response.generate(
                model="gpt-image-1",
                prompt="previews",
                quality="low",
                partial_images=1,
                extra_query={"async": "true"},
            )
            streamed = poll(client_b, raw.http_response.json()["id"], timeout=300)
            assert streamed["status"] == "succeeded", streamed
            (preview,) = streamed["progress"]["previews"]
            shown = urlsplit(preview["url"])
            assert shown.netloc == urlsplit(node_b.url).netloc
            from_a = httpx.get(node_a.url + shown.path + "?" + shown.query)
            assert from_a.status_code == 200 and from_a.content.startswith(PNG_SIGNATURE)

            # Ended: no inputs left in the bucket, nor on any node's disk.
            assert bucket_keys(s3, "task-inputs/") == []
            for node in (node_a, node_b, worker):
                assert files_under(node.data_dir / "task_inputs") == [], node.name
                assert files_under(node.data_dir / "spool") == [], node.name
        finally:
            nodes.stop_all()

    # Bounded memory on A: the edit's bytes passed through without being held, not even one file.
    growth_mib = (peak_kib - baseline_kib) / 1024
    print(
        f"\nnode A: {COUNT} × {SIZE_MIB} MiB edit: peak RSS {peak_kib / 1024:.0f} MiB, +{growth_mib:.1f} MiB"
    )
    assert growth_mib < SIZE_MIB / 2, (baseline_kib, peak_kib)


def test_an_edit_the_bucket_refuses_is_a_503_and_holds_nothing(
    upstream: FakeOpenAI, s3: FakeS3, tmp_path: Path
) -> None:
    """The store fails at submission (here: a bucket that does not exist): the client gets a 503
    it may retry, and the books show nothing: no task, no hold, no ledger row, no file left."""
    storage = {
        "kind": "s3",
        "endpoint_url": s3.endpoint_url,
        "region": REGION,
        "access_key_id": ACCESS_KEY_ID,
        "secret_access_key": SECRET_ACCESS_KEY,
        "bucket": "no-such-bucket",
    }
    data_dir = tmp_path / "gw"
    gw = start_gateway(make_settings(data_dir, [fake_upstream_config(upstream)], storage=storage), data_dir)
    try:
        key, key_id = gw.create_key(name="refused")
        client = gw.client(key)
        with pytest.raises(openai.InternalServerError) as refused:
            client.images.edit(
                model="gpt-image-1", image=png(64, 64), prompt="refused", extra_query={"async": "true"}
            )
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.response.json()["error"]["code"] == "storage_unavailable"
        assert gw.query("SELECT id FROM tasks") == []
        assert gw.query("SELECT id FROM reservations") == []
        assert gw.ledger() == []
        row = gw.key_row(key_id)
        assert (row["spent_micros"], row["reserved_micros"]) == (0, 0)
        assert files_under(data_dir / "spool") == [] and files_under(data_dir / "task_inputs") == []
        assert upstream.requests == []
    finally:
        gw.close()
