"""Issue 23 items 7 and 8: bounded console ranges, and bad input a 400 on SQLite and PostgreSQL.

Each test runs on both databases. On 9a64885 they failed: a date at the calendar's ends was a 500
(OverflowError adding a day to 9999-12-31 or taking 30 days off 0001-01-01); a 26-year range drew
a bar per day (9,497 of them, and a 9,997-year range a 788 MB page); a NUL byte reached
PostgreSQL (500 "invalid byte sequence"); an Idempotency-Key over 200 characters reached the
tasks table's VARCHAR(200) (500 on PostgreSQL, accepted on SQLite); and a 500 left the
keep-alive connection closed by uvicorn, so the client's next request on it was reset.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.test_console import csrf_of, signed_in
from tests.conftest import LOCAL_UPSTREAM, Gateway, make_settings, migrate, start_gateway
from tests.services import fresh_postgres_database


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp(f"edge-{request.param}")
    if request.param == "sqlite":
        gateway = start_gateway(make_settings(data_dir, [LOCAL_UPSTREAM]), data_dir)
        yield gateway
        gateway.close()
        return
    with fresh_postgres_database() as url:
        migrate(url)
        gateway = start_gateway(make_settings(data_dir, [LOCAL_UPSTREAM], database={"url": url}), data_dir)
        yield gateway
        gateway.close()


@pytest.fixture(scope="module")
def console(gw: Gateway) -> httpx.Client:
    return signed_in(gw)


@pytest.mark.parametrize("page", ["/console/usage", "/console/overview"])
@pytest.mark.parametrize(
    "params",
    [
        {"to": "9999-12-31"},
        {"from": "0001-01-01"},
        {"to": "0001-01-01"},
        {"from": "0002-01-01", "to": "9998-12-31"},
        {"from": "1969-12-31"},
        {"to": "2026-02-30"},
    ],
)
def test_console_dates_out_of_range_are_a_400(
    console: httpx.Client, page: str, params: dict[str, str]
) -> None:
    response = console.get(page, params=params)
    assert response.status_code == 400, response.text[:300]
    assert "between 1970-01-01 and 9998-12-31" in response.text or "YYYY-MM-DD" in response.text


@pytest.mark.parametrize(
    "params", [{"to": "9999-12-31"}, {"from": "0001-01-01"}, {"from": "-1"}, {"to": "99999999999999"}]
)
def test_usage_api_dates_out_of_range_are_a_400(gw: Gateway, params: dict[str, str]) -> None:
    key, _ = gw.create_key()
    own = httpx.get(gw.url + "/v1/usage", params=params, headers={"Authorization": f"Bearer {key}"})
    assert own.status_code == 400, own.text
    assert own.json()["error"]["param"] in params
    admin = gw.admin("GET", "/admin/usage", params={**params, "format": "csv"})
    assert admin.status_code == 400, admin.text


def test_the_console_usage_csv_shares_the_parser(console: httpx.Client) -> None:
    response = console.get("/console/usage.csv", params={"to": "9999-12-31"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "to"


def _points(html: str, chart: str) -> int:
    match = re.search(rf'id="{chart}"[^>]*data-points="(\d+)"', html)
    assert match, chart
    return int(match.group(1))


def test_a_year_is_drawn_by_day_a_longer_range_by_month_and_the_longest_is_refused(
    console: httpx.Client,
) -> None:
    year = console.get("/console/usage", params={"from": "2025-01-01", "to": "2025-12-31"})
    assert year.status_code == 200
    assert _points(year.text, "spend-by-day") == 365 and "day (UTC)" in year.text
    leap = console.get("/console/overview", params={"from": "2024-01-01", "to": "2024-12-31"})
    assert _points(leap.text, "requests-by-day") == 366
    # Over a year: one bar per month (26 years: 312 bars, not 9,497), so the page stays small.
    decades = console.get("/console/usage", params={"from": "2000-01-01", "to": "2025-12-31"})
    assert decades.status_code == 200
    assert _points(decades.text, "spend-by-day") == 312 and "month (UTC)" in decades.text
    assert len(decades.content) < 1_000_000
    overview = console.get("/console/overview", params={"from": "1980-01-15", "to": "2025-03-01"})
    assert overview.status_code == 200 and _points(overview.text, "latency-by-day") == 543
    # Past 50 years the range is refused before any query.
    longest = console.get("/console/usage", params={"from": "1970-01-01", "to": "9998-12-31"})
    assert longest.status_code == 400 and "too long" in longest.text


def test_a_monthly_range_counts_this_months_traffic(gw: Gateway, console: httpx.Client) -> None:
    key, _ = gw.create_key()
    client = gw.client(key)
    client.images.generate(model="gpt-image-1.5", prompt="a month", size="1024x1024")
    response = console.get("/console/usage", params={"from": "2000-01-01"})
    assert response.status_code == 200
    # The month's bar carries the request (its title names the month).
    months = re.findall(r"<title>(\d{4}-\d{2}): ([0-9,]+) requests</title>", response.text)
    assert months and sum(int(n.replace(",", "")) for _, n in months) >= 1


@pytest.mark.parametrize(
    "path",
    [
        "/console/requests?model=a%00b",
        "/console/requests?status=%00",
        "/console/tasks?key_id=k%00",
        "/console/moderation?category=%00",
        "/console/keys?q=%00",
        "/console/usage?model=%00",
    ],
)
def test_a_nul_in_a_console_filter_is_a_400(console: httpx.Client, path: str) -> None:
    response = console.get(path)
    assert response.status_code == 400, response.text[:300]
    assert "NUL" in response.text


def test_a_nul_in_api_filters_and_key_names_is_a_400(gw: Gateway) -> None:
    key, key_id = gw.create_key()
    tenant = {"Authorization": f"Bearer {key}"}
    for path in ["/v1/usage?model=x%00", "/v1/tasks?status=%00", "/v1/images/generations%00"]:
        response = httpx.get(gw.url + path, headers=tenant)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    admin = gw.admin("GET", "/admin/usage", params={"key_id": "a\x00b"})
    assert admin.status_code == 400
    created = gw.admin("POST", "/admin/keys", json={"name": "bad\x00name"})
    # FastAPI reads this body itself and answers its own parse error (still OpenAI-shaped).
    assert created.status_code == 400 and created.json()["error"]["type"] == "invalid_request_error"
    generation = httpx.post(
        gw.url + "/v1/images/generations", json={"model": "gpt-image-1.5", "prompt": "a\x00"}, headers=tenant
    )
    assert generation.status_code == 400 and "NUL" in generation.json()["error"]["message"]
    patched = gw.admin("PATCH", f"/admin/keys/{key_id}", json={"name": "x\x00"})
    assert patched.status_code == 400
    # The text "\u0000" (an escaped backslash) is not a NUL and is kept as written.
    literal = gw.admin("POST", "/admin/keys", json={"name": "literal \\u0000 text"})
    assert literal.status_code == 201 and literal.json()["name"] == "literal \\u0000 text"


def test_a_nul_in_a_console_form_is_a_400(gw: Gateway, console: httpx.Client) -> None:
    token = csrf_of(console)
    response = console.post(
        "/console/keys", data={"name": "form\x00name", "csrf_token": token}, headers={"origin": gw.url}
    )
    assert response.status_code == 400, response.text[:300]


def test_idempotency_keys_up_to_255_characters(gw: Gateway) -> None:
    key, _ = gw.create_key()
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-image-1.5", "prompt": "long key", "size": "1024x1024"}
    url = gw.url + "/v1/images/generations?async=true"
    longest = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "k" * 255}, timeout=30)
    assert longest.status_code == 202, longest.text
    again = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "k" * 255}, timeout=30)
    assert again.status_code == 202 and again.json()["id"] == longest.json()["id"]
    over = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "k" * 256}, timeout=30)
    assert over.status_code == 400, over.text
    assert over.json()["error"]["param"] == "Idempotency-Key"
    assert len(gw.query("SELECT id FROM tasks WHERE idempotency_key LIKE 'kkk%'")) == 1


def _exchange(conn: socket.socket, request: bytes) -> bytes:
    conn.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = conn.recv(65536)
        assert chunk, "the connection was closed"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the connection was closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_500_leaves_the_keep_alive_connection_usable(gw: Gateway, monkeypatch: Any) -> None:
    state = gw.server.app.state.gateway

    async def broken() -> int:
        raise RuntimeError("a bug that is not the client's")

    monkeypatch.setattr(state.tasks.queue, "depth", broken)
    client = signed_in(gw)
    cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        first = _exchange(
            conn, f"GET /console/overview HTTP/1.1\r\nHost: gw\r\nCookie: {cookie}\r\n\r\n".encode()
        )
        assert first.startswith(b"HTTP/1.1 500")
        assert b'"type":"api_error"' in first and b"RuntimeError" not in first
        # The same connection answers the next request.
        second = _exchange(conn, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 200")


def test_out_of_range_and_nul_never_reach_a_500_in_the_log(
    gw: Gateway, console: httpx.Client, caplog: Any
) -> None:
    with caplog.at_level("ERROR"):
        for path in [
            "/console/usage?to=9999-12-31",
            "/console/requests?model=%00",
            "/console/overview?from=0001-01-01",
        ]:
            assert console.get(path).status_code == 400
    assert "unhandled error" not in caplog.text
