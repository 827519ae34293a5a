"""Where generated images are kept for ``response_format=url`` and task results (SPEC §8).

``build_store`` picks the adapter from the settings and does no I/O; the lifespan then calls
``await store.start()`` and, at shutdown, ``await store.aclose()``.
"""

from __future__ import annotations

from app.storage.base import (
    ImageBytes,
    ImageStore,
    StoredImage,
    check_name,
    content_type_for,
    purge_expired,
)
from app.storage.config import StorageSettings
from app.storage.inputs import InputStore, LocalInputStore, build_input_store
from app.storage.local import LocalImageStore
from app.storage.signing import UrlSigner, ensure_secret

__all__ = [
    "ImageBytes",
    "ImageStore",
    "InputStore",
    "LocalImageStore",
    "LocalInputStore",
    "StorageSettings",
    "StoredImage",
    "UrlSigner",
    "build_input_store",
    "build_store",
    "check_name",
    "content_type_for",
    "ensure_secret",
    "purge_expired",
    "resolve_signing_secret",
]


def resolve_signing_secret(settings: StorageSettings, data_dir: str) -> bytes:
    """The configured ``storage.signing_key``, else the key generated once under ``data_dir`` (which
    only this node knows: links then verify on this node alone, as a local store's can anyway)."""
    if settings.signing_key is not None:
        return settings.signing_key.get_secret_value().encode("utf-8")
    return ensure_secret(data_dir)


def build_store(settings: StorageSettings, *, signing_secret: bytes) -> ImageStore:
    """The configured store. boto3 is imported only when S3 is chosen, keeping local start-up lean."""
    if settings.kind == "s3":
        from app.storage.s3 import S3ImageStore

        return S3ImageStore(settings, signer=UrlSigner(signing_secret) if settings.gateway_links else None)
    return LocalImageStore(settings.path, UrlSigner(signing_secret))
