"""The console in a real browser (acceptance 1 of issue 18).

Each test drives Debian's Chromium against a gateway on loopback served by the `local` renderer,
and checks what the page shows against what the API and the database say.
"""

from __future__ import annotations

import csv
import http.server
import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot, sign_in
from tests.conftest import Gateway

ALWAYS_BLOCKED = "a dismembered corpse"


def _new_key_in_console(page: Any, gateway: Gateway, name: str) -> tuple[str, str]:
    page.goto(gateway.url + "/console/keys")
    page.get_by_role("link", name="New key").click()
    page.get_by_label("Name").fill(name)
    page.get_by_label("Owner / tenant").fill("acme")
    page.get_by_label("Requests per minute").fill("50")
    page.get_by_label("Balance").fill("25")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label(f"API key for “{name}”").input_value()
    key_id = page.locator("#new-key-id").inner_text()
    return secret, key_id


def test_operator_creates_a_key_shown_once_and_its_edited_limits_bind_the_api(
    console_gateway: Gateway, new_page: Any
) -> None:
    page = new_page()
    sign_in(page, console_gateway)
    secret, key_id = _new_key_in_console(page, console_gateway, "journey")
    assert re.fullmatch(r"sk-gw-[A-Za-z0-9_-]{20,}", secret)
    row = console_gateway.key_row(key_id)
    assert row["rpm"] == 50 and row["balance_micros"] == 25_000_000 and row["owner"] == "acme"

    # Never again: not on the key's page, not in the list, not after a reload.
    page.goto(console_gateway.url + f"/console/keys/{key_id}")
    assert secret not in page.content()
    page.goto(console_gateway.url + "/console/keys?q=journey")
    assert secret not in page.content()
    expect(page.locator(f'tr[data-key-id="{key_id}"]')).to_have_count(1)  # retried, not sampled once

    # Edit: one model only, 2 requests a minute.
    page.goto(console_gateway.url + f"/console/keys/{key_id}")
    page.get_by_label("Every model the gateway serves").uncheck()
    page.get_by_role("group", name="Allowed models").get_by_label("gpt-image-1", exact=True).check()
    page.get_by_label("Requests per minute").fill("2")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_url(re.compile(r".*\?saved=1$"))
    assert page.get_by_label("Requests per minute").input_value() == "2"

    client = console_gateway.client(secret)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.images.generate(model="gpt-image-1-mini", prompt="a red kite", size="1024x1024", quality="low")
    assert denied.value.code == "model_not_allowed"
    client.images.generate(model="gpt-image-1", prompt="a red kite", size="1024x1024", quality="low")
    client.images.generate(model="gpt-image-1", prompt="a blue kite", size="1024x1024", quality="low")
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(model="gpt-image-1", prompt="a third kite", size="1024x1024", quality="low")
    assert limited.value.code == "rate_limit_exceeded"

    # A bad value is refused beside its field, by the admin API's own rules.
    page.get_by_label("Price multiplier").fill("-2")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator('[data-error-for="price_multiplier"]')).to_contain_text("greater than 0")
    assert page.get_by_label("Price multiplier").get_attribute("aria-invalid") == "true"
    assert console_gateway.key_row(key_id)["price_multiplier_ppm"] == 1_000_000

    # Lift the rate limit again, then top up: both land on the key.
    page.goto(console_gateway.url + f"/console/keys/{key_id}")
    page.get_by_label("Requests per minute").fill("")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_url(re.compile(r".*\?saved=1$"))
    page.get_by_label("Amount (PTC)").fill("5")
    page.get_by_role("button", name="Add credit").click()
    page.wait_for_url(re.compile(r".*\?saved=1$"))
    row = console_gateway.key_row(key_id)
    assert row["rpm"] is None
    assert row["balance_micros"] == 30_000_000 - row["spent_micros"]
    assert page.console_errors == []


