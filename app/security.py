"""API-key generation, hashing and verification.

Keys are 256-bit random secrets, so a plain SHA-256 is enough to store them safely (no dictionary
to attack); the plaintext is shown once, at creation. Lookups go by hash, and comparisons of
secrets use ``hmac.compare_digest`` so timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_PREFIX = "sk-gw-"
ADMIN_PREFIX = "sk-admin-"
# Enough of the key to recognise it in a list, not enough to matter: 6 random chars of 43.
DISPLAY_CHARS = len(KEY_PREFIX) + 6


def generate_api_key() -> str:
    """A new tenant key, ``sk-gw-<43 url-safe chars>``."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """What lists show instead of the key."""
    return key[:DISPLAY_CHARS]


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX) and 20 <= len(token) <= 200


def secrets_equal(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def ensure_admin_key(data_dir: str | Path) -> tuple[str, Path]:
    """Read the generated admin key, creating it (mode 0600) the first time."""
    path = Path(data_dir) / "admin_key"
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ADMIN_PREFIX + secrets.token_urlsafe(32)
    # O_EXCL: two processes starting together must not overwrite each other's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip(), path
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key, path
