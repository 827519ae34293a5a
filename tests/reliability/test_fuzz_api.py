"""Schema fuzzing of every route (issue 10), against the gateway's own OpenAPI document.

schemathesis generates valid and invalid requests for each operation of ``/openapi.json``; they are
sent to a live gateway (the fake upstream behind it is healthy, so any 5xx is a gateway bug):
client routes with a tenant key, admin routes with the admin key and with a tenant key, and every
route with a wrong key. Each answer must not be a 5xx, must match its documented schema and content
type, must refuse invalid input with a 4xx, and every error must be OpenAI-shaped.

``/v1/images/generations`` and ``/edits`` read their bodies themselves (unknown fields must reach the
upstream untouched), so the document declares no body for them: they get their own hypothesis fuzz,
random JSON values, near-valid objects, random multipart forms and raw bytes.

Seeded (``derandomize``) and bounded: a few dozen examples per operation.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from bench.traffic import EDIT, GEN, openai_error, sse_events
from tests.conftest import ADMIN_KEY, ALL_MODELS, LOCAL_UPSTREAM, Gateway, make_settings
from tests.fakes import image_files

# The document as the app factory builds it (no I/O: nothing is opened before the lifespan runs);
# `test_the_served_document_is_the_fuzzed_one` proves it is what the gateway serves.
DOCUMENT = create_app(make_settings(Path(tempfile.gettempdir()) / "unused", [LOCAL_UPSTREAM])).openapi()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CLIENT_OPERATIONS = [op for op in OPERATIONS if not op.path.startswith("/admin/")]
ADMIN_OPERATIONS = [op for op in OPERATIONS if op.path.startswith("/admin/")]
CHECKS = [
    not_a_server_error,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    negative_data_rejection,
]
FUZZ = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def tenant(gateway: Gateway) -> str:
    return gateway.create_key()[0]


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def label(operation: Any) -> str:
    return str(operation.label)


def cases(operation: Any) -> st.SearchStrategy[Any]:
    """Valid and invalid requests for one operation."""
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )


def check_error_shape(response: Any) -> None:
    if response.status_code >= 400:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        assert openai_error(body) is not None, (response.status_code, response.content[:300])


def fuzz(operation: Any, gateway: Gateway, key: str, checks: list[Callable[..., Any]]) -> None:
    @FUZZ
    @given(case=cases(operation))
    def run(case: Any) -> None:
        response = case.call(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"})
        case.validate_response(response, checks=checks)
        check_error_shape(response)

    run()


def test_the_served_document_is_the_fuzzed_one(http: httpx.Client) -> None:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    assert response.json() == DOCUMENT
    assert {op.path for op in OPERATIONS} >= {GEN, EDIT, "/v1/models", "/admin/keys", "/healthz"}


@pytest.mark.parametrize("operation", CLIENT_OPERATIONS, ids=label)
def test_client_routes_with_a_tenant_key(operation: Any, gateway: Gateway, tenant: str) -> None:
    fuzz(operation, gateway, tenant, CHECKS)


@pytest.mark.parametrize("operation", ADMIN_OPERATIONS, ids=label)
def test_admin_routes_with_the_admin_key(operation: Any, gateway: Gateway) -> None:
    fuzz(operation, gateway, ADMIN_KEY, CHECKS)


@pytest.mark.parametrize("operation", ADMIN_OPERATIONS, ids=label)
def test_admin_routes_refuse_a_tenant_key(operation: Any, gateway: Gateway, tenant: str) -> None:
    @FUZZ
    @given(case=cases(operation))
    def run(case: Any) -> None:
        response = case.call(base_url=gateway.url, headers={"Authorization": f"Bearer {tenant}"})
        check_error_shape(response)
        if refused_at_the_edge(response):
            return
        assert response.status_code in (401, 403), (response.status_code, response.text[:300])

    run()


PUBLIC = ("/healthz", "/readyz", "/v1/files/images/{name}")


def refused_at_the_edge(response: Any) -> bool:
    """A NUL anywhere in a request is refused before authentication (InputGuardMiddleware): no
    route, key lookup or admin check ever sees it. That is a refusal too, just an earlier one."""
    return response.status_code == 400 and "NUL character" in response.json()["error"]["message"]


@pytest.mark.parametrize("operation", OPERATIONS, ids=label)
def test_every_route_refuses_a_wrong_key(operation: Any, gateway: Gateway) -> None:
    @settings(FUZZ, max_examples=10)
    @given(case=cases(operation), key=st.sampled_from(["", "sk-nope", "Bearer", "sk-gw-" + "x" * 40]))
    def run(case: Any, key: str) -> None:
        response = case.call(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code < 500
        check_error_shape(response)
        if operation.path not in PUBLIC and not refused_at_the_edge(response):
            assert response.status_code == 401, (response.status_code, response.text[:300])
            assert response.json()["error"]["code"] == "invalid_api_key"

    run()


# -- the two routes whose bodies are not in the document -------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
# Values that hit the catalog's rules, mixed with anything at all.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([*ALL_MODELS, "gpt-4", ""]),
    "prompt": st.sampled_from(["a lighthouse", " ", "", "x" * 32_001, "ünïcødé 🌊"]) | st.text(max_size=30),
    "n": st.integers(-2, 12),
    "size": st.sampled_from(["auto", "1024x1024", "1536x1024", "1792x1024", "256x256", "0x0", "1024×1024"]),
    "quality": st.sampled_from(["low", "medium", "high", "auto", "standard", "hd", "ultra"]),
    "background": st.sampled_from(["transparent", "opaque", "auto", "pink"]),
    "output_format": st.sampled_from(["png", "jpeg", "webp", "gif"]),
    "output_compression": st.integers(-5, 105),
    "moderation": st.sampled_from(["low", "auto", "high"]),
    "stream": st.booleans(),
    "partial_images": st.integers(-1, 4),
    "response_format": st.sampled_from(["url", "b64_json", "jpeg"]),
    "style": st.sampled_from(["vivid", "natural"]),
    "user": st.text(max_size=10),
    "seed": st.integers(),
}
OPTIONAL_FIELDS = {name: value for name, value in FIELD_VALUES.items() if name not in ("model", "prompt")}


# Mostly well-formed requests that meet (or just miss) the catalog's rules, some with one field of
# any JSON type, and any JSON value at all.
def some_fields(fields: dict[str, st.SearchStrategy[Any]], most: int) -> st.SearchStrategy[dict[str, Any]]:
    """A few of ``fields`` (at most ``most``), each drawn from its own strategy."""
    names = st.lists(st.sampled_from(sorted(fields)), max_size=most, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({n: fields[n] for n in chosen}))


well_formed = st.builds(
    lambda model, extra: {"model": model, "prompt": "a lighthouse", **extra},
    st.sampled_from(["gpt-image-1", "gpt-image-1-mini", "dall-e-3"]),
    some_fields(OPTIONAL_FIELDS, 3),
)
one_odd_field = st.builds(
    lambda body, name, value: {**body, name: value},
    well_formed,
    st.sampled_from(sorted(FIELD_VALUES)),
    json_values,
)
generation_bodies = st.one_of(
    well_formed,
    well_formed,
    one_odd_field,
    st.fixed_dictionaries(
        {"model": FIELD_VALUES["model"], "prompt": FIELD_VALUES["prompt"]}, optional=OPTIONAL_FIELDS
    ),
    json_values,
)
query_params = st.fixed_dictionaries(
    {}, optional={"async": st.sampled_from(["true", "false", "maybe"]), "response_format": st.just("url")}
)


def check_image_answer(response: httpx.Response) -> None:
    """No 5xx; errors OpenAI-shaped; successes shaped like what they claim to be."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        check_error_shape(response)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(response.text)
        assert events, response.text[:300]
        for name, data in events:
            event = orjson.loads(data)
            assert name == event["type"], (name, event)
            if name == "error":
                assert openai_error(event) is not None, event
        return
    body = response.json()
    if response.status_code == 202:
        assert body["object"] == "image.task" and body["status"] == "queued", body
        return
    assert response.status_code == 200 and isinstance(body["data"], list) and body["data"], body
    for item in body["data"]:
        assert isinstance(item.get("b64_json") or item.get("url"), str), item