def test_tenant_playground_streams_two_partials_then_the_final_image_and_usage_shows_its_cost(
    console_gateway: Gateway, new_page: Any, tmp_path: Path
) -> None:
    secret, key_id = console_gateway.create_key(name="tenant-a")
    page = new_page()
    sign_in(page, console_gateway, secret)
    page.get_by_role("navigation").get_by_role("link", name="Playground").click()
    page.wait_for_url("**/console/playground")  # Tab in the new page, not the one being left
    page.keyboard.press("Tab")  # the first stop is the skip link, which lands on the content
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    # Focus follows the fragment once the browser has handled the key: wait for it, not for time.
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'main'")
    # Count every preview swapped into the page, whatever its timing.
    page.evaluate(
        """() => {
          window.__previews = [];
          const img = document.getElementById('p-preview');
          new MutationObserver(() => window.__previews.push(img.src))
            .observe(img, {attributes: true, attributeFilter: ['src']});
        }"""
    )
    page.get_by_label("Model", exact=True).select_option("gpt-image-1")
    page.get_by_label("Prompt").fill("a lighthouse at dawn, oil on canvas")
    page.get_by_label("Size", exact=True).select_option("1024x1024")
    page.get_by_label("Quality", exact=True).select_option("low")
    assert page.get_by_label("Stream").is_checked()
    page.get_by_label("Partial images").fill("2")
    # Keyboard only: focus the button and press Enter.
    page.get_by_role("button", name="Generate").focus()
    page.keyboard.press("Enter")

    final = page.locator("#p-results img.final")
    final.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#p-results img.final');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    page.locator("#p-cost[data-settled]").wait_for()

    previews = page.evaluate("() => window.__previews.filter(s => s.startsWith('blob:'))")
    assert len(previews) == 2 and len(set(previews)) == 2
    assert page.locator("#p-partial-count").inner_text() == "2"
    assert page.locator("#p-preview").get_attribute("data-sizes") == "1024x1024,1024x1024"
    assert final.count() == 1
    assert final.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [1024, 1024]
    assert page.get_by_role("link", name="Download image 1").get_attribute("download") == "image-1.png"

    request_id = page.locator("#p-request-id").inner_text()
    shown_cost = page.locator("#p-cost").inner_text()
    (entry,) = console_gateway.query(f"SELECT * FROM ledger_entries WHERE request_id = '{request_id}'")
    assert entry["key_id"] == key_id and entry["status"] == "succeeded" and entry["images"] == 1
    assert entry["cost_micros"] > 0
    assert shown_cost == f"{entry['cost_micros'] // 1_000_000}.{entry['cost_micros'] % 1_000_000:06d}"
    assert screenshot(page, "playground", tmp_path).stat().st_size > 10_000

    # The request log shows the row with its cost and the thumbnail kept for it.
    page.get_by_role("navigation").get_by_role("link", name="Requests").click()
    row = page.locator(f'tr[data-request-id="{request_id}"]')
    assert row.locator("td.cost").inner_text().startswith(shown_cost)
    thumb = row.locator("img.thumb")
    thumb.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert thumb.evaluate("i => Math.max(i.naturalWidth, i.naturalHeight)") == 128

    # Usage: the chart's bar for today and the CSV both carry the cost.
    page.get_by_role("navigation").get_by_role("link", name="Usage").click()
    assert page.locator("#usage-total-cost").inner_text() == shown_cost
    bar_titles = page.locator("#spend-by-day rect.bar title").all_text_contents()
    assert any(t.endswith(f": {shown_cost} PTC") for t in bar_titles), bar_titles
    assert any(shown_cost in t for t in page.locator("#spend-by-model rect.bar title").all_text_contents())
    with page.expect_download() as download:
        page.locator("#csv-link").click()
    text = open(download.value.path(), encoding="utf-8", newline="").read()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[-1]["day"] == "total" and rows[-1]["cost"] == shown_cost
    # ... and it is the admin API's report, byte for byte.
    href = page.locator("#csv-link").get_attribute("href")
    query = href.split("?", 1)[1] + f"&key_id={key_id}&format=csv"
    assert console_gateway.admin("GET", "/admin/usage?" + query).text == text
    assert page.console_errors == []


