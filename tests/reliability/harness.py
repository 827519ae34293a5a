"""The reliability tests' side of the harness: the fake upstream's fault mix and the gateway config
pointing at the fake. The load client and the books are in ``bench/traffic.py`` and ``bench/books.py``,
shared with the soak (which brings its own faulty upstream, ``bench/upstream.py --fault-rate``).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from bench.gateway_process import gateway_config as process_config
from tests.conftest import ADMIN_KEY, fake_upstream_config
from tests.fakes.openai_upstream import FakeOpenAI, Fault

# Every fault kind of the fake. Statuses other than 4xx are retried by the gateway (another try of
# the same upstream after a short backoff), so most of them end in a success; a 400 is relayed.
# The statuses among them are bench.traffic.FAULT_STATUSES (plus 429 and 400, which the gateway
# maps to its own codes).
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


def inject_faults(fake: FakeOpenAI, rate: float, seed: int) -> None:
    """Make ``fake`` fail ``rate`` of its calls with FAULT_MIX (fresh copies: their `fired` counts)."""
    fake.random_faults = [dataclasses.replace(fault, fired=0) for fault in FAULT_MIX]
    fake.fault_rate = rate
    fake.fault_rng = random.Random(seed)


def gateway_config(fake: FakeOpenAI, data_dir: Path, db_url: str, **extra: Any) -> dict[str, Any]:
    """A `python -m app serve` config with the fake as only upstream (see bench.gateway_process)."""
    return process_config(fake_upstream_config(fake), data_dir, db_url, admin_key=ADMIN_KEY, **extra)