def test_generations_with_random_bodies(http: httpx.Client, tenant: str) -> None:
    headers = {"Authorization": f"Bearer {tenant}"}

    @settings(FUZZ, max_examples=250)
    @given(body=generation_bodies, params=query_params)
    def run(body: Any, params: dict[str, str]) -> None:
        # The standard library's encoder: it writes integers of any size, as a client may.
        check_image_answer(http.post(GEN, content=json.dumps(body), params=params, headers=headers))

    run()


UPLOADS = {
    "png": image_files.png(32, 32),
    "jpeg": image_files.jpeg(32, 32),
    "webp": image_files.webp(32, 32),
    "mask": image_files.mask(32, 32),
    "gif": image_files.gif(),
    "truncated": image_files.truncated(image_files.png(32, 32)),
    "bomb": image_files.png_bomb(),
    "text": b"not an image at all",
    "empty": b"",
}
text_fields = st.one_of(
    st.builds(
        lambda model, extra: {"model": model, "prompt": "a hat", **extra},
        st.sampled_from(["gpt-image-1", "gpt-image-1.5", "dall-e-2"]),
        some_fields(
            {name: value.map(str) for name, value in OPTIONAL_FIELDS.items()}
            | {"input_fidelity": st.sampled_from(["low", "high", "max"])},
            3,
        ),
    ),
    st.dictionaries(
        st.sampled_from([*FIELD_VALUES, "input_fidelity"]) | st.text(max_size=8),
        st.one_of(*(v.map(str) for v in FIELD_VALUES.values()), st.text(max_size=20)),
        max_size=8,
    ),
)
file_part = st.tuples(
    st.sampled_from(["image", "image[]", "image[3]", "mask", "prompt", "file"]),
    st.sampled_from(sorted(UPLOADS)),
    st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", ""]),
)
file_parts = st.one_of(
    st.lists(file_part, max_size=4),
    st.tuples(st.just(("image", "png", "image/png")), st.lists(file_part, max_size=2)).map(
        lambda t: [t[0], *t[1]]
    ),
)