def test_a_moderation_block_shows_in_the_operators_audit_page(
    console_gateway: Gateway, new_page: Any
) -> None:
    secret, key_id = console_gateway.create_key(name="tenant-mod")
    with pytest.raises(openai.BadRequestError) as blocked:
        console_gateway.client(secret).images.generate(model="gpt-image-1", prompt=ALWAYS_BLOCKED)
    assert blocked.value.code == "moderation_blocked"
    page = new_page()
    sign_in(page, console_gateway)
    page.get_by_role("navigation").get_by_role("link", name="Moderation").click()
    page.get_by_label("Key", exact=True).select_option(key_id)
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#moderation-events tbody tr")
    expect(rows).to_have_count(1)  # retries until the filtered page has loaded
    assert rows.locator("td.stage").inner_text() == "input"
    assert "violence" in rows.locator("td.categories").inner_text()
    assert key_id in rows.inner_text()
    assert ALWAYS_BLOCKED not in page.content()  # prompts are stored hashed


def test_a_tenant_cannot_open_admin_pages_or_another_keys_request(
    console_gateway: Gateway, new_page: Any
) -> None:
    mine, my_id = console_gateway.create_key(name="tenant-b")
    theirs, their_id = console_gateway.create_key(name="tenant-c")
    raw = console_gateway.client(theirs).images.with_raw_response.generate(
        model="gpt-image-1", prompt="their secret picture", size="1024x1024", quality="low"
    )
    their_request = raw.headers["x-request-id"]
    my_raw = console_gateway.client(mine).images.with_raw_response.generate(
        model="gpt-image-1", prompt="my picture", size="1024x1024", quality="low"
    )
    my_request = my_raw.headers["x-request-id"]
    page = new_page()
    sign_in(page, console_gateway, mine)
    for path in (
        "/console/overview",
        "/console/keys",
        f"/console/keys/{their_id}",
        "/console/moderation",
        "/console/upstreams",
    ):
        response = page.goto(console_gateway.url + path)
        assert response.status == 403, path
        assert page.get_by_role("heading", name="Not allowed").is_visible()
    response = page.goto(console_gateway.url + f"/console/requests/{their_request}")
    assert response.status == 404
    response = page.goto(console_gateway.url + f"/console/api/requests/{their_request}")
    assert response.status == 404
    # A filter naming another key is ignored: a tenant's log is their own.
    page.goto(console_gateway.url + f"/console/requests?key_id={their_id}")
    # The page did render the tenant's log (their own request is listed), and not the other's.
    expect(page.locator(f'tr[data-request-id="{my_request}"]')).to_have_count(1)
    expect(page.locator(f'tr[data-request-id="{their_request}"]')).to_have_count(0)
    # The session cookie is no admin credential.
    response = page.goto(console_gateway.url + "/admin/keys")
    assert response.status == 401
    # The navigation offers no operator page.
    page.goto(console_gateway.url + "/console/usage")
    links = page.get_by_role("navigation").get_by_role("link").all_inner_texts()
    assert links == ["Usage", "Requests", "Tasks", "Playground", "Batches"]
    assert my_id in page.locator(".who").inner_text()
    # The header names the key; its id is on hover and beside it.
    expect(page.locator(".who .key-name")).to_have_text("tenant-b")
    expect(page.locator(".who .key-name")).to_have_attribute("title", my_id)


class _Attacker:
    """A page on another origin of the same site (another port): SameSite lets cookies through."""

    def __init__(self, target: str) -> None:
        page = f"""<!doctype html><html><body>
<form id="f" method="post" action="{target}/console/keys">
<input name="name" value="evil"><input name="csrf_token" value="guessed"><input name="all_models" value="1">
</form><form id="g" method="post" action="{target}/console/keys"><input name="name" value="evil2"></form>
<button id="go" onclick="document.getElementById('f').submit()">go</button>
<button id="go2" onclick="document.getElementById('g').submit()">go2</button>
</body></html>""".encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Attacker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attacker(console_gateway: Gateway) -> Iterator[_Attacker]:
    with _Attacker(console_gateway.url) as site:
        yield site


