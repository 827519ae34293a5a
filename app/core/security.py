"""API-key generation, hashing and verification.

Keys are 256-bit random secrets shown once, at creation. What is stored is a keyed hash,
HMAC-SHA256 under a server-side pepper: a copy of the database alone (a backup, a replica, a
leaked dump) is then not enough to check guesses offline, or to recognise a key seen elsewhere.
Lookups go by that hash, and every comparison of secrets uses ``hmac.compare_digest``.
The pepper comes from ``security.key_pepper`` (every replica must share it) or is generated once
into the data directory, like the admin key.
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
# Values that mean "somebody forgot to set this": every secret setting refuses them.
_PLACEHOLDERS = frozenset({"changeme", "change-me", "changethis", "secret", "xxx", "your-key-here"})


def is_placeholder(value: str) -> bool:
    return value.lower() in _PLACEHOLDERS


def generate_api_key() -> str:
    """A new tenant key, ``sk-gw-<43 url-safe chars>``."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str, pepper: bytes) -> str:
    """The stored form of a key."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()


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
    return _ensure_secret_file(Path(data_dir) / "admin_key", ADMIN_PREFIX + secrets.token_urlsafe(32))


def ensure_key_pepper(data_dir: str | Path) -> bytes:
    """Read the generated key-hashing pepper, creating it (mode 0600) the first time."""
    text, _ = _ensure_secret_file(Path(data_dir) / "key_pepper", secrets.token_urlsafe(48))
    return text.encode("utf-8")


def _ensure_secret_file(path: Path, new_value: str) -> tuple[str, Path]:
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_value
    # O_EXCL: two processes starting together must not overwrite each other's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip(), path
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key, path
