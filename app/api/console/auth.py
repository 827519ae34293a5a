"""Sign-in and sign-out. The operator signs in with the admin key, a tenant with their own key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.console.web import (
    COOKIE,
    ConsoleDenied,
    ViewerDep,
    check_csrf,
    clear_session_cookie,
    redirect,
    render,
    same_origin,
    session_store,
    set_session_cookie,
)
from app.api.deps import StateDep, is_admin_key
from app.console.sessions import SessionStore
from app.console.throttle import SignInThrottle
from app.core.errors import AuthenticationError

router = APIRouter()


@router.get("")
async def home(request: Request, state: StateDep) -> Response:
    viewer = await session_store(state).find(request.cookies.get(COOKIE))
    if viewer is None:
        return redirect("/console/login")
    return redirect("/console/overview" if viewer.is_operator else "/console/usage")


@router.get("/login")
async def login_form(request: Request) -> Response:
    return render(request, "login.html")


@router.post("/login")
async def login(request: Request, state: StateDep) -> Response:
    # No session yet, so no token to check: the origin check stops a cross-site page from signing
    # a victim into the attacker's account (login CSRF).
    if not same_origin(request):
        raise ConsoleDenied(403, "Sign-in must come from the console's own page.")
    form = await request.form()
    key = str(form.get("api_key") or "").strip()
    throttle: SignInThrottle = request.app.state.signin_throttle
    subjects = throttle.subjects(request.client.host if request.client else None, key)
    # Checked before the key: while locked even the right key waits, or guessing would go on.
    wait = await throttle.wait_s(subjects)
    if wait:
        message = f"Too many failed sign-ins. Try again in {wait} seconds."
        refused = render(request, "login.html", {"error": message}, status=429)
        refused.headers["retry-after"] = str(wait)
        return refused
    store: SessionStore = session_store(state)
    if key and is_admin_key(key, state.admin_key):
        token, _ = await store.open("operator", None)
        target = "/console/overview"
    else:
        try:
            caller = await state.keys.authenticate(key)
        except AuthenticationError as exc:
            await throttle.failed(subjects)
            # The key's status is told (as the API does), never the key.
            return render(request, "login.html", {"error": exc.message}, status=401)
        token, _ = await store.open("tenant", caller.key_id)
        target = "/console/usage"
    await throttle.succeeded(subjects)
    response = redirect(target)
    set_session_cookie(request, response, token, state.settings.console.session_ttl_s)
    return response


@router.post("/logout")
async def logout(request: Request, viewer: ViewerDep, state: StateDep) -> Response:
    form = await request.form()
    check_csrf(request, viewer, form.get("csrf_token"))
    await session_store(state).close(request.cookies.get(COOKIE, ""))
    response = redirect("/console/login")
    clear_session_cookie(request, response)
    return response