def test_edits_with_random_forms(http: httpx.Client, tenant: str, gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {tenant}"}

    @settings(FUZZ, max_examples=250)
    @given(fields=text_fields, parts=file_parts, params=query_params)
    def run(fields: dict[str, str], parts: list[tuple[str, str, str]], params: dict[str, str]) -> None:
        files = [(name, (f"{kind}.bin", UPLOADS[kind], ctype or None)) for name, kind, ctype in parts]
        response = http.post(EDIT, data=fields, files=files or None, params=params, headers=headers)
        if not files:  # httpx sends an urlencoded body then: not multipart, refused as such
            assert response.status_code == 400, response.text[:300]
        check_image_answer(response)

    run()
    assert not list((gateway.data_dir / "spool").iterdir())


@pytest.mark.parametrize("path", [GEN, EDIT])
def test_image_routes_with_raw_bytes(http: httpx.Client, tenant: str, path: str) -> None:
    content_types = st.sampled_from(
        [
            "application/json",
            "multipart/form-data; boundary=XyZ",
            "multipart/form-data",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
        ]
    )

    @settings(FUZZ, max_examples=60)
    @given(body=st.binary(max_size=300), content_type=content_types)
    def run(body: bytes, content_type: str) -> None:
        headers = {"Authorization": f"Bearer {tenant}", "Content-Type": content_type}
        response = http.post(path, content=body, headers=headers)
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
        check_error_shape(response)

    run()
