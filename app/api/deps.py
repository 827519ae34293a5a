"""Typed dependencies: the app state, the authenticated caller, the admin check.

The admin key is compared in one function, ``is_admin_key``. ``AdminGuardMiddleware`` calls it for
every ``/admin/…`` request before anything reads the body and marks the request on its scope
state; ``require_admin`` only reads that mark, so an admin route mounted where the middleware does
not look is refused rather than open. The console's operator sign-in calls ``is_admin_key`` too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth.keys import INVALID_KEY_MESSAGE, Caller
from app.core.errors import AuthenticationError
from app.core.security import secrets_equal
from app.runtime.state import AppState

# Scope-state key the admin guard sets on a request that carried the admin key.
ADMIN_MARK = "admin_key_checked"


async def get_state(request: Request) -> AppState:
    # async on purpose: FastAPI runs a plain `def` dependency on a worker thread, a thread hop
    # per request (measured: 6% of the gateway's CPU under load) for an attribute read.
    state: AppState = request.app.state.gateway
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def parse_bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None (the one parser of it)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def bearer_token(request: Request) -> str | None:
    return parse_bearer(request.headers.get("authorization"))


def is_admin_key(given: str | None, admin_key: str) -> bool:
    """Whether ``given`` is the admin key (constant time): the one place the admin key is checked."""
    return given is not None and secrets_equal(given, admin_key)


async def get_caller(request: Request, state: StateDep) -> Caller:
    caller = await state.keys.authenticate(bearer_token(request))
    # For the access log, which runs outside this handler; only the key id, never the key.
    request.state.key_id = caller.key_id
    # For the request log: the key's name as it was at the time.
    request.state.key_name = caller.name
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def caller_and_state(request: Request) -> tuple[Caller, AppState]:
    """``get_caller`` and ``get_state`` called directly, for the image routes: FastAPI's
    dependency solver cost 7% of the gateway's CPU on small answers (py-spy, issue 25), for two
    lookups that need nothing it offers (no parameters, no caching across dependencies)."""
    state = await get_state(request)
    return await get_caller(request, state), state


async def require_admin(request: Request) -> None:
    """Admin routes' guard: the middleware has already checked the key (see the module docstring)."""
    if not getattr(request.state, ADMIN_MARK, False):
        raise AuthenticationError(INVALID_KEY_MESSAGE)


AdminDep = Depends(require_admin)
