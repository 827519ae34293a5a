"""Reliability harness (issue 10), shared by the tests in this package and by ``bench/soak.py``.

- ``Traffic``: the mixed client load (generations, streams, edits, ``response_format=url``, async tasks)
  sent with httpx at a fixed concurrency; every answer is kept as an ``Outcome`` with what the client
  saw completed (the ``usage`` objects of the responses, completed stream events and task results).
- ``FAULT_MIX``: one upstream fault of every kind the fake knows, drawn at random by the fake
  (``FakeOpenAI.random_faults`` / ``fault_rate``).
- ``ledger_violations``: the money invariant, exactly in micro-units, read from the database:
  Σ ledger costs = Σ keys' spend = the catalog price of the usage the client saw completed, with
  nothing left reserved.

The price oracle is written out here from the catalog's published prices (SPEC §3) on purpose, so
that a pricing bug in ``app/billing`` cannot cancel itself out in the comparison.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.conftest import ADMIN_KEY, MODELS_FILE, fake_upstream_config, query
from tests.fakes import image_files
from tests.fakes.openai_upstream import FakeOpenAI, Fault

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
MODEL = "gpt-image-1"
# gpt-image-1, in micro-units of the price unit per token (= PTC per 1M tokens): text in 5, image
# in 10, text out — (none), image out 40.
PRICE_TEXT_IN, PRICE_IMAGE_IN, PRICE_IMAGE_OUT = 5, 10, 40
# Codes of the 5xx answers the gateway documents for upstream trouble (README "Errors").
UPSTREAM_CODES = frozenset({"upstream_error", "upstream_unavailable", "upstream_timeout"})

# Every fault kind of the fake. Statuses other than 4xx are retried by the gateway (another try of
# the same upstream after a short backoff), so most of them end in a success; a 400 is relayed.
FAULT_MIX: tuple[Fault, ...] = (
    Fault.status(500),
    Fault.status(502),
    Fault.status(503),
    Fault.status(429),
    Fault.status(400, "The fake refused this one.", code="invalid_value"),
    Fault.delay(0.2),
    Fault.hang(),
    Fault.close(),
    Fault.invalid_json(),
    Fault.stream_cut(1),
    Fault.stream_cut(2),
)
# The statuses the fake itself answers with in FAULT_MIX: when every try of a request draws one of
# them, the gateway relays the upstream's own status (type `server_error`, as the fake sends it).
FAULT_STATUSES = frozenset({500, 502, 503})


def inject_faults(fake: FakeOpenAI, rate: float, seed: int) -> None:
    """Make ``fake`` fail ``rate`` of its calls with FAULT_MIX (fresh copies: their `fired` counts)."""
    fake.random_faults = [dataclasses.replace(fault, fired=0) for fault in FAULT_MIX]
    fake.fault_rate = rate
    fake.fault_rng = random.Random(seed)


def usage_cost(usage: dict[str, Any]) -> int:
    """What ``usage`` costs on gpt-image-1, in micro-units (no rounding: integer prices per token)."""
    details_in = usage.get("input_tokens_details") or {}
    details_out = usage.get("output_tokens_details") or {}
    assert not details_out.get("text_tokens"), "gpt-image-1 has no text output price"
    image_out = details_out.get("image_tokens", usage.get("output_tokens", 0))
    return (
        details_in.get("text_tokens", 0) * PRICE_TEXT_IN
        + details_in.get("image_tokens", 0) * PRICE_IMAGE_IN
        + image_out * PRICE_IMAGE_OUT
    )


def gateway_config(fake: FakeOpenAI, data_dir: Path, db_url: str, **extra: Any) -> dict[str, Any]:
    """A `python -m app serve` config: the fake as only upstream, short timeouts and backoffs."""
    config: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "data_dir": str(data_dir),
        # Beside the rest of the run's files, not in the checkout's ./data/images (the default).
        "storage": {"path": str(data_dir / "images")},
        "models_file": MODELS_FILE,
        "database": {"url": db_url},
        "logging": {"level": "WARNING"},
        # A hanging upstream costs one timeout, then the retry goes elsewhere (here: again).
        "upstreams": [fake_upstream_config(fake, timeout_s=2, connect_timeout_s=2)],
        "retry": {"initial_delay_s": 0.01, "max_delay_s": 0.05},
        "tasks": {"workers": 2, "poll_s": 0.1},
    }
    config.update(extra)
    return config


def create_key(base_url: str, name: str = "reliability") -> tuple[str, str]:
    response = httpx.post(
        base_url + "/admin/keys", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return body["key"], body["id"]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def leftover_files(data_dir: Path) -> list[Path]:
    """Files left in the upload spool and the task inputs (both must be empty once all is done)."""
    return [p for sub in ("spool", "task_inputs") for p in (data_dir / sub).rglob("*") if p.is_file()]


# -- the client side ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it."""

    kind: str
    status: int  # HTTP status; 0 for a transport error
    request_id: str | None = None
    error: Any = None  # the `error` object of an error answer (or of a stream's error event)
    body_ok: bool = True  # an error answer whose body is not OpenAI-shaped sets this False
    completed: list[dict[str, Any]] = field(default_factory=list)  # usage of every completed result
    # Partial images of a stream's unfinished image (after its last completed event), when the
    # stream ended without all its images: billed at 100 image output tokens each.
    unfinished_partials: int = 0
    task_id: str | None = None
    task_status: str | None = None
    detail: str = ""

    @property
    def unexpected_5xx(self) -> bool:
        """A 5xx that is not one of the documented upstream answers."""
        if self.status < 500:
            return False
        error = self.error if isinstance(self.error, dict) else {}
        if error.get("code") in UPSTREAM_CODES:
            return False
        relayed = error.get("type") == "server_error" and self.status in FAULT_STATUSES
        return not relayed