def test_a_forged_cross_site_form_post_is_refused(
    console_gateway: Gateway, new_page: Any, attacker: _Attacker
) -> None:
    page = new_page()
    sign_in(page, console_gateway)
    for button in ("#go", "#go2"):
        page.goto(attacker.url)
        with page.expect_navigation() as navigation:
            page.click(button)
        assert navigation.value.status == 403
        assert "CSRF check failed" in page.content()
    names = [k["name"] for k in console_gateway.admin("GET", "/admin/keys").json()["data"]]
    assert "evil" not in names and "evil2" not in names
    # The operator's own form, same browser, still works: the refusal was the forgery's.
    page.goto(console_gateway.url + "/console/keys/new")
    page.get_by_label("Name").fill("legit")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("heading", name="Key created")).to_be_visible()


def test_screenshots_of_overview_and_requests(
    console_gateway: Gateway, new_page: Any, tmp_path: Path
) -> None:
    secret, _ = console_gateway.create_key(name="screens")
    client = console_gateway.client(secret)
    for prompt in ("a fox in snow", "a harbour at night", "a bowl of lemons"):
        client.images.generate(model="gpt-image-1", prompt=prompt, size="1024x1024", quality="low")
    page = new_page()
    sign_in(page, console_gateway)
    expect(page.locator("#requests-by-day rect.bar")).to_have_count(14)
    assert page.locator("#total-requests").inner_text() != "0"
    assert screenshot(page, "overview", tmp_path).stat().st_size > 10_000
    page.get_by_role("navigation").get_by_role("link", name="Requests").click()
    # A retrying wait: the overview, still shown for a moment, has no rows (and no thumbnails).
    expect(page.locator("#requests tbody tr").nth(2)).to_be_attached()
    page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].every(i => i.complete)")
    assert screenshot(page, "requests", tmp_path).stat().st_size > 10_000
    # On a phone's width nothing but the tables' own scroll boxes is wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/console/requests", "/console/playground", "/console/overview", "/console/keys/new"):
        page.goto(console_gateway.url + path)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path
    page.set_viewport_size({"width": 1280, "height": 860})
    # Upstreams refresh themselves.
    page.get_by_role("navigation").get_by_role("link", name="Upstreams").click()
    # Null-safe: evaluated while the old page may still be shown (a TypeError there fails the wait
    # at once instead of retrying, as a run under a CPU hog showed); the timeout bounds a hang only.
    page.wait_for_url("**/console/upstreams*", timeout=120_000)
    page.wait_for_function(
        "() => document.getElementById('upstreams')?.hasAttribute('data-refreshed') === true",
        timeout=120_000,
    )
    assert page.console_errors == []


def _png(width: int, height: int, *, alpha: bool = False) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(
        "RGBA" if alpha else "RGB", (width, height), (200, 120, 40, 0) if alpha else (200, 120, 40)
    ).save(out, format="PNG")
    return out.getvalue()


def test_playground_shows_the_apis_errors_beside_their_field_and_edits_with_a_mask(
    console_gateway: Gateway, new_page: Any
) -> None:
    secret, key_id = console_gateway.create_key(name="tenant-edit")
    page = new_page()
    sign_in(page, console_gateway, secret)
    page.goto(console_gateway.url + "/console/playground")
    page.get_by_label("Model", exact=True).select_option("gpt-image-1")
    # No prompt: the API's own 400 lands beside the prompt field.
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-error-for="prompt"]')
    error.wait_for()
    assert "prompt" in error.inner_text().lower()
    assert page.get_by_label("Prompt").get_attribute("aria-invalid") == "true"
    # The size control offers the catalog's sizes for the model, nothing else.
    assert page.locator("#p-size option").all_inner_texts() == ["auto", "1024x1024", "1536x1024", "1024x1536"]
    page.get_by_label("Prompt").fill("put a hat on it")
    page.get_by_label("Edit").check()
    assert page.get_by_role("button", name="Edit").is_visible()
    page.get_by_label("Input images").set_input_files(
        [{"name": "a.png", "mimeType": "image/png", "buffer": _png(1024, 1024)}]
    )
    page.get_by_label("Mask (png with alpha, optional)").set_input_files(
        [{"name": "m.png", "mimeType": "image/png", "buffer": _png(1024, 1024, alpha=True)}]
    )
    page.get_by_label("Size", exact=True).select_option("1024x1024")
    page.get_by_label("Quality", exact=True).select_option("low")
    page.get_by_label("Stream").uncheck()
    assert not page.get_by_label("Partial images").is_visible()
    page.get_by_role("button", name="Edit").click()
    final = page.locator("#p-results img.final")
    final.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector('#p-results img.final');"
        " return i && i.complete && i.naturalWidth > 0; }"
    )
    assert final.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [1024, 1024]
    request_id = page.locator("#p-request-id").inner_text()
    (entry,) = console_gateway.query(f"SELECT * FROM ledger_entries WHERE request_id = '{request_id}'")
    assert entry["endpoint"] == "edits" and entry["key_id"] == key_id and entry["image_input_tokens"] > 0
    assert (
        page.locator("#p-cost").inner_text()
        == f"{entry['cost_micros'] // 1_000_000}.{entry['cost_micros'] % 1_000_000:06d}"
    )
    assert page.console_errors == []


