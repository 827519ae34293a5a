"""The console's HTTP contract without a browser: sessions, cookies, CSRF, CSP, scoping, thumbnails."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.console.sessions import SessionStore
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from tests.conftest import ADMIN_KEY, LOCAL_UPSTREAM, Gateway

PAGES = [
    "/console/overview",
    "/console/keys",
    "/console/keys/new",
    "/console/usage",
    "/console/requests",
    "/console/tasks",
    "/console/moderation",
    "/console/upstreams",
    "/console/playground",
]


def signed_in(gw: Gateway, key: str = ADMIN_KEY, **headers: str) -> httpx.Client:
    client = httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30)
    gw.closing(client)
    response = client.post("/console/login", data={"api_key": key}, headers=headers)
    assert response.status_code == 303, response.text
    return client


def csrf_of(client: httpx.Client, path: str = "/console/keys/new") -> str:
    match = re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).text)
    assert match
    return match.group(1)


@pytest.fixture
def gw(gateway_with: Any) -> Gateway:
    gateway: Gateway = gateway_with(LOCAL_UPSTREAM)
    return gateway


def test_the_session_cookie_is_httponly_strict_scoped_and_secure_behind_https(gw: Gateway) -> None:
    response = httpx.post(gw.url + "/console/login", data={"api_key": ADMIN_KEY})
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie
    # uvicorn trusts X-Forwarded-Proto from loopback: the same gateway behind a TLS proxy.
    behind_tls = httpx.post(
        gw.url + "/console/login", data={"api_key": ADMIN_KEY}, headers={"x-forwarded-proto": "https"}
    )
    assert "Secure" in behind_tls.headers["set-cookie"]
    # The cookie is a random token; the database keeps only its SHA-256.
    token = re.search(r"gw_console=([^;]+)", cookie).group(1)  # type: ignore[union-attr]
    stored = [row["id"] for row in gw.query("SELECT id FROM console_sessions")]
    assert token not in stored and len(stored) == 2


def test_every_page_has_a_strict_csp_and_no_inline_script(gw: Gateway) -> None:
    client = signed_in(gw)
    for path in [*PAGES, "/console/login"]:
        response = client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "http" not in csp  # no third-party origin
        for tag in re.findall(r"<script[^>]*>", response.text):
            assert 'src="/console/static/' in tag or 'type="application/json"' in tag, (path, tag)
        assert " style=" not in response.text and "<style" not in response.text, path
        assert re.search(r"\son[a-z]+=", response.text) is None, path  # no inline handlers


def test_a_wrong_key_gets_no_session_and_a_revoked_key_loses_its_own(gw: Gateway) -> None:
    response = httpx.post(gw.url + "/console/login", data={"api_key": "sk-gw-nope"})
    assert response.status_code == 401 and "set-cookie" not in response.headers
    assert "Incorrect API key" in response.text
    key, key_id = gw.create_key(name="t")
    client = signed_in(gw, key)
    assert client.get("/console/usage").status_code == 200
    gw.admin("DELETE", f"/admin/keys/{key_id}")
    gone = client.get("/console/usage")
    assert gone.status_code == 303 and gone.headers["location"] == "/console/login"


def test_sign_out_ends_the_session_on_the_server(gw: Gateway) -> None:
    client = signed_in(gw)
    token = csrf_of(client)
    cookie = client.cookies.get("gw_console")
    refused = client.post("/console/logout", data={})
    assert refused.status_code == 403  # no CSRF token, no sign-out either
    out = client.post("/console/logout", data={"csrf_token": token})
    assert out.status_code == 303
    replay = httpx.get(gw.url + "/console/overview", cookies={"gw_console": cookie or ""})
    assert replay.status_code == 303 and replay.headers["location"] == "/console/login"


async def test_sessions_expire_absolutely_and_when_idle(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    await upgrade_head(engine)
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    store = SessionStore(create_sessionmaker(engine), ttl_s=3600, idle_s=600, clock=lambda: now[0])
    try:
        token, viewer = await store.open("tenant", "key_1")
        assert (await store.find(token)) == viewer
        now[0] += timedelta(seconds=599)
        assert await store.find(token) is not None  # a view refreshes the idle clock
        now[0] += timedelta(seconds=599)
        assert await store.find(token) is not None
        now[0] += timedelta(seconds=601)
        assert await store.find(token) is None  # idle too long
        token, _ = await store.open("operator", None)
        for _ in range(7):
            now[0] += timedelta(seconds=540)
            found = await store.find(token)
        assert found is None  # 63 minutes after sign-in, however busy
        assert await store.find("not-a-token") is None and await store.find(None) is None
    finally:
        await engine.dispose()


def test_state_changes_need_the_token_and_our_origin(gw: Gateway) -> None:
    client = signed_in(gw)
    token = csrf_of(client)
    body = {"name": "k", "all_models": "1", "csrf_token": token}
    assert client.post("/console/keys", data={**body, "csrf_token": "x"}).status_code == 403
    assert (
        client.post("/console/keys", data={k: v for k, v in body.items() if k != "csrf_token"}).status_code
        == 403
    )
    foreign = client.post("/console/keys", data=body, headers={"origin": "http://evil.example"})
    assert foreign.status_code == 403
    assert client.post("/console/keys", data=body, headers={"origin": "null"}).status_code == 403
    assert [k["name"] for k in gw.admin("GET", "/admin/keys").json()["data"]] == []
    made = client.post("/console/keys", data=body, headers={"origin": gw.url})
    assert made.status_code == 201 and "sk-gw-" in made.text
    # Login CSRF: a foreign page cannot sign a browser in.
    login = httpx.post(
        gw.url + "/console/login", data={"api_key": ADMIN_KEY}, headers={"origin": "http://evil.example"}
    )
    assert login.status_code == 403 and "set-cookie" not in login.headers
    # The playground's JSON posts carry the token in a header.
    play = client.post("/console/playground/generations", json={"model": "gpt-image-1", "prompt": "x"})
    assert play.status_code == 403


def test_playground_errors_are_the_apis_own(gw: Gateway) -> None:
    key, key_id = gw.create_key(name="p", models=["gpt-image-1"])
    client = signed_in(gw, key)
    token = csrf_of(client, "/console/playground")
    bad = {"model": "gpt-image-1", "prompt": "a cat", "size": "999x3"}
    console = client.post("/console/playground/generations", json=bad, headers={"x-csrf-token": token})
    api = httpx.post(gw.url + "/v1/images/generations", json=bad, headers={"authorization": f"Bearer {key}"})
    assert console.status_code == api.status_code == 400
    assert console.json() == api.json() and api.json()["error"]["param"] == "size"
    denied = client.post(
        "/console/playground/generations",
        json={**bad, "model": "dall-e-3", "size": "1024x1024"},
        headers={"x-csrf-token": token},
    )
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    # An operator acts as a key chosen by id; the request is billed to that key.
    operator = signed_in(gw)
    op_token = csrf_of(operator, "/console/playground")
    ok = operator.post(
        f"/console/playground/generations?as={key_id}",
        json={"model": "gpt-image-1", "prompt": "a cat", "size": "1024x1024", "quality": "low"},
        headers={"x-csrf-token": op_token},
    )
    assert ok.status_code == 200 and float(ok.headers["x-gateway-cost"]) > 0
    (row,) = gw.query(
        f"SELECT key_id, cost_micros FROM ledger_entries WHERE request_id = '{ok.headers['x-request-id']}'"
    )
    assert row["key_id"] == key_id
    detail = operator.get(f"/console/api/requests/{ok.headers['x-request-id']}").json()
    assert detail["cost"] == ok.headers["x-gateway-cost"]


def test_thumbnails_are_off_by_default_and_follow_the_key_switch(gw: Gateway) -> None:
    plain, _ = gw.create_key(name="plain")
    keen, keen_id = gw.create_key(name="keen", thumbnails=True)
    assert gw.admin("GET", f"/admin/keys/{keen_id}").json()["thumbnails"] is True
    for key in (plain, keen):
        gw.client(key).images.generate(
            model="gpt-image-1", prompt="a pear", size="1024x1536", quality="low", n=2
        )
    stream = gw.client(keen).images.generate(
        model="gpt-image-1", prompt="a plum", size="1024x1024", quality="low", stream=True, partial_images=1
    )
    assert [e.type for e in stream][-1] == "image_generation.completed"
    rows = _wait_for_thumbnails(gw, 3)
    assert {r["key_id"] for r in rows} == {keen_id}
    assert sorted((r["width"], r["height"]) for r in rows) == [(85, 128), (85, 128), (128, 128)]
    tenant = signed_in(gw, keen)
    image = tenant.get(f"/console/thumbs/{rows[0]['image']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    assert image.content[:4] == b"RIFF" and image.content[8:12] == b"WEBP" and len(image.content) < 8000
    assert signed_in(gw, plain).get(f"/console/thumbs/{rows[0]['image']}").status_code == 404
    # Switched off for the key: no more thumbnails, even with the gateway default on.
    gw.admin("PATCH", f"/admin/keys/{keen_id}", json={"thumbnails": False})
    gw.client(keen).images.generate(model="gpt-image-1", prompt="a fig", size="1024x1024", quality="low")
    assert len(gw.query("SELECT id FROM request_thumbnails")) == 3


def _wait_for_thumbnails(gw: Gateway, count: int) -> list[dict[str, Any]]:
    import time

    # Thumbnails are made after the answer, in the background: wait for the rows, bounded.
    for _ in range(200):
        rows = gw.query("SELECT * FROM request_thumbnails ORDER BY id")
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"expected {count} thumbnails, found {len(rows)}")


def test_a_tenant_csv_is_their_own_v1_usage(gw: Gateway) -> None:
    mine, my_id = gw.create_key(name="a")
    theirs, _ = gw.create_key(name="b")
    for key in (mine, theirs):
        gw.client(key).images.generate(model="gpt-image-1", prompt="a kite", size="1024x1024", quality="low")
    client = signed_in(gw, mine)
    today = datetime.now(UTC).date()
    span = f"from={today.isoformat()}&to={(today + timedelta(days=1)).isoformat()}"
    console = client.get(f"/console/usage.csv?{span}&key_id=someone-else&group_by=key").text
    own = httpx.get(
        gw.url + f"/v1/usage?{span}&group_by=day&format=csv", headers={"authorization": f"Bearer {mine}"}
    )
    assert console == own.text
    admin = gw.admin("GET", f"/admin/usage?{span}&key_id={my_id}&group_by=day&format=csv")
    assert console == admin.text


def test_a_failing_thumbnailer_never_costs_a_request_or_its_charge(gateway_with: Any) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM, console={"thumbnails": True})
    sink = gw.server.app.state.gateway.images._sink

    def broken(**_: Any) -> None:
        raise RuntimeError("disk full")

    sink.keep = broken
    key, key_id = gw.create_key(name="t")
    client = gw.client(key)
    client.images.generate(model="gpt-image-1", prompt="a pear", size="1024x1024", quality="low")
    events = list(
        client.images.generate(
            model="gpt-image-1",
            prompt="a plum",
            size="1024x1024",
            quality="low",
            stream=True,
            partial_images=1,
        )
    )
    assert events[-1].type == "image_generation.completed"
    rows = gw.ledger()
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"] and all(
        r["cost_micros"] > 0 for r in rows
    )
    assert gw.key_row(key_id)["spent_micros"] == sum(r["cost_micros"] for r in rows)
    assert gw.query("SELECT id FROM request_thumbnails") == []


async def test_closed_days_are_read_once_and_today_live(tmp_path: Path) -> None:
    from app.billing.reports import UsageFilter, activity
    from app.console.activity import ActivityCache, by_group
    from app.db.tables import LedgerEntry

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    await upgrade_head(engine)
    sessions = create_sessionmaker(engine)
    now = datetime(2026, 12, 10, 15, 0, tzinfo=UTC)

    async def add(at: datetime, cost: int, key: str = "key_a", status: str = "succeeded") -> None:
        async with sessions.begin() as session:
            session.add(
                LedgerEntry(
                    request_id="r",
                    key_id=key,
                    model="gpt-image-1",
                    upstream="local",
                    endpoint="generations",
                    status=status,
                    images=1,
                    cost_micros=cost,
                    latency_ms=100,
                    created_at=at,
                )
            )

    try:
        for day in range(1, 11):
            await add(datetime(2026, 12, day, 12, tzinfo=UTC), 1_000 * day)
        await add(datetime(2026, 12, 3, 1, tzinfo=UTC), 7, key="key_b", status="failed")
        cache = ActivityCache(clock=lambda: now)
        where = UsageFilter(start=datetime(2026, 12, 1, tzinfo=UTC), end=datetime(2026, 12, 11, tzinfo=UTC))
        for group_by in ("day", "model", "key"):
            cached = by_group(await cache.rows(sessions, where=where, group_by=group_by))  # type: ignore[arg-type]
            direct = by_group(await activity(sessions, where=where, group_by=group_by))  # type: ignore[arg-type]
            assert cached == direct, group_by
        assert by_group(await cache.rows(sessions, where=where, group_by="key"))["key_b"].errors == 1
        # A row slipped into a closed day is not read again; today's rows are always live.
        await add(datetime(2026, 12, 4, 12, tzinfo=UTC), 1)
        await add(datetime(2026, 12, 10, 14, tzinfo=UTC), 5)
        days = by_group(await cache.rows(sessions, where=where, group_by="day"))
        assert days["2026-12-04"].cost_micros == 4_000
        assert days["2026-12-10"].cost_micros == 10_005
        # Within the grace period after midnight, yesterday is still read live.
        early = ActivityCache(clock=lambda: datetime(2026, 12, 11, 0, 5, tzinfo=UTC))
        await early.rows(sessions, where=where, group_by="day")
        await add(datetime(2026, 12, 10, 23, 59, tzinfo=UTC), 3)
        assert (
            by_group(await early.rows(sessions, where=where, group_by="day"))["2026-12-10"].cost_micros
            == 10_008
        )
    finally:
        await engine.dispose()
