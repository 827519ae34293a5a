"""Key lifecycle through the admin API, authentication failures, per-key models, no plaintext at rest."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from app.core.logging import JSONFormatter
from tests.conftest import ADMIN_KEY, Gateway
from tests.fakes.openai_upstream import FakeOpenAI


def generate(gateway: Gateway, key: str | None, model: str = "gpt-image-1") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(
        gateway.url + "/v1/images/generations",
        json={"model": model, "prompt": "a cat"},
        headers=headers,
        timeout=30,
    )


def assert_invalid_key(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


def test_key_lifecycle_through_the_admin_api(gateway: Gateway, upstream: FakeOpenAI) -> None:
    created = gateway.admin(
        "POST", "/admin/keys", json={"name": "team-a", "owner": "tenant-1", "models": ["gpt-image-1"]}
    )
    assert created.status_code == 201
    body = created.json()
    key, key_id = body["key"], body["id"]
    assert key.startswith("sk-gw-") and len(key) > 40
    assert body["status"] == "active" and body["models"] == ["gpt-image-1"]
    assert key not in body["prefix"] and body["prefix"].startswith("sk-gw-")

    shown = gateway.admin("GET", f"/admin/keys/{key_id}").json()
    assert "key" not in shown and shown["name"] == "team-a" and shown["owner"] == "tenant-1"
    listed = gateway.admin("GET", "/admin/keys").json()
    assert listed["object"] == "list"
    assert key_id in [k["id"] for k in listed["data"]]
    assert all("key" not in k for k in listed["data"])

    assert generate(gateway, key).status_code == 200

    patched = gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"name": "team-a2", "enabled": False})
    assert patched.status_code == 200 and patched.json()["status"] == "disabled"
    assert_invalid_key(generate(gateway, key))

    gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"enabled": True})
    assert generate(gateway, key).status_code == 200

    revoked = gateway.admin("DELETE", f"/admin/keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert_invalid_key(generate(gateway, key))
    # Revocation is permanent.
    again = gateway.admin("PATCH", f"/admin/keys/{key_id}", json={"enabled": True})
    assert again.status_code == 400
    assert_invalid_key(generate(gateway, key))


def test_authentication_failures(gateway: Gateway, upstream: FakeOpenAI) -> None:
    assert_invalid_key(generate(gateway, None))
    assert_invalid_key(generate(gateway, "sk-gw-thisKeyDoesNotExistAnywhere0123456789abcd"))
    assert_invalid_key(generate(gateway, "not-even-a-key"))
    assert_invalid_key(generate(gateway, ADMIN_KEY))
    basic = httpx.post(
        gateway.url + "/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "x"},
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
        timeout=30,
    )
    assert_invalid_key(basic)

    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    expired_key, _ = gateway.create_key(name="expired", expires_at=past)
    assert_invalid_key(generate(gateway, expired_key))
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    valid_key, _ = gateway.create_key(name="not-yet-expired", expires_at=future)
    assert generate(gateway, valid_key).status_code == 200
    assert upstream.count() == 1

    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-gw-unknownunknownunknownunknown").images.generate(model="gpt-image-1", prompt="x")


def test_admin_routes_need_the_admin_key(gateway: Gateway) -> None:
    tenant_key, key_id = gateway.create_key(name="tenant")
    for headers in ({}, {"Authorization": f"Bearer {tenant_key}"}, {"Authorization": "Bearer wrong-admin"}):
        for method, path in (
            ("GET", "/admin/keys"),
            ("GET", f"/admin/keys/{key_id}"),
            ("POST", "/admin/keys"),
        ):
            response = httpx.request(
                method, gateway.url + path, headers=headers, json={"name": "x"}, timeout=30
            )
            assert_invalid_key(response)


def test_admin_validation_and_not_found(gateway: Gateway) -> None:
    missing = gateway.admin("GET", "/admin/keys/key_nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    no_name = gateway.admin("POST", "/admin/keys", json={})
    assert no_name.status_code == 400
    assert no_name.json()["error"]["param"] == "name"
    assert no_name.json()["error"]["code"] == "missing_required_parameter"
    unknown_field = gateway.admin("POST", "/admin/keys", json={"name": "x", "bogus": 1})
    assert unknown_field.status_code == 400 and unknown_field.json()["error"]["param"] == "bogus"
    unknown_model = gateway.admin("POST", "/admin/keys", json={"name": "x", "models": ["gpt-image-9"]})
    assert unknown_model.status_code == 400 and unknown_model.json()["error"]["param"] == "models"


def test_model_not_allowed_is_403_and_models_lists_only_allowed(
    gateway: Gateway, upstream: FakeOpenAI
) -> None:
    key, _ = gateway.create_key(name="limited", models=["gpt-image-1-mini", "dall-e-2"])
    response = generate(gateway, key, model="gpt-image-1")
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "permission_error",
        "model_not_allowed",
        "model",
    )
    assert upstream.count() == 0

    client = gateway.client(key)
    assert sorted(m.id for m in client.models.list()) == ["dall-e-2", "gpt-image-1-mini"]
    assert client.models.retrieve("dall-e-2").id == "dall-e-2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")
    with pytest.raises(openai.PermissionDeniedError):
        client.images.generate(model="gpt-image-1", prompt="x")

    everything = gateway.client()
    assert len(list(everything.models.list())) == 5


def test_no_plaintext_key_in_the_database_or_logs(
    gateway: Gateway, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key, key_id = gateway.create_key(name="secret-check")
    assert generate(gateway, key).status_code == 200
    assert_invalid_key(generate(gateway, key + "x"))

    raw = b"".join(p.read_bytes() for p in gateway.data_dir.glob("gateway.db*"))
    assert key.encode() not in raw
    assert key[len("sk-gw-") :].encode() not in raw

    formatter = JSONFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any(key_id in line for line in lines), "the key id should be logged"
    for line in lines:
        assert key not in line
        assert ADMIN_KEY not in line
        assert "sk-upstream-test" not in line
