"""The console's Requests page over the request log (issue 26): search, filters, CSV, detail."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import httpx
import openai
import pytest

from tests.api.test_console import csrf_of, signed_in
from tests.conftest import LOCAL_UPSTREAM, Gateway

ALWAYS = "a dismembered corpse"


@pytest.fixture
def gw(gateway_with: Any) -> Gateway:
    gateway: Gateway = gateway_with(LOCAL_UPSTREAM)
    return gateway


def ids_on(client: httpx.Client, query: str = "") -> list[str]:
    response = client.get("/console/requests" + query)
    assert response.status_code == 200, response.text
    return re.findall(r'<tr data-request-id="([^"]+)"', response.text)


def test_search_filters_csv_and_detail(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    acme, acme_id = gw.create_key(name="acme-prod")
    other, _ = gw.create_key(name="globex-dev")
    ok = gw.client(acme).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a kite", size="1024x1024"
    )
    with pytest.raises(openai.BadRequestError) as blocked:
        gw.client(acme).images.generate(model="gpt-image-1", prompt=ALWAYS)
    with pytest.raises(openai.BadRequestError) as invalid:
        gw.client(other).images.generate(model="gpt-image-1", prompt="a cat", size="7x7")
    ok_id = ok.headers["x-request-id"]
    blocked_id = blocked.value.response.headers["x-request-id"]
    invalid_id = invalid.value.response.headers["x-request-id"]

    operator = signed_in(gw)
    # The page shows this node's entries at once (it writes what is queued before reading).
    assert ids_on(operator) == [invalid_id, blocked_id, ok_id]
    # Search: error text (any case), key name, request id, error code.
    assert ids_on(operator, "?q=SUPPORTED+VALUES") == [invalid_id]
    assert ids_on(operator, "?q=acme") == [blocked_id, ok_id]
    assert ids_on(operator, f"?q={ok_id}") == [ok_id]
    assert ids_on(operator, "?q=moderation_blocked") == [blocked_id]
    # A LIKE wildcard is searched for literally.
    assert ids_on(operator, "?q=%25") == []
    # Filters: status class, model, upstream, key, date range.
    assert ids_on(operator, "?status=blocked") == [blocked_id]
    assert ids_on(operator, "?status=4xx") == [invalid_id]
    assert ids_on(operator, "?status=ok&upstream=local") == [ok_id]
    assert ids_on(operator, f"?key_id={acme_id}") == [blocked_id, ok_id]
    assert ids_on(operator, "?from=2000-01-01&to=2000-01-02") == []
    assert operator.get("/console/requests?status=nope").status_code == 400
    assert operator.get("/console/requests?from=yesterday").status_code == 400
    # Key names, with the id beside them.
    page = operator.get("/console/requests").text
    assert "acme-prod" in page and "globex-dev" in page and acme_id in page

    # Keyset pages, two rows a page (the gateway runs in this process), filters kept: none twice.
    monkeypatch.setattr("app.api.console.pages.PAGE_SIZE", 2)
    seen: list[str] = []
    pages = 0
    query = "?upstream="
    while True:
        response = operator.get("/console/requests" + query)
        seen.extend(re.findall(r'<tr data-request-id="([^"]+)"', response.text))
        pages += 1
        found = re.search(r'rel="next" href="\?([^"]+)"', response.text)
        if not found:
            break
        query = "?" + found.group(1).replace("&amp;", "&")
    assert (seen, pages) == ([invalid_id, blocked_id, ok_id], 2)
    assert ids_on(operator, "?q=acme") == [blocked_id, ok_id]
    assert 'rel="next"' not in operator.get("/console/requests?q=acme").text

    # CSV: the same rows and filters; never the secret.
    exported = operator.get("/console/requests.csv?q=acme")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["request_id"] for r in rows] == [blocked_id, ok_id]
    assert rows[0]["status_class"] == "blocked" and rows[0]["key_name"] == "acme-prod"
    assert acme not in exported.text

    # Detail: the refused request's whole entry, and "no ledger row"; the admitted one's ledger row.
    detail = operator.get(f"/console/requests/{blocked_id}").text
    assert "moderation_blocked" in detail and "No ledger row" in detail
    detail = operator.get(f"/console/requests/{ok_id}").text
    assert 'class="detail ledger-row"' in detail and 'id="log-entry"' in detail


def test_a_tenant_sees_only_their_own_entries(gw: Gateway) -> None:
    mine, _ = gw.create_key(name="tenant-a")
    theirs, theirs_id = gw.create_key(name="tenant-b")
    with pytest.raises(openai.BadRequestError) as own:
        gw.client(mine).images.generate(model="gpt-image-1", prompt="a cat", size="7x7")
    with pytest.raises(openai.BadRequestError) as other:
        gw.client(theirs).images.generate(model="gpt-image-1", prompt="a cat", size="7x7")
    own_id = own.value.response.headers["x-request-id"]
    other_id = other.value.response.headers["x-request-id"]
    tenant = signed_in(gw, mine)
    assert ids_on(tenant) == [own_id]
    # Another key named in the filter or the search is not theirs to see.
    assert ids_on(tenant, f"?key_id={theirs_id}") == [own_id]
    assert ids_on(tenant, "?q=tenant-b") == []
    assert ids_on(tenant, f"?q={other_id}") == []
    assert tenant.get(f"/console/requests/{other_id}").status_code == 404
    assert tenant.get(f"/console/requests/{own_id}").status_code == 200
    exported = tenant.get("/console/requests.csv").text
    assert own_id in exported and other_id not in exported


def test_task_pages_and_cancel_are_scoped_to_the_tenants_key(gateway_with: Any) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM, tasks={"workers": 0})
    mine, _ = gw.create_key(name="tenant-a")
    theirs, theirs_id = gw.create_key(name="tenant-b")

    def queued(key: str) -> str:
        raw = gw.client(key).images.with_raw_response.generate(
            model="gpt-image-1", prompt="later", size="1024x1024", extra_query={"async": "true"}
        )
        task_id: str = raw.http_response.json()["id"]
        return task_id

    own_task, other_task = queued(mine), queued(theirs)
    tenant = signed_in(gw, mine)
    token = csrf_of(tenant, "/console/tasks")
    origin = {"origin": gw.url}
    assert tenant.get(f"/console/tasks/{other_task}").status_code == 404
    refused = tenant.post(f"/console/tasks/{other_task}/cancel", data={"csrf_token": token}, headers=origin)
    assert refused.status_code == 404
    assert gw.query(f"SELECT status FROM tasks WHERE id = '{other_task}'") == [{"status": "queued"}]
    assert gw.key_row(theirs_id)["reserved_micros"] > 0
    # Without the CSRF token nothing happens either.
    assert tenant.post(f"/console/tasks/{own_task}/cancel", headers=origin).status_code == 403
    done = tenant.post(f"/console/tasks/{own_task}/cancel", data={"csrf_token": token}, headers=origin)
    assert done.status_code == 303 and done.headers["location"].endswith("?cancelled=1")
    assert gw.query(f"SELECT status FROM tasks WHERE id = '{own_task}'") == [{"status": "cancelled"}]
    page = tenant.get(f"/console/tasks/{own_task}").text
    assert "task_cancelled" in page and "Cancel task" not in page
    # The operator may cancel any key's task.
    operator = signed_in(gw)
    token = csrf_of(operator, "/console/tasks")
    done = operator.post(f"/console/tasks/{other_task}/cancel", data={"csrf_token": token}, headers=origin)
    assert done.status_code == 303
    assert gw.key_row(theirs_id)["reserved_micros"] == 0


def test_the_operator_playground_asks_which_key_to_bill(gw: Gateway) -> None:
    _, key_id = gw.create_key(name="newest")
    operator = signed_in(gw)
    page = operator.get("/console/playground").text
    # No key chosen: nothing to run yet, and no key silently picked.
    assert 'id="choose-key"' in page and 'id="playground"' not in page
    assert re.search(r'<option value="" selected>', page)
    assert f'<option value="{key_id}" selected' not in page
    chosen = operator.get(f"/console/playground?as={key_id}").text
    assert 'id="playground"' in chosen and f'<option value="{key_id}" selected' in chosen
    # A post without a key is refused, never billed to a default.
    token = csrf_of(operator, f"/console/playground?as={key_id}")
    refused = operator.post(
        "/console/playground/generations",
        json={"model": "gpt-image-1", "prompt": "a cat"},
        headers={"x-csrf-token": token},
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "key_id"
    assert gw.ledger() == []