def test_a_refused_request_is_found_by_searching_its_error_text(
    console_gateway: Gateway, new_page: Any
) -> None:
    secret, key_id = console_gateway.create_key(name="refused-tenant")
    with pytest.raises(openai.BadRequestError) as refused:
        console_gateway.client(secret).images.generate(model="gpt-image-1", prompt="a cat", size="13x17")
    request_id = refused.value.response.headers["x-request-id"]
    page = new_page()
    sign_in(page, console_gateway)
    page.get_by_role("navigation").get_by_role("link", name="Requests").click()
    page.get_by_label("Search").fill("'13x17'")
    page.keyboard.press("Enter")
    row = page.locator(f'tr[data-request-id="{request_id}"]')
    expect(row).to_be_visible()
    expect(page.locator("#requests tbody tr")).to_have_count(1)
    # The key's name, its id on hover; the error, truncated with its whole text as the title.
    expect(row.locator(".key-name")).to_have_text("refused-tenant")
    expect(row.locator(".key-name")).to_have_attribute("title", key_id)
    expect(row.locator("td.trunc")).to_have_attribute("title", re.compile("Invalid value: '13x17'"))
    row.get_by_role("link", name=request_id).click()
    expect(page.get_by_role("heading", name=re.compile("Request"))).to_contain_text(request_id)
    expect(page.locator("#log-entry")).to_contain_text("13x17")
    expect(page.get_by_text("No ledger row")).to_be_visible()

    # The tenant finds their own refused request too, by the same search.
    tenant = new_page()
    sign_in(tenant, console_gateway, secret)
    tenant.get_by_role("navigation").get_by_role("link", name="Requests").click()
    tenant.get_by_label("Search").fill("13x17")
    tenant.keyboard.press("Enter")
    expect(tenant.locator(f'tr[data-request-id="{request_id}"]')).to_be_visible()
    assert page.console_errors == [] and tenant.console_errors == []


