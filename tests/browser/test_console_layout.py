"""Layout of every console page with 200 rows of data (issue 26, acceptance 3).

At 1,440 px nothing scrolls sideways: not the page, and not a table inside its own scroll box
(the columns fit, long texts are cut with their whole text as the title). On a 390 px phone the
rows become cards and the page still fits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import LOCAL_PACED, sign_in
from tests.browser.seed import seed
from tests.conftest import Gateway, make_settings, start_gateway

DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}


class Seeded:
    def __init__(self, gateway: Gateway, tenant_secret: str, tenant_id: str, ids: dict[str, str]) -> None:
        self.gateway = gateway
        self.tenant_secret = tenant_secret
        self.tenant_id = tenant_id
        self.ids = ids

    def operator_pages(self) -> list[str]:
        return [
            "/console/overview",
            "/console/keys",
            f"/console/keys/{self.ids['key']}",
            "/console/keys/new",
            f"/console/keys/{self.tenant_id}/webhooks",
            "/console/usage",
            "/console/requests",
            f"/console/requests/{self.ids['request']}",
            "/console/tasks",
            f"/console/tasks/{self.ids['task']}",
            "/console/webhooks",
            "/console/moderation",
            "/console/upstreams",
            "/console/playground",
        ]

    def tenant_pages(self) -> list[str]:
        return ["/console/usage", "/console/requests", "/console/tasks", "/console/playground"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    data_dir = tmp_path_factory.mktemp("layout-gateway")
    # No task workers and no webhook sender: the seeded rows stay as written.
    settings = make_settings(
        data_dir,
        [LOCAL_PACED],
        tasks={"workers": 0},
        webhooks={"enabled": False},
        console={"thumbnails": True},
    )
    gw = start_gateway(settings, data_dir)
    secret, key_id = gw.create_key(name="layout-tenant", balance="100", quota="500", monthly_quota="50")
    ids = seed(settings.database.url, key_id)
    yield Seeded(gw, secret, key_id, ids)
    gw.close()


def overflow(page: Any) -> dict[str, Any]:
    """What is wider than its box: the document, and every table's scroll container."""
    result: dict[str, Any] = page.evaluate(
        """() => ({
          page: [document.documentElement.scrollWidth, window.innerWidth],
          boxes: [...document.querySelectorAll('.scroll')]
            .filter(b => b.scrollWidth > b.clientWidth + 1)
            .map(b => [(b.querySelector('table') || {}).id, b.scrollWidth, b.clientWidth]),
          // For the failure message: the outermost elements that stick out on the right.
          wide: [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > innerWidth + 1)
            .filter(e => !(e.parentElement && e.parentElement.getBoundingClientRect().right > innerWidth + 1))
            .slice(0, 5)
            .map(e => e.tagName + '#' + e.id + '.' + e.className),
        })"""
    )
    return result


def _visit_all(seeded: Seeded, new_page: Any, viewport: dict[str, int]) -> dict[str, Any]:
    failures: dict[str, Any] = {}
    for who, secret, paths in (
        ("operator", None, seeded.operator_pages()),
        ("tenant", seeded.tenant_secret, seeded.tenant_pages()),
    ):
        page = new_page(viewport=viewport)
        sign_in(page, seeded.gateway, *([secret] if secret else []))
        for path in paths:
            response = page.goto(seeded.gateway.url + path)
            assert response is not None and response.status == 200, (who, path)
            found = overflow(page)
            width, inner = found["page"]
            if width > inner or (viewport == DESKTOP and found["boxes"]):
                failures[f"{who} {path}"] = found
        assert page.console_errors == []
    return failures


def test_every_page_fits_1440_px_with_200_rows(seeded: Seeded, new_page: Any) -> None:
    page = new_page(viewport=DESKTOP)
    sign_in(page, seeded.gateway)
    # The data is there: 200 keys (and the tenant's), 200 deliveries, 200 tasks on the page.
    page.goto(seeded.gateway.url + "/console/keys")
    assert page.locator("#keys tbody tr").count() >= 201
    page.goto(seeded.gateway.url + "/console/webhooks")
    assert page.locator("#deliveries tbody tr").count() == 200
    assert _visit_all(seeded, new_page, DESKTOP) == {}


