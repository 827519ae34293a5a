"""The books balance with every provider at once (issues 19, 28): concurrent traffic to Gemini,
Imagen, FLUX, Stability, fal.ai and Replicate models, with successes, moderation refusals,
failovers and n > 1, leaves every ledger row at the catalog's price, the ledger equal to the keys'
spend, and nothing held."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import Gateway, make_settings, start_gateway
from tests.contract.providers import books_violations
from tests.contract.test_provider_bfl import KEY as BFL_KEY
from tests.contract.test_provider_bfl import flux_upstream
from tests.contract.test_provider_fal import KEY as FAL_KEY
from tests.contract.test_provider_fal import fal_upstream
from tests.contract.test_provider_google import KEY as GOOGLE_KEY
from tests.contract.test_provider_google import google_upstreams
from tests.contract.test_provider_replicate import KEY as REPLICATE_KEY
from tests.contract.test_provider_replicate import replicate_upstream
from tests.contract.test_provider_stability import KEY as STABILITY_KEY
from tests.contract.test_provider_stability import stability_upstream
from tests.fakes.bfl_upstream import FakeBFL
from tests.fakes.fal_upstream import FakeFal
from tests.fakes.google_upstream import FakeGoogle
from tests.fakes.provider_fake import Outcome
from tests.fakes.replicate_upstream import FakeReplicate
from tests.fakes.stability_upstream import FakeStability

REQUESTS = 48
Fakes = tuple[FakeGoogle, FakeBFL, FakeStability, FakeFal, FakeReplicate]


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    with (
        FakeGoogle(GOOGLE_KEY) as google,
        FakeBFL(BFL_KEY) as bfl,
        FakeStability(STABILITY_KEY) as stability,
        FakeFal(FAL_KEY) as fal,
        FakeReplicate(REPLICATE_KEY) as replicate,
    ):
        yield google, bfl, stability, fal, replicate


def test_books_balance_under_mixed_provider_traffic(
    fakes: Fakes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    google, bfl, stability, fal, replicate = fakes
    upstreams = [
        fal_upstream(fal),
        fal_upstream(fal, "fal-b", priority=1),
        replicate_upstream(replicate),
        replicate_upstream(replicate, "rep-b", priority=1),
        *google_upstreams(google),
        flux_upstream(bfl),
        flux_upstream(bfl, "flux-b", priority=1),
        stability_upstream(stability),
        stability_upstream(stability, "stability-b", priority=1),
    ]
    gw: Gateway = start_gateway(make_settings(tmp_path, upstreams), tmp_path)
    caplog.set_level(logging.INFO)
    try:
        keys = [gw.create_key() for _ in range(3)]
        rng = random.Random(19)
        # Faults that some requests will meet: moderation refusals and failovers, per provider.
        google.enqueue(
            Outcome("finish", detail="IMAGE_SAFETY", path=":generateContent", times=3),
            Outcome("status", status=503, body=b'{"error": {"code": 503, "message": "busy"}}', times=3),
            Outcome("filtered", detail=1, path=":predict", times=2),
        )
        bfl.enqueue(
            Outcome("content_moderated", path="/v1/flux", times=2),
            Outcome("status", status=429, body=b'{"detail": "slow down"}', path="/v1/flux", times=2),
        )
        stability.enqueue(
            Outcome("content_filtered", times=2), Outcome("status", status=500, body=b"{}", times=2)
        )
        fal.enqueue(
            Outcome("nsfw", detail=4, path="/fal-ai/", times=2),
            Outcome("status", status=503, body=b'{"detail": "busy"}', path="/fal-ai/", times=2),
        )
        replicate.enqueue(
            Outcome("nsfw", path="/predictions", times=2),
            Outcome("status", status=429, body=b'{"detail": "slow down"}', path="/predictions", times=2),
        )
        plan: list[tuple[str, int]] = [
            (
                rng.choice(
                    [
                        "gemini-2.5-flash-image",
                        "imagen-4.0-generate-001",
                        "flux-pro-1.1",
                        "stable-image-core",
                        "fal-flux-dev",
                        "replicate-flux-schnell",
                    ]
                ),
                rng.randint(1, 3),
            )
            for _ in range(REQUESTS)
        ]

        def run(index: int) -> str:
            model, n = plan[index]
            key, _ = keys[index % len(keys)]
            try:
                gw.client(key).images.generate(model=model, prompt=f"p{index}", n=n, size="1024x1024")
                return "ok"
            except openai.APIStatusError as exc:
                return str(exc.code)

        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(run, range(REQUESTS)))
        # The usage report groups provider models like OpenAI's: per model, the ledger's sums.
        report = gw.admin("GET", "/admin/usage", params={"group_by": "model"}).json()
    finally:
        gw.close()
    rows = gw.ledger()
    for group in report["data"]:
        mine = [r for r in rows if r["model"] == group["model"]]
        assert group["requests"] == len(mine)
        assert group["images"] == sum(int(r["images"]) for r in mine)
        assert group["image_output_tokens"] == sum(int(r["image_output_tokens"]) for r in mine)
        assert group["cost_micros"] == sum(int(r["cost_micros"]) for r in mine)
    assert {g["model"] for g in report["data"]} == {r["model"] for r in rows}
    assert "ok" in outcomes and "moderation_blocked" in outcomes, outcomes
    assert set(outcomes) <= {"ok", "moderation_blocked"}, outcomes
    assert books_violations(gw, [key_id for _, key_id in keys]) == []
    billed = [r for r in gw.ledger() if int(r["images"]) > 0]
    assert {r["model"] for r in billed} >= {
        "gemini-2.5-flash-image",
        "flux-pro-1.1",
        "fal-flux-dev",
        "replicate-flux-schnell",
    }
    # No provider key or host in the logs of all that (failovers and refusals included).
    logged = caplog.text
    secrets = (GOOGLE_KEY, BFL_KEY, STABILITY_KEY, FAL_KEY, REPLICATE_KEY)
    for secret in (*secrets, google.url, bfl.url, stability.url, fal.url, replicate.url):
        assert secret not in logged
    assert "upstream attempt failed" in logged  # the failovers were logged, scrubbed
