"""The pure parts of the provider adapters (issue 19): size mapping, host allow-lists, Gemini usage,
the catalog's provider section and credit prices."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from yarl import URL

from app.domain.catalog import Catalog, CatalogError
from app.domain.jobs import ImageJob, ImageResult, TokenUsage
from app.domain.provider_spec import DimensionRule, ProviderSpec, ProviderSpecError, unmapped_fields
from app.images.admission.validation import build_job, parse_generate_request
from app.upstream.call import UpstreamCall
from app.upstream.providers.gemini import usage_of
from app.upstream.providers.native import nearest_ratio, nearest_tier
from app.upstream.providers.polling import host_allowed
from app.upstream.registry import ProviderRegistry, Route
from app.upstream.router import Router
from tests.conftest import MODELS_FILE

GEMINI_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


@pytest.mark.parametrize(
    ("size", "ratio"),
    [
        ("1024x1024", "1:1"),
        ("1536x1024", "3:2"),
        ("1024x1536", "2:3"),
        ("1792x1024", "16:9"),
        ("1024x1792", "9:16"),
        ("3000x1000", "21:9"),  # past the widest: the widest
        ("1100x1000", "1:1"),
        ("1200x1000", "5:4"),
        ("auto", "1:1"),
    ],
)
def test_nearest_ratio(size: str, ratio: str) -> None:
    assert nearest_ratio(size, GEMINI_RATIOS, "1:1") == ratio


def test_nearest_ratio_is_symmetric_on_a_log_scale() -> None:
    # 2:1 is exactly between 16:9 (1.78) and 21:9 (2.33) only on a linear scale; on a log scale it
    # is nearer 16:9, and 1:2 mirrors it to 9:16.
    assert nearest_ratio("2000x1000", GEMINI_RATIOS) == "16:9"
    assert nearest_ratio("1000x2000", ("9:16", "1:1", "16:9", "21:9")) == "9:16"


@pytest.mark.parametrize(
    ("size", "tier"),
    [
        ("1024x1024", "1K"),
        ("1536x1024", "2K"),
        ("1400x1000", "1K"),
        ("2048x2048", "2K"),
        ("3840x2160", "4K"),
        ("auto", None),
    ],
)
def test_nearest_tier(size: str, tier: str | None) -> None:
    assert nearest_tier(size, {"1K": 1024, "2K": 2048, "4K": 4096}) == tier


@pytest.mark.parametrize(
    ("asked", "fitted"),
    [
        ((1024, 1024), (1024, 1024)),
        ((1536, 1024), (1440, 960)),
        ((1000, 1000), (992, 992)),
        ((100, 200), (256, 512)),
        ((4000, 1000), (1440, 352)),
    ],
)
def test_flux_dimensions_keep_the_ratio_within_bounds(
    asked: tuple[int, int], fitted: tuple[int, int]
) -> None:
    assert DimensionRule(multiple=32, min=256, max=1440).fit(*asked) == fitted


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://delivery-eu1.bfl.ai/results/x.png?sig=1", True),
        ("https://bfl.ai/x", False),  # *.bfl.ai is subdomains only
        ("https://bfl.ai.evil.example/x", False),
        ("https://evilbfl.ai/x", False),
        ("http://169.254.169.254/latest/meta-data", False),
        ("http://127.0.0.1:8123/delivery/x", True),
        ("http://127.0.0.1:9999/delivery/x", False),
    ],
)
def test_delivery_host_allow_list(url: str, allowed: bool) -> None:
    assert host_allowed(URL(url), ["*.bfl.ai", "127.0.0.1:8123"]) is allowed


def test_gemini_usage_splits_tokens_by_modality() -> None:
    metadata = {
        "promptTokenCount": 270,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 12},
            {"modality": "IMAGE", "tokenCount": 258},
        ],
        "candidatesTokenCount": 1300,
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}],
        "thoughtsTokenCount": 40,
        "totalTokenCount": 1610,
    }
    assert usage_of(metadata) == TokenUsage(text_input=12, image_input=258, text_output=50, image_output=1290)
    # Without details, output tokens count as image output (what an image model makes).
    assert usage_of({"promptTokenCount": 5, "candidatesTokenCount": 1290}) == TokenUsage(
        text_input=5, image_output=1290
    )
    assert usage_of(None) == TokenUsage()


def test_provider_section_is_validated() -> None:
    base: dict[str, Any] = {"kind": "gemini", "model": "m"}
    assert ProviderSpec.from_mapping(base, where="x").native_formats == ("png",)
    for bad, field in [
        ({**base, "kind": ""}, "kind"),
        ({"kind": "gemini"}, "model"),
        ({**base, "aspect_ratios": ["16x9"]}, "aspect_ratios"),
        ({**base, "resolutions": {"1K": 1024}, "quality_resolutions": {"hd": "2K"}}, "quality_resolutions"),
        ({**base, "aspect_ratios": ["16:9"], "default_ratio": "1:1"}, "default_ratio"),
    ]:
        with pytest.raises(ProviderSpecError, match=field):
            ProviderSpec.from_mapping(bad, where="models.m.provider")


def test_unmapped_fields_only_for_provider_models() -> None:
    spec = ProviderSpec(kind="bfl", model="flux", params={"seed": "seed"})
    assert unmapped_fields(["seed", "steps", "guidance"], spec) == ["guidance", "steps"]
    assert unmapped_fields(["steps"], None) == []


def test_catalog_provider_models_and_credit_prices() -> None:
    catalog = Catalog.from_file(MODELS_FILE)
    core = catalog.get("stable-image-core")
    assert core is not None and core.provider is not None and core.provider.model == "core"
    assert core.prices.per_image == {"*": {"*": 30_000}}  # 3 credits x 0.01
    sd35 = catalog.get("sd3.5-large")
    assert sd35 is not None and sd35.prices.per_image == {"*": {"*": 65_000}}
    gemini = catalog.get("gemini-2.5-flash-image")
    assert gemini is not None and gemini.reports_usage and not gemini.prices.per_image
    kontext_max = catalog.get("flux-kontext-max")
    assert kontext_max is not None and kontext_max.provider is not None
    assert kontext_max.provider.model == "flux-kontext-max" and kontext_max.provider.aspect_ratios


def test_catalog_rejects_a_bad_provider_section() -> None:
    raw = {
        "models": {
            "m": {
                "family": "flux",
                "max_prompt_chars": 10,
                "sizes": ["1024x1024"],
                "qualities": ["auto"],
                "provider": {"kind": "flux", "model": "x"},
            }
        }
    }
    # The catalog cannot know the adapters' kinds: the registry refuses it, at startup.
    with pytest.raises(ValueError, match=r"models\.m\.provider\.kind: 'flux' is not an upstream kind"):
        ProviderRegistry.build([], Catalog.from_mapping(raw))
    raw["models"]["m"]["provider"] = {"kind": "bfl", "model": "x"}
    raw["models"]["m"]["prices"] = {"credits_per_image": "three", "credit_price": 0.01}
    with pytest.raises(CatalogError, match="credits_per_image"):
        Catalog.from_mapping(raw)


def test_openai_fields_no_adapter_translates_are_refused_too() -> None:
    spec = ProviderSpec(kind="gemini", model="m")
    assert unmapped_fields(["size", "n", "quality", "moderation", "complexity"], spec) == ["complexity"]


class _Recorder:
    """A provider that records which upstream was asked."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self._calls = calls

    async def generate(self, job: ImageJob, *, upstream_model: str, call: UpstreamCall) -> ImageResult:
        self._calls.append(self.name)
        return ImageResult({"created": 1, "data": [{"b64_json": "AA=="}]})

    async def probe(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def test_a_resumed_job_is_routed_only_to_the_upstream_that_has_it() -> None:
    catalog = Catalog.from_file(MODELS_FILE)
    caps = catalog.get("flux-pro-1.1")
    assert caps is not None
    request = parse_generate_request({"model": "flux-pro-1.1", "prompt": "x"})
    job = build_job(request=request, caps=caps, request_id="req-1")
    calls: list[str] = []
    providers = [_Recorder(name, calls) for name in ("flux-a", "flux-b")]
    routes = {
        "flux-pro-1.1": [Route(p, "flux-pro-1.1", 1, priority) for priority, p in enumerate(providers)]  # type: ignore[arg-type]
    }
    router = Router(ProviderRegistry(routes, providers))  # type: ignore[arg-type]

    asyncio.run(router.generate(job))
    resumed = UpstreamCall(resume={"upstream": "flux-b", "jobs": [{"id": "j", "polling_url": "u"}]})
    asyncio.run(router.generate(job, call=resumed))
    assert calls == ["flux-a", "flux-b"]


def test_edit_model_ids_default_to_the_model_and_are_checked() -> None:
    plain = ProviderSpec.from_mapping({"kind": "k", "model": "m"}, where="models.x.provider")
    assert (plain.edit_model_for(1), plain.edit_model_for(3)) == ("m", "m")
    one = ProviderSpec.from_mapping({"kind": "k", "model": "m", "edit_model": "e"}, where="p")
    assert (one.edit_model_for(1), one.edit_model_for(2)) == ("e", "e")
    both = ProviderSpec.from_mapping(
        {"kind": "k", "model": "m", "edit_model": "e", "multi_edit_model": "e/multi"}, where="p"
    )
    assert (both.edit_model_for(1), both.edit_model_for(2)) == ("e", "e/multi")
    with pytest.raises(ProviderSpecError, match=r"models\.x\.provider\.multi_edit_model"):
        ProviderSpec.from_mapping(
            {"kind": "k", "model": "m", "multi_edit_model": 3}, where="models.x.provider"
        )
