"""Settings of the image store (the ``storage:`` section of the config).

Kept beside the store rather than in ``app/runtime/settings.py`` so the adapter and its knobs change together;
``app/runtime/settings.py`` imports this model. The S3 fields are flat (``storage: {kind: s3, bucket: …}``) as
SPEC §9 shows them, and are ignored when ``kind`` is ``local``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.core.security import is_placeholder

# SigV4 presigned URLs cannot live longer than 7 days; the local store keeps the same ceiling.
MAX_URL_TTL_S = 7 * 24 * 3600


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "s3"] = "local"
    # Local store: the directory that holds the images (created on start); relative to data_dir.
    path: str = "images"
    # How long a returned link stays valid.
    url_ttl_s: int = Field(default=3600, ge=1, le=MAX_URL_TTL_S)
    # Images older than this are purged; at least url_ttl_s, so no link outlives its image.
    retention_s: int = Field(default=86400, ge=60)
    # How often the purge runs.
    purge_interval_s: int = Field(default=600, ge=1)
    # Key for the gateway's link signatures. Unset: generated once into <data_dir>/signing_key, which
    # only that node knows; set it (the same secret on every node) when several nodes serve links.
    signing_key: SecretStr | None = None
    # S3 only: links point to the gateway (/v1/files/images/…), which any node verifies with
    # signing_key (then required) and streams from the store, instead of presigned links to the store
    # itself. For stores clients cannot reach, and links that look the same on every store.
    gateway_links: bool = False

    # S3-compatible store (AWS S3, MinIO, …).
    endpoint_url: str | None = None
    # Endpoint written into presigned links when clients reach the store under another name than
    # the gateway does (e.g. http://minio:9000 inside compose, https://files.example.com outside).
    public_endpoint_url: str | None = None
    bucket: str | None = None
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    # Key prefix inside the bucket, e.g. "images/".
    prefix: str = ""
    create_bucket: bool = False
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)

    @field_validator(
        "signing_key", "access_key_id", "secret_access_key", "endpoint_url", "bucket", mode="before"
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # "${VAR}" interpolation turns an unset variable into "", which means "not configured".
        return None if value == "" else value

    @field_validator("prefix")
    @classmethod
    def _relative_prefix(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("must not start with '/'")
        return value

    @model_validator(mode="after")
    def _check(self) -> StorageSettings:
        if self.retention_s < self.url_ttl_s:
            raise ValueError("retention_s must be at least url_ttl_s, or links would outlive their images")
        for name in ("signing_key", "secret_access_key"):
            secret: SecretStr | None = getattr(self, name)
            if secret is not None and is_placeholder(secret.get_secret_value()):
                raise ValueError(f"storage.{name} is a placeholder; set a real value")
        if self.signing_key is not None and len(self.signing_key.get_secret_value()) < 32:
            raise ValueError("storage.signing_key must be at least 32 characters")
        if self.kind == "s3":
            if not self.bucket:
                raise ValueError("storage.bucket is required when kind is s3")
            if self.gateway_links and self.signing_key is None:
                raise ValueError(
                    "storage.signing_key is required with gateway_links: every node must verify the "
                    "links any other node signed, so the key cannot be one generated per node"
                )
            if (self.access_key_id is None) != (self.secret_access_key is None):
                raise ValueError("storage.access_key_id and secret_access_key must be set together")
        return self
