"""The web console on ``/console``: server-rendered pages over the same services as the API."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from app.api.console import auth, batches, keys, pages, playground, tasks, webhooks
from app.api.console.web import HERE, ConsoleDenied, SignInRequired, console_denied, sign_in_required
from app.console.activity import ActivityCache
from app.console.statusmix import StatusMix


def install_console(app: FastAPI) -> None:
    for module in (auth, pages, keys, playground, tasks, webhooks, batches):
        app.include_router(module.router, prefix="/console", include_in_schema=False)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    # Totals of days that are over, shared by this process's pages (app/console/activity.py).
    app.state.console_activity = ActivityCache()
    # Requests per day by status class, the same way (app/console/statusmix.py).
    app.state.console_status_mix = StatusMix()
    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(ConsoleDenied, console_denied)
