"""Image store on any S3-compatible object store (AWS S3, MinIO, …); links are presigned GET URLs.

boto3 is synchronous, so every call runs in a worker thread (``asyncio.to_thread``); its clients are
thread-safe, unlike its sessions, so one session builds the clients at construction and only the
clients are shared. Presigning needs no network, but runs in a thread too: with no keys configured,
the first call resolves credentials through boto's provider chain, which may query a metadata service.
The gateway never serves these images itself: the store answers the link, and it alone checks the
signature and expiry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import SecretStr

from app.core.errors import NotFoundError
from app.storage.base import (
    NAME_PATTERN,
    ROUTE_PREFIX,
    ImageBytes,
    StoredImage,
    check_name,
    new_name,
    require_aware,
)
from app.storage.config import StorageSettings
from app.storage.signing import UrlSigner

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CreateBucketConfigurationTypeDef, ObjectIdentifierTypeDef

logger = logging.getLogger(__name__)

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_DELETE_BATCH = 1000  # the DeleteObjects maximum
_CHUNK = 256 * 1024  # what the gateway reads from the store per step when it serves a link


class S3ImageStore:
    """``signer`` set (``storage.gateway_links``): links point to the gateway, signed with the
    cluster's shared key, and any node streams the image from the bucket; else presigned links."""

    def __init__(self, settings: StorageSettings, *, signer: UrlSigner | None = None) -> None:
        if not settings.bucket:
            raise ValueError("storage.bucket is required for the s3 store")
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self._create_bucket = settings.create_bucket
        self._signer = signer
        self._region = settings.region
        session = boto3.session.Session(
            aws_access_key_id=_reveal(settings.access_key_id),
            aws_secret_access_key=_reveal(settings.secret_access_key),
            region_name=settings.region,
        )
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": settings.addressing_style},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"mode": "standard", "max_attempts": 3},
        )
        self._client: S3Client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
        # Links must name the store as clients reach it, which may differ from the gateway's view.
        self._presigner: S3Client = (
            session.client("s3", endpoint_url=settings.public_endpoint_url, config=config)
            if settings.public_endpoint_url
            else self._client
        )

    @property
    def client(self) -> S3Client:
        """The API client, shared with the task-input store (boto3 clients are thread-safe)."""
        return self._client

    def key_for(self, name: str) -> str:
        return self.prefix + check_name(name)

    async def start(self) -> None:
        if self._create_bucket:
            await asyncio.to_thread(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        # us-east-1 is the one region that refuses an explicit LocationConstraint.
        if self._region != "us-east-1":
            location = cast("CreateBucketConfigurationTypeDef", {"LocationConstraint": self._region})
            kwargs["CreateBucketConfiguration"] = location
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            # Another replica starting at the same moment created it first.
            if _code(exc) != "BucketAlreadyOwnedByYou":
                raise

    async def aclose(self) -> None:
        self._client.close()
        if self._presigner is not self._client:
            self._presigner.close()

    async def put(self, data: bytes, *, content_type: str) -> StoredImage:
        name = new_name(content_type)
        await asyncio.to_thread(
            self._client.put_object,
            Bucket=self.bucket,
            Key=self.key_for(name),
            Body=data,
            ContentType=content_type,
        )
        return StoredImage(name=name, size=len(data), content_type=content_type)

    async def url_for(self, name: str, *, base_url: str, ttl_s: int) -> str:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        if self._signer is not None:
            query = self._signer.query(check_name(name), ttl_s)
            return f"{base_url.rstrip('/')}{ROUTE_PREFIX}{name}?{urlencode(query)}"
        params = {"Bucket": self.bucket, "Key": self.key_for(name)}
        return await asyncio.to_thread(
            self._presigner.generate_presigned_url, "get_object", Params=params, ExpiresIn=ttl_s
        )

    async def read(self, name: str) -> bytes:
        return await asyncio.to_thread(self._read, self.key_for(name))

    def _read(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise NotFoundError("No such image.") from None
            raise
        with response["Body"] as body:
            return body.read()

    async def open_signed_stream(self, name: str, *, expires: str, sig: str) -> ImageBytes:
        key = self.key_for(name)
        if self._signer is None:
            raise NotFoundError("No such image.")  # the store answers its own presigned links
        self._signer.verify(name, expires, sig)
        size, body = await asyncio.to_thread(self._open, key)
        return ImageBytes(size=size, chunks=_chunks(body))

    def _open(self, key: str) -> tuple[int, StreamingBody]:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise NotFoundError("No such image.") from None
            raise
        return response["ContentLength"], response["Body"]

    async def delete(self, name: str) -> None:
        # DeleteObject succeeds for a missing key, which is the contract here.
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self.key_for(name))

    async def purge_older_than(self, cutoff: datetime) -> int:
        """Remove this store's images (under the prefix, named as the store names them) whose
        LastModified is before ``cutoff``; other objects in the bucket are left alone."""
        return await asyncio.to_thread(self._purge, require_aware(cutoff))

    def _purge(self, cutoff: datetime) -> int:
        stale: list[ObjectIdentifierTypeDef] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                key = obj.get("Key", "")
                modified = obj.get("LastModified")
                if modified is None or not NAME_PATTERN.fullmatch(key[len(self.prefix) :]):
                    continue
                if modified < cutoff:
                    stale.append({"Key": key})
        removed = 0
        for start in range(0, len(stale), _DELETE_BATCH):
            batch = stale[start : start + _DELETE_BATCH]
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            errors = response.get("Errors", [])
            for error in errors:
                logger.warning("could not purge %s: %s", error.get("Key"), error.get("Code"))
            removed += len(batch) - len(errors)
        return removed


async def _chunks(body: StreamingBody) -> AsyncIterator[bytes]:
    """The object's bytes a chunk at a time, each read off the event loop; closed at the end or
    when the client goes away (the generator is closed then)."""
    try:
        while chunk := await asyncio.to_thread(body.read, _CHUNK):
            yield chunk
    finally:
        body.close()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()
