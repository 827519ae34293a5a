"""The local image store: signed links, path safety, atomic writes, purge; plus signing and settings."""

from __future__ import annotations

import os
import stat
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr, ValidationError

from app.core.errors import NotFoundError, PermissionDeniedError
from app.storage import (
    LocalImageStore,
    StorageSettings,
    UrlSigner,
    build_store,
    content_type_for,
    ensure_secret,
    resolve_signing_secret,
)
from app.storage.base import new_name
from app.storage.s3 import S3ImageStore

SECRET = b"k" * 32
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> LocalImageStore:
    local = LocalImageStore(tmp_path / "images", UrlSigner(SECRET), clock=clock)
    await local.start()
    return local


def link_parts(url: str) -> tuple[str, str, str]:
    """(name, expires, sig) from a store link."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path.rsplit("/", 1)[1], query["expires"][0], query["sig"][0]


def listing(store: LocalImageStore) -> list[str]:
    return sorted(os.listdir(store.root))


async def test_put_read_and_signed_link_round_trip(store: LocalImageStore, clock: Clock) -> None:
    stored = await store.put(PNG, content_type="image/png")
    assert stored.size == len(PNG) and stored.content_type == "image/png"
    assert stored.name.startswith("img_") and stored.name.endswith(".png")
    assert await store.read(stored.name) == PNG

    url = await store.url_for(stored.name, base_url="http://127.0.0.1:8080/", ttl_s=600)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("http", "127.0.0.1:8080")
    assert parts.path == f"/v1/files/images/{stored.name}"
    name, expires, sig = link_parts(url)
    assert int(expires) == int(clock.now) + 600
    path = await store.open_signed(name, expires=expires, sig=sig)
    assert path.read_bytes() == PNG
    assert content_type_for(name) == "image/png"


async def test_each_format_gets_its_extension(store: LocalImageStore) -> None:
    jpeg = await store.put(b"jpeg-bytes", content_type="image/jpeg")
    webp = await store.put(b"webp-bytes", content_type="image/webp")
    assert jpeg.name.endswith(".jpg") and content_type_for(jpeg.name) == "image/jpeg"
    assert webp.name.endswith(".webp") and content_type_for(webp.name) == "image/webp"
    with pytest.raises(ValueError, match="unsupported"):
        await store.put(b"x", content_type="text/html")


@pytest.mark.parametrize("part", ["sig", "name", "expires"])
async def test_tampered_link_is_refused(store: LocalImageStore, part: str) -> None:
    first = await store.put(PNG, content_type="image/png")
    other = await store.put(b"other", content_type="image/png")
    name, expires, sig = link_parts(await store.url_for(first.name, base_url="http://gw", ttl_s=60))
    if part == "sig":
        sig = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    elif part == "name":
        name = other.name  # a real image, but the link was signed for another one
    else:
        expires = str(int(expires) + 3600)  # stretching the lifetime must break the signature
    with pytest.raises(PermissionDeniedError) as caught:
        await store.open_signed(name, expires=expires, sig=sig)
    assert caught.value.status_code == 403 and caught.value.code == "invalid_signature"


@pytest.mark.parametrize(
    ("expires", "sig"),
    [
        ("", ""),
        ("abc", "0" * 64),
        ("١٢٣", "0" * 64),  # Unicode digits that int() would accept
        ("-5", "0" * 64),
        ("1" * 13, "0" * 64),
        ("1800000600", "Z" * 64),
        ("1800000600", "é" * 64),  # non-ASCII must not reach compare_digest
    ],
)
async def test_malformed_link_is_refused(store: LocalImageStore, expires: str, sig: str) -> None:
    stored = await store.put(PNG, content_type="image/png")
    with pytest.raises(PermissionDeniedError) as caught:
        await store.open_signed(stored.name, expires=expires, sig=sig)
    assert caught.value.code == "invalid_signature"


async def test_expired_link_is_refused(store: LocalImageStore, clock: Clock) -> None:
    stored = await store.put(PNG, content_type="image/png")
    name, expires, sig = link_parts(await store.url_for(stored.name, base_url="http://gw", ttl_s=60))
    clock.now += 60
    assert (await store.open_signed(name, expires=expires, sig=sig)).is_file()  # the last valid second
    clock.now += 1
    with pytest.raises(PermissionDeniedError) as caught:
        await store.open_signed(name, expires=expires, sig=sig)
    assert caught.value.status_code == 403 and caught.value.code == "url_expired"


async def test_signature_is_checked_before_existence(store: LocalImageStore) -> None:
    stored = await store.put(PNG, content_type="image/png")
    name, expires, sig = link_parts(await store.url_for(stored.name, base_url="http://gw", ttl_s=60))
    await store.delete(stored.name)
    with pytest.raises(NotFoundError):
        await store.open_signed(name, expires=expires, sig=sig)
    # A forged link to a missing image says "forged", not "missing".
    with pytest.raises(PermissionDeniedError):
        await store.open_signed(name, expires=expires, sig="0" * 64)


TRAVERSAL = [
    "../secret.png",
    "..%2fsecret.png",
    "%2e%2e/secret.png",
    "../img_" + "a" * 32 + ".png",
    "img_" + "a" * 32 + ".png/../../secret.png",
    "/etc/passwd",
    "img_" + "a" * 32 + ".png\n",
    "img_" + "a" * 32 + ".png\x00",
    "img_" + "A" * 32 + ".png",
    "img_" + "a" * 32 + ".html",
    "..",
    "",
]


@pytest.mark.parametrize("name", TRAVERSAL)
async def test_names_outside_the_pattern_are_not_found(store: LocalImageStore, name: str) -> None:
    secret = store.root.parent / "secret.png"
    secret.write_bytes(b"outside the store")
    with pytest.raises(NotFoundError):
        store.path_for(name)
    with pytest.raises(NotFoundError):
        await store.read(name)
    with pytest.raises(NotFoundError):
        await store.delete(name)
    with pytest.raises(NotFoundError):
        await store.url_for(name, base_url="http://gw", ttl_s=60)
    # Even a correctly signed link cannot name a file outside the store.
    query = store.signer.query(name, 60, now=time.time())
    with pytest.raises(NotFoundError):
        await store.open_signed(name, expires=query["expires"], sig=query["sig"])
    assert secret.read_bytes() == b"outside the store"


async def test_missing_image_and_idempotent_delete(store: LocalImageStore) -> None:
    stored = await store.put(PNG, content_type="image/png")
    await store.delete(stored.name)
    await store.delete(stored.name)
    with pytest.raises(NotFoundError):
        await store.read(stored.name)
    assert listing(store) == []


async def test_writes_leave_no_temp_files(store: LocalImageStore) -> None:
    names = [(await store.put(PNG + bytes([i]), content_type="image/png")).name for i in range(5)]
    assert listing(store) == sorted(names)
    for i, name in enumerate(names):
        assert (store.root / name).read_bytes() == PNG + bytes([i])
        assert stat.S_IMODE((store.root / name).stat().st_mode) & 0o077 == 0  # private to the gateway


async def test_failed_write_leaves_nothing_behind(
    store: LocalImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        await store.put(PNG, content_type="image/png")
    assert listing(store) == []


async def test_purge_removes_only_old_images(store: LocalImageStore) -> None:
    now = datetime.now(UTC)
    old = [(await store.put(PNG, content_type="image/png")).name for _ in range(2)]
    fresh = (await store.put(PNG, content_type="image/webp")).name
    unrelated = store.root / "README"
    unrelated.write_text("operator's file")
    stale_temp = store.root / ".tmp-crashed"
    stale_temp.write_bytes(b"half an image")
    long_ago = (now - timedelta(days=2)).timestamp()
    for path in [*(store.root / n for n in old), unrelated, stale_temp]:
        os.utime(path, (long_ago, long_ago))

    assert await store.purge_older_than(now - timedelta(days=1)) == 2
    assert listing(store) == sorted([fresh, "README"])
    assert await store.read(fresh) == PNG
    assert await store.purge_older_than(now - timedelta(days=1)) == 0
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.purge_older_than(datetime(2020, 1, 1))  # naive on purpose


def test_purge_walks_the_directory_without_holding_it(store: LocalImageStore) -> None:
    # A day of images is ~100,000 files; listing them all at once left the server tens of MB larger
    # after each purge in the soak (bench/soak.py). Listed, 20,000 took 18 MB (each entry keeps its
    # stat); streamed, nothing to speak of.
    store.root.mkdir(parents=True, exist_ok=True)
    for _ in range(20_000):
        (store.root / new_name("image/png")).touch()
    tracemalloc.start()
    try:
        assert store._purge(cutoff_ts=0.0) == 0  # all fresh: walked, nothing removed
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024, f"purge held {peak} bytes"


async def test_purge_of_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path / "never-created", UrlSigner(SECRET))
    assert await store.purge_older_than(datetime.now(UTC)) == 0


def test_signer_rejects_short_secrets() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        UrlSigner(b"short")


def test_signatures_depend_on_the_secret() -> None:
    a, b = UrlSigner(b"a" * 32), UrlSigner(b"b" * 32)
    name = "img_" + "0" * 32 + ".png"
    assert a.sign(name, 100) != b.sign(name, 100)
    with pytest.raises(PermissionDeniedError):
        b.verify(name, 100, a.sign(name, 100), now=0)
    a.verify(name, "100", a.sign(name, 100), now=0)


def test_ensure_secret_creates_a_private_stable_key(tmp_path: Path) -> None:
    first = ensure_secret(tmp_path / "data")
    assert len(first) >= 32
    assert ensure_secret(tmp_path / "data") == first
    key_file = tmp_path / "data" / "signing_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert os.listdir(tmp_path / "data") == ["signing_key"]  # the temp file is gone
    key_file.write_text("too short\n")
    with pytest.raises(ValueError, match="delete it"):
        ensure_secret(tmp_path / "data")


def test_configured_signing_key_wins_over_the_file(tmp_path: Path) -> None:
    configured = StorageSettings(signing_key=SecretStr("s" * 40))
    assert resolve_signing_secret(configured, str(tmp_path)) == b"s" * 40
    assert not (tmp_path / "signing_key").exists()
    generated = resolve_signing_secret(StorageSettings(), str(tmp_path))
    assert (tmp_path / "signing_key").exists() and generated != b"s" * 40


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "s3"}, "bucket is required"),
        ({"kind": "s3", "bucket": "b", "access_key_id": "AKIA"}, "set together"),
        ({"url_ttl_s": 7200, "retention_s": 3600}, "retention_s"),
        ({"url_ttl_s": 8 * 24 * 3600, "retention_s": 9 * 24 * 3600}, "url_ttl_s"),
        ({"signing_key": "changeme"}, "placeholder"),
        ({"signing_key": "tooshort"}, "32 characters"),
        ({"kind": "s3", "bucket": "b", "access_key_id": "a", "secret_access_key": "secret"}, "placeholder"),
        ({"prefix": "/images/"}, "prefix"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_storage_settings(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StorageSettings.model_validate(fields)


def test_storage_settings_defaults_and_empty_values() -> None:
    settings = StorageSettings.model_validate(
        {"kind": "s3", "bucket": "b", "endpoint_url": "", "access_key_id": ""}
    )
    assert settings.endpoint_url is None and settings.access_key_id is None
    defaults = StorageSettings()
    assert (defaults.kind, defaults.path, defaults.url_ttl_s, defaults.retention_s) == (
        "local",
        "images",  # relative to data_dir (app/runtime/settings.py)
        3600,
        86400,
    )


async def test_build_store_picks_the_adapter(tmp_path: Path) -> None:
    local = build_store(StorageSettings(path=str(tmp_path / "img")), signing_secret=SECRET)
    assert isinstance(local, LocalImageStore) and local.root == (tmp_path / "img").absolute()
    assert not (tmp_path / "img").exists()  # building does no I/O; start() creates the directory
    await local.start()
    assert (tmp_path / "img").is_dir()
    await local.aclose()
    # An unreachable endpoint is fine: building an S3 store contacts nothing.
    s3_settings = StorageSettings.model_validate(
        {
            "kind": "s3",
            "bucket": "images",
            "endpoint_url": "http://127.0.0.1:9",
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": "not-a-real-secret-key",
        }
    )
    remote = build_store(s3_settings, signing_secret=SECRET)
    assert isinstance(remote, S3ImageStore)
    await remote.aclose()