def openai_error(body: Any) -> dict[str, Any] | None:
    """The error object when ``body`` is exactly OpenAI-shaped, else None."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    if not {"message", "type", "param", "code"} <= error.keys():
        return None
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return None
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return None
    return error


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body; comment lines (keep-alive pings) are skipped.

    Deliberately not the gateway's own decoder: the client side must not share the code under test.
    """
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if data:
            events.append((name, "\n".join(data)))
    return events


EDIT_IMAGE = image_files.png(64, 48)


class Traffic:
    """The mixed load. ``kinds`` and their weights are the mix; ``seed`` makes the choice of requests
    reproducible (what they meet at the upstream is up to the fake's own seeded draw)."""

    MIX: tuple[tuple[str, int], ...] = (
        ("generate", 30),
        ("stream", 20),
        ("edit", 15),
        ("edit_stream", 5),
        ("url", 5),
        ("async_generate", 15),
        ("async_edit", 10),
    )

    def __init__(
        self, base_url: str, key: str, *, seed: int = 0, timeout_s: float = 60.0, wait_for_tasks: bool = False
    ) -> None:
        self.base_url = base_url
        # Like an SDK user, poll each submitted task until it ends before sending the next request
        # (else a client submits as fast as the gateway answers 202s, and the queue grows as long
        # as submissions outpace the workers, which no queue survives).
        self.wait_for_tasks = wait_for_tasks
        self.headers = {"Authorization": f"Bearer {key}"}
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self.stopped = False  # set to end a run early (its requests in flight still finish)
        self._sent = 0

    async def run(
        self, *, requests: int | None = None, seconds: float | None = None, concurrency: int = 50
    ) -> list[Outcome]:
        """Send ``requests`` requests (or for ``seconds``) at ``concurrency``; returns their outcomes."""
        assert requests is not None or seconds is not None
        deadline = time.monotonic() + seconds if seconds is not None else None
        budget = requests
        kinds, weights = zip(*self.MIX, strict=True)
        new: list[Outcome] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout_s, limits=limits
        ) as client:

            async def worker() -> None:
                nonlocal budget
                while True:
                    if budget is not None:
                        if budget <= 0:
                            return
                        budget -= 1
                    if self.stopped or (deadline is not None and time.monotonic() >= deadline):
                        return
                    kind = self.rng.choices(kinds, weights)[0]
                    self._sent += 1
                    new.append(await self.one(client, kind, self._sent))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.outcomes.extend(new)
        return new

    async def one(self, client: httpx.AsyncClient, kind: str, index: int) -> Outcome:
        prompt = f"reliability {kind} {index}"
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "quality": "low", "size": "1024x1024"}
        try:
            if kind in ("generate", "url", "async_generate"):
                body["n"] = 1 + index % 2
                if kind == "url":
                    body["response_format"] = "url"
                params = {"async": "true"} if kind == "async_generate" else None
                return await self._json(client, kind, client.post(GEN, json=body, params=params))
            if kind == "stream":
                body.update(stream=True, partial_images=index % 3)
                return await self._stream(client, kind, client.stream("POST", GEN, json=body))
            fields = {"model": MODEL, "prompt": prompt, "quality": "low"}
            files = {"image": ("in.png", EDIT_IMAGE, "image/png")}
            if kind == "edit_stream":
                fields.update(stream="true", partial_images="1")
                request = client.stream("POST", EDIT, data=fields, files=files)
                return await self._stream(client, kind, request)
            params = {"async": "true"} if kind == "async_edit" else None
            return await self._json(client, kind, client.post(EDIT, data=fields, files=files, params=params))
        except httpx.TransportError as exc:
            return Outcome(kind, 0, detail=repr(exc))

    async def _json(self, client: httpx.AsyncClient, kind: str, sending: Any) -> Outcome:
        response: httpx.Response = await sending
        outcome = Outcome(kind, response.status_code, response.headers.get("x-request-id"))
        try:
            payload = response.json()
        except ValueError:
            outcome.body_ok = False
            outcome.detail = response.text[:300]
            return outcome
        if response.status_code >= 400:
            outcome.error = openai_error(payload)
            outcome.body_ok = outcome.error is not None
            outcome.detail = response.text[:300]
        elif response.status_code == 202:
            outcome.task_id = payload["id"]
            if self.wait_for_tasks:
                await self._wait(client, outcome)
        else:
            outcome.completed.append(payload["usage"])
            if kind == "url":
                await self._fetch_links(client, outcome, payload)
        return outcome

    async def _fetch_links(
        self, client: httpx.AsyncClient, outcome: Outcome, payload: dict[str, Any]
    ) -> None:
        """`response_format=url`: the links must serve the stored images."""
        for item in payload["data"]:
            link = await client.get(item["url"])
            if link.status_code != 200 or not link.content.startswith(image_files.PNG_SIGNATURE):
                outcome.body_ok = False
                outcome.detail = f"link {item['url']} answered {link.status_code}"

    async def _stream(self, client: httpx.AsyncClient, kind: str, sending: Any) -> Outcome:
        async with sending as response:
            outcome = Outcome(kind, response.status_code, response.headers.get("x-request-id"))
            text = (await response.aread()).decode()
        if response.status_code != 200:
            try:
                outcome.error = openai_error(orjson.loads(text))
            except orjson.JSONDecodeError:
                outcome.error = None
            outcome.body_ok = outcome.error is not None
            outcome.detail = text[:300]
            return outcome
        partials = 0
        for name, data in sse_events(text):
            event = orjson.loads(data)
            if name.endswith(".completed"):
                outcome.completed.append(event["usage"])
                base64.b64decode(event["b64_json"], validate=True)
                partials = 0
            elif name.endswith(".partial_image"):
                partials += 1
            elif name == "error":
                outcome.error = openai_error(event)
                outcome.body_ok = outcome.error is not None and event.get("type") == "error"
                outcome.unfinished_partials = partials
        return outcome

    async def _wait(self, client: httpx.AsyncClient, outcome: Outcome, poll_s: float = 0.25) -> None:
        while outcome.task_status is None:
            await asyncio.sleep(poll_s)
            self._record(outcome, (await client.get(f"/v1/tasks/{outcome.task_id}")).json())

    @staticmethod
    def _record(outcome: Outcome, task: dict[str, Any]) -> None:
        """A finished task's outcome (its result's usage is billed); nothing while it runs."""
        if task["status"] == "succeeded":
            outcome.task_status = "succeeded"
            outcome.completed.append(task["result"]["usage"])
        elif task["status"] == "failed":
            outcome.task_status = "failed"
            outcome.error = task.get("error")

    async def settle_tasks(self, *, timeout_s: float = 120.0) -> list[Outcome]:
        """Poll every submitted task until it ends; records its result's usage. Returns those still
        open at the deadline (none, when the queue works)."""
        pending = [o for o in self.outcomes if o.task_id is not None and o.task_status is None]
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=30) as client:
            while pending and time.monotonic() < deadline:
                still = []
                for outcome in pending:
                    self._record(outcome, (await client.get(f"/v1/tasks/{outcome.task_id}")).json())
                    if outcome.task_status is None:
                        still.append(outcome)
                pending = still
                if pending:
                    await asyncio.sleep(0.2)
        return pending


