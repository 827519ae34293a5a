"""Signed, expiring links for the local image store: ``?expires=<unix>&sig=<hex>``.

The signature is HMAC-SHA256 over a versioned message binding the image name to the expiry, so
neither can be changed without the key. Verification checks the signature before the expiry: a
forged link learns nothing, not even whether its time has passed. The stdlib ``hmac`` is the whole
mechanism; a token library (itsdangerous, JWT) would add a dependency and a longer URL for no gain.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

from app.core.errors import PermissionDeniedError

SECRET_FILE = "signing_key"
MIN_SECRET_BYTES = 32
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
# Bumping the version invalidates every outstanding link, should the message format ever change.
_DOMAIN = b"gateway-image-url-v1"


class UrlSigner:
    """Signs and verifies ``(name, expires)`` pairs with one secret key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the signing secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def sign(self, name: str, expires: int) -> str:
        """The hex signature of a link to ``name`` valid until the unix time ``expires``."""
        message = b"\n".join((_DOMAIN, name.encode("utf-8"), str(int(expires)).encode("ascii")))
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def verify(self, name: str, expires: str | int, sig: str, now: float | None = None) -> None:
        """Accept the link or raise 403: ``invalid_signature`` if forged, ``url_expired`` if late."""
        expires_text = str(expires)
        # Shape checks first: they make the comparison below ASCII-only and bound the parse.
        if not _EXPIRES.fullmatch(expires_text) or not _SIG.fullmatch(sig):
            raise _invalid()
        expected = self.sign(name, int(expires_text))
        if not hmac.compare_digest(expected, sig):
            raise _invalid()
        current = time.time() if now is None else now
        if current > int(expires_text):
            raise PermissionDeniedError("This image link has expired.", code="url_expired")

    def query(self, name: str, ttl_s: int, now: float | None = None) -> dict[str, str]:
        """The query parameters of a link to ``name`` valid for ``ttl_s`` seconds."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        current = time.time() if now is None else now
        expires = int(current) + ttl_s
        return {"expires": str(expires), "sig": self.sign(name, expires)}


def _invalid() -> PermissionDeniedError:
    return PermissionDeniedError("This image link is invalid.", code="invalid_signature")


def ensure_secret(data_dir: str | Path) -> bytes:
    """Read the generated signing key, creating it (mode 0600) the first time.

    The key is written to a private temp file and then hard-linked into place: the link either
    creates the name with the full content or fails because another process won, so no reader
    ever sees a half-written key (an ``O_EXCL`` create followed by a write leaves that window).
    """
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".signing_key-")  # created with mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another process created it first; use theirs
    finally:
        os.unlink(temp)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    secret = path.read_text(encoding="utf-8").strip().encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{path} holds fewer than {MIN_SECRET_BYTES} bytes; delete it to generate a new key")
    return secret