def test_on_a_phone_rows_are_cards_and_nothing_scrolls_sideways(seeded: Seeded, new_page: Any) -> None:
    assert _visit_all(seeded, new_page, PHONE) == {}
    page = new_page(viewport=PHONE)
    sign_in(page, seeded.gateway)
    page.goto(seeded.gateway.url + "/console/requests")
    row = page.locator("#requests tbody tr").first
    # A card: the row is a block, its header row is hidden, each cell names its column.
    assert row.evaluate("r => getComputedStyle(r).display") == "block"
    assert page.locator("#requests thead").evaluate("h => getComputedStyle(h).display") == "none"
    assert row.locator("td[data-label='Status']").count() == 1


AXE = Path(__file__).resolve().parents[1] / "node" / "node_modules" / "axe-core" / "axe.min.js"


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's violations on the page as it is now (all of its default rules)."""
    page.add_script_tag(path=str(AXE))
    found: list[dict[str, Any]] = page.evaluate(
        """async () => {
          const result = await axe.run(document, {resultTypes: ['violations']});
          return result.violations.map(v => ({
            id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ') + ' :: ' + n.failureSummary),
          }));
        }"""
    )
    return found


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1440x900", "390x844"])
def test_axe_finds_no_violation_on_any_page(
    seeded: Seeded, new_page: Any, scheme: str, viewport: dict[str, int]
) -> None:
    if not AXE.exists():
        # As with Chromium (conftest.py): in CI its absence is a broken machine, not an extra.
        message = f"axe-core is missing ({AXE}): `make install` runs `npm ci` in tests/node"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    failures: dict[str, Any] = {}
    # The pages forbid inline script (CSP); axe is injected by the test, so the test lifts it.
    signed_out = new_page(viewport=viewport, color_scheme=scheme, bypass_csp=True)
    signed_out.goto(seeded.gateway.url + "/console/login")
    if found := axe_violations(signed_out):
        failures["/console/login"] = found
    for who, secret, paths in (
        ("operator", None, seeded.operator_pages()),
        ("tenant", seeded.tenant_secret, seeded.tenant_pages()),
    ):
        page = new_page(viewport=viewport, color_scheme=scheme, bypass_csp=True)
        sign_in(page, seeded.gateway, *([secret] if secret else []))
        for path in paths:
            page.goto(seeded.gateway.url + path)
            if found := axe_violations(page):
                failures[f"{who} {path}"] = found
    assert failures == {}, json.dumps(failures, indent=1)


CONSOLE_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"


def test_screenshots_light_and_dark_desktop_and_phone(seeded: Seeded, new_page: Any, tmp_path: Path) -> None:
    """README's console pictures, from this data (``UPDATE_SCREENSHOTS=1`` writes docs/console/)."""
    from tests.browser.conftest import SCREENSHOTS_UPDATE

    folder = CONSOLE_SHOTS if SCREENSHOTS_UPDATE else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    shots = [("overview", "/console/overview"), ("keys", "/console/keys"), ("requests", "/console/requests")]
    for scheme in ("light", "dark"):
        for device, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page = new_page(viewport=viewport, color_scheme=scheme)
            sign_in(page, seeded.gateway)
            for name, path in shots:
                page.goto(seeded.gateway.url + path)
                page.wait_for_function("() => [...document.images].every(i => i.complete)")
                target = folder / f"{name}-{scheme}-{device}.png"
                page.screenshot(path=str(target))  # the first screen, as a visitor sees it
                assert target.stat().st_size > 10_000, target
            assert page.console_errors == []


def test_a_text_search_walks_the_log_a_window_at_a_time_and_misses_nothing(
    seeded: Seeded, new_page: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.console.queries as queries

    # 200 seeded entries, 150 of them with the long error; a window of 50 entries a page.
    monkeypatch.setattr(queries, "SEARCH_WINDOW", 50)
    page = new_page(viewport=DESKTOP)
    sign_in(page, seeded.gateway)
    page.goto(seeded.gateway.url + "/console/requests?q=13x17&from=2000-01-01")
    seen: list[str] = []
    windows = 0
    while True:
        ids = page.locator("#requests tbody tr[data-request-id]").evaluate_all(
            "rows => rows.map(r => r.dataset.requestId)"
        )
        seen += ids
        if page.locator("#search-window").count():
            windows += 1
            assert len(ids) < 50  # the window ran out before the page filled
        more = page.get_by_role("link", name=re.compile("older requests"))
        if more.count() == 0:
            break
        more.click()
        page.wait_for_load_state()
    wanted = {
        r["request_id"]
        for r in seeded.gateway.query("SELECT request_id FROM request_log WHERE error_message LIKE '%13x17%'")
    }
    assert len(seen) == len(set(seen)) and set(seen) == wanted and len(wanted) >= 150
    assert windows >= 3
