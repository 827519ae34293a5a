"""Command-line operations that work on the database directly: keys and migrations."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal

import orjson
from pydantic import ValidationError

from app.auth.keys import KeyService
from app.billing.reports import UsageFilter, usage_report
from app.cluster.bus import ClusterBus
from app.core.errors import GatewayError
from app.db.engine import create_engine, create_sessionmaker
from app.db.migrate import upgrade_head
from app.domain.catalog import Catalog
from app.runtime.settings import Settings
from app.schemas.admin import ApiKeyCreatedResponse, ApiKeyCreateRequest


def add_key_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="manage tenant API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("--name", required=True)
    create.add_argument("--owner")
    create.add_argument("--models", help="comma-separated model names (default: all)")
    create.add_argument("--moderation", choices=["default", "strict", "off"], default="default")
    create.add_argument("--expires-at", help="ISO 8601 date-time, e.g. 2027-01-01T00:00:00Z")
    for money in ("quota", "monthly-quota", "balance", "price-multiplier"):
        create.add_argument(f"--{money}", type=Decimal)
    for limit in ("rpm", "ipm", "concurrency"):
        create.add_argument(f"--{limit}", type=int)
    actions.add_parser("list", help="list keys")
    show = actions.add_parser("show", help="show one key")
    show.add_argument("key_id")
    revoke = actions.add_parser("revoke", help="revoke a key permanently")
    revoke.add_argument("key_id")
    topup = actions.add_parser("topup", help="add credit to a key's balance")
    topup.add_argument("key_id")
    topup.add_argument("amount", type=Decimal, help="in the price unit, e.g. 12.5")


def add_usage_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = subparsers.add_parser("usage", help="usage and spend from the ledger")
    usage.add_argument("--key", dest="key_id")
    usage.add_argument("--model")
    usage.add_argument("--from", dest="start", help="ISO 8601 date or date-time (inclusive)")
    usage.add_argument("--to", dest="end", help="ISO 8601 date or date-time (exclusive)")
    usage.add_argument("--group-by", choices=["day", "model", "key"])
    usage.add_argument("--format", choices=["json", "csv"], default="json")


@asynccontextmanager
async def _key_service(settings: Settings) -> AsyncIterator[KeyService]:
    engine = create_engine(settings.database.url, pool=settings.database.pool())
    # With Redis, a change made here reaches every node's key cache at once (only published to).
    bus = ClusterBus(settings.redis.url, prefix=settings.redis.prefix) if settings.redis.url else None
    try:
        await upgrade_head(engine)
        catalog = Catalog.from_file(settings.models_file)
        yield KeyService(
            create_sessionmaker(engine),
            catalog.names(),
            pepper=settings.security.pepper(settings.data_dir),
            bus=bus,
        )
    finally:
        if bus is not None:
            await bus.aclose()
        await engine.dispose()


def _print(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


async def _run_keys(settings: Settings, args: argparse.Namespace) -> None:
    async with _key_service(settings) as keys:
        if args.action == "create":
            request = ApiKeyCreateRequest(
                name=args.name,
                owner=args.owner,
                models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
                moderation=args.moderation,
                expires_at=_moment(args.expires_at, "--expires-at"),
                quota=args.quota,
                monthly_quota=args.monthly_quota,
                balance=args.balance,
                price_multiplier=args.price_multiplier,
                rpm=args.rpm,
                ipm=args.ipm,
                concurrency=args.concurrency,
            )
            public, key = await keys.create(request)
            _print(ApiKeyCreatedResponse(**public.model_dump(), key=key).model_dump())
        elif args.action == "list":
            _print({"object": "list", "data": [k.model_dump() for k in await keys.list()]})
        elif args.action == "show":
            _print((await keys.get(args.key_id)).model_dump())
        elif args.action == "revoke":
            _print((await keys.revoke(args.key_id)).model_dump())
        elif args.action == "topup":
            _print((await keys.top_up(args.key_id, args.amount)).model_dump())


def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    try:
        asyncio.run(_run_keys(settings, args))
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.status_code == 404 else 1
    except (ValidationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run_migrate(settings: Settings) -> int:
    async def migrate() -> None:
        engine = create_engine(settings.database.url, pool=settings.database.pool())
        try:
            await upgrade_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(migrate())
    print("database is at the newest revision")
    return 0


def _moment(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 date or date-time; without an offset it is UTC (``2030-01-01`` is its midnight
    UTC), as the README's examples write it."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"{option}: expected an ISO 8601 date or date-time, not {value!r}") from None


def run_usage(settings: Settings, args: argparse.Namespace) -> int:
    async def report() -> str:
        engine = create_engine(settings.database.url, pool=settings.database.pool())
        try:
            await upgrade_head(engine)
            result = await usage_report(
                create_sessionmaker(engine),
                where=UsageFilter(
                    key_id=args.key_id,
                    model=args.model,
                    start=_moment(args.start, "--from"),
                    end=_moment(args.end, "--to"),
                ),
                group_by=args.group_by,
                price_unit=settings.price_unit,
            )
        finally:
            await engine.dispose()
        if args.format == "csv":
            return result.as_csv()
        return orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode()

    try:
        print(asyncio.run(report()))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
