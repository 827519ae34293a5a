"""``python -m app serve|migrate|keys``: load settings, then run the server or a command."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from app.runtime.cli import add_key_commands, add_usage_command, run_keys, run_migrate, run_usage
from app.runtime.settings import ConfigError, Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description="Image gateway")
    parser.add_argument("--config", help="config file (default: $GATEWAY_CONFIG or config/gateway.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", dest="serve_config", help=argparse.SUPPRESS)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    commands.add_parser("migrate", help="upgrade the database to the newest schema")
    worker = commands.add_parser("worker", help="run task workers only (no HTTP server)")
    worker.add_argument("--concurrency", type=int, help="tasks run at once (default: tasks.concurrency)")
    add_key_commands(commands)
    add_usage_command(commands)
    return parser


def _banner(settings: Settings, host: str, port: int) -> str:
    everywhere = host in ("0.0.0.0", "::", "")
    shown = "127.0.0.1" if everywhere else host
    base = f"http://{shown}:{port}"
    # Say where it really listens: bound to every interface, the admin API and console are reachable
    # from the network, which a newcomer must not mistake for loopback.
    where = f"every interface ({host or '0.0.0.0'}:{port}), reachable at {base}" if everywhere else base
    if settings.admin_key is not None:
        admin = "the admin key is the one you configured (GATEWAY_ADMIN_KEY or admin_key)"
        admin_expr = "$GATEWAY_ADMIN_KEY"
    else:
        path = Path(settings.data_dir) / "admin_key"
        admin = f"the admin key is in {path} (mode 0600)"
        admin_expr = f"$(cat {path})"
    console = (
        f"\nWeb console: {base}/console  (sign in with the admin key, or a tenant with their own key)\n"
        if settings.console.enabled
        else ""
    )
    return f"""
Image gateway listening on {where}  ({admin})

Create a tenant key:
  curl -s {base}/admin/keys -H "Authorization: Bearer {admin_expr}" \\
       -H 'content-type: application/json' -d '{{"name": "me"}}'

Then generate an image with it:
  curl -s {base}/v1/images/generations -H "Authorization: Bearer $KEY" \\
       -H 'content-type: application/json' \\
       -d '{{"model": "gpt-image-2", "prompt": "a lighthouse at dawn", "size": "1024x1024"}}'

Or from Python:
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key=os.environ["KEY"])
  image = client.images.generate(model="gpt-image-2", prompt="a lighthouse at dawn")
{console}"""


class DrainingServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down, so a clean drain would exit as
    "killed by signal"; a drain that completed is a success, and exits 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from app.core.logging import configure_logging
    from app.main import create_app
    from app.runtime.lifespan import prepare

    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    workers = args.workers or settings.server.workers
    configure_logging(level=settings.logging.level, json_format=settings.logging.json_format)
    # Migrate and create the admin key once here, so several workers never race to do it.
    asyncio.run(prepare(settings))
    print(_banner(settings, host, port), flush=True)
    # Past the grace period uvicorn cancels what is left; a little slack lets streams end first.
    grace = math.ceil(settings.server.shutdown_grace_s) + 2
    if workers > 1:
        # Worker processes rebuild the app from the same config file and environment.
        uvicorn.run(
            "app.main:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_config=None,
            timeout_graceful_shutdown=grace,
            timeout_keep_alive=settings.server.keep_alive_s,
        )
    else:
        config = uvicorn.Config(
            create_app(settings),
            host=host,
            port=port,
            log_config=None,
            timeout_graceful_shutdown=grace,
            timeout_keep_alive=settings.server.keep_alive_s,
        )
        DrainingServer(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = getattr(args, "serve_config", None) or args.config
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        if config:
            # Worker processes (--workers N) read the same file.
            import os

            os.environ["GATEWAY_CONFIG"] = config
        return serve(settings, args)
    if args.command == "migrate":
        return run_migrate(settings)
    if args.command == "worker":
        from app.core.logging import configure_logging
        from app.runtime.standalone import run_workers

        configure_logging(level=settings.logging.level, json_format=settings.logging.json_format)
        return run_workers(settings, concurrency=args.concurrency)
    if args.command == "keys":
        return run_keys(settings, args)
    if args.command == "usage":
        return run_usage(settings, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
