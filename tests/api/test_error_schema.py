"""The error bodies real requests receive are the ones the OpenAPI document describes (issue 17).

Each body comes over HTTP from a running gateway (uvicorn on loopback): a validation 400, an
unknown key's 401, the admin guard's 401 (sent by ASGI middleware before routing), an unknown
URL's 404, a 405, a body-size 413 (middleware again), a rate-limit 429 and a moderation block's 400
(the one body with extra keys). Every one is validated against the served document's
``ErrorBody`` component, $refs resolved in that document.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import Gateway, fake_upstream_config, make_settings, start_gateway
from tests.fakes.openai_upstream import FakeOpenAI

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def small_gateway(fake_upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("error-schema")
    settings = make_settings(
        data_dir, [fake_upstream_config(fake_upstream)], server={"max_json_body_bytes": 2048}
    )
    gw = start_gateway(settings, data_dir)
    yield gw
    gw.close()


def error_validator(gw: Gateway) -> jsonschema.protocols.Validator:
    document = httpx.get(gw.url + "/openapi.json", timeout=30).json()
    # The component, with the document's components beside it so that its $refs resolve.
    schema = {"$ref": "#/components/schemas/ErrorBody", "components": document["components"]}
    cls = jsonschema.validators.validator_for({"$schema": "https://json-schema.org/draft/2020-12/schema"})
    cls.check_schema(schema)
    return cls(schema)


def received(gw: Gateway, key: str) -> dict[str, httpx.Response]:
    tenant = {"Authorization": f"Bearer {key}"}
    post = lambda path, **kw: httpx.post(gw.url + path, timeout=30, **kw)  # noqa: E731
    limited, _ = gw.create_key(name="limited", rpm=1)
    first = post(
        GEN, json={"model": "gpt-image-1", "prompt": "a cat"}, headers={"Authorization": f"Bearer {limited}"}
    )
    assert first.status_code == 200, first.text
    return {
        "400 validation": post(GEN, json={"model": "gpt-image-1"}, headers=tenant),
        "400 invalid json": post(
            GEN, content=b"{nope", headers={**tenant, "content-type": "application/json"}
        ),
        "400 moderation": post(
            GEN, json={"model": "gpt-image-1", "prompt": "a dismembered corpse"}, headers=tenant
        ),
        "401 unknown key": post(
            GEN, json={"model": "gpt-image-1", "prompt": "a cat"}, headers={"Authorization": "Bearer sk-nope"}
        ),
        "401 admin guard": post("/admin/keys", json={"name": "x"}, headers=tenant),
        "404 unknown url": httpx.get(gw.url + "/v1/nothing-here", headers=tenant, timeout=30),
        "405 method": httpx.delete(gw.url + GEN, headers=tenant, timeout=30),
        "413 too large": post(
            GEN, content=b"{" + b" " * 4096 + b"}", headers={**tenant, "content-type": "application/json"}
        ),
        "429 rate limit": post(
            GEN,
            json={"model": "gpt-image-1", "prompt": "a cat"},
            headers={"Authorization": f"Bearer {limited}"},
        ),
    }


def test_every_error_kind_matches_the_documented_error_schema(small_gateway: Gateway) -> None:
    validator = error_validator(small_gateway)
    key, _ = small_gateway.create_key(name="schema")
    responses = received(small_gateway, key)
    for kind, response in responses.items():
        assert response.status_code == int(kind.split()[0]), (kind, response.text)
        assert response.headers["content-type"] == "application/json", kind
        body: Any = response.json()
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, (kind, body, errors)
        # What the schema requires, said plainly: all four keys, present even when null.
        assert {"message", "type", "param", "code"} <= set(body["error"]), kind
    assert "moderation_details" in responses["400 moderation"].json()["error"]


def test_the_schema_rejects_what_the_gateway_never_sends(small_gateway: Gateway) -> None:
    """The component is exact, not permissive: a missing ``param`` or an extra top-level key fails."""
    validator = error_validator(small_gateway)
    good = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert validator.is_valid(good)
    assert not validator.is_valid({"error": {"message": "m", "type": "t", "code": None}})
    assert not validator.is_valid({**good, "detail": "FastAPI's shape"})
    assert not validator.is_valid({"detail": [{"loc": ["body"], "msg": "x"}]})