def expected_micros(outcomes: Iterable[Outcome]) -> int:
    return sum(
        sum(usage_cost(usage) for usage in outcome.completed)
        + outcome.unfinished_partials * 100 * PRICE_IMAGE_OUT
        for outcome in outcomes
    )


def summary(outcomes: Sequence[Outcome]) -> str:
    """A one-line count of outcomes by kind and status, for failure messages and the soak's log."""
    counts = Counter(f"{o.kind}:{o.task_status or o.status}" for o in outcomes)
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


# -- the database side --------------------------------------------------------------------------------


def ledger_violations(
    db_url: str, key_ids: Sequence[str], expected: int | None, *, tolerated_holds: Sequence[str] = ()
) -> list[str]:
    """Every way the money invariant is broken, as messages (empty: it holds).

    - each ledger row's cost is its tokens at the catalog's prices (exact, micro-units), and a row
      with no image costs nothing;
    - Σ ledger costs = Σ ``api_keys.spent_micros`` = Σ monthly periods' spend, per key;
    - nothing stays reserved: ``reserved_micros`` is 0 and no reservation row is left (but the
      ``tolerated_holds``, whose amounts may stay reserved);
    - Σ ledger costs = ``expected`` (the usage the clients saw completed), when given.
    """
    problems: list[str] = []
    keys = "', '".join(key_ids)
    rows = query(
        db_url,
        "SELECT request_id, key_id, status, images, text_input_tokens, image_input_tokens, "
        "text_output_tokens, image_output_tokens, cost_micros FROM ledger_entries "
        f"WHERE key_id IN ('{keys}')",
    )
    for row in rows:
        tokens_cost = (
            row["text_input_tokens"] * PRICE_TEXT_IN
            + row["image_input_tokens"] * PRICE_IMAGE_IN
            + row["image_output_tokens"] * PRICE_IMAGE_OUT
        )
        if int(row["cost_micros"]) != tokens_cost:
            problems.append(
                f"ledger row {row['request_id']} costs {row['cost_micros']}, tokens say {tokens_cost}"
            )
        # A stream cut after some completed images is billed for those (status failed or cancelled),
        # and for the partial images of an unfinished one: 100 image output tokens each.
        if int(row["images"]) == 0 and int(row["image_output_tokens"]) % 100:
            problems.append(f"ledger row {row['request_id']} has no image but bills a non-partial amount")
    ledger_total = sum(int(r["cost_micros"]) for r in rows)
    key_rows = query(db_url, f"SELECT id, spent_micros, reserved_micros FROM api_keys WHERE id IN ('{keys}')")
    spent = sum(int(r["spent_micros"]) for r in key_rows)
    if ledger_total != spent:
        problems.append(f"ledger total {ledger_total} != keys' spend {spent}")
    periods = query(
        db_url, f"SELECT spent_micros, reserved_micros FROM key_periods WHERE key_id IN ('{keys}')"
    )
    if sum(int(p["spent_micros"]) for p in periods) != spent:
        problems.append(f"monthly periods' spend {sum(int(p['spent_micros']) for p in periods)} != {spent}")
    holds = query(
        db_url, f"SELECT id, request_id, amount_micros FROM reservations WHERE key_id IN ('{keys}')"
    )
    tolerated = sum(int(h["amount_micros"]) for h in holds if h["id"] in tolerated_holds)
    for what, rows_reserved in (("keys", key_rows), ("monthly periods", periods)):
        reserved = sum(int(r["reserved_micros"]) for r in rows_reserved)
        if reserved != tolerated:
            problems.append(f"{what} still reserve {reserved} micro-units ({tolerated} tolerated)")
    left = [h for h in holds if h["id"] not in tolerated_holds]
    if left:
        problems.append(f"{len(left)} reservation rows left, e.g. {left[:3]}")
    if expected is not None and ledger_total != expected:
        problems.append(
            f"ledger total {ledger_total} != cost of the usage the clients saw completed {expected}"
        )
    return problems


def open_tasks(db_url: str) -> int:
    return int(
        query(db_url, "SELECT COUNT(*) AS n FROM tasks WHERE status IN ('queued', 'in_progress')")[0]["n"]
    )
