"""Issue 23 item 10 over HTTP: wrong console sign-ins are slowed, then refused with 429 and
``retry-after``, and the owner gets back in once the lock is over (the throttle's clock is moved,
never waited for). On 9a64885 every attempt was answered at once: the 7th below signed in."""

from __future__ import annotations

import httpx

from tests.conftest import ADMIN_KEY, LOCAL_UPSTREAM, Gateway


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


def test_wrong_sign_ins_are_throttled_then_the_owner_gets_back_in(gateway_with: object) -> None:
    gw: Gateway = gateway_with(LOCAL_UPSTREAM)  # type: ignore[operator]
    clock = Clock()
    throttle = getattr(gw.server.app.state, "signin_throttle", None)
    if throttle is not None:  # (absent on 9a64885, where the 7th attempt below signed in)
        throttle.clock = clock
    client = gw.closing(httpx.Client(base_url=gw.url, follow_redirects=False, timeout=30))
    wrong = "sk-admin-test-" + "x" * 30
    for _ in range(6):
        assert client.post("/console/login", data={"api_key": wrong}).status_code == 401
    # Five free failures, the sixth locks the address (and the prefix it tried) for 2 s.
    locked = client.post("/console/login", data={"api_key": ADMIN_KEY})
    assert locked.status_code == 429
    assert locked.headers["retry-after"] == "2"
    assert "Too many failed sign-ins" in locked.text and "set-cookie" not in locked.headers
    clock.now += 3
    signed_in = client.post("/console/login", data={"api_key": ADMIN_KEY})
    assert signed_in.status_code == 303 and "gw_console=" in signed_in.headers["set-cookie"]
    # The success cleared the address: the next wrong key is a plain 401 again.
    assert client.post("/console/login", data={"api_key": wrong}).status_code == 401