@pytest.fixture
def idle_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway without task workers: an async request stays queued until someone cancels it."""
    from tests.browser.conftest import LOCAL_PACED
    from tests.conftest import make_settings, start_gateway

    gw = start_gateway(make_settings(tmp_path, [LOCAL_PACED], tasks={"workers": 0}), tmp_path)
    yield gw
    gw.close()


def test_a_task_is_cancelled_from_its_page_and_its_hold_released(
    idle_gateway: Gateway, new_page: Any
) -> None:
    secret, key_id = idle_gateway.create_key(name="task-owner", balance="5")
    raw = idle_gateway.client(secret).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a queued harbour", size="1024x1024", extra_query={"async": "true"}
    )
    task_id = raw.http_response.json()["id"]
    assert idle_gateway.key_row(key_id)["reserved_micros"] > 0
    page = new_page()
    sign_in(page, idle_gateway)
    page.get_by_role("navigation").get_by_role("link", name="Tasks").click()
    task_row = page.locator(f'tr[data-task-id="{task_id}"]')
    expect(task_row.locator(".key-name")).to_have_text("task-owner")
    task_row.get_by_role("link", name=task_id).click()
    expect(page.locator("#task-status")).to_have_text("queued")
    expect(page.locator(".key-name")).to_have_text("task-owner")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel task").click()
    expect(page.locator("#task-status")).to_have_text("cancelled")
    expect(page.get_by_role("status")).to_contain_text("hold was released")
    expect(page.locator("#task-error")).to_contain_text("task_cancelled")
    expect(page.locator("#no-ledger")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel task")).to_have_count(0)
    # On the ledger: the hold is gone, nothing was spent, the balance is whole, no row was written.
    row = idle_gateway.key_row(key_id)
    assert (row["reserved_micros"], row["spent_micros"], row["balance_micros"]) == (0, 0, 5_000_000)
    assert [r for r in idle_gateway.ledger() if r["key_id"] == key_id] == []
    # The API agrees.
    polled = idle_gateway.client(secret).get(f"/tasks/{task_id}", cast_to=object)  # type: ignore[call-overload]
    assert polled["status"] == "cancelled"
    assert page.console_errors == []


def test_a_tenant_sees_their_name_balance_and_limits_and_the_balance_moves(
    console_gateway: Gateway, new_page: Any
) -> None:
    from app.domain.money import format_micros

    secret, key_id = console_gateway.create_key(
        name="acme-tenant", balance="10", quota="20", monthly_quota="8", rpm=30, models=["gpt-image-1"]
    )
    page = new_page()
    sign_in(page, console_gateway, secret)
    expect(page.locator("#account .key-name")).to_have_text("acme-tenant")
    expect(page.locator("#account .key-name")).to_have_attribute("title", key_id)
    expect(page.locator("#account-balance")).to_have_text(format_micros(10_000_000))
    expect(page.locator("#account-limits")).to_contain_text("30")
    expect(page.locator("#account-models")).to_have_text("gpt-image-1")
    expect(page.locator("#quota-used")).to_have_attribute("value", "0")

    console_gateway.client(secret).images.generate(
        model="gpt-image-1", prompt="a moving balance", size="1024x1024", quality="low"
    )
    (charged,) = [r for r in console_gateway.ledger() if r["key_id"] == key_id]
    assert charged["cost_micros"] > 0
    page.reload()
    expect(page.locator("#account-balance")).to_have_text(format_micros(10_000_000 - charged["cost_micros"]))
    expect(page.locator("#account-spent")).to_have_text(format_micros(charged["cost_micros"]))
    expect(page.locator("#account-month")).to_have_text(format_micros(charged["cost_micros"]))
    expect(page.locator("#quota-used")).to_have_attribute("value", str(charged["cost_micros"]))
    assert page.console_errors == []


def test_a_webhook_is_redelivered_from_its_tasks_page(idle_gateway: Gateway, new_page: Any) -> None:
    from tests.fakes.webhook_receiver import WebhookReceiver

    receiver = WebhookReceiver()
    receiver.start()
    try:
        secret, key_id = idle_gateway.create_key(name="hooked-owner")
        created = idle_gateway.admin("POST", f"/admin/keys/{key_id}/webhooks", json={"url": receiver.url})
        receiver.secret = created.json()["secret"]
        raw = idle_gateway.client(secret).images.with_raw_response.generate(
            model="gpt-image-1", prompt="a hooked harbour", size="1024x1024", extra_query={"async": "true"}
        )
        task_id = raw.http_response.json()["id"]
        page = new_page()
        sign_in(page, idle_gateway)
        page.goto(idle_gateway.url + f"/console/tasks/{task_id}")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Cancel task").click()
        expect(page.locator("#task-status")).to_have_text("cancelled")
        (first,) = receiver.wait_for(1)
        assert first.verified and first.event["type"] == "image.task.cancelled"
        page.reload()
        row = page.locator("#deliveries tbody tr[data-delivery-id]")
        expect(row).to_have_count(1)
        expect(row.locator("td").nth(2)).to_have_text("delivered")
        delivery_id = row.get_attribute("data-delivery-id")
        assert delivery_id == first.headers["webhook-id"]
        row.get_by_role("button", name=f"Redeliver {delivery_id}").click()
        expect(page.get_by_role("status")).to_contain_text("being sent again")
        second = receiver.wait_for(2)[1]
        # The same event, the same webhook-id: receivers can tell it is a redelivery.
        assert second.verified and second.headers["webhook-id"] == delivery_id
        assert second.event["type"] == "image.task.cancelled"
        assert page.console_errors == []
    finally:
        receiver.stop()
