"""Prepared statements on SQLite store exactly what ``Connection.execute`` would."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import bindparam, create_engine, insert, select, text, update

from app.billing.ledger import ENTRY_COLUMNS
from app.db.prepared import Prepared
from app.db.tables import ApiKey, Base, LedgerEntry, Task

ENTRY = {
    "request_id": "req_1",
    "key_id": "key_1",
    "model": "gpt-image-1",
    "upstream": "openai",
    "endpoint": "generations",
    "status": "succeeded",
    "images": 2,
    "text_input_tokens": 10,
    "image_input_tokens": 0,
    "text_output_tokens": 0,
    "image_output_tokens": 4160,
    "cost_micros": 123_456,
    "estimated": False,
    "latency_ms": 12,
    "error_code": None,
    "usage": {"input_tokens": 10, "details": {"é": [1, 2]}},
    "reserved_micros": 100_000,
    "overrun_micros": 23_456,
    "operator_cost_micros": 0,
    "batch_id": None,
    "created_at": datetime(2026, 11, 25, 12, 30, 1, 123456, tzinfo=UTC),
    "svg_model": "gpt-5.5",
    "svg_input_tokens": 1200,
    "svg_output_tokens": 2500,
    "svg_reasoning_tokens": 100,
    "svg_cost_micros": 26_500,
}


def dump(path: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as raw:
        return list(raw.execute(f"SELECT * FROM {table}"))


def test_an_insert_stores_the_same_bytes_as_core(tmp_path: Path) -> None:
    prepared = Prepared(insert(LedgerEntry), columns=ENTRY_COLUMNS)
    paths = []
    for name, run in (("core", False), ("prepared", True)):
        path = tmp_path / f"{name}.db"
        engine = create_engine(f"sqlite:///{path}")
        Base.metadata.create_all(engine)
        with engine.begin() as c:
            if run:
                assert prepared.execute(c, ENTRY).rowcount == 1
            else:
                c.execute(insert(LedgerEntry), ENTRY)
        engine.dispose()
        paths.append(path)
    assert dump(paths[0], "ledger_entries") == dump(paths[1], "ledger_entries")
    engine = create_engine(f"sqlite:///{paths[1]}")
    with engine.connect() as c:
        usage, created = c.execute(select(LedgerEntry.usage, LedgerEntry.created_at)).one()
    assert usage == ENTRY["usage"] and created == ENTRY["created_at"]


def test_returning_rowcount_and_literal_parameters(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as c:
        c.execute(
            insert(ApiKey).values(
                id="k1", key_hash="h", prefix="p", name="n", enabled=True, created_at=datetime.now(UTC)
            )
        )
        bump = Prepared(
            update(ApiKey)
            .where(ApiKey.id == bindparam("key"), ApiKey.enabled.is_(True), ApiKey.name == "n")
            .values(reserved_micros=ApiKey.reserved_micros + bindparam("amount"))
            .returning(ApiKey.reserved_micros)
        )
        assert bump.execute(c, {"key": "k1", "amount": 5}).first() == (5,)
        assert bump.execute(c, {"key": "nobody", "amount": 5}).first() is None
        gone = Prepared(update(ApiKey).where(ApiKey.id == bindparam("key")).values(name="m"))
        assert gone.execute(c, {"key": "k1"}).rowcount == 1
        assert gone.execute(c, {"key": "nobody"}).rowcount == 0
        assert c.execute(text("SELECT name, reserved_micros FROM api_keys")).one() == ("m", 5)


def test_statements_it_cannot_prepare_run_through_sqlalchemy(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    Base.metadata.create_all(engine)
    expanding = Prepared(select(Task.id).where(Task.id.in_(bindparam("ids", expanding=True))))
    with engine.begin() as c:
        assert expanding.execute(c, {"ids": ["a", "b"]}).first() is None
