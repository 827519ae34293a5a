"""Image request and response bodies, named as in the openai-python types."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from app.schemas.base import WireModel


class SvgReasoning(WireModel):
    """``svg.reasoning``: the SVG author's reasoning effort (values checked in validation)."""

    effort: StrictStr | None = None


class SvgOptions(WireModel):
    """``svg``: which model authors SVG output and how hard it reasons (``output_format=svg``)."""

    model: StrictStr | None = None
    reasoning: SvgReasoning | None = None


class ImageGenerateRequest(WireModel):
    """``POST /v1/images/generations``. Types are strict (JSON ``"2"`` is not ``n=2``); allowed
    values depend on the model, so they are checked against the catalog in
    ``images/admission/validation.py``."""

    prompt: StrictStr
    model: StrictStr
    n: StrictInt | None = None
    size: StrictStr | None = None
    quality: StrictStr | None = None
    background: StrictStr | None = None
    output_format: StrictStr | None = None
    output_compression: StrictInt | None = None
    moderation: StrictStr | None = None
    stream: StrictBool | None = None
    partial_images: StrictInt | None = None
    response_format: StrictStr | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    complexity: StrictStr | None = None
    frame_count: StrictInt | None = None
    frame_duration_ms: StrictInt | None = None
    svg: SvgOptions | None = None


class ImageData(BaseModel):
    model_config = ConfigDict(extra="allow")

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """The success body. The gateway relays the upstream's dict as is; this documents its shape."""

    model_config = ConfigDict(extra="allow")

    created: int
    data: list[ImageData]
    background: str | None = None
    output_format: str | None = None
    quality: str | None = None
    size: str | None = None
    usage: dict[str, Any] | None = None
    safety_identifier: str | None = None
    svg_usage: dict[str, Any] | None = None


class ModelObject(BaseModel):
    """OpenAI's model object, plus the gateway's lifecycle fields (clients ignore extra fields)."""

    id: str
    object: str = "model"
    created: int
    owned_by: str
    # active | legacy (superseded, still served) | deprecated (a retirement is scheduled) | retired
    state: str = "active"
    retired_at: str | None = None
    replacement: str | None = None
    # Set on a dated snapshot: the family entry it is an alias of.
    alias_of: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


class ImageEditForm(WireModel):
    """``POST /v1/images/edits`` form fields (the files travel separately, spooled to disk).

    Multipart sends everything as text, so numbers and booleans are parsed from strings here
    (``"2"`` → 2, ``"true"`` → True); anything else the client sends is forwarded upstream as is.
    """

    prompt: str
    model: str
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    stream: bool | None = None
    partial_images: int | None = None
    response_format: str | None = None
    input_fidelity: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    complexity: str | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    # From the ``svg[model]`` and ``svg[reasoning][effort]`` parts (see uploads.nest_fields).
    svg: SvgOptions | None = None
