"""The catalog's new rules as pure functions: free-size estimates, aliases, lifecycle fields, GIF
rules, the SVG author table, and the multipart nesting of `svg[...]` fields."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.domain.catalog import Catalog, CatalogError
from app.images.admission.validation import nest_fields
from app.upstream.multipart import flatten_field
from tests.conftest import MODELS_FILE

RAW = yaml.safe_load(Path(MODELS_FILE).read_text())
CATALOG = Catalog.from_mapping(RAW)


def caps(name: str) -> Any:
    found = CATALOG.get(name)
    assert found is not None
    return found


def test_free_size_tokens_scale_by_pixels_and_never_undercut_a_listed_size() -> None:
    gpt2 = caps("gpt-image-2")
    # 2048x1152: 2.25x the pixels of 1024x1024 (4160 high tokens), above 1536x1024's 6208.
    assert gpt2.output_tokens_per_image("high", "2048x1152") == math.ceil(4160 * 2048 * 1152 / 1024**2)
    # 1536x864 has fewer pixels than 1536x1024 but more than 1024x1024: scaled, at least 1024x1024's.
    scaled = math.ceil(4160 * 1536 * 864 / 1024**2)
    assert gpt2.output_tokens_per_image("high", "1536x864") == max(scaled, 4160)
    # A listed size keeps its table entry; xhigh and max have their own rows.
    assert gpt2.output_tokens_per_image("high", "1536x1024") == 6208
    assert caps("gpt-image-2.5-flare").output_tokens_per_image("max", "1024x1024") == 16640
    assert caps("gpt-image-2.5-flare").max_output_tokens_per_image("3840x2160") == math.ceil(
        16640 * 3840 * 2160 / 1024**2
    )


def test_aliases_share_their_family_and_keep_their_name() -> None:
    snapshot = caps("gpt-image-2.5-sunburst-2026-09-08")
    family = caps("gpt-image-2.5-sunburst")
    assert snapshot.name == "gpt-image-2.5-sunburst-2026-09-08" and snapshot.alias_of == family.name
    assert snapshot.canonical == family.name and family.canonical == family.name
    assert (snapshot.qualities, snapshot.prices, snapshot.free_size) == (
        family.qualities,
        family.prices,
        family.free_size,
    )
    assert "gpt-image-2-2026-04-21" in CATALOG.names()


def test_every_sdk_model_is_in_the_catalog() -> None:
    import typing

    from openai.types import image_model

    for name in typing.get_args(image_model.ImageModel):
        assert name in CATALOG, name


def test_lifecycle_fields_as_published() -> None:
    assert caps("gpt-image-1").retired_at == dt.date(2026, 10, 23)
    assert caps("gpt-image-1").replacement == "gpt-image-2.5-sunburst"
    for name in ("dall-e-2", "dall-e-3"):
        assert caps(name).retired_at == dt.date(2026, 5, 12)
        assert caps(name).default_response_format == "url"
    assert (
        caps("gpt-image-2").retired_at is None and caps("gpt-image-2").default_response_format == "b64_json"
    )
    noon = dt.datetime(2026, 10, 23, 12, tzinfo=dt.UTC)
    assert caps("gpt-image-1").state(noon) == "retired"
    assert caps("gpt-image-1").state(noon - dt.timedelta(days=1)) == "deprecated"
    assert caps("gpt-image-1.5").state(noon) == "active"


def test_svg_authors_and_the_dearest_fallback() -> None:
    assert CATALOG.svg_authors["gpt-5.5-mini"].input == 250_000
    dearest = CATALOG.svg_author_price("nobody")
    assert dearest.output == max(p.output for p in CATALOG.svg_authors.values())


def broken(change: dict[str, Any]) -> dict[str, Any]:
    raw = yaml.safe_load(Path(MODELS_FILE).read_text())
    for name, fields in change.items():
        raw["models"][name].update(fields)
    return raw


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"gpt-image-1.5": {"output_formats": ["png", "gif"]}}, "models.gpt-image-1.5.gif"),
        ({"gpt-image-1.5": {"retired_at": "soon"}}, "models.gpt-image-1.5.retired_at"),
        ({"gpt-image-1.5": {"replacement": "gpt-image-9"}}, "models.gpt-image-1.5.replacement"),
        ({"gpt-image-1.5": {"aliases": ["gpt-image-1"]}}, "used twice"),
        ({"gpt-image-1.5": {"default_response_format": "png"}}, "default_response_format"),
    ],
)
def test_a_malformed_entry_names_the_field(change: dict[str, Any], words: str) -> None:
    with pytest.raises(CatalogError, match=words.replace(".", r"\.")):
        Catalog.from_mapping(broken(change))


def test_svg_multipart_fields_nest_and_flatten_back() -> None:
    fields = {"svg[model]": "gpt-5.5", "svg[reasoning][effort]": "low", "n": "1", "odd[": "x", "a[]": "y"}
    nested = nest_fields(fields)
    assert nested["svg"] == {"model": "gpt-5.5", "reasoning": {"effort": "low"}}
    assert nested["odd["] == "x" and nested["a[]"] == "y" and nested["n"] == "1"
    assert sorted(flatten_field("svg", nested["svg"])) == [
        ("svg[model]", "gpt-5.5"),
        ("svg[reasoning][effort]", "low"),
    ]
    assert flatten_field("tags", ["a", True]) == [("tags[]", "a"), ("tags[]", "true")]
    assert flatten_field("none", None) == []
    # A bracketed name that clashes with a plain field of the same name stays as it came.
    assert nest_fields({"svg": "plain", "svg[model]": "x"}) == {"svg": "plain", "svg[model]": "x"}
