"""What every console page shares: templates, headers, who is signed in, and CSRF checks."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from app import __version__
from app.api.deps import StateDep
from app.api.errors import error_response
from app.console.sessions import SessionStore, Viewer
from app.core.errors import AuthenticationError
from app.core.security import secrets_equal
from app.domain.money import format_micros
from app.runtime.state import AppState

if TYPE_CHECKING:
    from starlette.templating import Jinja2Templates

HERE = Path(__file__).parent
COOKIE = "gw_console"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

# Pages come only from this origin: no inline script or style, no third party. Images may be blob:
# URLs (the playground's previews, decoded in the page) and same-origin thumbnails.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
PAGE_HEADERS = {
    "content-security-policy": CSP,
    # same-origin, not the API's no-referrer: with no-referrer a browser sends `Origin: null` on
    # form posts, and the CSRF check needs the real origin.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


def _money(micros: int | None) -> str:
    return "—" if micros is None else format_micros(micros)


def _when(value: datetime | int | None) -> str:
    if value is None:
        return "—"
    moment = datetime.fromtimestamp(value, UTC) if isinstance(value, int) else value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@functools.cache
def templates() -> Jinja2Templates:
    """Built on the first page view, not at import: Jinja2 stays off the gateway's start-up path."""
    from starlette import templating

    built = templating.Jinja2Templates(directory=str(HERE / "templates"))
    built.env.filters["money"] = _money
    built.env.filters["when"] = _when
    built.env.globals["version"] = __version__  # the console footer (CHANGELOG.md)
    return built


class SignInRequired(Exception):
    """No live session: pages redirect to the sign-in form, scripts get 401."""


class ConsoleDenied(Exception):
    """Signed in, but not allowed (403), or not found for this viewer (404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def session_store(state: AppState) -> SessionStore:
    console = state.settings.console
    return SessionStore(state.sessions, ttl_s=console.session_ttl_s, idle_s=console.idle_timeout_s)


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, *, status: int = 200
) -> HTMLResponse:
    state: AppState = request.app.state.gateway
    viewer: Viewer | None = getattr(request.state, "viewer", None)
    full = {
        "viewer": viewer,
        "csrf_token": viewer.csrf_token if viewer else "",
        "price_unit": state.settings.price_unit,
        "path": request.url.path,
        "viewer_key_name": getattr(request.state, "viewer_key_name", None),
        **(context or {}),
    }
    response = templates().TemplateResponse(request, name, full, status_code=status)
    response.headers.update(PAGE_HEADERS)
    return response


def redirect(url: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(PAGE_HEADERS)
    return response


async def get_viewer(request: Request, state: StateDep) -> Viewer:
    viewer = await session_store(state).find(request.cookies.get(COOKIE))
    if viewer is None:
        raise SignInRequired
    if viewer.key_id is not None:
        # A tenant's session lives only as long as their key: revoked, disabled or expired ends it.
        try:
            caller = await state.keys.caller_for(viewer.key_id)
        except AuthenticationError:
            await session_store(state).close(request.cookies.get(COOKIE, ""))
            raise SignInRequired from None
        # The header names the tenant's key (its id on hover), read by the check above anyway.
        request.state.viewer_key_name = caller.name
    request.state.viewer = viewer
    request.state.key_id = viewer.key_id or "admin"
    return viewer


ViewerDep = Annotated[Viewer, Depends(get_viewer)]


async def get_operator(viewer: ViewerDep) -> Viewer:
    if not viewer.is_operator:
        raise ConsoleDenied(403, "This page is for the gateway's operator.")
    return viewer


OperatorDep = Annotated[Viewer, Depends(get_operator)]


def same_origin(request: Request) -> bool:
    """True unless the browser says the request comes from another origin.

    Browsers send ``Origin`` on every POST (fetch and forms); when it is there it must name this
    host. ``null`` (sandboxed frames, opaque origins) is refused as well.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    host = request.headers.get("host", "")
    public = request.app.state.gateway.settings.server.public_url
    allowed = {host}
    if public:
        allowed.add(urlsplit(public).netloc)
    return urlsplit(origin).netloc in allowed


def check_csrf(request: Request, viewer: Viewer, token: object) -> None:
    """A state-changing request must come from our own page: same origin and the session's token.

    SameSite=Strict keeps the cookie off cross-site requests, but not off *same-site* ones (another
    port or subdomain of the same host); the per-session token covers those.
    """
    given = token if isinstance(token, str) else request.headers.get(CSRF_HEADER, "")
    if not same_origin(request) or not given or not secrets_equal(given, viewer.csrf_token):
        raise ConsoleDenied(
            403, "The form could not be verified (CSRF check failed). Reload the page and try again."
        )


def set_session_cookie(request: Request, response: Response, token: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )


def wants_json(request: Request) -> bool:
    return request.method != "GET" or "application/json" in request.headers.get("accept", "")


async def sign_in_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    if wants_json(request) and request.method != "GET":
        response = error_response(AuthenticationError("Sign in to the console first."))
        response.headers.update(PAGE_HEADERS)
        return response
    return redirect("/console/login")


async def console_denied(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConsoleDenied)
    return render(request, "error.html", {"message": exc.message, "status": exc.status}, status=exc.status)
